"""Triton kernel for ``tokenfx::add_norm``: residual add fused with LayerNorm / RMSNorm.

One program per row of ``[rows, C]``; the whole row sits in one block of ``BLOCK_C``
(next power of two >= C) lanes, masked past C. The sum is rounded to the input dtype
before the statistics are taken, so the kernel matches the unfused graph
(``add`` then ``layer_norm``) and :func:`tokenfx.codegen.add_norm.add_norm_reference`
up to fp32 reduction order.

:func:`add_norm_triton` launches it on any shape; :func:`emit_source` writes the same
kernel as a standalone file specialised to one (C, kind, dtype, weight, bias, eps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenfx.codegen.emit import emit
from tokenfx.errors import OpInputError

KINDS = ("layernorm", "rmsnorm")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@triton.jit
def add_norm_kernel(
    X, R, W, B, OUT, SUM,  # pointers; W / B are ignored unless HAS_WEIGHT / HAS_BIAS
    C, eps,
    BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    offsets = row.to(tl.int64) * C + cols

    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + offsets, mask=mask, other=0.0).to(tl.float32)
    # Round the sum to the input dtype and take statistics of the rounded value:
    # the unfused graph stores `x + residual` in x.dtype before normalising it.
    summed = x + r
    if SUM.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: GPUs round in the cast below, but the CPU
        # interpreter truncates fp32 -> bf16, and `summed` must equal torch's x + residual.
        bits = summed.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        summed = tl.where(summed == summed, bits.to(tl.float32, bitcast=True), summed)  # NaN stays NaN
    summed = summed.to(SUM.dtype.element_ty)
    tl.store(SUM + offsets, summed, mask=mask)
    s = summed.to(tl.float32)

    if RMS:
        mean_sq = tl.sum(s * s, axis=0) / C  # masked lanes are 0
        y = s * tl.rsqrt(mean_sq + eps)
    else:
        mean = tl.sum(s, axis=0) / C
        centred = tl.where(mask, s - mean, 0.0)  # keep masked lanes out of the variance
        var = tl.sum(centred * centred, axis=0) / C
        y = centred * tl.rsqrt(var + eps)

    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offsets, y.to(OUT.dtype.element_ty), mask=mask)


def _num_warps(block_c: int) -> int:
    # ~256 elements per warp keeps registers per thread small for wide rows.
    return min(max(block_c // 256, 1), 16)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise OpInputError(f"add_norm: kind must be one of {KINDS}, got {kind!r}")


def add_norm_triton(x, residual, weight, bias, eps: float, kind: str):
    """Launch :func:`add_norm_kernel`. x, residual ``[..., C]`` (same dtype); weight, bias
    ``[C]`` or None. Returns ``(normed, summed)`` shaped like x, in x.dtype; matches
    ``add_norm_reference`` within fp32 reduction-order error."""
    _check_kind(kind)
    shape, C = x.shape, x.shape[-1]
    x2 = x.contiguous().view(-1, C)
    r2 = residual.to(x.dtype).contiguous().view(-1, C)
    normed = torch.empty_like(x2)
    summed = torch.empty_like(x2)
    rows = x2.shape[0]
    if rows and C:
        block_c = triton.next_power_of_2(C)
        w = weight.contiguous() if weight is not None else x2  # dummy pointer, never read
        b = bias.contiguous() if bias is not None else x2
        add_norm_kernel[(rows,)](
            x2, r2, w, b, normed, summed, C, float(eps),
            BLOCK_C=block_c, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            RMS=kind == "rmsnorm", num_warps=_num_warps(block_c),
        )
    return normed.view(shape), summed.view(shape)


_LAUNCH_TEMPLATE = '''

def launch(x, residual, weight, bias):
    """normed, summed = add_norm(x, residual, weight, bias) for x, residual [..., {C}] {dtype}."""
    if x.shape[-1] != C or x.dtype != DTYPE or residual.shape != x.shape or residual.dtype != DTYPE:
        raise ValueError(
            f"kernel specialised to [..., {{C}}] {{DTYPE}}; got x {{x.dtype}} {{tuple(x.shape)}}, "
            f"residual {{residual.dtype}} {{tuple(residual.shape)}}"
        )
    if (weight is not None) != HAS_WEIGHT or (bias is not None) != HAS_BIAS:
        raise ValueError(f"kernel specialised to weight={{HAS_WEIGHT}}, bias={{HAS_BIAS}}")
    x2 = x.contiguous().view(-1, C)
    r2 = residual.contiguous().view(-1, C)
    normed = torch.empty_like(x2)
    summed = torch.empty_like(x2)
    if x2.shape[0]:
        w = weight.contiguous() if HAS_WEIGHT else x2  # dummy pointer, never read
        b = bias.contiguous() if HAS_BIAS else x2
        add_norm_kernel[(x2.shape[0],)](
            x2, r2, w, b, normed, summed, C, EPS,
            BLOCK_C=BLOCK_C, HAS_WEIGHT=HAS_WEIGHT, HAS_BIAS=HAS_BIAS, RMS=RMS,
            num_warps=NUM_WARPS,
        )
    return normed.view(x.shape), summed.view(x.shape)
'''


def emit_source(*, C: int, kind: str, has_weight: bool, has_bias: bool, dtype: str, eps: float) -> str:
    """Standalone Python source of :func:`add_norm_kernel` plus a ``launch(x, residual,
    weight, bias)`` specialised to one row width, kind, dtype, weight/bias presence and eps.
    ``dtype`` is a torch dtype name: ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
    _check_kind(kind)
    dtype = dtype.removeprefix("torch.")
    if dtype not in _DTYPES:
        raise OpInputError(f"add_norm: dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    if C < 1:
        raise OpInputError(f"add_norm: C must be positive, got {C}")
    block_c = triton.next_power_of_2(C)
    notes = ("normed, summed = launch(x, residual, weight, bias)",
             f"  summed = x + residual (in {dtype}); normed = {kind}(summed) in fp32, * weight + bias, cast to {dtype}.")
    constants = (
        f"C = {C}\n"
        f"BLOCK_C = {block_c}  # next power of two >= C\n"
        f"HAS_WEIGHT = {has_weight}\n"
        f"HAS_BIAS = {has_bias}\n"
        f"RMS = {kind == 'rmsnorm'}  # {kind}\n"
        f"EPS = {float(eps)!r}\n"
        f"DTYPE = torch.{dtype}\n"
        f"NUM_WARPS = {_num_warps(block_c)}\n"
    )
    return emit("add_norm", __name__, f"C={C}, kind={kind}, dtype={dtype}, weight={has_weight}, bias={has_bias}, "
                f"eps={eps!r}", notes, constants, (add_norm_kernel,), _LAUNCH_TEMPLATE.format(C=C, dtype=dtype))
