"""``tokenfx::linear``: ``x @ w.T (+ b)`` through the fastest CPU GEMM for the row count.

On CPU at decode sizes the weights stream from memory and the GEMM should cost the same for
1 row as for 16; MKL's ``F.linear`` does not (measured, one thread, SmolLM2-135M's 211
linears, weights streamed from DRAM: 41 ms at 1 row, 72 ms at 4, 97 ms at 8 — a verify of 4
tree nodes cost 1.7× a decode step before any attention). oneDNN with weights reordered once
into its blocked layout streams them at the bandwidth: 46 / 47 / 56 ms at 1 / 4 / 8 rows.
And for one row MKL is fastest with the weight stored ``[in, out]`` (36 ms). So the op picks
by ``M`` (the rows of ``x``):

- ``M == 1``: ``x @ wt`` with a transposed contiguous copy of ``w``;
- ``M == 2, 3``: ``F.linear`` (MKL's small-M path; the reordered weight is slower there);
- ``M >= 4``: oneDNN's ``_linear_pointwise`` on the reordered weight.

Only weights of at least :data:`MIN_WEIGHT` elements are lowered (the MLP and the LM head):
smaller ones stay in cache, where MKL does well at every ``M``.

The copies are made on first use and kept per weight (by storage, dropped when the weight's
storage is freed; rebuilt when the weight is modified in place). They cost memory: up to two
more copies of the linear weights a graph runs with (the transposed one once a 1-row call was
made, the reordered one once a 4-row call was). Results differ from ``F.linear`` by float
rounding only (another summation order), as MKL's own paths for different ``M`` do.

Like ``tokenfx::kv_write`` it is a runtime op, not a pass's: the runtime puts it into the
graphs it runs (:func:`tokenfx.runtime.executor.lower`), never into exported ones, so it has
no Triton kernel and no ONNX translation. On other devices (CUDA: cuBLAS has no such cliff)
and where PyTorch has no oneDNN it is ``F.linear``.
"""

from __future__ import annotations

import os

import torch
from torch.multiprocessing.reductions import StorageWeakRef

# The low-level Library API (not ``custom_op``): the call costs a fraction of the Python
# dispatch ``custom_op`` adds, and a decode step makes one per linear.
_lib = torch.library.Library("tokenfx", "FRAGMENT")
_lib.define("linear(Tensor x, Tensor w, Tensor? b) -> Tensor")

_ONEDNN = torch.backends.mkldnn.is_available()
_layouts: dict[int, list] = {}  # data_ptr → [storage ref, version, shape, {"t": w.T, "packed": w reordered}]


def _entry(w: torch.Tensor) -> dict:
    """The cached layouts of weight ``w`` (a new, empty set when ``w`` is new or changed). The
    weak reference held per entry keeps a freed storage's address from being reused while the
    entry lives, so an equal storage pointer with a live reference is the same storage."""
    ptr = w.data_ptr()
    storage = w.untyped_storage()._cdata
    try:
        version = w._version
    except RuntimeError:  # an inference tensor: no version counter, it cannot be modified in place anyway
        version = -1
    found = _layouts.get(ptr)
    if found is not None and found[0].cdata == storage and not found[0].expired() and found[1] == version \
            and found[2] == (w.shape, w.stride(), w.dtype):
        return found[3]
    if len(_layouts) > 4096 or found is not None:
        for key in [k for k, v in _layouts.items() if v[0].expired()]:
            del _layouts[key]
    layouts: dict = {}
    _layouts[ptr] = [StorageWeakRef(w.untyped_storage()), version, (w.shape, w.stride(), w.dtype), layouts]
    return layouts


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    if x.device.type != "cpu" or w.dim() != 2 or x.dtype != w.dtype or x.dtype != torch.float32:
        return torch.nn.functional.linear(x, w, b)
    rows = x.numel() // max(x.shape[-1], 1)
    if rows == 1:
        layouts = _entry(w)
        wt = layouts.get("t")
        if wt is None:
            wt = layouts["t"] = w.detach().t().contiguous()
        y = torch.matmul(x, wt)
        return y if b is None else y + b
    if rows < 4 or not _ONEDNN:
        return torch.nn.functional.linear(x, w, b)
    layouts = _entry(w)
    packed = layouts.get("packed")
    if packed is None:
        packed = layouts["packed"] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 4)
    return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


_lib.impl("linear", linear, "CompositeExplicitAutograd")


@torch.library.register_fake("tokenfx::linear")
def _(x, w, b):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


# Weights smaller than this stay ``aten.linear``: they sit in cache, where MKL is fast at every
# row count and oneDNN's per-call primitive lookup (~13 µs) costs more than it saves (measured:
# 576 × 576 at 4 rows, 27 µs F.linear vs 36 µs reordered).
MIN_WEIGHT = 1 << 19
ENABLED = os.environ.get("TOKENFX_LINEAR", "1") != "0"  # TOKENFX_LINEAR=0: keep aten.linear (to compare)


def lower_linears(graph: torch.fx.Graph, weights) -> int:
    """Make each ``aten.linear`` of ``graph`` whose weight is one of the nodes ``weights`` and has
    at least :data:`MIN_WEIGHT` elements a ``tokenfx::linear`` (in place); returns how many."""
    count = 0
    for node in graph.nodes if ENABLED else ():
        if node.op == "call_function" and node.target is torch.ops.aten.linear.default and node.args[1] in weights:
            val = node.args[1].meta.get("val")
            if val is None and node.args[1].op == "get_attr":
                val = _attr(graph.owning_module, node.args[1].target)
            if not isinstance(val, torch.Tensor) or val.numel() < MIN_WEIGHT:
                continue
            x, w, *rest = node.args
            node.target = torch.ops.tokenfx.linear.default
            node.args = (x, w, rest[0] if rest else node.kwargs.get("bias"))
            node.kwargs = {}
            count += 1
    return count


def _attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part, None)
    return module
