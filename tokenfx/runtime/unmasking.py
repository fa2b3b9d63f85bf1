"""Unmasking policies for masked-diffusion LMs: which proposed tokens become final this round.

A dLLM round is one bidirectional forward over the sequence (or over the current block, with
the K/V cache): at every still-masked position of the current block it proposes a token and a
confidence. A policy looks at those proposals and decides which of them to keep; the rest stay
masked for a later round. Policies differ only in that decision, so the runtime
(:mod:`tokenfx.runtime.diffusion`) runs them all through one interface::

    decision = policy.select(state)          # RoundState -> Decision

:class:`RoundState` (``B`` rows, ``K`` = block length)::

    tokens[B, L]        the whole sequence now (prompt + generation buffer; masked = mask_id)
    valid[B, L]         bool, False on left padding
    block_start         index in ``tokens`` of the current block's first position
    masked[B, K]        bool, positions of the block still masked
    candidates[B, K]    the token proposed at each block position (argmax, or a draw when sampling)
    confidence[B, K]    probability of the candidate; 0 where ``masked`` is False
    logits[B, K, V]     the round's logits at the block positions (float32)
    round               rounds already run on this block (0 in its first round)
    rounds_left         rounds this block may still use, this one included (>= 1)

:class:`Decision`: ``unmask[B, K]`` (bool, a subset of ``masked``) and optionally
``tokens[B, K]``, tokens to write instead of ``candidates`` (the guided policy writes the AR
model's token where it disagrees). The runtime enforces the budget contract for every policy
(:func:`enforce_budget`): a row with masks left unmasks at least one token per round (the most
confident), and in its last round (``rounds_left == 1``) all of them, so a block always
finishes within its rounds.

Policies here (built by :func:`make_policy` from the CLI's ``--diffusion`` names):

- ``vanilla`` — LLaDA's low-confidence remasking: a fixed number of rounds per block, in each
  the ``n_masked / rounds_left`` (rounded as LLaDA's schedule) most confident proposals.
- ``topk`` — a fixed ``k`` most confident proposals per round.
- ``threshold`` — Fast-dLLM: every proposal with confidence >= ``threshold`` (at least one).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from tokenfx.errors import GenerationError


@dataclasses.dataclass
class RoundState:
    tokens: torch.Tensor  # [B, L]
    valid: torch.Tensor  # [B, L] bool
    block_start: int
    masked: torch.Tensor  # [B, K] bool
    candidates: torch.Tensor  # [B, K]
    confidence: torch.Tensor  # [B, K], 0 where not masked
    logits: torch.Tensor  # [B, K, V]
    round: int
    rounds_left: int
    generator: torch.Generator | None = None

    @property
    def block(self) -> slice:
        return slice(self.block_start, self.block_start + self.masked.shape[1])


@dataclasses.dataclass
class Decision:
    unmask: torch.Tensor  # [B, K] bool, a subset of RoundState.masked
    tokens: torch.Tensor | None = None  # [B, K] replacements for RoundState.candidates


class Policy(Protocol):
    name: str

    def select(self, state: RoundState) -> Decision: ...


def most_confident(confidence: torch.Tensor, masked: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The ``count[b]`` most confident masked positions of each row: bool ``[B, K]``."""
    scores = confidence.masked_fill(~masked, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return (rank < count.unsqueeze(1)) & masked


def enforce_budget(state: RoundState, unmask: torch.Tensor) -> torch.Tensor:
    """``unmask`` ∩ masked, plus the most confident token where a row would unmask none, plus
    everything in the block's last round."""
    unmask = unmask & state.masked
    if state.rounds_left <= 1:
        return state.masked.clone()
    empty = state.masked.any(1) & ~unmask.any(1)
    if empty.any():
        unmask = unmask | (most_confident(state.confidence, state.masked, empty.long()))
    return unmask


class Vanilla:
    """LLaDA's low-confidence remasking with its linear schedule: of the ``m`` masks left,
    ``m // r`` (+1 for the first ``m % r`` rounds) are kept in each of the ``r`` rounds left."""

    name = "vanilla"

    def select(self, state: RoundState) -> Decision:
        left = state.masked.sum(1)
        count = left // state.rounds_left + (left % state.rounds_left > 0).long()
        return Decision(most_confident(state.confidence, state.masked, count))


class TopK:
    """A fixed ``k`` most confident proposals per round."""

    name = "topk"

    def __init__(self, k: int = 2):
        if k < 1:
            raise GenerationError(f"diffusion policy topk: k must be >= 1; got {k}")
        self.k = k

    def select(self, state: RoundState) -> Decision:
        count = torch.full((state.masked.shape[0],), self.k, dtype=torch.long)
        return Decision(most_confident(state.confidence, state.masked, count))


class Threshold:
    """Fast-dLLM's parallel decoding: keep every proposal whose confidence reaches ``threshold``."""

    name = "threshold"

    def __init__(self, threshold: float = 0.9):
        if not 0.0 < threshold <= 1.0:
            raise GenerationError(f"diffusion policy threshold: the threshold must be in (0, 1]; got {threshold}")
        self.threshold = threshold

    def select(self, state: RoundState) -> Decision:
        return Decision((state.confidence >= self.threshold) & state.masked)


# name -> factory(**options); ``ete``, ``guided`` and ``learned`` register here too
POLICIES = {"vanilla": Vanilla, "topk": TopK, "threshold": Threshold}


def make_policy(name: str, **options) -> Policy:
    """The policy the CLI's ``--diffusion NAME`` means, with its options (``k=``, ``threshold=``,
    ``guide=`` for the guided policy's AR model ...)."""
    if name not in POLICIES:
        raise GenerationError(f"unknown diffusion policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**options)
