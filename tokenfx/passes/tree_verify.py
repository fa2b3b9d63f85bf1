"""``tree_verify``: a decode-step graph → a graph that verifies a whole draft tree in one call.

Contract: exact (each tree token gets the logits the model gives it after the cached prefix
and its own ancestors, the same arithmetic as decoding that root-to-node path).

Before (``kv_cache(mode=decode, logits=all)``)::

    logits[B, T, V], new_kv = step(tokens[B, T], positions[B, T], kv_cache[L, 2, B, Hkv, S, D],
                                   cache_mask[B, S], token_mask[B, T] [, slots[T]])

After::

    logits[B, T, V], new_kv = verify(tokens[B, T], positions[B, T], kv_cache, cache_mask[B, S],
                                     tree_mask[B, T, T] [, slots[T]])

``tree_mask[b, i, j]``: tree token ``j`` is token ``i`` itself or one of its ancestors in row
``b``'s tree (:class:`tokenfx.ir.tree.Tree`'s ``mask``); ``positions`` are
each row's prefix length + node depth (explicit, so RoPE and learned positions both work);
each row has its own tree, prefix length and cache mask. Rows with smaller trees pad theirs
with self-only nodes. A causal ``tree_mask`` makes the graph an ordinary decode step.

How: every attention core of the decode graph (found through the ModelMap) becomes
``tokenfx::tree_attention(q, keys, values, key_mask, tree_mask, slots, scale)``: the cached
keys under ``cache_mask`` plus the tree's own keys under the ancestor mask. With
``cache_update="inplace"`` the tree's K/V are written into the buffer at ``slots`` first and
attention reads the buffer; with ``"output"`` (ONNX) the keys are ``cat(cache, new)`` and the
tree's slots are the last ``T``. The token-mask input is replaced by ``tree_mask`` and the
graph is exported again (dynamic batch, tree size and cache length).

The pass mutates the graph it is handed (a clone: ``Pass.run`` and the PassManager make it).
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx

from tokenfx.errors import MappingError, PassOptionError
from tokenfx.ir import aten as A
from tokenfx.ir.graph import ModelGraph
from tokenfx.passes.base import Pass, PassResult, register
from tokenfx.ir.kv_layout import example_inputs, reexport
from tokenfx.ir.rewrite import inherit_module_path

aten = torch.ops.aten


@register
class TreeVerify(Pass):
    """Make a decode-step graph verify a token tree per row in one call (exact)."""

    name = "tree_verify"
    contract = "exact"

    @dataclasses.dataclass
    class Options:
        pass

    def rewrite(self, graph: ModelGraph) -> PassResult:
        """Rewrite ``graph``'s module in place, then export it again (the clone :meth:`Pass.run` or
        the PassManager hands it)."""
        layout = graph.kv
        if layout is None or layout.mode != "decode":
            raise PassOptionError("tree_verify: needs a decode-step graph; run kv_cache(mode=decode, logits=all) first")
        if layout.logits != "all":
            raise PassOptionError("tree_verify: the decode graph returns only the last position's logits; "
                                  "build it with kv_cache(mode=decode, logits=all) (every tree node needs its logits)")
        if "tree_mask" in layout.inputs:
            raise PassOptionError("tree_verify: the graph already verifies trees")
        structure = graph.structure
        attentions = [(b, a) for b in structure.blocks for a in b.attention]
        g = graph.gm.graph
        inputs = {n.name: n for n in g.nodes if n.op == "placeholder"}
        missing = [name for name in layout.inputs if name not in inputs]
        if missing:
            raise MappingError(f"tree_verify: the decode graph has no input(s) {missing}")
        tokens, cache, cache_mask, token_mask = (inputs[k] for k in ("tokens", "kv_cache", "cache_mask", "token_mask"))
        inplace = layout.cache_update == "inplace"
        writes = [n for n in g.nodes if n.op == "call_function" and "kv_write" in str(n.target)]
        if inplace and len(writes) != len(attentions):
            raise MappingError(f"tree_verify: {len(attentions)} attention cores but {len(writes)} cache writes")

        with g.inserting_before(token_mask):
            tree_mask = g.placeholder("tree_mask")
        after_inputs = [n for n in g.nodes if n.op == "placeholder"][-1].next
        with g.inserting_before(after_inputs):
            if inplace:
                key_mask, slots = cache_mask, inputs["slots"]
            else:  # keys are cat(cache, new): the tree's slots are the last T
                zeros = g.call_function(aten.zeros_like.default, (tokens,))
                key_mask = g.call_function(aten.cat.default, ([cache_mask, zeros], 1))
                past = g.call_function(aten.sym_size.int, (cache, 4))
                count = g.call_function(aten.sym_size.int, (tokens, 1))
                end = g.call_function(operator.add, (past, count))
                slots = g.call_function(aten.arange.start, (past, end), {"dtype": torch.long, "device": A.val(tokens).device})

        op = torch.ops.tokenfx.tree_attention.default
        for layer, (block, att) in enumerate(attentions):
            if att.core.target is not aten.scaled_dot_product_attention.default:
                raise MappingError(f"tree_verify: block {block.name}: expected the kv_cache pass's SDPA core, "
                                   f"found {att.core.target}")
            a = A.sdpa_args(att.core)
            if inplace and writes[layer].args[1] != layer:
                raise MappingError(f"tree_verify: block {block.name}: cache write for layer {writes[layer].args[1]}")
            scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(att.head_dim)
            existing = set(g.nodes)
            with g.inserting_before(att.core):
                core = g.call_function(op, (a["q"], a["k"], a["v"], key_mask, tree_mask, slots, float(scale)))
            inherit_module_path(set(g.nodes) - existing, att.core)
            att.core.replace_all_uses_with(core)
            g.erase_node(att.core)
        g.eliminate_dead_code()
        if token_mask.users:
            raise MappingError("tree_verify: token_mask is still used outside attention: "
                               + ", ".join(u.name for u in token_mask.users))
        g.erase_node(token_mask)
        g.set_codegen(torch.fx.graph.CodeGen())  # the signature changed: plain positional inputs, named as above
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(graph.gm, attr):
                delattr(graph.gm, attr)
        g.lint()
        graph.gm.recompile()

        new_layout = dataclasses.replace(layout, inputs=tuple("tree_mask" if n == "token_mask" else n for n in layout.inputs))
        example_ids = A.val(tokens)
        new = reexport(graph.gm, graph, new_layout, torch.zeros(1, 1, dtype=torch.long, device=example_ids.device))
        return PassResult(new, matched=[f"{b.name}: tree attention" for b, _ in attentions],
                          stats={"layers": len(attentions)})

    def verify_outputs(self, before: ModelGraph, after: ModelGraph):
        """(reference, rewritten) pairs: a causal tree equals the decode step on the same
        tokens; each branch of a two-branch tree equals the decode step on that branch alone."""
        return reference_pairs(before, after)


def reference_pairs(before: ModelGraph, after: ModelGraph):
    from tokenfx.ir.tree import Tree

    layout = before.kv
    vocab = int(getattr(before.config, "vocab_size", 2) or 2)
    past, t = 5, 5
    args = list(example_inputs(layout, batch=2, tokens=t, past=past, vocab=vocab))
    cache = torch.randn(args[2].shape, generator=torch.Generator().manual_seed(1)).to(layout.dtype)
    pairs = []
    with torch.no_grad():
        # a chain: the tree graph is the decode step
        ref, _ = before.gm(*_with_cache(args, cache))
        tree_args = list(args)
        tree_args[4] = Tree.chain(t - 1).mask.expand(2, t, t).contiguous()
        got, _ = after.gm(*_with_cache(tree_args, cache))
        pairs.append((ref, got))
        # two branches under the root: nodes [root, a1, a2, b1, b2]
        tree = Tree([-1, 0, 1, 0, 3])
        tree_args[4] = tree.mask.expand(2, t, t).contiguous()
        tree_args[1] = (tree.depth + past).expand(2, t).contiguous()
        got, _ = after.gm(*_with_cache(tree_args, cache))
        for branch in ([0, 1, 2], [0, 3, 4]):
            idx = torch.tensor(branch)
            chain = _chain_args(layout, args, idx, past)
            ref, _ = before.gm(*_with_cache(chain, cache))
            pairs.append((ref, got[:, idx]))
    return pairs


def _with_cache(args, cache):
    args = list(args)
    args[2] = cache.clone()  # an in-place graph writes into its cache
    return args


def _chain_args(layout, args, idx, past):
    out = list(args)
    out[0] = args[0][:, idx].contiguous()
    out[1] = (torch.arange(idx.numel()) + past).expand(args[0].shape[0], -1).contiguous()
    out[4] = torch.ones_like(out[0])
    if layout.cache_update == "inplace":
        out[5] = args[5][: idx.numel()].contiguous()
        # the same buffer length; slots past the chain stay masked
    return out
