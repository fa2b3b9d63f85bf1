"""Run a ModelGraph: as it is, or compiled ahead of time by AOTInductor with an on-disk cache.

Inductor's compile of a decoder graph takes 20–80 s on a small CPU; paying it in every
process would cancel the speed-up. :func:`compiled` packages the graph with
``torch._inductor.aoti_compile_and_package`` once and keeps the package under
``$TOKENFX_CACHE`` (default ``~/.cache/tokenfx``), keyed by the graph's code, the bytes of
its weights, its dynamic shapes, the device and the torch version. A later process loads
the package in well under a second. The package is called like the graph (same inputs,
same outputs) and has no Python per-op dispatch or guard evaluation per call.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from tokenfx.ir.graph import ModelGraph


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENFX_CACHE", Path.home() / ".cache" / "tokenfx"))


def graph_key(graph: ModelGraph, label: str) -> str:
    """Content hash of everything the compiled artifact depends on."""
    inlined = sorted(str(op) for op in _inlined_ops(graph))  # compiled from their references (see compiled())
    parts = (label, torch.__version__, graph.gm.code, repr(graph.dynamic_shapes), *(f"inline:{op}" for op in inlined),
             repr([(tuple(a.shape), a.dtype, a.device.type) for a in graph.example_args]))
    return _content_hash(parts, sorted(list(graph.gm.named_parameters()) + list(graph.gm.named_buffers()),
                                       key=lambda kv: kv[0]))


def _content_hash(parts, named_tensors) -> str:
    """sha256 over ``parts`` and the names, shapes, dtypes, devices and bytes of ``named_tensors``."""
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode())
    for name, value in named_tensors:
        h.update(name.encode())
        h.update(str((tuple(value.shape), value.dtype, value.device.type)).encode())
        h.update(value.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def compiled(graph: ModelGraph, label: str, *, progress: bool = True):
    """``graph`` compiled by AOTInductor (from the disk cache when present); returns a callable."""
    key = graph_key(graph, label)
    path = cache_dir() / "aoti" / f"{label}-{key}.pt2"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        ep = torch.export.export(graph.gm, graph.example_args, dynamic_shapes=graph.dynamic_shapes, strict=False)
        table = _inlined_ops(graph)
        if table:  # on CPU a tokenfx op runs its plain-torch reference: let Inductor compile it in place
            ep = ep.run_decompositions(table)
        with _status(f"compiling the {label} graph with AOTInductor (once; cached in {path.parent})", progress):
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree deprecation noise
                staged = Path(tmp) / path.name
                torch._inductor.aoti_compile_and_package(ep, package_path=str(staged))
                os.replace(staged, path)  # atomic: a concurrent reader sees the whole package or none
    return _load(path)


def _inlined_ops(graph: ModelGraph) -> dict:
    """``{op: reference}`` for the tokenfx ops of a CPU graph (a Python callback from the compiled
    package per call cost ~0.3 ms for ``tree_attention``); GPU graphs keep the ops (Triton kernels)."""
    from tokenfx.codegen.ops import registered_ops

    if any(a.device.type != "cpu" for a in graph.example_args if isinstance(a, torch.Tensor)):
        return {}
    present = {n.target for n in graph.gm.graph.nodes if n.op == "call_function"}
    return {spec.op: spec.reference for spec in registered_ops().values() if spec.op in present}


def _load(path: Path):
    # the package calls tokenfx ops by schema: register them even when no graph was built here
    from tokenfx.codegen import add_norm, kv_compact, kv_write, tree_attention  # noqa: F401

    runner = torch._inductor.aoti_load_package(str(path))

    def call(*args):
        # the package was compiled for contiguous inputs and reads them by those strides
        return runner(*(a if not isinstance(a, torch.Tensor) or a.is_contiguous() else a.contiguous() for a in args))

    call.package = path
    return call


class _status:
    def __init__(self, text: str, enabled: bool):
        self.text, self.enabled, self._ctx = text, enabled, None

    def __enter__(self):
        if self.enabled and not sys.stderr.isatty():
            print(f"tokenfx: {self.text}", file=sys.stderr, flush=True)
        elif self.enabled:
            from rich.console import Console

            self._ctx = Console(stderr=True).status(self.text)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


# -- whole sets of graphs for one model (a Generator's prefill + decode) ----------------------------------
def module_key(module: torch.nn.Module, label: str) -> str:
    """Content hash of a model and of the tokenfx / torch code that would turn it into graphs."""
    config = getattr(module, "config", None)
    parts = (label, type(module).__qualname__, torch.__version__, _package_digest(),
             config.to_json_string() if hasattr(config, "to_json_string") else repr(config))
    return _content_hash(parts, list(module.named_parameters()) + list(module.named_buffers()))


def _package_digest() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()


def remember_compiled_set(key: str, runners: dict, meta: dict) -> None:
    """Record which packages a model's graphs compiled to (``runners`` from :func:`compiled`), so
    the next process can skip building them."""
    import json

    entry = {"packages": {label: str(run.package) for label, run in runners.items()}, "meta": meta}
    index = cache_dir() / "sets" / f"{key}.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, index)


def remember_compiled(key: str, label: str, run) -> None:
    """Add one package to a model's set (graphs built on demand, such as early-exit pieces)."""
    import json

    index = cache_dir() / "sets" / f"{key}.json"
    entry = {"packages": {}, "meta": {}}
    if index.exists():
        try:
            entry = json.loads(index.read_text())
        except json.JSONDecodeError:
            pass
    entry["packages"][label] = str(run.package)
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, index)


def load_compiled_set(key: str, labels: tuple[str, ...]):
    """``((callable, …), meta)`` for a model remembered by :func:`remember_compiled_set`, else None."""
    import json

    index = cache_dir() / "sets" / f"{key}.json"
    if not index.exists():
        return None
    try:
        entry = json.loads(index.read_text())
        paths = [Path(entry["packages"][label]) for label in labels]
    except (json.JSONDecodeError, KeyError):
        return None
    if not all(p.exists() for p in paths):
        return None
    return tuple(_load(p) for p in paths), entry["meta"]
