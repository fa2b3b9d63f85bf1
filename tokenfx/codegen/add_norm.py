"""``tokenfx::add_norm``: residual add fused with LayerNorm or RMSNorm.

    normed, summed = add_norm(x, residual, weight, bias, eps, kind)
    summed = x + residual                       (in the add's promoted dtype, as the unfused graph does)
    normed = norm(summed) * weight (+ bias)     (statistics in at least fp32, cast back to x.dtype)

Shapes: x, residual ``[..., C]``; weight, bias ``[C]`` or None; kind ``"layernorm"`` or
``"rmsnorm"``. The four implementations DESIGN.md asks for live here: fake (shape
propagation, export, compile), CPU (plain torch, the reference), CUDA (Triton kernel from
``codegen/triton/add_norm.py``) and the onnxscript translation.
"""

from __future__ import annotations

import torch

from tokenfx.codegen.ops import register_op
from tokenfx.errors import OpInputError

KINDS = ("layernorm", "rmsnorm")


def add_norm_reference(x, residual, weight, bias, eps: float, kind: str):
    """Plain-torch reference. Returns ``(normed, summed)``, both ``x.dtype``, shape of x."""
    summed = x + residual
    s = summed.to(torch.promote_types(summed.dtype, torch.float32))  # fp64 stays fp64
    if kind == "layernorm":
        var, mean = torch.var_mean(s, dim=-1, keepdim=True, correction=0)
        y = (s - mean) * torch.rsqrt(var + eps)
    elif kind == "rmsnorm":
        y = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    else:
        raise OpInputError(f"add_norm: kind must be one of {KINDS}, got {kind!r}")
    if weight is not None:
        y = y * weight.to(s.dtype)
    if bias is not None:
        y = y + bias.to(s.dtype)
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

    if x.dtype != residual.dtype or x.dtype == torch.float64:  # the kernel computes in fp32
        return add_norm_reference(x, residual, weight, bias, eps, kind)
    return add_norm_triton(x, residual, weight, bias, eps, kind)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, kind = inputs
    ctx.save_for_backward(x, residual, weight, bias)
    ctx.eps, ctx.kind = eps, kind


def _backward(ctx, grad_normed, grad_summed):
    # Differentiate the reference: the op is small and this keeps one definition of its math.
    saved = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(t.is_floating_point()) if t is not None else None for t in saved]
        normed, summed = add_norm_reference(*leaves, ctx.eps, ctx.kind)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad((normed, summed), wrt, (grad_normed, grad_summed), allow_unused=True))
    out = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
    return (*out, None, None)


add_norm.register_autograd(_backward, setup_context=_setup_context)


register_op(
    "add_norm",
    op=torch.ops.tokenfx.add_norm.default,
    reference=add_norm_reference,
    triton_module="tokenfx.codegen.triton.add_norm",
    onnx_translation="tokenfx.codegen.onnx_add_norm:translate",
)
