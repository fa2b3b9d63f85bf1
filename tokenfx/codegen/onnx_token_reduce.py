"""onnxscript translations of the token-reduction ops (``tokenfx::bipartite_match``,
``reduction_plan``, ``merge_tokens``, ``attention_pagerank``, ``importance_roles``) into
standard ONNX ops (opset 18)::

    bipartite_match     m = x / Max(ReduceL2(x), 1e-12);  A, B = each row's A / B positions (TopK-compacted)
                        scores = Where(valid B, MatMul(m[A], m[B]ᵀ), -inf)   # [B, |A|, |B|], not [B, N, N]
                        score, match = ReduceMax, B[ArgMax] scattered back to A; (-inf, own) elsewhere
    reduction_plan      removed = ScatterElements(0, TopK(priority, r, largest).indices, 1)
                        keep    = TopK(removed * N + index, N - r, smallest).indices
                        new     = Where(removed, N - r, CumSum(kept) - 1)
                        assign  = Where(removed & candidate, GatherElements(new, match), new)
    merge_tokens        ScatterND(zeros[B, N - r + 1, ·], (b, assign) pairs, (x·size | size), reduction=add)
                        (row-wise adds), the discard slot N - r sliced off; x' = num / den
    attention_pagerank  the ``iterations`` loop unrolled: s ← MatMul(s[B, H, 1, N], p)[..., 0, :] · real
    importance_roles    rank = ScatterElements(·, TopK(key, N, smallest).indices, Range(N)); A = rank < ⌈U/2⌉

The stable sorts of the references become ``TopK(sorted=1)``, which breaks ties by the lower
index as a stable sort does (ascending and descending alike). ``r``, ``merge``,
``iterations`` and ``cls_weight`` are Python values, resolved once at export time; B and N are
read with ``Shape`` at run time, so every dim stays symbolic. Integer outputs are int64, float
outputs float32 (``merge_tokens``' x' in x's dtype, accumulated in float32 or float64 as the
reference does). Use with::

    torch.onnx.export(model, args, dynamo=True,
                      custom_translation_table=tokenfx.codegen.ops.onnx_translation_table())
"""

from __future__ import annotations

from onnxscript import ir
from onnxscript import opset18 as op

_FLOAT, _DOUBLE, _INT64, _BOOL = ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT64, ir.DataType.BOOL
_NEG, _POS = float("-inf"), float("inf")


def _ints(*values):
    return op.Constant(value=ir.tensor(list(values), dtype=_INT64))


def _int(value: int):
    return op.Constant(value=ir.tensor(int(value), dtype=_INT64))


def _scalar(value: float, dtype=_FLOAT):
    return op.Constant(value=ir.tensor(float(value), dtype=dtype))


def _cast(value, dtype):
    return value if value.dtype == dtype else op.Cast(value, to=dtype)


def _role_is(role, k: int):
    return op.Equal(_cast(role, _INT64), _int(k))


def _dim(value, axis: int):
    """``value.shape[axis]`` as a 1-D int64 tensor ``[1]``."""
    return op.Shape(value, start=axis, end=axis + 1)


def _arange_like(value):
    """``[0, 1, ..., N - 1]`` expanded to ``value``'s ``[B, N]`` shape (int64)."""
    n = op.Squeeze(_dim(value, 1), _ints(0))
    return op.Expand(op.Range(_int(0), n, _int(1)), op.Shape(value))


def _compact(flag, index):
    """``(idx [B, K] i64, valid [B, K] bool)``: each row's flagged positions in ascending order,
    K = the largest flagged count of any row (at least 1, so no dim is empty); a shorter row is
    filled with its unflagged positions, marked not ``valid``."""
    n = _dim(flag, 1)
    k = op.Max(op.ReduceMax(op.ReduceSum(op.Cast(flag, to=_INT64), _ints(-1), keepdims=0), _ints(0), keepdims=1),
               _ints(1))
    _, idx = op.TopK(op.Where(flag, index, op.Add(index, n)), k, axis=-1, largest=0, sorted=1)
    return idx, op.GatherElements(flag, idx, axis=1)


def bipartite_match(metric, role):
    """``(score [B, N] f32, match [B, N] i64)``: an A token's best cosine to a B token.

    ToMe's A × B similarity, not N × N: each row's A and B tokens are gathered (in token order,
    so ``ArgMax``'s first maximum is the reference's lowest-index B), scored ``[B, |A|, |B|]``
    (about a quarter of the N × N matmul) and the results scattered back; every other token
    gets ``(-inf, own index)`` as in the reference."""
    m = _cast(metric, _FLOAT)
    norm = op.Max(op.ReduceL2(m, _ints(-1), keepdims=1), _scalar(1e-12))
    m = op.Div(m, norm)
    index = _arange_like(_cast(role, _INT64))  # [B, N]
    a_idx, a_valid = _compact(_role_is(role, 1), index)  # [B, Ka]
    b_idx, b_valid = _compact(_role_is(role, 2), index)  # [B, Kb]
    m_a = op.GatherND(m, op.Unsqueeze(a_idx, _ints(-1)), batch_dims=1)  # [B, Ka, C]
    m_b = op.GatherND(m, op.Unsqueeze(b_idx, _ints(-1)), batch_dims=1)  # [B, Kb, C]
    scores = op.MatMul(m_a, op.Transpose(m_b, perm=[0, 2, 1]))  # [B, Ka, Kb] cosine
    scores = op.Where(op.Unsqueeze(b_valid, _ints(-2)), scores, _scalar(_NEG))
    score = op.ReduceMax(scores, _ints(-1), keepdims=0)  # [B, Ka]
    best = op.ArgMax(scores, axis=-1, keepdims=0, select_last_index=0)  # the first max, as torch
    found = op.And(a_valid, op.Greater(score, _scalar(_NEG)))
    score = op.Where(found, score, _scalar(_NEG))
    match = op.Where(found, op.GatherElements(b_idx, best, axis=1), a_idx)
    neg = op.Expand(_scalar(_NEG), op.Shape(index))
    return (op.ScatterElements(neg, a_idx, score, axis=1),  # a_idx holds distinct positions per row
            op.ScatterElements(index, a_idx, match, axis=1))


def _count(r):
    """A token count as a 1-D int64 ``[1]``: a Python int, or a graph value (a ratio schedule's
    count computed from the symbolic token dim)."""
    if isinstance(r, int):
        return _ints(r)
    return op.Reshape(_cast(r, _INT64), _ints(1))


def reduction_plan(score, match, role, real, r, merge: bool, quota=None):
    """``(assign [B, N] i64, keep [B, N - r] i64)``: each row removes exactly ``r`` tokens."""
    index = _arange_like(score)  # [B, N]
    if isinstance(r, int) and r == 0:  # nothing removed: every token keeps its place (and TopK with k=0 is avoided)
        return index, op.Identity(index)
    count = _count(r)
    score = _cast(score, _FLOAT)
    candidate = op.And(_role_is(role, 1), op.Greater(score, _scalar(_NEG)))
    pad = op.Not(_cast(real, _BOOL))
    first = candidate
    if quota is not None:  # a row's best `quota` candidates first, then its pads, then its other candidates
        n_all = _dim(score, 1)
        _, ranked = op.TopK(op.Where(candidate, score, _scalar(_NEG)), n_all, axis=-1, largest=1, sorted=1)
        rank = op.ScatterElements(index, ranked, index, axis=1)
        first = op.And(candidate, op.Less(rank, op.Unsqueeze(_cast(quota, _INT64), _ints(-1))))
    later = op.Where(candidate, op.Sub(score, _scalar(2.0)), _scalar(_NEG))
    # priority tiers as the reference: matched A tokens (score + 4 in [3, 5]) before pads (1)
    priority = op.Where(first, op.Add(score, _scalar(4.0)), op.Where(pad, _scalar(1.0), later))
    _, removed_idx = op.TopK(priority, count, axis=-1, largest=1, sorted=1)  # [B, r], ties → lower index
    removed = op.ScatterElements(op.Mul(index, _int(0)), removed_idx,
                                 op.Expand(_int(1), op.Shape(removed_idx)), axis=1)  # [B, N] 0/1
    n = _dim(score, 1)
    n_kept = op.Sub(n, count)  # [1]
    # survivors in original order: the smallest keys removed * N + index
    _, keep = op.TopK(op.Add(op.Mul(removed, n), index), n_kept, axis=-1, largest=0, sorted=1)
    removed_b = op.Cast(removed, to=_BOOL)
    new_index = op.Sub(op.CumSum(op.Sub(_int(1), removed), _int(1)), _int(1))  # kept tokens before i
    new_index = op.Where(removed_b, n_kept, new_index)  # the discard slot N - r
    if merge:
        target = op.GatherElements(new_index, _cast(match, _INT64), axis=1)  # the partner is a B token
        assign = op.Where(op.And(removed_b, candidate), target, new_index)
    else:
        assign = new_index
    return assign, keep


def merge_tokens(x, size, assign, r):
    """``(x' [B, N - r, C], size' [B, N - r])``: the size-weighted average of what maps to each slot.

    One ``ScatterND(reduction=add)`` per sum, indexed by ``(b, assign[b, n])`` pairs: it adds whole
    ``C``-rows, where ``ScatterElements`` would walk a ``[B, N, C]`` int64 index element by element
    (measured in onnxruntime 1.32, CPU, B = 32, N = 256, C = 384: 2.7 ms against 20 ms per block).
    Both add the updates in token order, as the reference's ``scatter_add``."""
    count = _count(r)
    acc = _DOUBLE if x.dtype == _DOUBLE else _FLOAT
    w = _cast(size, acc)
    xw = op.Mul(_cast(x, acc), op.Unsqueeze(w, _ints(-1)))  # [B, N, C]
    assign = _cast(assign, _INT64)
    b, n, c = _dim(x, 0), _dim(x, 1), _dim(x, 2)
    n_kept = op.Sub(n, count)
    slots = op.Add(n_kept, _ints(1))  # N - r + 1: the kept tokens and the discard slot
    rows = op.Expand(op.Unsqueeze(op.Range(_int(0), op.Squeeze(b, _ints(0)), _int(1)), _ints(1)), op.Shape(assign))
    pairs = op.Concat(op.Unsqueeze(rows, _ints(-1)), op.Unsqueeze(assign, _ints(-1)), axis=-1)  # [B, N, 2]
    zero = ir.tensor([0.0], dtype=acc)
    num = op.ScatterND(op.ConstantOfShape(op.Concat(b, slots, c, axis=0), value=zero), pairs, xw, reduction="add")
    den = op.ScatterND(op.ConstantOfShape(op.Concat(b, slots, axis=0), value=zero), pairs, w, reduction="add")
    num = op.Slice(num, _ints(0), n_kept, _ints(1))
    den = op.Slice(den, _ints(0), n_kept, _ints(1))
    out = op.Div(num, op.Unsqueeze(den, _ints(-1)))
    return _cast(out, x.dtype), _cast(den, size.dtype)


def attention_pagerank(probs, real, iterations: int, cls_weight: bool):
    """``s [B, H, N]`` f32: Zero-TPrune's per-head importance, ``iterations`` unrolled."""
    p = _cast(probs, _FLOAT)
    realf = op.Cast(real, to=_FLOAT)  # [B, N]
    n = op.Max(op.ReduceSum(realf, _ints(-1), keepdims=1), _scalar(1.0))  # [B, 1]
    s = op.Div(realf, n)  # [B, N]
    if cls_weight:
        first = op.Equal(op.Range(_int(0), op.Squeeze(_dim(realf, 1), _ints(0)), _int(1)), _int(0))  # [N]
        s = op.Mul(s, op.Where(first, op.Sqrt(n), _scalar(1.0)))  # [B, N]
    s = op.Expand(op.Unsqueeze(s, _ints(1)), op.Shape(p, start=0, end=3))  # [B, H, N]
    real3 = op.Unsqueeze(realf, _ints(1))  # [B, 1, N]
    for _ in range(int(iterations)):
        s = op.Squeeze(op.MatMul(op.Unsqueeze(s, _ints(-2)), p), _ints(-2))  # s_j ← Σ_i A_ij s_i
        s = op.Mul(s, real3)  # pads hold no importance
    return s


def importance_roles(importance, participates):
    """``role [B, N]`` i64: the less important ``⌈U/2⌉`` participating tokens are A (1), the rest B (2)."""
    part = _cast(participates, _BOOL)
    key = op.Where(part, _cast(importance, _FLOAT), _scalar(_POS))
    index = _arange_like(key)
    _, order = op.TopK(key, _dim(key, 1), axis=-1, largest=0, sorted=1)  # ascending, ties → lower index
    rank = op.ScatterElements(op.Mul(index, _int(0)), order, index, axis=1)
    half = op.Div(op.Add(op.ReduceSum(op.Cast(part, to=_INT64), _ints(-1), keepdims=1), _int(1)), _int(2))
    return op.Where(part, op.Where(op.Less(rank, half), _int(1), _int(2)), _int(0))
