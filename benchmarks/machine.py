"""What every benchmark script shares: quiet libraries, its command line's common options, the
run's start-up (threads, output folder, console, clock, machine record) and its outputs (JSON
+ PNG titled with the machine).

A script reads::

    from machine import benchmark_parser, quiet_libraries, start_run
    quiet_libraries()            # before transformers is imported

    parser = benchmark_parser(__doc__)                  # --threads and --out, the rest its own
    args = parser.parse_args(argv)
    run = start_run("generate", args, console_width=150)  # threads set, --out made, machine noted
    with run.progress(64) as progress: ...
    run.save(results, plot)                             # <out>/generate.json and .png
    run.print_written(results)

Nothing heavy is imported at module level: a script imports this first, and may point
Inductor's cache at a fresh folder (:func:`temporary_caches`) before torch is imported.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
THREADS_HELP = ("torch intra-op threads (default 1: on a machine shared with other work, more threads stall at "
                "OpenMP barriers)")
_CACHE_PREFIX = {"TOKENFX_CACHE": "tokenfx-bench-cache-", "TORCHINDUCTOR_CACHE_DIR": "tokenfx-bench-inductor-"}


# -- before the heavy imports ----------------------------------------------------------------------
def quiet_libraries() -> None:
    """Keep transformers' warnings, the hub's progress bars and tokenizers' fork warning out of the
    printed tables; they read these once, at import."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def temporary_caches(*variables: str) -> None:
    """Point each cache variable (``TOKENFX_CACHE``, ``TORCHINDUCTOR_CACHE_DIR``) at a fresh
    temporary folder, removed when the process exits, so compiles are timed cold. Call before
    torch is imported: Inductor reads its cache folder once."""
    for variable in variables:
        folder = tempfile.mkdtemp(prefix=_CACHE_PREFIX[variable])
        os.environ[variable] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


# -- the command line ------------------------------------------------------------------------------
def benchmark_parser(doc: str, *, threads: int | None = 1, threads_help: str = THREADS_HELP) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's docstring, with ``--threads`` (torch
    intra-op threads, at least 1; ``threads=None``: torch's own choice) and ``--out`` (the output
    folder, default benchmarks/results)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=_at_least_one, default=threads, help=threads_help)
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: benchmarks/results)")
    return parser


def add_modes(parser: argparse.ArgumentParser, *, default: str, quick: str, full: str | None = None) -> None:
    """``--quick`` (and ``--full`` where ``full`` describes it) into ``args.mode``, ``default``
    when neither is given; ``quick`` / ``full`` are their help texts."""
    if full is None:
        parser.add_argument("--quick", dest="mode", action="store_const", const="quick", default=default, help=quick)
        return
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="mode", action="store_const", const="quick", help=quick)
    group.add_argument("--full", dest="mode", action="store_const", const="full", help=full)
    parser.set_defaults(mode=default)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """One benchmark run: where it writes, what it prints on, when it started, on what machine."""

    name: str
    out: Path
    console: object  # rich.console.Console
    started: float
    machine: dict

    def progress(self, description_width: int):
        """A progress bar on the run's console: description, bar, done / total, time elapsed."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn(f"{{task.description:<{description_width}}}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=self.console)

    @property
    def json_path(self) -> Path:
        return self.out / f"{self.name}.json"

    @property
    def png_path(self) -> Path:
        return self.out / f"{self.name}.png"

    def save(self, results: dict, plot) -> None:
        """Stamp ``results["total_runtime_s"]``, write ``<out>/<name>.json`` and draw
        ``plot(results, <out>/<name>.png)``."""
        results["total_runtime_s"] = time.perf_counter() - self.started
        self.json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        plot(results, self.png_path)

    def print_written(self, results: dict) -> None:
        self.console.print(f"wrote {self.json_path} and {self.png_path} in {results['total_runtime_s']:.0f} s")


def start_run(name: str, args: argparse.Namespace, *, console_width: int | None = None) -> Run:
    """Set torch's threads from ``--threads`` (None: leave torch's choice), make ``--out``, open a
    console at least ``console_width`` wide, start the clock and note the machine (its load
    average now, before the run's own work)."""
    import torch
    from rich.console import Console

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console() if console_width is None else Console(width=max(Console().width, console_width))
    return Run(name, args.out, console, time.perf_counter(), machine_info())


# -- what ran, where -------------------------------------------------------------------------------
def machine_info() -> dict:
    import torch
    import transformers

    import tokenfx

    model_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
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

    import tokenfx

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


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: figures go to files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, machine: dict, title: str, note: str = "") -> None:
    """Title ``fig`` with what ran and on which CPU (``machine_info()``) and an optional ``note``
    after it, write it to ``path``, close it."""
    import matplotlib.pyplot as plt

    cpu = machine["cpu_model"] or machine["processor"] or machine["machine"]
    fig.suptitle(f"{title}, CPU: {cpu}, {machine['cpu_count']} cores, {machine['torch_threads']} torch thread(s)"
                 + (f". {note}" if note else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
