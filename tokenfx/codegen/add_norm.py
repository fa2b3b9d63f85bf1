"""``tokenfx::add_norm``: residual add fused with LayerNorm or RMSNorm.

    normed, summed = add_norm(x, residual, weight, bias, eps, kind)
    summed = x + residual                       (rounded to x.dtype, as the unfused graph does)
    normed = norm(summed) * weight (+ bias)     (statistics in fp32, cast back to x.dtype)

Shapes: x, residual ``[..., C]``; weight, bias ``[C]`` or None; kind ``"layernorm"`` or
``"rmsnorm"``. The four implementations DESIGN.md asks for live here: fake (shape
propagation, export, compile), CPU (plain torch, the reference), CUDA (Triton kernel from
``codegen/triton/add_norm.py``) and the onnxscript translation.
"""

from __future__ import annotations

import torch

from tokenfx.codegen.ops import register_op

KINDS = ("layernorm", "rmsnorm")


def add_norm_reference(x, residual, weight, bias, eps: float, kind: str):
    """Plain-torch reference. Returns ``(normed, summed)``, both ``x.dtype``, shape of x."""
    summed = x + residual
    s = summed.float()
    if kind == "layernorm":
        var, mean = torch.var_mean(s, dim=-1, keepdim=True, correction=0)
        y = (s - mean) * torch.rsqrt(var + eps)
    elif kind == "rmsnorm":
        y = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    else:
        raise ValueError(f"add_norm: kind must be one of {KINDS}, got {kind!r}")
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), summed


@torch.library.custom_op("tokenfx::add_norm", mutates_args=())
def add_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    kind: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return add_norm_reference(x, residual, weight, bias, eps, kind)


@add_norm.register_fake
def _(x, residual, weight, bias, eps, kind):
    summed_dtype = torch.promote_types(x.dtype, residual.dtype)
    return torch.empty_like(x), x.new_empty(x.shape, dtype=summed_dtype)


@add_norm.register_kernel("cuda")
def _(x, residual, weight, bias, eps, kind):
    from tokenfx.codegen.triton.add_norm import add_norm_triton

    if x.dtype != residual.dtype:
        return add_norm_reference(x, residual, weight, bias, eps, kind)
    return add_norm_triton(x, residual, weight, bias, eps, kind)


def add_norm_onnx(x, residual, weight, bias, eps: float, kind: str):
    """onnxscript translation: Add + LayerNormalization / RMSNormalization-equivalent ops."""
    from tokenfx.codegen.onnx_add_norm import translate

    return translate(x, residual, weight, bias, eps, kind)


register_op(
    "add_norm",
    op=torch.ops.tokenfx.add_norm.default,
    reference=add_norm_reference,
    triton_module="tokenfx.codegen.triton.add_norm",
)
