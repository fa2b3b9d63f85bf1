"""Where tokenfx keeps what it builds once and reuses across processes: ``$TOKENFX_CACHE``
(default ``~/.cache/tokenfx``) — converted models (``models/``), compiled packages (``aoti/``),
the index of a model's compiled graphs (``sets/``) and drafter state (``drafters/``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENFX_CACHE", Path.home() / ".cache" / "tokenfx"))
