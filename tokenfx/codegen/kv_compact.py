"""``tokenfx::kv_compact``: after a verify step, move each row's accepted tree K/V into place, in place.

    kv_compact(cache[L, 2, B, Hkv, S, D], src[B, A], dst[B, A])
    for every b, a:  cache[:, :, b, :, dst[b, a]] = cache[:, :, b, :, src[b, a]]   (all reads before writes)

The tree's K/V were written at the verify step's slots in tree order; the accepted path is a
subset of them (root first). ``kv_compact`` gathers that path into the row's contiguous
cache tail. Rows accept different numbers of tokens: shorter rows repeat their last pair
(same src, same dst: a harmless duplicate write). The runtime calls it between graph calls,
so like ``kv_write`` it has no ONNX translation; it has a CPU reference (gather, then
scatter) and a Triton kernel (one program per (layer, k|v, row, kv head) walking ``a`` in
order, which equals the reference whenever no ``dst[b, a]`` is a later ``src[b, a']`` —
true for the runtime's increasing paths with ``dst <= src``).
"""

from __future__ import annotations

import torch

_lib = torch.library.Library("tokenfx", "FRAGMENT")
_lib.define("kv_compact(Tensor(a!) cache, Tensor src, Tensor dst) -> ()")


def kv_compact_reference(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    rows = torch.arange(cache.shape[2], device=cache.device)[:, None].expand_as(src)
    cache[:, :, rows, :, dst] = cache[:, :, rows, :, src]  # advanced indexing: the right side is a copy


def _cuda(cache, src, dst):
    from tokenfx.codegen.triton.kv_compact import kv_compact_triton

    kv_compact_triton(cache, src, dst)


_lib.impl("kv_compact", kv_compact_reference, "CPU")
_lib.impl("kv_compact", _cuda, "CUDA")


@torch.library.register_fake("tokenfx::kv_compact")
def _(cache, src, dst):
    return None
