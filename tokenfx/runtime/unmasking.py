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
- ``ete`` — Explore-Then-Exploit ("From Bits to Rounds"): exploit = every proposal with
  confidence >= ``threshold``; a round with fewer than ``min_exploit`` of those explores: it
  also unmasks the most confident proposal and the ``explore`` highest-entropy ones, whose
  information makes other positions confident in the next round (a cascade).
- ``guided`` — FreeCache's Guided Diffusion: the AR model ``guide`` checks, in one call, the
  proposals read left to right from the first masked position; the longest prefix it agrees
  with plus its own token at the first disagreement are unmasked. Token-identical to the AR
  model's greedy decoding when the block has ``block_length`` rounds (every round unmasks at
  least one token, so the last round never has to force the rest), whatever the dLLM proposes
  (greedy or sampled) and whichever K/V cache it runs with.
- ``learned`` — "Learning Unmasking Policies for Diffusion Language Models": a one-layer
  transformer over per-position features (:func:`unmask_features`) gives an unmask probability
  per masked position; positions with probability >= ``threshold`` are unmasked. Trained by
  ``tools/train_unmask_policy.py`` (REINFORCE), shipped in ``tokenfx/assets/unmask-policy``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Protocol

import torch

from tokenfx.errors import GenerationError

SHIPPED_POLICY = Path(__file__).resolve().parents[1] / "assets" / "unmask-policy"


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
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
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
        count = torch.full((state.masked.shape[0],), self.k, dtype=torch.long, device=state.masked.device)
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


class ExploreThenExploit:
    """Explore-Then-Exploit ("From Bits to Rounds"): a block needs at least (its information) /
    (information unmasked per round) rounds, and confident proposals carry little information.

    Exploit: unmask every proposal with confidence >= ``threshold``. When fewer than
    ``min_exploit`` proposals reach it, explore instead: unmask the most confident proposal (the
    vanilla step) and the ``explore`` proposals of highest entropy (the most information per
    token), so that the next round finds more positions confident — a cascade of exploit rounds.
    """

    name = "ete"

    def __init__(self, threshold: float = 0.9, explore: int = 1, min_exploit: int = 1):
        if not 0.0 < threshold <= 1.0:
            raise GenerationError(f"diffusion policy ete: the threshold must be in (0, 1]; got {threshold}")
        if explore < 0 or min_exploit < 1:
            raise GenerationError(f"diffusion policy ete: explore must be >= 0 and min_exploit >= 1; got "
                                  f"explore={explore}, min_exploit={min_exploit}")
        self.threshold, self.explore, self.min_exploit = threshold, explore, min_exploit

    def select(self, state: RoundState) -> Decision:
        exploit = (state.confidence >= self.threshold) & state.masked
        explore_rows = exploit.sum(1) < self.min_exploit
        ones = torch.ones(state.masked.shape[0], dtype=torch.long, device=state.masked.device)
        entropy = token_entropy(state.logits)
        explore = (most_confident(state.confidence, state.masked, ones)
                   | most_confident(entropy, state.masked & ~exploit, ones * self.explore))
        return Decision(torch.where(explore_rows[:, None], exploit | explore, exploit))


class Guided:
    """FreeCache's Guided Diffusion with an AR model ``guide`` (a :class:`Generator`, or a model
    spec such as ``"tokenfx:tiny-code"``) that shares the dLLM's token ids.

    Each round the block's proposals from its first masked position on form one chain; the AR
    model scores the chain in one call of its tree-verify graph (over the K/V of everything
    before the block, prefilled once per block), and :func:`verify.greedy` — the draft-tree
    verifier of speculative decoding, here with a chain tree — accepts the longest prefix equal
    to the AR model's greedy choice. Unmasked: that prefix plus the AR model's own token at the
    first disagreement (``Decision.tokens``). Every unmasked token is the AR model's greedy
    token after the tokens before it, so the block reads as greedy AR decoding (exact when the
    runtime gives the block ``block_length`` rounds and nothing else unmasks tokens out of order).
    ``verify_calls`` / ``accepted`` count the AR calls and the dLLM proposals it accepted.
    """

    name = "guided"

    def __init__(self, guide=None):
        from tokenfx.runtime.generate import Generator, generator_for

        if guide is None:
            raise GenerationError("diffusion policy guided needs guide=, the AR model that checks the proposals "
                                  "(a Generator or a model spec such as 'tokenfx:tiny-code')")
        self.guide = guide if isinstance(guide, Generator) else generator_for(guide)
        self._prefix = None  # (tokens before the block, their valid mask, the AR request holding their K/V)
        self.verify_calls = 0
        self.accepted = 0

    @torch.inference_mode()
    def select(self, state: RoundState) -> Decision:
        from tokenfx.runtime.speculative import verify

        batch, k = state.masked.shape
        device = state.masked.device
        request, last_logits = self._prefilled(state)
        vocab = self.guide.vocab_size or state.logits.shape[-1]
        chain = torch.where(state.masked, state.candidates, state.tokens[:, state.block])
        chain = torch.where(chain < vocab, chain, 0)  # a dLLM-only id (the mask) is never the AR model's choice
        positions = request.positions[:, -1:] + 1 + torch.arange(k, device=device)
        causal = torch.ones(k, k, dtype=torch.bool, device=device).tril().expand(batch, k, k).contiguous()
        end = state.block_start + k
        out = self.guide.runner("tree")(chain, positions, request.cache, request.cache_mask, causal,
                                        request.slots[state.block_start:end])[0]
        self.verify_calls += 1
        # AR logits after block column i - 1, i = 0..K (index 0: the prefix's last token)
        after = torch.cat([last_logits.to(out.dtype), out], 1)

        # the chain tree per row: node n sits at block column first + n - 1 (node 0, the root, is known)
        first = torch.where(state.masked.any(1), state.masked.float().argmax(1), k)
        node = torch.arange(k + 1, device=device)
        column = first[:, None] - 1 + node
        valid = column < k
        nodes = torch.where(node > 0, chain.gather(1, column.clamp(0, k - 1)), 0)
        node_logits = after.gather(1, (column + 1).clamp(0, k)[:, :, None].expand(-1, -1, after.shape[-1]))
        parents = (node - 1).expand(batch, -1)
        ancestors = torch.ones(k + 1, k + 1, dtype=torch.bool, device=device).tril() & valid[:, None, :] & valid[:, :, None]
        verdict = verify.greedy(nodes, parents, valid, ancestors, node.expand(batch, -1), node_logits)

        accepted = verdict.length - 1
        index = torch.arange(k, device=device)
        unmask = (index >= first[:, None]) & (index <= (first + accepted)[:, None]) & state.masked
        at_bonus = index == (first + accepted)[:, None]
        tokens = torch.where(at_bonus, verdict.bonus[:, None], chain)
        self.accepted += int((accepted * state.masked.any(1)).sum())
        return Decision(unmask, tokens)

    def _prefilled(self, state: RoundState):
        """``(request, logits [B, 1, V])``: the AR request with the K/V of ``tokens[:, :block_start]``
        and the AR logits after its last token; prefilled at a block's first round, reused while
        the prefix and the Generator's buffers are unchanged."""
        start = state.block_start
        prefix, valid = state.tokens[:, :start], state.valid[:, :start]
        if self._prefix is not None:
            old_prefix, old_valid, request, last_logits = self._prefix
            if (self.guide.last_request is request and old_prefix.shape == prefix.shape
                    and bool((old_prefix == prefix).all()) and bool((old_valid == valid).all())):
                return request, last_logits
        if start < 1 or not bool(valid.any(1).all()):
            raise GenerationError("diffusion policy guided: every row needs a prompt for the AR model to continue")
        limit = self.guide.layout.max_positions
        if start + state.masked.shape[1] > limit:
            raise GenerationError(f"diffusion policy guided: the sequence ({start + state.masked.shape[1]} tokens) "
                                  f"exceeds the guide model's {limit} positions")
        ids = torch.where(valid, prefix, 0).long().contiguous()
        request = self.guide.start(ids, valid.long().contiguous(), start + state.masked.shape[1])
        last_logits = request.logits[:, -1:].clone()  # the graph's output buffer may be reused by a later call
        self._prefix = (prefix.clone(), valid.clone(), request, last_logits)
        return request, last_logits


# -- the learned policy --------------------------------------------------------------------------
FEATURES = ("confidence", "entropy", "margin", "position", "round_fraction", "masked")


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each position's distribution: ``[B, K, V] -> [B, K]``."""
    logp = logits.float().log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def unmask_features(state: RoundState) -> torch.Tensor:
    """Per-position features of one round, ``[B, K, F]`` in the order of :data:`FEATURES`: the
    candidate's probability (1 where decided), the entropy over log V, the top-1 minus top-2
    probability, the position in the block in [0, 1], the share of the block's rounds used, and
    whether the position is still masked."""
    batch, k = state.masked.shape
    logp = state.logits.float().log_softmax(-1)
    probs = logp.exp()
    entropy = -(probs * logp).sum(-1) / math.log(state.logits.shape[-1])
    top2 = probs.topk(2, dim=-1).values
    masked = state.masked.float()
    confidence = torch.where(state.masked, state.confidence.float(), 1.0)
    position = (torch.arange(k, dtype=torch.float32, device=masked.device) / max(k - 1, 1)).expand(batch, k)
    rounds = state.round + state.rounds_left
    round_fraction = torch.full((batch, k), state.round / max(rounds, 1), device=masked.device)
    return torch.stack([confidence, entropy, top2[..., 0] - top2[..., 1], position, round_fraction, masked], -1)


class UnmaskNet(torch.nn.Module):
    """One transformer layer over a block's positions: features ``[B, K, F]`` -> unmask logits ``[B, K]``."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.width, self.heads = width, heads
        self.embed = torch.nn.Linear(len(FEATURES), width)
        self.layer = torch.nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True,
                                                      norm_first=True)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(features))).squeeze(-1)


def load_unmask_net(path: str | Path | None = None) -> UnmaskNet:
    """The network saved by ``tools/train_unmask_policy.py`` (``policy.safetensors`` in the
    folder ``path``, default the shipped ``tokenfx/assets/unmask-policy``)."""
    import json

    from safetensors.torch import load_file

    folder = Path(path) if path is not None else SHIPPED_POLICY
    weights, config = folder / "policy.safetensors", folder / "config.json"
    if not weights.exists() or not config.exists():
        raise GenerationError(f"diffusion policy learned: no trained policy in {folder} (policy.safetensors + "
                              "config.json; train one with tools/train_unmask_policy.py)")
    meta = json.loads(config.read_text())
    if tuple(meta.get("features", ())) != FEATURES:
        raise GenerationError(f"diffusion policy learned: {config} was trained on features {meta.get('features')}, "
                              f"this tokenfx computes {list(FEATURES)}")
    net = UnmaskNet(meta["width"], meta["heads"])
    net.load_state_dict(load_file(str(weights)))
    return net.eval()


class Learned:
    """"Learning Unmasking Policies for Diffusion Language Models": unmask every masked position
    whose probability under :class:`UnmaskNet` reaches ``threshold`` (training samples from the
    same probabilities instead, see ``tools/train_unmask_policy.py``). ``path``: a folder with a
    trained policy (default the shipped one); ``net``: an :class:`UnmaskNet` to use as it is."""

    name = "learned"

    def __init__(self, path: str | Path | None = None, threshold: float = 0.5, net: UnmaskNet | None = None):
        if not 0.0 < threshold < 1.0:
            raise GenerationError(f"diffusion policy learned: the threshold must be in (0, 1); got {threshold}")
        self.net = net if net is not None else load_unmask_net(path)
        self.threshold = threshold

    def probabilities(self, state: RoundState) -> torch.Tensor:
        """Unmask probability per block position, ``[B, K]`` (0 where not masked)."""
        with torch.no_grad():
            p = torch.sigmoid(self.net(unmask_features(state)))
        return torch.where(state.masked, p, 0.0)

    def select(self, state: RoundState) -> Decision:
        return Decision((self.probabilities(state) >= self.threshold) & state.masked)


# name -> factory(**options)
POLICIES = {"vanilla": Vanilla, "topk": TopK, "threshold": Threshold, "ete": ExploreThenExploit, "guided": Guided,
            "learned": Learned}


def make_policy(name: str, **options) -> Policy:
    """The policy the CLI's ``--diffusion NAME`` means, with its options (``k=``, ``threshold=``,
    ``guide=`` for the guided policy's AR model ...)."""
    if name not in POLICIES:
        raise GenerationError(f"unknown diffusion policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    factory = POLICIES[name]
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:  # an option the policy does not take
        raise GenerationError(f"diffusion policy {name}: {exc}; its options: "
                              f"{', '.join(inspect.signature(factory).parameters) or 'none'}") from exc
    return factory(**options)
