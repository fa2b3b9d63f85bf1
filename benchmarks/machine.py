"""What the benchmarks record about the machine and the code they ran (shared by every script)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

import tokenfx


def machine_info() -> dict:
    model_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenfx": getattr(tokenfx, "__version__", "unknown"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor(),
        "cpu_model": model_name,
        "machine": platform.machine(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda_available": torch.cuda.is_available(),
        "tokenfx_source": source_fingerprint(),
    }


def source_fingerprint() -> dict:
    """Git HEAD and a hash of the package's .py files as they are on disk (the tree may be uncommitted)."""
    import hashlib
    import subprocess

    package = Path(tokenfx.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode())
        h.update(path.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=package, capture_output=True,
                                    text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        head, dirty = None, None
    return {"git_head": head, "uncommitted_changes": dirty, "py_sha256": h.hexdigest()[:16]}


def save_figure(fig, path, machine: dict, title: str) -> None:
    """Title ``fig`` with what ran and on which CPU (``machine_info()``), write it to ``path``, close it."""
    import matplotlib.pyplot as plt

    cpu = machine["cpu_model"] or machine["processor"] or machine["machine"]
    fig.suptitle(f"{title}, CPU: {cpu}, {machine['cpu_count']} cores, {machine['torch_threads']} torch thread(s)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
