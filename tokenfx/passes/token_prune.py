"""``token_prune``: Zero-TPrune — drop the tokens the attention graph says matter least.

Contract: approximate (r = 0 everywhere leaves the graph untouched). Preconditions as for
``token_merge`` (a bidirectional SDPA encoder); the two share one reduction chain, so
``token_prune(r=[0, 8, 8, 0]),token_merge(r=[0, 0, 0, 8])`` prunes and merges in one graph (a
second step in the same block must not read that block's attention: ``metric='hidden'``).

Before (a block that prunes)::

    o = sdpa(q, k, v, mask)
    h = layer_norm(o·Wo + x)
    y = layer_norm(mlp(h) + h)

After ``token_prune(r=8)``::

    p = softmax(q kᵀ · scale + mask)                 # only in pruning blocks: the same attention,
    o = p @ v                                        # with its probabilities kept for the ranking
    h = layer_norm(o·Wo + x)
    s     = tokenfx.attention_pagerank(p, real, iterations, cls_weight)   # [B, H, N]
    imp   = sqrt(mean over kept heads of s²)                             # heads combined by RMS
    role  = tokenfx.importance_roles(imp, part)      # less important half = A, the rest = B
    score, match = tokenfx.bipartite_match(mean_h(k), role)             # most similar B (keys)
    assign, keep = tokenfx.reduction_plan(score, match, role, real, 8, True)
    h = h[keep] ;  size = each survivor's size + the sizes of the A tokens most similar to it
    y = layer_norm(mlp(h) + h)

The steps (Zero-TPrune §3): importance is a weighted PageRank over the attention matrix per
head, from a uniform start (the CLS token's start weight × √N with ``cls_weight``),
``iterations`` steps per block (default: more in shallow blocks, 1 in deep ones); heads whose
score variance lies outside ``head_band`` (a [low, high] multiple of the median head's) are
left out of the root-mean-square; then the similarity stage: the less important half is A,
each A token's most similar B token by cosine of keys, and the r most similar A tokens go.
A pruned token's size moves to its most similar survivor, so size-weighted pooling and
proportional attention count it as a copy of that token (and ``unmerge`` copies that value
back to it). Blocks that do not prune keep SDPA untouched.

``r`` is an int for every block or a per-block list; ``keep`` instead keeps that fraction of
the tokens reaching each block in ``blocks`` (block indices from 0; a symbolic count under
dynamic shapes).

The pass mutates the graph it is handed (a clone: ``Pass.run`` and the PassManager make it).
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import operator

import torch

from tokenfx.errors import MappingError, PassOptionError
from tokenfx.ir import aten as A
from tokenfx.ir import token_reduction as T
from tokenfx.ir.rewrite import inherit_module_path
from tokenfx.passes.base import Pass, PassResult, register

aten = torch.ops.aten
tfx = torch.ops.tokenfx


def default_iterations(num_blocks: int) -> list[int]:
    """More PageRank steps where attention is diffuse (shallow blocks), one in deep blocks."""
    return [10 if i < num_blocks / 3 else 3 if i < 2 * num_blocks / 3 else 1 for i in range(num_blocks)]


@register
class TokenPrune(Pass):
    """Zero-TPrune: attention-graph PageRank importance + similarity stage; approximate."""

    name = "token_prune"
    contract = "approximate"

    @dataclasses.dataclass
    class Options(T.ReductionOptions):  # + proportional, protect, unmerge
        r: int | list[int] = 0  # tokens pruned per block: int, or one per block
        keep: float = 0.0  # instead of r: keep this fraction (0.5 … 1) of the tokens in `blocks`
        blocks: list[int] | None = None  # indices of the blocks that prune with `keep` (default: all but the first)
        iterations: int | list[int] | None = None  # PageRank steps per block (default: 10 / 3 / 1 by depth)
        cls_weight: bool = False  # start the first token at √N times the others
        head_band: list[float] | None = None  # [low, high] × the median head's score variance

    def rewrite(self, graph):
        """Insert the prune steps into ``graph`` itself (the clone :meth:`Pass.run` or the
        PassManager hands it)."""
        o = self.options
        blocks = graph.structure.blocks
        L = len(blocks)
        plan = self._plan(L)
        iterations = self._iterations(L)
        if o.head_band is not None and (len(o.head_band) != 2 or not 0 <= o.head_band[0] <= o.head_band[1]):
            raise PassOptionError(f"token_prune: head_band must be [low, high] with 0 ≤ low ≤ high, got {o.head_band}")
        if not any(plan):
            return PassResult(graph, matched=[], stats={"r": plan})
        chain = T.Chain(graph, tuple(int(p) for p in o.protect), o.unmerge)
        matched = []
        for index, r in enumerate(plan):
            if r == 0:
                continue
            attention = blocks[index].attention[0]
            if attention.kv_heads != attention.heads:
                raise MappingError(f"token_prune: block {blocks[index].name} shares K/V heads ({attention.kv_heads} for "
                                   f"{attention.heads}); PageRank needs one attention matrix per head")
            probs = _eager_attention(chain.g, attention)
            if r == "keep":
                def r_step(x):
                    return _keep_count(chain.g, x, o.keep)
            else:
                r_step = T.check_cap(chain, index, r, clamp=not isinstance(o.r, (list, tuple)))
                if r_step == 0:
                    continue

            def roles(x, state, probs=probs, steps=iterations[index]):
                return _importance_roles(chain.g, probs, state, steps, o.cls_weight, o.head_band)

            def metric(x, attention=attention):
                return T.keys_metric(chain.g, attention)

            chain.insert(index, r_step, "prune", roles, metric, o.proportional, reads_attention=True)
            matched.append(f"{blocks[index].name}: prune {'keep ' + str(o.keep) if r == 'keep' else r} "
                           f"({iterations[index]} PageRank steps)")
        matched += chain.finish()
        return PassResult(graph, matched=matched, stats={"r": plan, "iterations": iterations})

    def _plan(self, L: int) -> list:
        o = self.options
        if o.keep:
            if o.r:
                raise PassOptionError("token_prune: give r or keep, not both")
            if not 0.5 <= o.keep <= 1.0:
                raise PassOptionError(f"token_prune: keep={o.keep} must be in [0.5, 1] (a block prunes at most half)")
            pruning = list(range(1, L)) if o.blocks is None else list(o.blocks)
            bad = [i for i in pruning if not 0 <= i < L]
            if bad:
                raise PassOptionError(f"token_prune: block {bad[0]} does not exist; the model has blocks 0 … {L - 1}")
            return ["keep" if i in pruning and o.keep < 1.0 else 0 for i in range(L)]
        if o.blocks is not None:
            raise PassOptionError("token_prune: blocks= goes with keep=; with r give one count per block")
        return T.schedule(o.r, L)

    def _iterations(self, L: int) -> list[int]:
        it = self.options.iterations
        if it is None:
            return default_iterations(L)
        values = list(it) if isinstance(it, (list, tuple)) else [it] * L
        if len(values) != L or any(int(v) < 1 for v in values):
            raise PassOptionError(f"token_prune: iterations={it} must be ≥ 1, one per block ({L} blocks) or one for all")
        return [int(v) for v in values]


def _eager_attention(g: torch.fx.Graph, attention) -> torch.fx.Node:
    """Replace the block's SDPA with softmax(q kᵀ·scale + mask) @ v; return the probabilities."""
    core = attention.core
    a = A.sdpa_args(core)
    q, k, v, mask = a["q"], a["k"], a["v"], a["mask"]
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(attention.head_dim)
    existing = set(g.nodes)
    with g.inserting_before(core):
        scores = g.call_function(aten.matmul.default, (q, g.call_function(aten.transpose.int, (k, -2, -1))))
        scores = g.call_function(aten.mul.Tensor, (scores, float(scale)))
        dtype = A.val(q).dtype
        if mask is None:  # still an add: a reduction step in an earlier block puts its bias here
            additive = 0.0
        elif A.val(mask).dtype == torch.bool:
            additive = g.call_function(aten.where.Scalar, (mask, 0.0, torch.finfo(dtype).min))
            additive = g.call_function(aten._to_copy.default, (additive,), {"dtype": dtype})
        else:
            additive = mask
        scores = masked = g.call_function(aten.add.Tensor, (scores, additive))
        probs = g.call_function(aten._softmax.default, (scores, -1, False))
        out = g.call_function(aten.matmul.default, (probs, v))
    out.meta[T.MASK_ADD] = masked.name  # where a reduction step in an earlier block puts its bias
    inherit_module_path(set(g.nodes) - existing, core)
    T._fake_values(g.owning_module, set(g.nodes) - existing)
    if core.target is aten.scaled_dot_product_attention.default:
        core.replace_all_uses_with(out)
    else:  # fused variants return (out, logsumexp, ...): only the output may be read
        for user in list(core.users):
            if user.target is not operator.getitem or user.args[1] != 0:
                raise MappingError(f"token_prune: {core.name} output {user.args[1]} is read; cannot replace the core")
            user.replace_all_uses_with(out)
            g.erase_node(user)
    g.erase_node(core)
    attention.core = out
    return probs


def _importance_roles(g, probs, state, steps: int, cls_weight: bool, band) -> torch.fx.Node:
    s = g.call_function(tfx.attention_pagerank.default, (probs, state.real, steps, cls_weight))  # [B, H, N]
    sq = g.call_function(aten.mul.Tensor, (s, s))
    if band is None:
        importance = g.call_function(aten.sqrt.default, (g.call_function(aten.mean.dim, (sq, [1])),))
    else:
        # heads whose scores are (almost) flat or dominated by one token say little: leave them out
        realf = g.call_function(aten.unsqueeze.default, (g.call_function(aten._to_copy.default, (state.real,),
                                                                          {"dtype": torch.float32}), 1))  # [B, 1, N]
        count = g.call_function(aten.clamp_min.default, (g.call_function(aten.sum.dim_IntList, (realf, [2], True)), 1.0))
        mean = g.call_function(aten.div.Tensor, (g.call_function(aten.sum.dim_IntList, (s, [2], True)), count))
        dev = g.call_function(aten.mul.Tensor, (g.call_function(aten.sub.Tensor, (s, mean)), realf))
        var = g.call_function(aten.div.Tensor, (g.call_function(aten.sum.dim_IntList, (
            g.call_function(aten.mul.Tensor, (dev, dev)), [2], True)), count))  # [B, H, 1], real tokens only
        median = g.call_function(aten.median.dim, (var, 1, True))
        median = g.call_function(operator.getitem, (median, 0))
        lo = g.call_function(aten.ge.Tensor, (var, g.call_function(aten.mul.Tensor, (median, float(band[0])))))
        hi = g.call_function(aten.le.Tensor, (var, g.call_function(aten.mul.Tensor, (median, float(band[1])))))
        w = g.call_function(aten._to_copy.default, (g.call_function(aten.logical_and.default, (lo, hi)),),
                            {"dtype": torch.float32})
        total = g.call_function(aten.sum.dim_IntList, (g.call_function(aten.mul.Tensor, (sq, w)), [1]))
        heads = g.call_function(aten.clamp_min.default, (g.call_function(aten.sum.dim_IntList, (w, [1])), 1.0))
        importance = g.call_function(aten.sqrt.default, (g.call_function(aten.div.Tensor, (total, heads)),))
    return g.call_function(tfx.importance_roles.default, (importance, state.part))


def _keep_count(g, x, keep: float) -> torch.fx.Node:
    """``N - floor(keep · N)`` tokens to remove, as a graph value (N may be symbolic)."""
    n = g.call_function(aten.sym_size.int, (x, 1))
    ratio = fractions.Fraction(keep).limit_denominator(1000)
    num, den = ratio.numerator, ratio.denominator
    kept = g.call_function(operator.floordiv, (g.call_function(operator.mul, (n, num)), den))
    return g.call_function(operator.sub, (n, kept))
