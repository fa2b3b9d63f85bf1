"""The ``tokenfx::*`` ops of token reduction (``token_merge``, ``token_prune``).

A reduction step inside a block takes the residual stream ``x [B, N, C]`` and per-token state
(``size [B, N]`` — how many input tokens each token stands for; ``real [B, N]`` — not padding;
``role [B, N]`` — 0 takes no part, 1 = set A (may be removed), 2 = set B (may receive)) and
returns ``N - r`` tokens::

    score, match = bipartite_match(metric, role)          # A token's best B partner (cosine)
    assign, keep = reduction_plan(score, match, role, real, r, merge)
    x', size'    = merge_tokens(x, size, assign, r)       # size-weighted average into place

- ``bipartite_match(metric [B, N, C], role [B, N]) → score [B, N] f32, match [B, N] i64``:
  for an A token, the largest cosine to a B token and that token's index (first on ties);
  ``-inf`` and its own index for every other token (or when a row has no B token).
- ``reduction_plan(score, match, role, real, r, merge) → assign [B, N] i64, keep [B, N - r] i64``:
  each row removes exactly ``r`` tokens so shapes stay uniform: first the A tokens with a
  partner, best-matched first (ToMe: "sort A by that score, the top r merge"), then, if the
  row has too few, padding tokens (a short row in a padded batch drops pads instead; pads are
  never A or B, so they never merge into real tokens nor receive one). With ``quota [B]`` a row's
  best ``quota[b]`` candidates go first, then its pads, then its other candidates (a ratio
  schedule: each sample merges its own share, the batch drops pads to keep shapes uniform).
  Ties go to the lower
  index (stable sort), so the plan is deterministic. ``keep`` lists the survivors in their
  original order; ``assign[i]`` is where token i goes in the new sequence: its own new index
  if kept, its partner's if merged (``merge=True``), and ``N - r`` (a discard slot) if dropped.
- ``merge_tokens(x [B, N, C], size [B, N] f32, assign [B, N] i64, r) → x' [B, N - r, C], size'``:
  ``x' = Σ_{i→j} size_i x_i / Σ_{i→j} size_i`` and ``size' = Σ_{i→j} size_i`` (ToMe's
  ``merge(x·size, sum) / merge(size, sum)``), accumulated in fp32.
- ``attention_pagerank(probs [B, H, N, N], real [B, N], iterations, cls_weight) → s [B, H, N]``:
  Zero-TPrune's importance: per head, ``s ← Aᵀ s`` from a uniform start ``1/n`` over the row's
  ``n`` real tokens (the first token's start weight × √n with ``cls_weight``); pads hold 0.
  The paper's update also divides by N each step; that only rescales every score alike (the
  ranking is unchanged) and underflows fp32 after ~16 iterations at N ≈ 200, so it is left out:
  rows of A are stochastic, so s keeps its total.
- ``importance_roles(importance [B, N], participates [B, N] bool) → role [B, N] i64``: the
  less important ``⌈U/2⌉`` of a row's ``U`` participating tokens are A, the rest B (ties by
  index).

Each op has a fake, a plain-torch CPU reference (what runs without a GPU, and what Inductor
inlines on CPU), a CUDA kernel from ``codegen/triton/token_reduce.py`` where the work is
worth a kernel (matching, merging, PageRank), and an onnxscript translation in
``codegen/onnx_token_reduce.py``.
"""

from __future__ import annotations

import torch

from tokenfx.codegen.ops import register_op
from tokenfx.errors import OpInputError

_NEG = float("-inf")


# -- references ------------------------------------------------------------------------------------
def bipartite_match_reference(metric: torch.Tensor, role: torch.Tensor):
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m @ m.transpose(-1, -2)  # [B, N, N] cosine
    allowed = (role == 1).unsqueeze(-1) & (role == 2).unsqueeze(-2)
    scores = scores.masked_fill(~allowed, _NEG)
    score, match = scores.max(dim=-1)
    own = torch.arange(metric.shape[1], device=metric.device).expand_as(match)
    match = torch.where(score == _NEG, own, match)
    return score, match


def reduction_plan_reference(score, match, role, real, r: int, merge: bool, quota=None):
    B, N = score.shape
    device = score.device
    candidate = (role == 1) & (score > _NEG)
    pad = ~real.bool()
    _check_removable(candidate | pad, r)
    # priority tiers: matched A tokens (score in [-1, 1] → [3, 5]) before pads (1); never the rest
    first = candidate
    if quota is not None:  # only a row's best `quota` candidates go before its pads; the others after them
        ranked = torch.sort(torch.where(candidate, score, _NEG), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(ranked).scatter(1, ranked, torch.arange(N, device=device).expand(B, N))
        first = candidate & (rank < quota.unsqueeze(-1))
    later = torch.where(candidate, score - 2.0, torch.full_like(score, _NEG))  # [-3, -1]
    priority = torch.where(first, score + 4.0, torch.where(pad, torch.ones_like(score), later))
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    removed_idx = order[:, :r]
    removed = torch.zeros(B, N, dtype=torch.bool, device=device).scatter(1, removed_idx, True)
    keep = torch.sort(removed.to(torch.int8), dim=-1, stable=True).indices[:, : N - r]
    new_index = torch.full((B, N), N - r, dtype=torch.long, device=device)
    new_index = new_index.scatter(1, keep, torch.arange(N - r, device=device).expand(B, N - r))
    if merge:
        target = torch.gather(new_index, 1, match)  # the partner is a B token: always kept
        assign = torch.where(removed & candidate, target, new_index)
    else:
        assign = new_index
    return assign, keep


def _check_removable(removable: torch.Tensor, r: int) -> None:
    """Each row must have r tokens it may remove (matched A tokens or pads); the passes' cap
    guarantees it for static token counts, a short input under a dynamic schedule can break it.
    Checked on concrete tensors only (tracing with fake tensors cannot read values)."""
    try:
        fewest = int(removable.sum(-1).min()) if removable.numel() else r
    except Exception:  # fake / traced tensors
        return
    if fewest < r:
        raise OpInputError(f"token reduction: a row has only {fewest} tokens it may remove but this block removes "
                         f"r={r}; the input is too short for the schedule (a block removes at most half of the "
                         f"tokens that can take part)")


def merge_tokens_reference(x: torch.Tensor, size: torch.Tensor, assign: torch.Tensor, r: int):
    B, N, C = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)
    w = size.to(acc)
    num = torch.zeros(B, N - r + 1, C, dtype=acc, device=x.device)
    num = num.scatter_add(1, assign.unsqueeze(-1).expand(B, N, C), x.to(acc) * w.unsqueeze(-1))
    den = torch.zeros(B, N - r + 1, dtype=acc, device=x.device).scatter_add(1, assign, w)
    num, den = num[:, : N - r], den[:, : N - r]
    return (num / den.unsqueeze(-1)).to(x.dtype), den.to(size.dtype)


def attention_pagerank_reference(probs: torch.Tensor, real: torch.Tensor, iterations: int, cls_weight: bool):
    p = probs.float()
    realf = real.to(p.dtype)  # [B, N]
    n = realf.sum(-1).clamp_min(1.0)[:, None, None]  # [B, 1, 1]
    s = (realf.unsqueeze(1) / n).expand(p.shape[0], p.shape[1], p.shape[2])  # [B, H, N]
    if cls_weight:
        boost = torch.ones_like(realf)
        boost[:, 0] = n[:, 0, 0].sqrt()
        s = s * boost.unsqueeze(1)
    for _ in range(iterations):
        s = (s.unsqueeze(-2) @ p).squeeze(-2)  # s_j ← Σ_i A_ij s_i
        s = s * realf.unsqueeze(1)  # pads hold no importance (their rows are not attention)
    return s


def importance_roles_reference(importance: torch.Tensor, participates: torch.Tensor):
    B, N = importance.shape
    part = participates.bool()
    key = torch.where(part, importance.float(), torch.full_like(importance, float("inf"), dtype=torch.float32))
    order = torch.sort(key, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter(1, order, torch.arange(N, device=importance.device).expand(B, N))
    half = (part.sum(-1, keepdim=True) + 1) // 2
    return torch.where(part, torch.where(rank < half, 1, 2), 0).to(torch.long)


# -- ops ---------------------------------------------------------------------------------------------
@torch.library.custom_op("tokenfx::bipartite_match", mutates_args=())
def bipartite_match(metric: torch.Tensor, role: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return bipartite_match_reference(metric, role)


@bipartite_match.register_fake
def _(metric, role):
    B, N = metric.shape[0], metric.shape[1]
    return metric.new_empty((B, N), dtype=torch.float32), metric.new_empty((B, N), dtype=torch.long)


@bipartite_match.register_kernel("cuda")
def _(metric, role):
    from tokenfx.codegen.triton.token_reduce import bipartite_match_triton

    return bipartite_match_triton(metric, role)


@torch.library.custom_op("tokenfx::reduction_plan", mutates_args=())
def reduction_plan(score: torch.Tensor, match: torch.Tensor, role: torch.Tensor, real: torch.Tensor, r: int,
                   merge: bool, quota: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return reduction_plan_reference(score, match, role, real, r, merge, quota)


def _contiguous(like: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    """An empty contiguous tensor with strides written out: ``new_empty`` would give a symbolic
    ``N - r`` dim the stride ``Max(1, N - r)``, which later views cannot reason about."""
    strides, step = [], 1
    for dim in reversed(shape):
        strides.append(step)
        step = step * dim
    return torch.empty_strided(tuple(shape), tuple(reversed(strides)), dtype=dtype or like.dtype, device=like.device)


@reduction_plan.register_fake
def _(score, match, role, real, r, merge, quota=None):
    B, N = score.shape
    return score.new_empty((B, N), dtype=torch.long), _contiguous(score, (B, N - r), torch.long)


@torch.library.custom_op("tokenfx::merge_tokens", mutates_args=())
def merge_tokens(x: torch.Tensor, size: torch.Tensor, assign: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return merge_tokens_reference(x, size, assign, r)


@merge_tokens.register_fake
def _(x, size, assign, r):
    B, N, C = x.shape
    return _contiguous(x, (B, N - r, C)), _contiguous(size, (B, N - r))


@merge_tokens.register_kernel("cuda")
def _(x, size, assign, r):
    from tokenfx.codegen.triton.token_reduce import merge_tokens_triton

    return merge_tokens_triton(x, size, assign, r)


@torch.library.custom_op("tokenfx::attention_pagerank", mutates_args=())
def attention_pagerank(probs: torch.Tensor, real: torch.Tensor, iterations: int, cls_weight: bool) -> torch.Tensor:
    return attention_pagerank_reference(probs, real, iterations, cls_weight)


@attention_pagerank.register_fake
def _(probs, real, iterations, cls_weight):
    return probs.new_empty(probs.shape[:3], dtype=torch.float32)


@attention_pagerank.register_kernel("cuda")
def _(probs, real, iterations, cls_weight):
    from tokenfx.codegen.triton.token_reduce import attention_pagerank_triton

    return attention_pagerank_triton(probs, real, iterations, cls_weight)


@torch.library.custom_op("tokenfx::importance_roles", mutates_args=())
def importance_roles(importance: torch.Tensor, participates: torch.Tensor) -> torch.Tensor:
    return importance_roles_reference(importance, participates)


@importance_roles.register_fake
def _(importance, participates):
    return importance.new_empty(importance.shape, dtype=torch.long)


_TRITON = "tokenfx.codegen.triton.token_reduce"
_ONNX = "tokenfx.codegen.onnx_token_reduce"
for _name, _ref in (("bipartite_match", bipartite_match_reference), ("reduction_plan", reduction_plan_reference),
                    ("merge_tokens", merge_tokens_reference), ("attention_pagerank", attention_pagerank_reference),
                    ("importance_roles", importance_roles_reference)):
    register_op(_name, op=getattr(torch.ops.tokenfx, _name).default, reference=_ref, triton_module=_TRITON,
                onnx_translation=f"{_ONNX}:{_name}")
