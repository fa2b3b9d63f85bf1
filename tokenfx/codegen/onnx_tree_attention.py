"""onnxscript translation of ``tokenfx::tree_attention`` into standard ONNX ops (opset 18).

    onehot  = Equal(Unsqueeze(slots, 1) [T, 1], Range(0, S) [S])                  [T, S]
    placed  = MatMul(Cast<float>(tree_mask) [B, T, T], Cast<float>(onehot)) > 0    [B, T, S]
    allowed = (key_mask != 0)[B, 1, 1, 1, S]  Or  placed[B, 1, 1, T, S]
    q5      = Reshape(q, [B, Hkv, G, T, D])                    (GQA: head h = kv head h // G)
    scores  = MatMul(q5, Transpose(k[B, Hkv, 1, S, D])) * scale                    [B, Hkv, G, T, S]
    out     = Reshape(MatMul(Softmax(Where(allowed, scores, -inf)), v[B, Hkv, 1, S, D]), Shape(q))

``placed[b, i, s]`` is true where ``s == slots[j]`` for a tree token ``j`` that query ``i``
sees: the same dense mask the CPU reference builds with an indexed ``|=``, written as a
matmul because ONNX has no scatter-or. B, T, S and the head counts are read with ``Shape``
at run time, so the exported graph keeps every dim symbolic. fp16 / bf16 inputs are computed
in float32 and cast back once, as the reference's CPU flash kernel accumulates in float32;
float32 and float64 stay as they are. Use with::

    torch.onnx.export(model, args, dynamo=True,
                      custom_translation_table=tokenfx.codegen.ops.onnx_translation_table())
"""

from __future__ import annotations

from onnxscript import ir
from onnxscript import opset18 as op

_FLOAT, _DOUBLE, _INT64 = ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64


def _ints(*values):
    return op.Constant(value=ir.tensor(list(values), dtype=_INT64))


def translate(q, k, v, key_mask, tree_mask, slots, scale: float):
    """``[B, H, T, D]`` for q ``[B, H, T, D]``, k / v ``[B, Hkv, S, D]``, key_mask ``[B, S]``,
    tree_mask ``[B, T, T]``, slots ``[T]``; the softmax over every visible key, in one dense
    masked attention."""
    out_dtype = q.dtype
    compute = out_dtype if out_dtype in (_FLOAT, _DOUBLE) else _FLOAT
    if out_dtype != compute:
        q, k, v = (op.Cast(x, to=compute) for x in (q, k, v))

    # The dense mask [B, 1, 1, T, S]: the cached prefix, or a tree token's slot under tree_mask.
    s_len = op.Squeeze(op.Shape(k, start=2, end=3), _ints(0))
    onehot = op.Equal(op.Unsqueeze(op.Cast(slots, to=_INT64), _ints(1)),
                      op.Range(op.Constant(value=ir.tensor(0, dtype=_INT64)), s_len,
                               op.Constant(value=ir.tensor(1, dtype=_INT64))))
    placed = op.Greater(op.MatMul(op.Cast(tree_mask, to=_FLOAT), op.Cast(onehot, to=_FLOAT)),
                        op.Constant(value=ir.tensor(0.0, dtype=_FLOAT)))
    prefix = op.Not(op.Equal(key_mask, op.CastLike(op.Constant(value=ir.tensor(0, dtype=_INT64)), key_mask)))
    allowed = op.Or(op.Unsqueeze(prefix, _ints(1, 2, 3)), op.Unsqueeze(placed, _ints(1, 2)))

    # GQA without repeating K/V: query heads [B, Hkv, G, T, D] against kv heads [B, Hkv, 1, S, D].
    q_shape = op.Shape(q)
    b, t_and_d = op.Shape(q, start=0, end=1), op.Shape(q, start=2, end=4)
    hkv = op.Shape(k, start=1, end=2)
    q5 = op.Reshape(q, op.Concat(b, hkv, _ints(-1), t_and_d, axis=0))
    k5, v5 = op.Unsqueeze(k, _ints(2)), op.Unsqueeze(v, _ints(2))
    scores = op.Mul(op.MatMul(q5, op.Transpose(k5, perm=[0, 1, 2, 4, 3])),
                    op.Constant(value=ir.tensor(float(scale), dtype=compute)))
    scores = op.Where(allowed, scores, op.Constant(value=ir.tensor(float("-inf"), dtype=compute)))
    out = op.Reshape(op.MatMul(op.Softmax(scores, axis=-1), v5), q_shape)
    return out if out_dtype == compute else op.Cast(out, to=out_dtype)
