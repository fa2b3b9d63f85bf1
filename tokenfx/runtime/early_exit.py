"""Early-exit decoding over the stages of the ``early_exit`` pass.

Two approximate policies (their output may differ from the full model's; opt in)::

    gen.generate(ids, max_new_tokens=64, early_exit=0.9)                         # CALM, softmax confidence
    gen.generate(ids, max_new_tokens=64, early_exit=ConfidenceExit(0.9, measure="state", layers=(2, 4)))
    gen.generate(ids, max_new_tokens=64, early_exit=SkipDecode(min_layers=3))    # SkipDecode schedule

and the lossless one, self-speculation (``speculate="self:E"`` / ``"self:auto"``), in
:mod:`tokenfx.runtime.speculative.self_spec`.

**Confidence-gated** (CALM): each token runs the stages one after the other; after each exit
point at or past ``min_layer`` the exit head's confidence is compared with the threshold
(``softmax``: top probability; ``margin``: top-1 minus top-2 probability; ``entropy``:
``1 - H(p) / log V``; ``state``: cosine of the residual stream at this exit and the previous
one, which needs no head). The batch exits together, at the first exit where every row is
confident. The skipped blocks' K/V for this token are then filled by state propagation: the
exit hidden state goes through each skipped block's K/V projections only (``kv_fill``), so
later tokens attend to a complete cache. With ``decay=τ`` the threshold falls with the
generated position t of T: ``λ(t) = 0.9 λ + 0.1 λ exp(-τ t / T)``.

**SkipDecode**: generated token t runs ``n(t)`` blocks, ``n`` falling linearly from
``max_layers`` to ``min_layers`` over the request (shared by the batch, never increasing):
the first ``warmup`` blocks, then the last ``n(t) - warmup``. Because ``n`` never increases,
every block a token runs was run by every earlier token (the prompt runs them all), so the
cache it attends to is complete and nothing is recomputed.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from tokenfx.errors import GenerationError

MEASURES = ("softmax", "margin", "entropy", "state")


@dataclasses.dataclass(frozen=True)
class ConfidenceExit:
    """Exit a token at the first exit point where the whole batch is confident (approximate)."""

    threshold: float
    measure: str = "softmax"
    layers: tuple | None = None  # exit points, as block counts (default: after every block)
    min_layer: int = 1  # no exit before this many blocks
    decay: float | None = None  # τ of the position-decaying threshold; None: constant

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= float(self.threshold) <= 1.0:
            raise GenerationError(f"early_exit: the confidence threshold must be in [0, 1], got {self.threshold!r}")
        if self.measure not in MEASURES:
            raise GenerationError(f"early_exit: unknown confidence measure {self.measure!r}; choose {', '.join(MEASURES)}")
        if self.decay is not None and self.decay < 0:
            raise GenerationError(f"early_exit: decay must be >= 0, got {self.decay}")

    def threshold_at(self, t: int, total: int) -> float:
        lam = float(self.threshold)
        if not self.decay:
            return lam
        return 0.9 * lam + 0.1 * lam * math.exp(-self.decay * t / max(total, 1))


@dataclasses.dataclass(frozen=True)
class SkipDecode:
    """A per-position exit schedule shared by the batch, never increasing (approximate)."""

    min_layers: int
    max_layers: int | None = None  # default: every block
    warmup: int = 1  # the first blocks every token runs

    def schedule(self, steps: int, num_blocks: int) -> list[int]:
        """Blocks run by generated token ``t`` for ``t < steps``: linear from max to min, monotone."""
        top = num_blocks if self.max_layers is None else int(self.max_layers)
        if not 1 <= self.min_layers <= top <= num_blocks:
            raise GenerationError(f"early_exit: SkipDecode needs 1 <= min_layers ({self.min_layers}) <= max_layers "
                                  f"({top}) <= the model's {num_blocks} blocks")
        if not 1 <= self.warmup <= self.min_layers:
            raise GenerationError(f"early_exit: SkipDecode warmup ({self.warmup}) must be in 1 … min_layers "
                                  f"({self.min_layers})")
        span = max(steps - 1, 1)
        return [int(round(top - (top - self.min_layers) * t / span)) for t in range(steps)]

    def blocks(self, n: int, num_blocks: int) -> tuple[range, range]:
        """The blocks a token with ``n`` layers runs: the warm-up ones, then the last ``n - warmup``."""
        if n >= num_blocks:
            return range(0, num_blocks), range(num_blocks, num_blocks)
        return range(0, self.warmup), range(num_blocks - (n - self.warmup), num_blocks)


def policy(early_exit) -> ConfidenceExit | SkipDecode:
    """``early_exit`` as given to ``generate``: a threshold (float), or a policy object."""
    if isinstance(early_exit, (ConfidenceExit, SkipDecode)):
        return early_exit
    if isinstance(early_exit, bool) or not isinstance(early_exit, (int, float)):
        raise GenerationError(f"early_exit must be a confidence threshold in [0, 1], a ConfidenceExit or a "
                              f"SkipDecode, got {early_exit!r}")
    return ConfidenceExit(float(early_exit))


# -- stages of a Generator's graph ------------------------------------------------------------------------
class Stages:
    """Pieces of a Generator's tree-verify graph (:func:`tokenfx.passes.early_exit.piece`), built
    on first use, compiled with AOTInductor when the Generator compiles (and remembered per
    model, so a later process loads them without capturing)."""

    def __init__(self, gen):
        self.gen = gen
        self._runs: dict = {}

    @property
    def num_blocks(self) -> int:
        return self.gen.layout.layers

    def piece(self, start: int, stop: int, head: bool, trace: bool = False):
        """``(graph inputs[, h]) → (h[, logits][, every block's h])`` for blocks ``[start, stop)``."""
        from tokenfx.passes import early_exit as E

        label = f"piece-{start}-{stop}{'-head' if head else ''}{'-trace' if trace else ''}"
        return self._get(label, lambda g: E.piece(g, start, stop, head, trace))

    def head(self):
        """``(graph inputs, h [B, N, C]) → (h, logits)``: the exit head alone, run as an fx graph
        (never compiled: its token count need not match the other inputs')."""
        from tokenfx.passes import early_exit as E

        if "head" not in self._runs:
            from tokenfx.runtime.executor import lower

            self._runs["head"] = lower(E.piece(self.gen.tree_graph, self.num_blocks, self.num_blocks, True)).gm
        return self._runs["head"]

    def fill(self, start: int, stop: int):
        """``(graph inputs, h) → ()``: K/V of blocks ``[start, stop)`` from ``h`` (CALM)."""
        from tokenfx.passes import early_exit as E

        return self._get(f"fill-{start}-{stop}", lambda g: E.kv_fill(g, start, stop))

    def _get(self, label: str, build):
        run = self._runs.get(label)
        if run is None:
            gen = self.gen
            runners, _ = gen.cached_runners((label,), lambda: ({label: gen.compiled(build(gen.tree_graph), f"ee-{label}")}, {}))
            run = self._runs[label] = runners[label]
        return run


# -- confidence ----------------------------------------------------------------------------------------------
def confidence(measure: str, logits: torch.Tensor | None, h: torch.Tensor, h_prev: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` confidence in [0, 1] of the exit with ``logits [B, V]`` and residual stream ``h [B, C]``."""
    if measure == "state":
        if h_prev is None:
            return torch.zeros(h.shape[0], device=h.device)
        return torch.nn.functional.cosine_similarity(h.float(), h_prev.float(), dim=-1).clamp(min=0.0)
    p = logits.float().softmax(-1)
    if measure == "softmax":
        return p.max(-1).values
    if measure == "margin":
        top = p.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)
    return 1.0 - entropy / math.log(p.shape[-1])


# -- the per-token steps the Generator's loop calls -------------------------------------------------------------
class ConfidenceStep:
    """One decode step under :class:`ConfidenceExit`; records the exit of every step."""

    def __init__(self, gen, policy: ConfidenceExit, total: int):
        from tokenfx.passes.early_exit import exit_layers

        self.stages, self.policy, self.total = gen.stages, policy, total
        self.num_blocks = self.stages.num_blocks
        try:
            self.exits = exit_layers(self.num_blocks, policy.layers)
        except Exception as exc:  # PassOptionError → the generate-level error type
            raise GenerationError(str(exc)) from exc
        if not 1 <= policy.min_layer <= self.num_blocks:
            raise GenerationError(f"early_exit: min_layer must be in 1 … {self.num_blocks}, got {policy.min_layer}")
        self.exited: list[int] = []

    def __call__(self, token, position, cache, cache_mask, slots, t: int) -> torch.Tensor:
        args = _step_args(token, position, cache, cache_mask, slots)
        lam = self.policy.threshold_at(t, self.total)
        measure = self.policy.measure
        start, h, h_prev = 0, (), None
        for stop in self.exits:
            last = stop == self.num_blocks
            head = last or measure != "state"
            outs = self.stages.piece(start, stop, head)(*args, *h)
            h_new = outs[0]
            logits = outs[1] if head else None
            if last:
                self.exited.append(stop)
                return logits
            if stop >= self.policy.min_layer and (measure != "state" or h_prev is not None):
                conf = confidence(measure, None if logits is None else logits[:, -1], h_new[:, -1], h_prev)
                if bool((conf >= lam).all()):
                    if logits is None:
                        logits = self.stages.piece(stop, stop, True)(*args, h_new)[1]
                    self.stages.fill(stop, self.num_blocks)(*args, h_new)  # state propagation (CALM)
                    self.exited.append(stop)
                    return logits
            h_prev = h_new[:, -1]
            start, h = stop, (h_new,)
        raise AssertionError("unreachable: the last block always exits")

    def stats(self) -> dict:
        n = max(len(self.exited), 1)
        return {"early_exit": dataclasses.asdict(self.policy), "mean_layers": sum(self.exited) / n,
                "exit_histogram": {str(e): self.exited.count(e) for e in sorted(set(self.exited))}}


class SkipStep:
    """One decode step under a :class:`SkipDecode` schedule; records the blocks each step ran."""

    def __init__(self, gen, policy: SkipDecode, total: int):
        self.stages, self.policy = gen.stages, policy
        self.num_blocks = self.stages.num_blocks
        self.plan = policy.schedule(total, self.num_blocks)
        self.ran: list[tuple[int, ...]] = []

    def __call__(self, token, position, cache, cache_mask, slots, t: int) -> torch.Tensor:
        args = _step_args(token, position, cache, cache_mask, slots)
        warm, top = self.policy.blocks(self.plan[min(t, len(self.plan) - 1)], self.num_blocks)
        self.ran.append(tuple(warm) + tuple(top))
        if not len(top):
            return self.stages.piece(0, self.num_blocks, True)(*args)[1]
        h = self.stages.piece(0, warm.stop, False)(*args)[0]
        return self.stages.piece(top.start, self.num_blocks, True)(*args, h)[1]

    def stats(self) -> dict:
        n = max(len(self.ran), 1)
        return {"early_exit": dataclasses.asdict(self.policy), "mean_layers": sum(len(r) for r in self.ran) / n}


def make_step(gen, early_exit, total: int):
    p = policy(early_exit)
    return ConfidenceStep(gen, p, total) if isinstance(p, ConfidenceExit) else SkipStep(gen, p, total)


def _step_args(token, position, cache, cache_mask, slots):
    """The tree-verify graph's inputs for one token per row (a one-node tree)."""
    b = token.shape[0]
    tree_mask = torch.ones(b, 1, 1, dtype=torch.bool, device=token.device)
    return (token[:, None].contiguous(), position.contiguous(), cache, cache_mask, tree_mask, slots)


@torch.inference_mode()
def teacher_forced_nll(gen, ids: torch.Tensor, early_exit=None, prefix: int = 1) -> dict:
    """Score text under an early-exit policy: ``ids [B, N]`` (no padding) are fed one token at a
    time after a ``prefix``-token prefill, each next token scored by the logits the policy's
    exit gives (the full model's when ``early_exit`` is None). Returns the mean negative
    log-likelihood per scored token (``exp`` of it is the perplexity), the count, and the
    policy's mean layers per token."""
    ids = torch.as_tensor(ids).long()
    batch, total = ids.shape
    if not 1 <= prefix < total:
        raise GenerationError(f"teacher_forced_nll: prefix must be in 1 … {total - 1}, got {prefix}")
    step = make_step(gen, early_exit, total - prefix) if early_exit is not None else None
    mask = torch.ones(batch, prefix, dtype=torch.long, device=ids.device)
    request = gen.start(ids[:, :prefix].contiguous(), mask, total)
    cache, cache_mask, slots, logits = request.cache, request.cache_mask, request.slots, request.logits
    position = request.positions[:, -1:] + 1
    decode = gen.runner("decode")
    ones = torch.ones(batch, 1, dtype=torch.long, device=ids.device)
    nll = torch.zeros((), dtype=torch.float64)
    for t in range(prefix, total):
        nll -= logits[:, -1].float().log_softmax(-1).gather(1, ids[:, t:t + 1]).double().sum()
        if t == total - 1:
            break
        token = ids[:, t]
        if step is None:
            logits, _ = decode(token[:, None].contiguous(), position, cache, cache_mask, ones, slots[t:t + 1])
        else:
            logits = step(token, position, cache, cache_mask, slots[t:t + 1], t - prefix)
        cache_mask[:, t] = 1
        position += 1
    scored = batch * (total - prefix)
    layers = step.stats()["mean_layers"] if step is not None else float(gen.layout.layers)
    return {"nll": float(nll) / scored, "tokens": scored, "mean_layers": layers}
