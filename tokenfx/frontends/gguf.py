"""GGUF files (llama.cpp's format) as standard Hugging Face directories.

``transformers`` reads a GGUF file and dequantizes its weights to float32; doing that in every
process costs ~15 s for a 135 M model, so :func:`hf_directory` converts once into
``$TOKENFX_CACHE/models/<stem>-<digest>/`` (config, ``model.safetensors``, tokenizer, chat
template) and later calls return that directory. The conversion is written to a temporary
directory and renamed into place, so a failed or concurrent run never leaves half a model.

The weights are the GGUF file's *dequantized* values: a Q4_1 file gives float32 weights that
are exactly what llama.cpp multiplies by, so every output is checked against HF running
the same converted weights, not against the original unquantized checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tokenfx.cache import cache_dir
from tokenfx.errors import ModelLoadError


def architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (``llama``, ``qwen2`` …)."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelLoadError("reading a GGUF file needs the gguf package: pip install gguf accelerate") from exc
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise ModelLoadError(f"{path}: not a model GGUF file (no general.architecture field)") from None
    except Exception as exc:  # the reader raises ValueError / struct errors on a corrupt file
        raise ModelLoadError(f"{path} is not a valid GGUF file: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc


def hf_directory(path: Path) -> Path:
    """The Hugging Face directory converted from GGUF file ``path`` (converted on first use)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such GGUF file: {path}")
    target = cache_dir() / "models" / f"{path.stem}-{_digest(path)}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    arch = architecture(path)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported (transformers reads "
                             f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    _convert(path, target)
    return target


def _convert(path: Path, target: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    from rich.console import Console

    with Console(stderr=True).status(f"converting {path.name} to a Hugging Face directory (once; kept in {target.parent})"):
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load {path} with transformers: {first}") from exc
        # the weights are dequantized already: what is saved is a plain float32 checkpoint
        if getattr(model, "hf_quantizer", None) is not None:
            del model.hf_quantizer
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            if target.exists():  # a concurrent conversion won
                shutil.rmtree(tmp)
                return
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
