"""``token_merge``: ToMe's bipartite soft matching inside every selected block.

Contract: approximate (r = 0 everywhere leaves the graph untouched). Preconditions: a
bidirectional encoder with SDPA attention (BERT-style text encoders, ViT); decoders are
refused (merging would break their cache).

Before (one post-norm block)::

    h = layer_norm(attn_out + x)                  # after the attention residual
    y = layer_norm(mlp(h) + h)

After ``token_merge(r=8)`` (the same in pre-norm blocks, on the residual add)::

    h = layer_norm(attn_out + x)                                       # [B, N, C]
    role         = A/B alternately over the row's participating tokens (not CLS, not pads)
    score, match = tokenfx.bipartite_match(metric, role)               # cosine, best B per A
    assign, keep = tokenfx.reduction_plan(score, match, role, real, 8, True)
    h, size      = tokenfx.merge_tokens(h, size, assign, 8)           # [B, N - 8, C], size-weighted
    y = layer_norm(mlp(h) + h)
    ... every later block: sdpa(q, k, v, attn_mask=where(real, log(size), finfo.min))

The steps (ToMe §3): the metric is the block's keys averaged over heads (``metric="keys"``,
ToMe's choice) or the hidden states at the merge point (``metric="hidden"``; measured far
better on a sentence embedder, see benchmarks/token_reduction.py); A and B alternate; each A
token's best B match by cosine; the r best-matched A tokens merge into their match by
size-weighted average; CLS (``protect``) never merges. Proportional attention adds
``log(size)`` to every later attention's keys as SDPA's float mask (``proportional=False``
drops it). Padded text batches, pooling, ``unmerge`` and how a second reduction pass joins
the chain: :mod:`tokenfx.ir.token_reduction`.

``r`` is an int for every block, a per-block list, or with ``inflect`` a linear ramp with
the same total (``inflect > 0``: more merging in later blocks).

The pass mutates the graph it is handed (a clone: ``Pass.run`` and the PassManager make it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from tokenfx.errors import PassOptionError
from tokenfx.ir import token_reduction as T
from tokenfx.passes.base import Pass, PassResult, register

@register
class TokenMerge(Pass):
    """Bipartite soft matching (ToMe) after each block's attention; approximate."""

    name = "token_merge"
    contract = "approximate"

    @dataclasses.dataclass
    class Options(T.ReductionOptions):  # + proportional, protect, unmerge
        r: int | list[int] | None = None  # tokens merged per block: int, or one per block (default 8)
        inflect: float = 0.0  # ramp an int r: r·(1 - inflect) first … r·(1 + inflect) last
        metric: Literal["keys", "hidden"] = "keys"  # the block's keys (ToMe) or the hidden states
        ratio: float | list[float] = 0.0  # instead of r: merge this share of each sample's tokens per block

    def rewrite(self, graph):
        """Insert the merge steps into ``graph`` itself (the clone :meth:`Pass.run` or the
        PassManager hands it)."""
        o = self.options
        blocks = graph.structure.blocks
        ratios = self._ratios(len(blocks))
        plan = T.schedule(8 if o.r is None else o.r, len(blocks), o.inflect) if ratios is None else ratios
        if not any(plan):
            return PassResult(graph, matched=[], stats={"r": plan})
        chain = T.Chain(graph, tuple(int(p) for p in o.protect), o.unmerge)
        matched = []
        protected = len(chain.protect)
        for index, value in enumerate(plan):
            if value == 0:
                continue
            if ratios is not None:
                # the batch's count follows the tokens reaching the step; each sample merges its own share
                count = functools.partial(T.ratio_count, chain.g, ratio=value, protected=protected)
                quota = functools.partial(_quota, chain.g, ratio=value)
                label = f"{value:g} of each sample"
            else:
                count = T.check_cap(chain, index, value, clamp=not isinstance(o.r, (list, tuple)))
                quota, label = None, str(count)
                if count == 0:
                    continue
            attention = blocks[index].attention[0]

            def roles(x, state):
                return T.participating_parity(chain.g, state.part)

            def metric(x, attention=attention):
                return x if o.metric == "hidden" else T.keys_metric(chain.g, attention)

            chain.insert(index, count, "merge", roles, metric, o.proportional, quota,
                         reads_attention=o.metric == "keys")
            matched.append(f"{blocks[index].name}: merge {label}")
        matched += chain.finish()
        return PassResult(graph, matched=matched, stats={"r": plan, "metric": o.metric})

    def _ratios(self, num_blocks: int) -> list[float] | None:
        o = self.options
        if not o.ratio:
            return None
        if o.r is not None or o.inflect:
            raise PassOptionError("token_merge: give r (with inflect) or ratio, not both")
        values = list(o.ratio) if isinstance(o.ratio, (list, tuple)) else [o.ratio] * num_blocks
        if len(values) != num_blocks:
            raise PassOptionError(f"ratio={values} has {len(values)} entries; the model has {num_blocks} blocks")
        if any(not 0.0 <= v <= 0.5 for v in values):
            raise PassOptionError(f"ratio={values}: each block merges a share in [0, 0.5] (ToMe's cap: half the tokens)")
        return [float(v) for v in values]


def _quota(g, x, state, ratio: float):
    return T.ratio_quota(g, state.part, ratio)
