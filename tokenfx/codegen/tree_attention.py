"""``tokenfx::tree_attention``: attention of a block of tree tokens over a KV buffer.

    out[B, H, T, D] = tree_attention(q[B, H, T, D], k[B, Hkv, S, D], v[B, Hkv, S, D],
                                     key_mask[B, S], tree_mask[B, T, T], slots[T], scale)

Query ``i`` of row ``b`` attends to key ``s`` when ``key_mask[b, s] != 0`` (the cached prefix,
visible to every query) or when ``s == slots[j]`` for a tree token ``j`` with
``tree_mask[b, i, j]`` (its ancestors and itself: the tree's K/V live in the buffer at
``slots``, and those slots have ``key_mask == 0``). ``H`` is a multiple of ``Hkv`` (GQA:
query head ``h`` reads kv head ``h // (H // Hkv)``); ``scale`` multiplies ``q·k``.
``tree_mask`` must be true on the diagonal (every token sees itself), so no row is empty.

The ``tree_verify`` pass inserts it in place of each attention core of a decode graph.
Implementations (DESIGN.md's op recipe): fake; CPU = :func:`tree_attention_reference`
(plain torch: the dense mask, then SDPA, which on CPU is a flash kernel); CUDA = the Triton
kernel in ``codegen/triton/tree_attention.py`` (online softmax over the cached keys, then
over the tree keys gathered by ``slots`` under the ancestor mask, no dense mask built);
ONNX = ``codegen/onnx_tree_attention.py``.

The schema names its first arguments like SDPA's (``query, key, value``), so the ModelMap
reads a tree graph's attention cores as it reads SDPA's.

Defined with the low-level Library API (as ``kv_write``): it runs once per layer per
decode step, where ``custom_op``'s Python dispatch costs ~4x more per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenfx.codegen.ops import register_op

_lib = torch.library.Library("tokenfx", "FRAGMENT")
_lib.define("tree_attention(Tensor query, Tensor key, Tensor value, Tensor key_mask, Tensor tree_mask, Tensor slots, "
            "float scale) -> Tensor")


def tree_attention_reference(q, k, v, key_mask, tree_mask, slots, scale: float):
    """Plain torch: build the ``[B, 1, T, S]`` bool mask and call SDPA (GQA without a repeat)."""
    b, h, t, _ = q.shape
    s = k.shape[2]
    cached = (key_mask != 0)[:, None, None, :]  # [B, 1, 1, S]
    placed = torch.zeros(b, 1, t, s, dtype=torch.bool, device=q.device).index_copy(3, slots, tree_mask[:, None].bool())
    allowed = cached | placed  # functional (no in-place ops): decomposes into graphs Inductor compiles
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=h != k.shape[1])


def _cuda(q, k, v, key_mask, tree_mask, slots, scale):
    from tokenfx.codegen.triton.tree_attention import tree_attention_triton

    if q.dtype == torch.float64:  # the kernel accumulates in fp32
        return tree_attention_reference(q, k, v, key_mask, tree_mask, slots, scale)
    return tree_attention_triton(q, k, v, key_mask, tree_mask, slots, scale)


_lib.impl("tree_attention", tree_attention_reference, "CPU")
_lib.impl("tree_attention", _cuda, "CUDA")


@torch.library.register_fake("tokenfx::tree_attention")
def _(q, k, v, key_mask, tree_mask, slots, scale):
    return torch.empty_like(q)


register_op(
    "tree_attention",
    op=torch.ops.tokenfx.tree_attention.default,
    reference=tree_attention_reference,
    triton_module="tokenfx.codegen.triton.tree_attention",
    onnx_translation="tokenfx.codegen.onnx_tree_attention:translate",
)
