"""Triton kernel for ``tokenfx::kv_compact``: move each row's accepted tree K/V into place, in place.

    for every b, a (in order):  cache[:, :, b, :, dst[b, a]] = cache[:, :, b, :, src[b, a]]

One program per (layer, k|v, row b, kv head); grid ``(2 * L, B, Hkv)``. Each program walks
``a`` in order, copying one ``D``-vector per pair (``BLOCK_D`` lanes, the next power of two
>= D, masked past D). Reading pair ``a + 1`` after writing pair ``a`` equals the reference's
gather-then-scatter whenever no ``dst[b, a]`` is a later ``src[b, a']`` — true for the
runtime's increasing accepted paths with ``dst <= src`` (see
:mod:`tokenfx.codegen.kv_compact`). Ragged rows repeat their last pair; the repeat rewrites
the same value. The copy is bit-exact in any dtype.

:func:`kv_compact_triton` launches it on any cache; :func:`emit_source` writes the same
kernel as a standalone file specialised to one head dim and dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenfx.codegen.emit import emit
from tokenfx.errors import OpInputError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@triton.jit
def kv_compact_kernel(
    CACHE, SRC, DST,  # CACHE [L, 2, B, Hkv, S, D] (any strides), SRC / DST [B, A]
    A,
    stride_l, stride_kv, stride_b, stride_h, stride_s, stride_d,
    stride_src_b, stride_src_a, stride_dst_b, stride_dst_a,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    layer_kv = tl.program_id(0).to(tl.int64)  # layer * 2 + (0: k, 1: v)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    head = CACHE + (layer_kv // 2) * stride_l + (layer_kv % 2) * stride_kv + b * stride_b + h * stride_h
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM
    for a in range(0, A):  # in order: the contract above relies on it
        src = tl.load(SRC + b * stride_src_b + a * stride_src_a).to(tl.int64)
        dst = tl.load(DST + b * stride_dst_b + a * stride_dst_a).to(tl.int64)
        row = tl.load(head + src * stride_s + offs_d * stride_d, mask=d_in)
        tl.store(head + dst * stride_s + offs_d * stride_d, row, mask=d_in)


# Copied into the emitted standalone file, which imports no tokenfx: so a plain ValueError.
def _check_shapes(cache, src, dst):
    if cache.dim() != 6 or cache.shape[1] != 2:
        raise ValueError(f"kv_compact: expected cache [L, 2, B, Hkv, S, D], got {tuple(cache.shape)}")
    if src.dim() != 2 or src.shape != dst.shape or src.shape[0] != cache.shape[2]:
        raise ValueError(f"kv_compact: expected src, dst [B={cache.shape[2]}, A]; got {tuple(src.shape)}, "
                         f"{tuple(dst.shape)}")
    if src.is_floating_point() or dst.is_floating_point():
        raise ValueError(f"kv_compact: src and dst must be integer slot indices, got {src.dtype}, {dst.dtype}")


def _launch(cache, src, dst, *, num_warps):
    """Run :func:`kv_compact_kernel` on checked inputs, writing ``cache`` in place."""
    L, _, B, Hkv, _, D = cache.shape
    A = src.shape[1]
    if cache.numel() == 0 or A == 0:
        return
    kv_compact_kernel[(2 * L, B, Hkv)](
        cache, src, dst, A, *cache.stride(), *src.stride(), *dst.stride(),
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), num_warps=num_warps,
    )


def _num_warps(block_d: int) -> int:
    # One D-vector per step: a warp moves 32 x 4 elements per instruction, so few warps suffice.
    return 1 if block_d <= 128 else 2


def kv_compact_triton(cache, src, dst) -> None:
    """Launch :func:`kv_compact_kernel`: cache ``[L, 2, B, Hkv, S, D]`` (any strides, any dtype)
    is updated in place from src, dst ``[B, A]``; bit-exact, equal to ``kv_compact_reference``
    under the contract of :mod:`tokenfx.codegen.kv_compact`."""
    _check_shapes(cache, src, dst)
    _launch(cache, src, dst, num_warps=_num_warps(triton.next_power_of_2(cache.shape[-1])))


_LAUNCH_TEMPLATE = '''

def launch(cache, src, dst):
    """kv_compact(cache [L, 2, B, Hkv, S, {D}] {dtype}, src [B, A], dst [B, A]), in place."""
    _check_shapes(cache, src, dst)
    if cache.shape[-1] != HEAD_DIM or cache.dtype != DTYPE:
        raise ValueError(
            f"kernel specialised to head dim {{HEAD_DIM}}, {{DTYPE}}; got cache {{cache.dtype}} {{tuple(cache.shape)}}"
        )
    _launch(cache, src, dst, num_warps=NUM_WARPS)
'''


def emit_source(*, head_dim: int, dtype: str) -> str:
    """Standalone Python source of :func:`kv_compact_kernel` plus a ``launch(cache, src, dst)``
    specialised to one head dim and dtype (``"float32"``, ``"float16"`` or ``"bfloat16"``)."""
    dtype = dtype.removeprefix("torch.")
    if dtype not in _DTYPES:
        raise OpInputError(f"kv_compact: dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    if head_dim < 1:
        raise OpInputError(f"kv_compact: head_dim must be positive, got {head_dim}")
    block_d = triton.next_power_of_2(head_dim)
    notes = ("launch(cache, src, dst): for every b, a in order, cache[:, :, b, :, dst[b, a]] = cache[:, :, b, :, src[b, a]].",)
    constants = (
        f"HEAD_DIM = {head_dim}\n"
        f"NUM_WARPS = {_num_warps(block_d)}\n"
        f"DTYPE = torch.{dtype}\n"
    )
    return emit("kv_compact", __name__, f"head_dim={head_dim}, dtype={dtype}", notes, constants,
                (kv_compact_kernel, _check_shapes, _launch), _LAUNCH_TEMPLATE.format(D=head_dim, dtype=dtype))
