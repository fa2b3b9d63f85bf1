"""Verifiers: given a batch of draft trees and the target's logits at every node, choose each
row's accepted path and the token that follows it.

Inputs (one batch, ``T`` nodes per row, node 0 = the root, padding nodes ``valid == False``)::

    tokens[B, T], parents[B, T] (root and padding: -1), valid[B, T], mask[B, T, T] (ancestor-or-self),
    depth[B, T], logits[B, T, V] (the target's logits *after* each node)

Result :class:`Verdict`: ``path[B, P]`` accepted node indices from the root (padded by
repeating the last), ``length[B]`` (nodes on the path, root included, so ``length - 1``
draft tokens were accepted) and ``bonus[B]``, the target's token after the path. Every row
emits ``tokens[path[1:length]]`` then ``bonus``.

- :func:`greedy` — accept the deepest node whose every ancestor's token equals the target's
  argmax at its parent; the bonus is the argmax after it. Token-identical to greedy decoding.
- :func:`sample` — lossless sampling, node by node from the root:
  *deterministic drafts* (``q is None``: template / n-gram / top-k children) draw
  ``y ~ p(node)`` and descend into the child whose token is ``y``, else emit ``y``;
  *sampled drafts* (``q[b, i]`` = the draft distribution node ``i``'s children were drawn
  from, without replacement, in index order) use recursive rejection sampling: accept child
  ``x`` with probability ``min(1, p(x) / q(x))``; on rejection ``p ← norm((p − q)+)`` and
  ``q(x) ← 0``, renormalised; when every child is rejected, emit ``y ~ p``. Either way the
  emitted tokens are distributed exactly as sampling from the target (tests check it).

``p`` is the target's distribution after the sampling transforms (temperature, top-k,
top-p: :func:`warp`), the same one plain sampling draws from (:func:`sample_token`).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Verdict:
    path: torch.Tensor  # [B, P] node indices, root first
    length: torch.Tensor  # [B] nodes on the accepted path (>= 1: the root)
    bonus: torch.Tensor  # [B] the target's token after the path


def warp(logits: torch.Tensor, temperature: float, top_k=None, top_p=None) -> torch.Tensor:
    """Probabilities after temperature → top-k → top-p (HF order), over the last dim."""
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores.softmax(-1)


def sample_token(scores: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """One token per row of ``scores [B, V]`` as plain sampling draws it (HF order: temperature →
    top-k → top-p, then one draw from :func:`warp`'s distribution): ``[B]``."""
    return torch.multinomial(warp(scores, temperature, top_k, top_p), 1, generator=generator).squeeze(1)


def greedy(tokens, parents, valid, mask, depth, logits) -> Verdict:
    target = logits.argmax(-1)  # [B, T]: the target's token after each node
    expected = target.gather(1, parents.clamp(min=0))  # what the target says after each node's parent
    correct = (tokens == expected) & valid
    correct[:, 0] = True
    ok = valid & ~(mask & ~correct[:, None, :]).any(-1)  # every ancestor-or-self correct
    best = torch.where(ok, depth, -1).argmax(1)  # the deepest; ties → lowest index
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return _verdict(mask[rows, best], depth[rows, best] + 1, target[rows, best])


def sample(tokens, parents, valid, mask, depth, probs, generator=None, q=None) -> Verdict:
    """``probs[B, T, V]``: the target's warped distributions (:func:`warp`); ``q`` as in the module doc."""
    b, t = tokens.shape
    rows = torch.arange(b, device=tokens.device)
    cur = torch.zeros(b, dtype=torch.long, device=tokens.device)
    active = torch.ones(b, dtype=torch.bool, device=tokens.device)
    bonus = torch.zeros(b, dtype=torch.long, device=tokens.device)
    sibling_rank = _sibling_rank(parents, valid)
    on_path = torch.zeros(b, t, dtype=torch.bool, device=tokens.device)
    on_path[:, 0] = True
    max_children = int(sibling_rank.max()) + 1 if t > 1 else 0
    while bool(active.any()):
        p = probs[rows, cur].clone()  # [B, V]
        nxt = torch.full((b,), -1, dtype=torch.long, device=tokens.device)
        if q is None:  # deterministic children: one draw from p, follow it if drafted
            y = torch.multinomial(p, 1, generator=generator).squeeze(1)
            child = (parents == cur[:, None]) & valid & (tokens == y[:, None])
            found = child.any(1) & active
            nxt = torch.where(found, child.float().argmax(1), nxt)
            bonus = torch.where(active & ~found, y, bonus)
        else:  # sampled children: recursive rejection sampling without replacement
            qd = q[rows, cur].float().clone()
            undecided = active.clone()
            for r in range(max_children):
                child = (parents == cur[:, None]) & valid & (sibling_rank == r)
                has = child.any(1) & undecided
                if not bool(has.any()):
                    break
                c = child.float().argmax(1)
                x = tokens[rows, c]
                px, qx = p[rows, x], qd[rows, x]
                u = torch.rand(b, generator=generator, device=tokens.device)
                accept = has & (u * qx <= px)  # u < min(1, p/q); q(x) > 0 for a drawn child
                nxt = torch.where(accept, c, nxt)
                undecided &= ~accept
                reject = has & ~accept
                if bool(reject.any()):
                    residual = _residual(p, qd)
                    p = torch.where(reject[:, None], residual, p)
                    qd[rows[reject], x[reject]] = 0.0
                    qd = torch.where(reject[:, None], _normalise(qd), qd)
            y = torch.multinomial(_normalise(p), 1, generator=generator).squeeze(1)
            bonus = torch.where(undecided, y, bonus)
        found = nxt >= 0
        on_path[rows[found], nxt[found]] = True
        cur = torch.where(found, nxt, cur)
        active = found
    lengths = on_path.sum(1)
    return _verdict(on_path, lengths, bonus)


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The target's distribution given that the draft's proposal was rejected: norm((p − q)+)."""
    return _normalise((p - q).clamp(min=0))


def _normalise(p: torch.Tensor) -> torch.Tensor:
    total = p.sum(-1, keepdim=True)
    return torch.where(total > 0, p / total.clamp(min=1e-30), p)


def _sibling_rank(parents: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """For each valid non-root node, how many earlier valid nodes share its parent."""
    same = (parents[:, :, None] == parents[:, None, :]) & valid[:, None, :] & valid[:, :, None]
    earlier = torch.ones(parents.shape[1], parents.shape[1], dtype=torch.bool, device=parents.device).tril(-1)
    rank = (same & earlier).sum(-1)
    return torch.where(valid & (parents >= 0), rank, -1)


def _verdict(path_mask: torch.Tensor, length: torch.Tensor, bonus: torch.Tensor) -> Verdict:
    """Path node indices (ascending = root first, since parents precede children) from a [B, T] mask."""
    t = path_mask.shape[1]
    idx = torch.arange(t, device=path_mask.device).expand_as(path_mask)
    ordered = torch.sort(torch.where(path_mask, idx, t), dim=1).values
    width = int(length.max())
    path = ordered[:, :width]
    last = path.gather(1, (length - 1)[:, None])
    path = torch.where(path >= t, last, path)
    return Verdict(path, length, bonus)
