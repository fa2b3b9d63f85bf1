"""Run a ModelGraph: as it is, or compiled ahead of time by AOTInductor with an on-disk cache.

Inductor's compile of a whole decoder graph takes minutes on a small CPU (84 s for SmolLM2's
30-block decode graph, a quarter of an hour for its tree graph); paying it in every process
would cancel the speed-up. :func:`compiled` cuts the graph into prologue, blocks and epilogue
(:mod:`tokenfx.runtime.regional`) and packages each *distinct* piece once with
``torch._inductor.aoti_compile_and_package`` — a uniform decoder compiles three small graphs,
whatever its depth — keyed by the piece's code, shapes, device and the torch version (the
weights are inputs, so a package serves every model of that architecture). Packages live under
``$TOKENFX_CACHE`` (default ``~/.cache/tokenfx``); a later process loads them in about a second.
A graph that does not cut into uniform blocks is packaged whole, keyed by its weights too.
The result is called like the graph (same inputs, same outputs) with no Python per-op
dispatch or guard evaluation per call.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tokenfx.cache import cache_dir
from tokenfx.ir.graph import ModelGraph


def compile_mode(compile) -> tuple[bool, bool]:
    """``(compile, strict)`` for a runtime's ``compile=`` True / False / "auto" (strict: a failed
    compile raises; "auto" compiles unless ``TOKENFX_COMPILE=0`` and falls back on failure)."""
    from tokenfx.errors import GenerationError

    if compile == "auto":
        return os.environ.get("TOKENFX_COMPILE", "1").lower() not in ("0", "false", "off", "no"), False
    if isinstance(compile, bool):
        return compile, True
    raise GenerationError(f"compile must be True, False or 'auto', got {compile!r}")


def lower(graph: ModelGraph) -> ModelGraph:
    """``graph`` as the runtime runs it on CPU: each ``aten.linear`` over a weight of the graph
    becomes ``tokenfx::linear`` (the GEMM picked by row count, :mod:`tokenfx.codegen.linear`).
    A new ModelGraph (the given one is not changed), or the same one when nothing matched."""
    from tokenfx.codegen.linear import lower_linears

    if not on_cpu(graph):
        return graph
    lowered = graph.clone()
    if not lower_linears(lowered.gm.graph, {n for n in lowered.gm.graph.nodes if n.op == "get_attr"}):
        return graph
    lowered.gm.recompile()
    return lowered


def on_cpu(graph: ModelGraph) -> bool:
    return all(a.device.type == "cpu" for a in graph.example_args if isinstance(a, torch.Tensor))


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


def compiled(graph: ModelGraph, label: str, *, progress: bool = True, blockwise: bool = True):
    """``graph`` compiled by AOTInductor (from the disk cache when present); returns a callable
    (a :class:`~tokenfx.runtime.regional.Blockwise` runner when the graph cuts into blocks)."""
    from tokenfx.runtime import regional

    if blockwise:
        try:
            pieces = regional.partition(graph)
        except regional.Uncuttable:
            pieces = None
        if pieces is not None:
            examples = regional.example_values(graph, pieces)
            device = next((a.device.type for a in graph.example_args if isinstance(a, torch.Tensor)), "cpu")
            paths, todo = {}, []
            for key, (args, dynamic) in examples.items():
                piece = next(p for p in pieces if p.key == key)
                kind = "prologue" if piece is pieces[0] else "epilogue" if piece is pieces[-1] else "block"
                ops = _inlined_ops_of(piece.gm, args)
                # keyed by the piece's code alone: a block shared by several graphs (early-exit pieces
                # of the tree graph) compiles once
                parts = (kind, key, torch.__version__, device, *(f"inline:{op}" for op in sorted(map(str, ops))))
                paths[key] = cache_dir() / "aoti" / f"{kind}-{_content_hash(parts, [])}.pt2"
                if not paths[key].exists():
                    todo.append((key, kind, piece, args, dynamic, ops))
            if todo:
                with _Progress(f"compiling the {label} graph with AOTInductor", len(todo), progress) as bar:
                    for i, (key, kind, piece, args, dynamic, ops) in enumerate(todo):
                        bar.step(f"the {label} graph's {kind} ({i + 1} of {len(todo)}; "
                                 f"{len(pieces)} pieces share {len(examples)} packages, cached in {cache_dir() / 'aoti'})")
                        _package(piece.gm, args, dynamic, ops, paths[key])
            return regional.Blockwise(graph, pieces, {key: _load(path) for key, path in paths.items()})
    graph = lower(graph)
    key = graph_key(graph, label)
    path = cache_dir() / "aoti" / f"{label}-{key}.pt2"
    if not path.exists():
        with _status(f"compiling the {label} graph with AOTInductor (once; cached in {path.parent})", progress):
            _package(graph.gm, graph.example_args, graph.dynamic_shapes, _inlined_ops(graph), path)
    return _load(path)


def _package(gm, args, dynamic_shapes, table: dict, path: Path) -> None:
    """Export ``gm`` at ``args`` and write its AOTInductor package to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch-internal pytree / dynamic-shape deprecation noise
        ep = torch.export.export(gm, tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
        if table:  # on CPU a tokenfx op runs its plain-torch reference: let Inductor compile it in place
            ep = ep.run_decompositions(table)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            staged = Path(tmp) / path.name
            torch._inductor.aoti_compile_and_package(ep, package_path=str(staged))
            os.replace(staged, path)  # atomic: a concurrent reader sees the whole package or none


def _inlined_ops_of(gm, args) -> dict:
    """``{op: reference}`` for the tokenfx ops of a CPU graph (a Python callback from the compiled
    package per call cost ~0.3 ms for ``tree_attention``); GPU graphs keep the ops (Triton kernels)."""
    from tokenfx.codegen.ops import registered_ops

    if any(a.device.type != "cpu" for a in args if isinstance(a, torch.Tensor)):
        return {}
    present = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    return {spec.op: spec.reference for spec in registered_ops().values() if spec.op in present}


def _inlined_ops(graph: ModelGraph) -> dict:
    return _inlined_ops_of(graph.gm, graph.example_args)


def _load(path: Path):
    # the package calls tokenfx ops by schema: register them even when no graph was built here
    from torch.utils import _pytree as pytree

    from tokenfx.codegen import add_norm, kv_compact, kv_write, linear, tree_attention  # noqa: F401

    loader = torch._inductor.aoti_load_package(str(path)).loader
    # the package's own __call__ parses its pytree specs from JSON on every call (~20 µs, and a
    # block-wise decode step makes one call per block): parse them once
    out_spec = pytree.treespec_loads(loader.get_call_spec()[1])
    run = loader.boxed_run

    def call(*args):
        # the package was compiled for contiguous inputs and reads them by those strides
        flat = [a if not isinstance(a, torch.Tensor) or a.is_contiguous() else a.contiguous() for a in args]
        return pytree.tree_unflatten(run(flat), out_spec)

    call.package = path
    return call


class _Progress:
    """A progress bar over a compile's pieces, naming the one in work, with the elapsed time."""

    def __init__(self, text: str, total: int, enabled: bool):
        self.text, self.total, self.enabled, self._bar, self._task = text, total, enabled, None, None

    def __enter__(self):
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.text, total=self.total)
        self._start = time.perf_counter()
        self._count = 0
        return self

    def step(self, what: str) -> None:
        elapsed = time.perf_counter() - self._start
        if self._bar is not None:
            self._bar.update(self._task, completed=self._count, description=f"compiling {what}")
        elif self.enabled:
            print(f"tokenfx: compiling {what} [{elapsed:.0f} s]", file=sys.stderr, flush=True)
        self._count += 1

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.update(self._task, completed=self.total)
            self._bar.__exit__(*exc)


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


# -- the graphs of one model, remembered as a set (a Generator's prefill + decode, tree, early-exit pieces) --
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


def load_or_build(key: str | None, labels: tuple[str, ...], build, module: torch.nn.Module | None = None):
    """The one compile-cache lookup for a model's graphs: ``({label: runner}, meta)``.

    When ``key`` (a :func:`module_key`) names a set that an earlier process remembered with
    every one of ``labels``, the runners are loaded from their packages (no capture, no pass).
    Otherwise ``build()`` returns the pair, and its runners are added to the set under ``key``
    (``meta`` merged into the set's) when every one is compiled (an fx graph, run when a
    compile failed or was not asked for, is not remembered). ``key`` None: build, remember
    nothing. Block-wise runners name their weights by their path in ``module`` (tables a pass
    computed are saved beside the index)."""
    if key is not None:
        warm = _load_set(key, labels, module)
        if warm is not None:
            return warm
    runners, meta = build()
    if key is not None and all(_is_compiled(run) for run in runners.values()):
        _remember(key, runners, meta, module)
    return runners, meta


def _is_compiled(run) -> bool:
    from tokenfx.runtime.regional import Blockwise

    return isinstance(run, Blockwise) or hasattr(run, "package")


def _read_set(key: str) -> dict | None:
    import json

    index = cache_dir() / "sets" / f"{key}.json"
    if not index.exists():
        return None
    try:
        entry = json.loads(index.read_text())
    except json.JSONDecodeError:
        return None  # a damaged record: build again
    return entry if isinstance(entry, dict) else None


def _remember(key: str, runners: dict, meta: dict, module) -> None:
    entry = _read_set(key) or {}
    graphs, known = entry.get("graphs") or {}, entry.get("meta") or {}
    graphs.update({label: _entry(key, label, run, module) for label, run in runners.items()})
    _write_set(key, {"graphs": graphs, "meta": {**known, **meta}})


def _load_set(key: str, labels: tuple[str, ...], module):
    entry = _read_set(key)
    if entry is None:
        return None
    try:
        runners = {label: _open(entry["graphs"][label], module) for label in labels}
    except (KeyError, TypeError, FileNotFoundError, OSError):
        return None  # an old or partial record: build again
    return runners, entry.get("meta") or {}


def _entry(key: str, label: str, run, module) -> dict:
    from tokenfx.runtime.regional import Blockwise

    if not isinstance(run, Blockwise):
        return {"package": str(run.package)}
    if module is None:
        raise ValueError("a block-wise runner is remembered with the module that owns its weights")
    plan, extras = run.describe(module)
    extras_file = None
    if extras:
        from safetensors.torch import save_file

        extras_file = cache_dir() / "sets" / f"{key}-{label}.safetensors"
        extras_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = extras_file.with_suffix(".tmp")
        save_file(extras, str(tmp))
        os.replace(tmp, extras_file)
    return {"blockwise": plan, "extras": str(extras_file) if extras_file else None}


def _open(graph: dict, module):
    if "package" in graph:
        path = Path(graph["package"])
        if not path.exists():
            raise FileNotFoundError(path)
        return _load(path)
    from tokenfx.runtime.regional import Blockwise

    if module is None or not all(Path(s["package"]).exists() for s in graph["blockwise"]["steps"]):
        raise FileNotFoundError("a package of the set is gone")
    extras = {}
    if graph.get("extras"):
        from safetensors.torch import load_file

        extras = load_file(graph["extras"])
    return Blockwise.restore(graph["blockwise"], module, extras, lambda path: _load(Path(path)))


def _write_set(key: str, entry: dict) -> None:
    import json

    index = cache_dir() / "sets" / f"{key}.json"
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, index)
