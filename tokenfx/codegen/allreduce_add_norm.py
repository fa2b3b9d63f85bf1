"""``tokenfx::allreduce_start`` / ``allreduce_wait`` / ``allreduce_add_norm``: a tensor-parallel
all-reduce split into an early start and a late wait, the wait fused with the residual add +
norm that follows it (TokenWeave's fused all-reduce + RMSNorm).

    token          = allreduce_start(partial, group)                # launches the sum; returns at once
    ...            other work (the other token part's attention / MLP) runs while it travels
    reduced        = allreduce_wait(token, partial, after)          # sum over the ranks of ``partial``
    normed, summed = allreduce_add_norm(token, partial, residual, weight, bias, eps, kind, after)
                     = add_norm(allreduce_wait(token, partial), residual, weight, bias, eps, kind)

Shapes: partial, residual ``[..., C]``; weight, bias ``[C]`` or None; token a 0-dim int64 CPU
tensor; ``after`` a list of tensors the op does not read.

Why a token and ``after`` (the order a compiler may not undo): the ops are functional to
torch.export and Inductor (``mutates_args=()``), so order only survives through data
dependence. ``start`` returns a token that only its wait reads, so no wait can be hoisted
above its start. ``after`` carries the other token part's latest start token into a wait
(``split_overlap`` fills it): the wait then depends on that start, and that start on the
other part's matmul that produced its partial sum, so no scheduler can move the wait above
the other part's compute, nor sink the other part's start below it. In eager mode and in
``torch.export`` the graph's node order is the execution order as well.

Implementations: one for every device, on ``torch.distributed``: the start launches
``dist.all_reduce(async_op=True)`` on a copy of ``partial`` (the caller's tensor is not
written) and keeps the ``Work`` handle and the buffer in a registry keyed by the token; the
wait pops it and calls ``work.wait()``. On CPU the collective is gloo's, on CUDA NCCL's
(``work.wait()`` makes the current stream wait, no host sync); the add + norm is
``tokenfx::add_norm`` (its plain-torch reference on CPU, its Triton kernel on CUDA). A
single-GPU Triton kernel of the fused op would only be ``add_norm``: without NVLink symmetric
memory there is nothing for a kernel to fuse the reduction with, so none is written here.
Fake: the shapes. ONNX: refused, ONNX has no collectives.
"""

from __future__ import annotations

import itertools

import torch

from tokenfx.codegen.add_norm import add_norm_reference
from tokenfx.codegen.ops import register_op
from tokenfx.errors import ExportError, OpInputError

# token -> (Work handle, the buffer the collective writes): what a started all-reduce leaves
# for its wait. A process holds one entry per all-reduce in flight (two in split_overlap).
_PENDING: dict[int, tuple[object, torch.Tensor]] = {}
_TOKENS = itertools.count(1)


def process_group(group: str):
    """The process group called ``group`` (``"0"`` is the default world group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise OpInputError(f"tokenfx all-reduce (group {group!r}): no torch.distributed process group is "
                           "initialised; run a tensor-parallel graph in its ranks (torchrun, or "
                           "dist.init_process_group with gloo on CPU / nccl on CUDA)")
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group)


def _launch(partial: torch.Tensor, group: str) -> int:
    import torch.distributed as dist

    buffer = partial.contiguous().clone()  # the collective sums in place: keep the caller's partial intact
    work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=process_group(group), async_op=True)
    token = next(_TOKENS)
    _PENDING[token] = (work, buffer)
    return token


def _finish(token: torch.Tensor) -> torch.Tensor:
    key = int(token)
    if key not in _PENDING:
        raise OpInputError(f"tokenfx all-reduce: token {key} has no all-reduce in flight (never started in "
                           "this process, or already waited: each start is waited exactly once)")
    work, buffer = _PENDING.pop(key)
    work.wait()
    return buffer


# -- the ops -----------------------------------------------------------------------------------------------
@torch.library.custom_op("tokenfx::allreduce_start", mutates_args=())
def allreduce_start(partial: torch.Tensor, group: str) -> torch.Tensor:
    return torch.tensor(_launch(partial, group), dtype=torch.int64)


@allreduce_start.register_fake
def _(partial, group):
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("tokenfx::allreduce_wait", mutates_args=())
def allreduce_wait(token: torch.Tensor, partial: torch.Tensor, after: list[torch.Tensor]) -> torch.Tensor:
    return _finish(token)


@allreduce_wait.register_fake
def _(token, partial, after):
    return torch.empty_like(partial, memory_format=torch.contiguous_format)


@torch.library.custom_op("tokenfx::allreduce_add_norm", mutates_args=())
def allreduce_add_norm(
    token: torch.Tensor,
    partial: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    kind: str,
    after: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    reduced = _finish(token)
    if reduced.device.type == "cpu":
        return add_norm_reference(reduced, residual, weight, bias, eps, kind)
    from tokenfx.codegen import add_norm as _add_norm  # noqa: F401  (registers tokenfx::add_norm)

    return torch.ops.tokenfx.add_norm.default(reduced, residual, weight, bias, eps, kind)


@allreduce_add_norm.register_fake
def _(token, partial, residual, weight, bias, eps, kind, after):
    summed_dtype = torch.promote_types(partial.dtype, residual.dtype)
    return torch.empty_like(partial), partial.new_empty(partial.shape, dtype=summed_dtype)


# -- references: the same results without the split into start and wait ------------------------------------
def allreduce_reference(partial: torch.Tensor, group: str) -> torch.Tensor:
    """Blocking ``dist.all_reduce`` of a copy of ``partial`` (sum over the group's ranks)."""
    import torch.distributed as dist

    buffer = partial.contiguous().clone()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=process_group(group))
    return buffer


def allreduce_add_norm_reference(partial, residual, weight, bias, eps: float, kind: str, group: str):
    """The unfused, blocking form: ``add_norm_reference(all_reduce(partial), residual, ...)``.
    Returns ``(normed, summed)``."""
    return add_norm_reference(allreduce_reference(partial, group), residual, weight, bias, eps, kind)


# -- ONNX: refused ---------------------------------------------------------------------------------------------
ONNX_REFUSAL = ("has no ONNX translation: ONNX has no collective operations (no all-reduce across ranks), so a "
                "tensor-parallel graph cannot run in onnxruntime; export the single-rank graph (before "
                "tensor_parallel / split_overlap) instead")


def _refuse(name: str):
    def translate(*args, **kwargs):
        raise ExportError(f"tokenfx::{name} {ONNX_REFUSAL}")

    translate.__name__ = f"refuse_{name}"
    return translate


def refuse_collectives(gm: torch.fx.GraphModule) -> None:
    """Raise :class:`ExportError` naming the first collective in ``gm`` (a tokenfx all-reduce, or the
    functional all-reduce ``tensor_parallel`` inserts): ONNX export of a rank's graph is refused."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "name", lambda: node.target)())
        if name.startswith(("tokenfx::allreduce_", "_c10d_functional::")):
            raise ExportError(f"ONNX export refused: node {node.name} ({name}) {ONNX_REFUSAL}")


refuse_allreduce_start = _refuse("allreduce_start")
refuse_allreduce_wait = _refuse("allreduce_wait")
refuse_allreduce_add_norm = _refuse("allreduce_add_norm")

for _name in ("allreduce_start", "allreduce_wait", "allreduce_add_norm"):
    register_op(_name, op=getattr(torch.ops.tokenfx, _name).default,
                reference=globals()[_name],  # the eager op itself: its collective cannot be inlined
                triton_module="tokenfx.codegen.triton.add_norm",
                onnx_translation=f"tokenfx.codegen.allreduce_add_norm:refuse_{_name}")
