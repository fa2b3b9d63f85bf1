"""onnxscript translation of ``tokenfx::add_norm`` into standard ONNX ops (opset 18).

    summed = Add(x, residual)
    s      = Cast<float>(summed)
    layernorm:  y = LayerNormalization(s, Cast<float>(weight) or ones[C], Cast<float>(bias), axis=-1)
    rmsnorm:    y = s * Reciprocal(Sqrt(ReduceMean(s * s, axes=[-1]) + eps)) [* weight] [+ bias]
    normed = Cast<x.dtype>(y)

Statistics, weight and bias are applied in float32 and cast back once, as the reference
does. Use with::

    torch.onnx.export(model, args, dynamo=True,
                      custom_translation_table={torch.ops.tokenfx.add_norm.default: translate})

The exporter calls the translation as a plain Python function while tracing: tensors
arrive as onnxscript symbolic values, an optional tensor passed as None arrives as
``None``, and float / str arguments arrive as Python values; so the branches below are
resolved once, at export time.
"""

from __future__ import annotations

from onnxscript import ir
from onnxscript import opset18 as op

from tokenfx.errors import OpInputError

KINDS = ("layernorm", "rmsnorm")
_FLOAT = ir.DataType.FLOAT


def _to_float(value):
    return value if value.dtype == _FLOAT else op.Cast(value, to=_FLOAT)


def translate(x, residual, weight, bias, eps: float, kind: str):
    """``(normed, summed)`` for x, residual ``[..., C]``; weight, bias ``[C]`` or None."""
    if kind not in KINDS:
        raise OpInputError(f"add_norm: kind must be one of {KINDS}, got {kind!r}")
    summed = op.Add(x, residual)
    s = _to_float(summed)
    eps = float(eps)
    if kind == "layernorm":
        # LayerNormalization requires Scale; without a weight it is ones of shape [C].
        scale = (
            _to_float(weight)
            if weight is not None
            else op.ConstantOfShape(op.Shape(s, start=-1), value=ir.tensor([1.0], dtype=_FLOAT))
        )
        if bias is not None:
            outputs = op.LayerNormalization(s, scale, _to_float(bias), axis=-1, epsilon=eps)
        else:
            outputs = op.LayerNormalization(s, scale, axis=-1, epsilon=eps)
        y = outputs[0]  # (Y, Mean, InvStdDev); the statistics outputs stay unused
    else:
        axes = op.Constant(value=ir.tensor([-1], dtype=ir.DataType.INT64))
        mean_sq = op.ReduceMean(op.Mul(s, s), axes, keepdims=1)
        eps_c = op.Constant(value=ir.tensor(eps, dtype=_FLOAT))
        y = op.Mul(s, op.Reciprocal(op.Sqrt(op.Add(mean_sq, eps_c))))
        if weight is not None:
            y = op.Mul(y, _to_float(weight))
        if bias is not None:
            y = op.Add(y, _to_float(bias))
    normed = y if x.dtype == _FLOAT else op.Cast(y, to=x.dtype)
    return normed, summed
