"""Triton kernel for ``tokenfx::tree_attention``: flash attention of tree tokens over a KV buffer.

One program per (row b, query head h, block of ``BLOCK_T`` tree queries); grid
``(B * H, cdiv(T, BLOCK_T))``. It keeps the flash-attention running max / denominator /
numerator in fp32 and folds in two phases of keys, never building the dense ``[T, S]`` mask:

1. the cached prefix: keys ``s`` of the buffer in blocks of ``BLOCK_S``, visible to every
   query where ``key_mask[b, s] != 0``;
2. the tree: tree tokens ``j`` in blocks of ``BLOCK_J``, whose K/V rows are gathered from the
   buffer at ``slots[j]``, visible to query ``i`` where ``tree_mask[b, i, j]`` (its ancestors
   and itself).

Preconditions (those of the op): the ``slots`` are distinct and have ``key_mask == 0`` (a
slot that is also in the prefix would be counted twice here, once in the reference), and
``tree_mask`` is true on the diagonal. Query head ``h`` reads kv head ``h // GROUP``
(GQA, ``GROUP = H // Hkv``). ``q·k`` and ``p·v`` use ``tl.dot`` in the input dtype with fp32
accumulation (IEEE fp32 products for fp32 inputs, no TF32), softmax in fp32 with ``exp2``,
output cast to ``q.dtype``: the result matches
:func:`tokenfx.codegen.tree_attention.tree_attention_reference` within the rounding of the
input dtype (``p`` is rounded to it before ``p·v``, as in flash attention). Under
``TRITON_INTERPRET=1`` bf16 blocks are upcast to fp32 before ``tl.dot``: the interpreter's
dot multiplies bf16 operands as raw bits (``DOT_IN_FP32``).

:func:`tree_attention_triton` launches it on any shape; :func:`emit_source` writes the same
kernel and launcher as a standalone file specialised to one head dim, dtype, GQA group and
set of block sizes.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from tokenfx.codegen.emit import emit
from tokenfx.errors import OpInputError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOG2E = math.log2(math.e)


@triton.jit
def _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale):
    """Fold one block of keys ``k`` / values ``v`` ``[N, BLOCK_D]`` into the running max
    ``m_i``, denominator ``l_i`` ``[BLOCK_T]`` and numerator ``acc`` ``[BLOCK_T, BLOCK_D]`` of
    queries ``q`` ``[BLOCK_T, BLOCK_D]``; ``allowed`` ``[BLOCK_T, N]`` masks the scores."""
    k = k.to(q.dtype)  # q.dtype is the dot dtype: the input's, or fp32 (see _dot_in_fp32)
    v = v.to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # log2 domain: scale * log2(e)
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # A query that has seen no key yet keeps m = -inf: shift by 0 there, so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def tree_attention_kernel(
    Q, K, V,  # [B, H, T, D], [B, Hkv, S, D] x2: any strides
    KEY_MASK, TREE_MASK, SLOTS, OUT,  # [B, S], [B, T, T] uint8, [T], [B, H, T, D]: contiguous
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    H, T, S, qk_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_J: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kv_h = h // GROUP
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_in = offs_t < T
    d_in = offs_d < HEAD_DIM  # BLOCK_D is a power of two >= HEAD_DIM

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=t_in[:, None] & d_in[None, :], other=0.0)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    k_head = K + b * stride_kb + kv_h * stride_kh
    v_head = V + b * stride_vb + kv_h * stride_vh

    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)

    # Phase 1: the cached prefix, the same keys for every query of the row.
    for start in range(0, S, BLOCK_S):
        offs_s = start + tl.arange(0, BLOCK_S)
        visible = tl.load(KEY_MASK + b * S + offs_s, mask=offs_s < S, other=0) != 0
        kv_mask = visible[:, None] & d_in[None, :]
        k = tl.load(k_head + offs_s[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_head + offs_s[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(q, k, v, visible[None, :], m_i, l_i, acc, qk_scale)

    # Phase 2: the tree's own K/V, gathered from the buffer at slots[j], under the ancestor mask.
    for start in range(0, T, BLOCK_J):
        offs_j = start + tl.arange(0, BLOCK_J)
        j_in = offs_j < T
        slot = tl.load(SLOTS + offs_j, mask=j_in, other=0).to(tl.int64)
        kv_mask = j_in[:, None] & d_in[None, :]
        k = tl.load(k_head + slot[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_head + slot[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        allowed = tl.load(TREE_MASK + b * T * T + offs_t[:, None] * T + offs_j[None, :],
                          mask=t_in[:, None] & j_in[None, :], other=0) != 0
        m_i, l_i, acc = _online_softmax_step(q, k, v, allowed, m_i, l_i, acc, qk_scale)

    # Every real query sees itself (diagonal of tree_mask), so l_i > 0; the guard is for the
    # padding queries past T, whose rows are never stored.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = OUT + ((b * H + h) * T + offs_t[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=t_in[:, None] & d_in[None, :])


# Copied into the emitted standalone file, which imports no tokenfx: so a plain ValueError.
def _check_shapes(q, k, v, key_mask, tree_mask, slots):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"tree_attention: expected q [B, H, T, D], k = v [B, Hkv, S, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hkv == 0 or H % Hkv:
        raise ValueError(f"tree_attention: k / v {tuple(k.shape)} do not match q {tuple(q.shape)} "
                         f"(same B and D, H a multiple of Hkv)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"tree_attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if tuple(key_mask.shape) != (B, S) or tuple(tree_mask.shape) != (B, T, T) or tuple(slots.shape) != (T,):
        raise ValueError(f"tree_attention: expected key_mask [{B}, {S}], tree_mask [{B}, {T}, {T}], slots [{T}]; got "
                         f"{tuple(key_mask.shape)}, {tuple(tree_mask.shape)}, {tuple(slots.shape)}")


def _dot_in_fp32(dtype) -> bool:
    # The interpreter's tl.dot multiplies bf16 operands as their raw uint16 bits (triton 3.9):
    # there, bf16 blocks are upcast to fp32 first. Compiled kernels keep bf16 tensor-core dots.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _launch(q, k, v, key_mask, tree_mask, slots, scale, *, group, block_t, block_s, block_j, num_warps):
    """Run :func:`tree_attention_kernel` on checked inputs; returns ``[B, H, T, D]`` in q.dtype."""
    B, H, T, D = q.shape
    S = k.shape[2]
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    # Masks are read as bytes: a bool tensor's storage viewed as uint8 (no copy); both are tiny.
    key_mask = (key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask).contiguous()
    tree_mask = (tree_mask if tree_mask.dtype == torch.bool else tree_mask != 0).contiguous().view(torch.uint8)
    slots = slots.contiguous()
    grid = (B * H, triton.cdiv(T, block_t))
    tree_attention_kernel[grid](
        q, k, v, key_mask, tree_mask, slots, out,
        *q.stride(), *k.stride(), *v.stride(),
        H, T, S, float(scale) * LOG2E,
        HEAD_DIM=D, GROUP=group, BLOCK_D=max(triton.next_power_of_2(D), 16),
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_J=block_j, DOT_IN_FP32=_dot_in_fp32(q.dtype),
        num_warps=num_warps,
    )
    return out


def _block_sizes(tree_size: int | None) -> dict:
    # tl.dot needs every block dim >= 16. A tree of up to 64 tokens is one query block and one
    # tree-key block; 64 prefix keys per step keep the fp32 [BLOCK_T, BLOCK_S] scores small.
    block_t = 16 if tree_size is None else min(max(triton.next_power_of_2(tree_size), 16), 64)
    return dict(block_t=block_t, block_s=64, block_j=block_t, num_warps=4)


def tree_attention_triton(q, k, v, key_mask, tree_mask, slots, scale: float):
    """Launch :func:`tree_attention_kernel`. q ``[B, H, T, D]``, k / v ``[B, Hkv, S, D]`` (any
    strides, same dtype: fp32, fp16 or bf16), key_mask ``[B, S]`` (nonzero = visible),
    tree_mask ``[B, T, T]``, slots ``[T]``. Returns ``[B, H, T, D]`` in q.dtype, equal to
    ``tree_attention_reference`` within the input dtype's rounding."""
    _check_shapes(q, k, v, key_mask, tree_mask, slots)
    group = q.shape[1] // k.shape[1]
    return _launch(q, k, v, key_mask, tree_mask, slots, scale, group=group, **_block_sizes(q.shape[2]))


_LAUNCH_TEMPLATE = '''

def launch(q, k, v, key_mask, tree_mask, slots, scale):
    """tree_attention(q [B, {H_expr}, T, {D}], k / v [B, Hkv, S, {D}] {dtype}, key_mask [B, S], tree_mask [B, T, T],
    slots [T], scale) -> [B, H, T, {D}] {dtype}."""
    _check_shapes(q, k, v, key_mask, tree_mask, slots)
    if q.shape[-1] != HEAD_DIM or q.dtype != DTYPE or q.shape[1] != GROUP * k.shape[1]:
        raise ValueError(
            f"kernel specialised to head dim {{HEAD_DIM}}, {{DTYPE}}, GQA group {{GROUP}}; got q {{q.dtype}} "
            f"{{tuple(q.shape)}}, k {{tuple(k.shape)}}"
        )
    return _launch(q, k, v, key_mask, tree_mask, slots, scale, group=GROUP, block_t=BLOCK_T, block_s=BLOCK_S,
                   block_j=BLOCK_J, num_warps=NUM_WARPS)
'''


def emit_source(*, head_dim: int, dtype: str, group: int, tree_size: int | None = None,
                block_t: int | None = None, block_s: int | None = None, block_j: int | None = None) -> str:
    """Standalone Python source of :func:`tree_attention_kernel` plus a ``launch(q, k, v,
    key_mask, tree_mask, slots, scale)`` specialised to one head dim, dtype (a torch dtype
    name: ``"float32"``, ``"float16"`` or ``"bfloat16"``), GQA group ``H // Hkv`` and block
    sizes. Block sizes left None are chosen for ``tree_size`` as :func:`tree_attention_triton`
    does; any T and S still run, the block sizes only tile them."""
    dtype = dtype.removeprefix("torch.")
    if dtype not in _DTYPES:
        raise OpInputError(f"tree_attention: dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    if head_dim < 1 or group < 1:
        raise OpInputError(f"tree_attention: head_dim and group must be positive, got {head_dim}, {group}")
    blocks = _block_sizes(tree_size)
    blocks.update({name: size for name, size in
                   (("block_t", block_t), ("block_s", block_s), ("block_j", block_j)) if size is not None})
    for name in ("block_t", "block_s", "block_j"):
        size = blocks[name]
        if size < 16 or size & (size - 1):
            raise OpInputError(f"tree_attention: {name} must be a power of two >= 16 (tl.dot), got {size}")
    notes = ("out = launch(q, k, v, key_mask, tree_mask, slots, scale): query i of row b attends to the keys",
             "  with key_mask[b, s] != 0 and to the tree keys at slots[j] with tree_mask[b, i, j];",
             f"  softmax in fp32, output in {dtype}.")
    constants = (
        f"HEAD_DIM = {head_dim}\n"
        f"GROUP = {group}  # query heads per kv head\n"
        f"BLOCK_T = {blocks['block_t']}  # tree queries per program\n"
        f"BLOCK_S = {blocks['block_s']}  # prefix keys per step\n"
        f"BLOCK_J = {blocks['block_j']}  # tree keys per step\n"
        f"NUM_WARPS = {blocks['num_warps']}\n"
        f"DTYPE = torch.{dtype}\n"
        f"LOG2E = {LOG2E!r}\n"
    )
    h_expr = f"{group} * Hkv" if group > 1 else "Hkv"
    specialised_to = (f"head_dim={head_dim}, dtype={dtype}, group={group}, block_t={blocks['block_t']}, "
                      f"block_s={blocks['block_s']}, block_j={blocks['block_j']}")
    functions = (_online_softmax_step, tree_attention_kernel, _check_shapes, _dot_in_fp32, _launch)
    return emit("tree_attention", __name__, specialised_to, notes, constants, functions,
                _LAUNCH_TEMPLATE.format(D=head_dim, dtype=dtype, H_expr=h_expr), stdlib=("os",))
