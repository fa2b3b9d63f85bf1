"""Self-speculative decoding (lossless): draft with the model's first ``E`` blocks + its exit
head, verify with the rest, reusing everything drafting computed (LayerSkip, Kangaroo, DEL).

One round, for a chain of ``d`` draft tokens after the root ``x0`` (the last committed token)::

    for j in 0 … d:   h_E[j], logits = piece(0, E, head=j < d)(x_j)      # writes blocks < E's K/V for x_j
                      x_{j+1} = argmax / sample(logits)                 # stop early when unsure (Kangaroo)
    logits[0 … d] = piece(E, L, head)(h_E[0 … d])                       # blocks >= E over the whole chain
    accept, bonus, kv_compact (the shared loop, :mod:`.decode`)

Drafting writes blocks ``< E``'s K/V of every chain token into the target's own cache (the
round's scratch slots, visible to the later draft tokens through ``cache_mask`` while
drafting), and keeps the residual stream after block ``E - 1``; verification runs only
blocks ``>= E``, from those hidden states, over all ``d + 1`` tokens in one call (LayerSkip's
reuse: no block runs twice for a token). The last draft token's blocks ``< E`` run as one
more draft step without the head. Blocks ``< E`` of a token see exactly the tokens the full
model's would (the committed ones and the chain before it), so the target logits are the
full model's and the output is token-identical to greedy decoding (or, sampling, distributed
as the target; the chain is verified by speculative sampling against the exit head's ``q``).

With Kangaroo's exit adapter (``speculate="adapter:FILE"``, or ``"self:adapter"`` for the one
trained for the model, :mod:`.adapter`) a draft step is blocks ``< E`` (the same piece,
without its head), then the adapter's one decoder layer over its own K/V cache — laid out
slot for slot like the target's, compacted with it after each round — and the adapter's head
over its FR-Spec vocabulary subset; verification is unchanged (blocks ``>= E`` from the
residual stream after block ``E - 1``, full head). Committed tokens the adapter has not seen
(the prompt; tokens of plain or bare-exit rounds) are caught up in one call before the next
adapter round: blocks ``< E`` run over them on a copy of the target's cache (which stays as
it was), then the adapter.

``layer="auto"`` is DEL: each round picks the exit ``E`` and the chain length ``d`` that
maximise the expected tokens per unit of work,
``TPL(E, d) = [(1 - α_E^{d+1}) / (1 - α_E)] / cost(E, d)``, with ``α_E`` the rate at which the
exit head after block ``E`` predicts the verified next token. DEL counts ``cost`` in layers,
``d·E + L``; here it is this machine's measured seconds for the round's calls — ``d`` draft
steps with the head, one without, the verification of ``d + 1`` tokens — plus the round's
measured bookkeeping (each call timed once per process and drafter, fastest of 3). On a small model per-call overhead, not
layers, dominates, and only seconds rank the choices right. ``d = 0`` (plain decoding through
the same graph, one token per round) competes too, so DEL never pays for drafts that do not
pay back. ``α`` is estimated online from *shadow tokens*: every ``shadow_every`` rounds the
verification runs every block and keeps each block's residual stream, the exit head is
applied to all of them at once, and each layer's prediction is compared with the tokens the
target accepted (decayed counts: recent text weighs more). When the model has a trained exit
adapter (found as ``"self:adapter"`` finds it) DEL adds it as a choice, its ``α`` counted from
its own rounds (prior: its held-out agreement; every ``shadow_every`` rounds, offset from the
shadows, one round drafts with it whatever the estimate says, so a low estimate is revised);
the bare exits it then weighs are the one at the adapter's layer (measuring every exit's cost
takes ~30 s on a 30-block model).
"""

from __future__ import annotations

import functools
import time

import torch

from tokenfx.errors import GenerationError
from tokenfx.runtime.speculative import verify as V
from tokenfx.runtime.speculative.decode import Draft, Drafter, State, positions_of
from tokenfx.ir.tree import Tree


class SelfSpeculation(Drafter):
    """``speculate="self:E"`` (fixed exit) or ``"self:auto"`` (DEL). ``length``: the most draft
    tokens per round; ``stop``: end the chain when every row's draft top probability falls below
    it (Kangaroo's double early exit; 0 never stops early)."""

    def __init__(self, layer: int | str | None = None, *, length: int = 6, stop: float = 0.3, shadow_every: int = 8,
                 adapter=None):
        if layer not in (None, "auto") and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise GenerationError(f"speculate='self:{layer}': the exit layer must be a number or 'auto'")
        if not isinstance(length, int) or length < 1:
            raise GenerationError(f"self-speculation: length must be a positive number of draft tokens, got {length!r}")
        if not 0.0 <= stop <= 1.0:
            raise GenerationError(f"self-speculation: stop must be a probability in [0, 1], got {stop!r}")
        self.layer, self.length, self.stop, self.shadow_every = layer, length, stop, shadow_every
        self.auto = layer == "auto"
        self.name = "self:auto" if self.auto else f"self:{layer}" if layer else "self"
        # Kangaroo's exit adapter (an ExitAdapter, its file, or "find": the one trained for the model);
        # self:auto looks for one too
        self.adapter = adapter if adapter is not None else ("find" if self.auto else None)
        if adapter is not None and not self.auto:
            self.name = "adapter"
        self.inline = None
        self._adapter_round = False
        self.a_hits, self.a_tries = 1.0, 2.0  # the adapter's acceptance counts (a prior, see prepare)
        self.max_nodes = 1 + length
        self.gen = None
        self.hits = self.tries = None  # [L] shadow-token agreement counts per exit (DEL)
        self.costs, self.overhead = None, 0.0  # DEL: measured seconds per call; bookkeeping per round

    # -- setup ----------------------------------------------------------------------------------------
    def prepare(self, generator) -> None:
        if generator.layout.cache_update != "inplace":
            raise GenerationError("self-speculation needs the Generator's in-place cache")
        self.gen = generator
        blocks = generator.layout.layers
        if blocks < 2:
            raise GenerationError(f"self-speculation needs at least 2 blocks; the model has {blocks}")
        if self.adapter is not None and self.inline is None:
            self._prepare_adapter(generator)
        if not self.auto:
            if self.layer is None:
                self.layer = max(1, blocks // 3)
                self.name = f"self:{self.layer}"
            if not 1 <= self.layer < blocks:
                raise GenerationError(f"speculate='self:{self.layer}': the exit layer must be in 1 … {blocks - 1} "
                                      f"(the model has {blocks} blocks)")
        if self.hits is None or self.hits.numel() != blocks:
            # prior: one agreement in two tries per exit, so untried exits are explored
            self.hits, self.tries = torch.ones(blocks), torch.full((blocks,), 2.0)
            self.rounds = 0

    def _prepare_adapter(self, generator) -> None:
        from tokenfx.runtime.speculative import adapter as A

        source = getattr(generator, "model", None)
        wanted = self.adapter
        if not isinstance(source, torch.nn.Module):
            if self.auto:
                self.adapter = None
                return
            raise GenerationError("an exit adapter drafts from the target's own blocks: the Generator needs the "
                                  "model object, not a captured graph")
        if isinstance(wanted, str) and wanted == "find":
            found = A.find_adapter(source)
            if found is None:
                if self.auto:
                    self.adapter = None
                    return
                raise GenerationError(f"speculate='self:adapter': no exit adapter is trained for this model (digest "
                                      f"{A.target_digest(source)}); train one with tools/train_exit_adapter.py, or "
                                      "give its file as speculate='adapter:FILE'")
            wanted = found
        adapter = wanted if isinstance(wanted, A.ExitAdapter) else A.ExitAdapter.load(wanted, source)
        A.check(adapter, source)
        self.adapter, self.inline = adapter, A.InlineAdapter(adapter, source)
        if not self.auto:
            self.layer = adapter.layer
            self.name = f"adapter:{adapter.layer}"
        prior = adapter.agreement if adapter.agreement is not None else 0.5
        self.a_hits, self.a_tries = 4.0 * prior, 4.0  # as if 4 draft tokens had been tried

    def begin(self, state: State) -> None:
        self._hidden = None
        if self.inline is not None:
            b, slots = state.tokens.shape[0], state.cache.shape[-2]
            self._acache = self.inline.new_cache(b, slots, dtype=state.cache.dtype)
            self._acols = torch.zeros(b, dtype=torch.long, device=state.tokens.device)  # columns with adapter K/V

    # -- DEL --------------------------------------------------------------------------------------------
    def alpha(self) -> torch.Tensor:
        """``[L]``: estimated acceptance rate of the exit after each block (index E - 1)."""
        return self.hits / self.tries

    def plan(self) -> tuple[int, int, bool]:
        """(exit E, draft length d, with the adapter) for the next round; ``d = 0``: a plain round."""
        blocks = self.gen.layout.layers
        if not self.auto:
            return self.layer, self.length, self.inline is not None
        if self.costs is None:
            exits = [self.inline.layer] if self.inline is not None else range(1, blocks)
            self.costs = _measure_costs(self.gen, self.length, exits=exits, inline=self.inline)
        if self.inline is not None and self.rounds % self.shadow_every == self.shadow_every // 2:
            # a probe: the adapter drafts a whole chain now and then, so its acceptance estimate follows
            # the text even while other choices win (a prior that starts low would never be revised)
            return self.inline.layer, self.length, True
        alpha = self.alpha().clamp(max=0.999)
        choice = (blocks, 0, False)
        best = 1.0 / (self._cost(blocks, 0) + self.overhead)
        candidates = [(e, float(alpha[e - 1]), False) for e in self.costs["draft"]]
        if self.inline is not None:
            candidates.append((self.inline.layer, min(self.a_hits / self.a_tries, 0.999), True))
        for exit_, a, with_adapter in candidates:
            for d in range(1, self.length + 1):
                rate = ((1 - a ** (d + 1)) / (1 - a)) / (self._cost(exit_, d, with_adapter) + self.overhead)
                if rate > best:
                    best, choice = rate, (exit_, d, with_adapter)
        return choice

    def _cost(self, exit_: int, d: int, with_adapter: bool = False) -> float:
        """Seconds of a round's model calls (module docstring)."""
        c = self.costs
        if d == 0:
            return c["plain"]
        if with_adapter:
            return d * c["adapter_draft"] + c["adapter_tail"] + c["verify"][exit_][d + 1]
        return d * c["draft"][exit_] + c["tail"][exit_] + c["verify"][exit_][d + 1]

    # -- drafting -------------------------------------------------------------------------------------------
    def propose(self, state: State) -> Draft:
        self._round_start = time.perf_counter()
        stages = self.gen.stages
        exit_, d, with_adapter = self.plan()
        self.exit, self.shadow = exit_, self.auto and self.rounds % self.shadow_every == 0 and not with_adapter
        d = min(d, state.max_nodes - 1, int(state.max_depth.max()))  # tree_budget, tokens still allowed
        self._planned = (exit_, d, with_adapter)
        self._adapter_round = with_adapter and d >= 1
        if d < 1:  # plain decoding: the root alone, verified by the whole model
            self._hidden = None
            return Draft.from_tree(_chain(0), state.root[:, None])
        if with_adapter:
            return self._propose_with_adapter(state, d)
        b = state.tokens.shape[0]
        device = state.tokens.device
        write, cache, cache_mask, slots = state.write, state.cache, state.cache_mask, state.slots
        base = positions_of(state.length - 1, state.start)
        tree_mask = torch.ones(b, 1, 1, dtype=torch.bool, device=device)
        sampling = state.temperature > 0
        tokens = [state.root]
        hidden, qs = [], []
        j = 0
        while True:
            if j > 0:
                cache_mask[:, write + j - 1] = 1  # the previous chain token's blocks < E are cached now
            head = j < d
            outs = stages.piece(0, exit_, head)(tokens[-1][:, None].contiguous(), (base + j)[:, None].contiguous(),
                                                cache, cache_mask, tree_mask, slots[write + j:write + j + 1])
            hidden.append(outs[0])
            if not head:
                break
            logits = outs[1][:, -1]
            p = V.warp(logits, state.temperature, state.top_k, state.top_p) if sampling else logits.float().softmax(-1)
            nxt = torch.multinomial(p, 1, generator=state.generator).squeeze(1) if sampling else p.argmax(-1)
            qs.append(p)
            tokens.append(nxt)
            j += 1
            if j < d and self.stop > 0 and bool((p.max(-1).values < self.stop).all()):
                d = j  # Kangaroo: the draft is unsure; one more step computes the last token's blocks < E
        cache_mask[:, write:write + d] = 0  # scratch again: verification places the chain by its tree mask
        self._hidden = torch.cat(hidden, 1)  # [B, d + 1, C]: the residual stream after block E - 1
        draft = Draft.from_tree(_chain(d), torch.stack(tokens, 1))
        if sampling:
            v = qs[0].shape[-1]
            q = torch.zeros(b, d + 1, v, device=device)
            q[:, :d] = torch.stack(qs, 1)
            draft.q = q
        return draft

    def _catch_up(self, state: State) -> None:
        """Adapter K/V for the committed columns that have none yet (the prompt; tokens that plain
        or bare-exit rounds committed): blocks ``< E`` run over them once more, on a copy of the
        target's cache (its own entries stay as they were), then the adapter."""
        cached = state.length - 1  # the root (column length - 1) is drafted from, so computed there
        lo = int(torch.where(state.finished, cached, self._acols).min())
        hi = int(cached.max())
        if hi <= lo:
            return
        t = hi - lo
        device = state.tokens.device
        columns = torch.arange(lo, hi, device=device)
        positions = positions_of(columns[None, :], state.start[:, None]).contiguous()
        committed = state.cache_mask[:, lo:hi].bool()
        own = torch.eye(t, dtype=torch.bool, device=device)[None]
        tree = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None] & (committed[:, None, :] | own)
        cache_mask = state.cache_mask.clone()
        cache_mask[:, lo:hi] = 0
        slots = state.slots[lo:hi]
        h = self.gen.stages.piece(0, self.inline.layer, False)(
            state.tokens[:, lo:hi].contiguous(), positions, state.cache.clone(), cache_mask, tree.contiguous(), slots)[0]
        mask = torch.zeros(state.tokens.shape[0], t, state.cache_mask.shape[1], dtype=torch.bool, device=device)
        mask[:, :, :lo] = state.cache_mask[:, None, :lo].bool()
        mask[:, :, lo:hi] = tree
        self.inline.step(h, positions, self._acache, mask, slots)
        self._acols = torch.where(state.finished, self._acols, cached)

    def _propose_with_adapter(self, state: State, d: int) -> Draft:
        """A chain drafted by blocks ``< E`` (the target's pieces, its cache) + the exit adapter."""
        self._catch_up(state)
        inline = self.inline
        b = state.tokens.shape[0]
        device = state.tokens.device
        write, cache, cache_mask, slots = state.write, state.cache, state.cache_mask, state.slots
        base = positions_of(state.length - 1, state.start)
        one = torch.ones(b, 1, 1, dtype=torch.bool, device=device)
        run = self.gen.stages.piece(0, inline.layer, False)
        sampling = state.temperature > 0
        tokens, hidden, qs = [state.root], [], []
        j = 0
        while True:
            if j > 0:
                cache_mask[:, write + j - 1] = 1  # the previous chain token's blocks < E (and adapter) are cached
            position = (base + j)[:, None].contiguous()
            slot = slots[write + j:write + j + 1]
            h = run(tokens[-1][:, None].contiguous(), position, cache, cache_mask, one, slot)[0]
            hidden.append(h)
            mask = cache_mask.bool()
            mask[:, write + j] = True
            a = inline.step(h, position, self._acache, mask[:, None, :], slot)
            if j == d:
                break
            logits = inline.logits(a)[:, -1]  # [B, k]: the adapter's vocabulary only (FR-Spec)
            if sampling:
                p_sub = V.warp(logits, state.temperature, state.top_k, state.top_p)
                pick = torch.multinomial(p_sub, 1, generator=state.generator).squeeze(1)
                p = torch.zeros(b, self.gen.vocab_size, device=device, dtype=p_sub.dtype)
                p[:, inline.vocab if inline.vocab is not None else slice(None)] = p_sub
                qs.append(p)
            else:
                p_sub = logits.float().softmax(-1)
                pick = p_sub.argmax(-1)
            tokens.append(inline.to_vocab(pick))
            j += 1
            if j < d and self.stop > 0 and bool((p_sub.max(-1).values < self.stop).all()):
                d = j  # Kangaroo: the draft is unsure; one more step computes the last token's blocks < E
        cache_mask[:, write:write + d] = 0
        self._hidden = torch.cat(hidden, 1)
        self.exit = inline.layer
        draft = Draft.from_tree(_chain(d), torch.stack(tokens, 1))
        if sampling:
            q = torch.zeros(b, d + 1, qs[0].shape[-1], device=device)
            q[:, :d] = torch.stack(qs, 1)
            draft.q = q
        return draft

    def _update_adapter(self, state: State, draft: Draft, verdict: V.Verdict) -> None:
        """Move the accepted chain's adapter K/V to the rows' ends (as the loop did the target's)
        and count its acceptance."""
        steps = verdict.path.shape[1]
        cached = state.length - 1
        device = state.tokens.device
        dst = cached[:, None] + torch.arange(steps, device=device)
        dst = torch.minimum(dst, (cached + verdict.length - 1)[:, None])
        torch.ops.tokenfx.kv_compact(self._acache, state.write + verdict.path, dst)
        self._acols = torch.where(state.finished, self._acols, cached + verdict.length)
        active = ~state.finished
        if bool(active.any()):
            drafted = draft.tokens.shape[1] - 1
            accepted = (verdict.length - 1)[active].float()
            decay = 0.9
            self.a_hits = decay * self.a_hits + float(accepted.sum())
            self.a_tries = decay * self.a_tries + float((accepted + (accepted < drafted).float()).sum())

    def verify(self, gen, tokens, positions, cache, cache_mask, tree_mask, slots) -> torch.Tensor:
        stages, blocks = gen.stages, gen.layout.layers
        if not self.shadow:
            if self._hidden is None:  # a plain round
                return stages.piece(0, blocks, True)(tokens, positions, cache, cache_mask, tree_mask, slots)[1]
            return stages.piece(self.exit, blocks, True)(tokens, positions, cache, cache_mask, tree_mask, slots,
                                                         self._hidden)[1]
        # a shadow round: every block runs (blocks < E again, the same K/V) and keeps its residual stream
        _, logits, trace = stages.piece(0, blocks, True, trace=True)(tokens, positions, cache, cache_mask, tree_mask,
                                                                     slots)
        self._trace = trace[:-1]  # [L - 1, B, T, C]: after blocks 1 … L - 1
        return logits

    def update(self, state: State, draft: Draft, logits: torch.Tensor, verdict: V.Verdict) -> None:
        self.rounds += 1
        if self._adapter_round:
            self._update_adapter(state, draft, verdict)
        if not self.auto:
            return
        if self.costs is not None and not self.shadow:  # bookkeeping: the round's time beyond its model calls
            exit_, d, with_adapter = self._planned
            spent = time.perf_counter() - self._round_start - self._cost(exit_, min(d, draft.tokens.shape[1] - 1),
                                                                         with_adapter)
            self.overhead = 0.8 * self.overhead + 0.2 * max(spent, 0.0)
        if not self.shadow:
            return
        exits, b, t, c = self._trace.shape
        flat = self._trace.permute(1, 0, 2, 3).reshape(b, exits * t, c).contiguous()
        ph = torch.zeros(b, exits * t, dtype=torch.long, device=flat.device)
        _, shadow = self.gen.stages.head()(ph, ph, None, None, None, None, flat)
        guess = shadow.argmax(-1).reshape(b, exits, t)  # [B, L - 1, T]: each exit's next token after each node
        target = logits.argmax(-1)  # [B, T]: the verified next token after each node
        on_path = torch.zeros(b, t, dtype=torch.bool, device=flat.device)
        steps = torch.arange(verdict.path.shape[1], device=flat.device)[None, :] < verdict.length[:, None]
        rows = torch.arange(b, device=flat.device)[:, None].expand_as(verdict.path)
        on_path[rows[steps], verdict.path[steps]] = True
        on_path &= ~state.finished[:, None]
        agree = (guess == target[:, None, :]) & on_path[:, None, :]
        n = float(on_path.sum())
        if n:
            decay = 0.9  # recent rounds count more: acceptance drifts with the text
            self.hits[:-1] = decay * self.hits[:-1] + agree.sum((0, 2)).float()
            self.tries[:-1] = decay * self.tries[:-1] + n


@functools.lru_cache(maxsize=None)
def _chain(d: int) -> Tree:
    """The chain template of ``d`` drafts (its closure computed once, not every round)."""
    return Tree.chain(d)


def _measure_costs(gen, length: int, context: int = 128, exits=None, inline=None) -> dict:
    """Seconds per call (fastest of 3 after a warm-up) of every piece DEL may run, batch 1,
    after ``context`` cached tokens: ``draft[E]`` (blocks < E + head, one token), ``tail[E]``
    (blocks < E, no head), ``verify[E][T]`` (blocks >= E + head over T tokens), ``plain``, for
    each exit of ``exits`` (default: all); with an ``inline`` adapter also ``adapter_draft``
    (blocks < E, the adapter, its head) and ``adapter_tail`` (without the head)."""
    stages, layout = gen.stages, gen.layout
    blocks = layout.layers
    context = max(0, min(context, layout.max_positions - length - 2))  # positions stay inside the model's tables
    size = context + length + 2
    cache = torch.zeros(layout.cache_shape(1, size), dtype=layout.dtype)
    cache_mask = torch.zeros(1, size, dtype=torch.long)
    cache_mask[:, :context] = 1
    slots = torch.arange(size)

    def args(t):
        return (torch.zeros(1, t, dtype=torch.long), (torch.arange(t) + context)[None].contiguous(), cache, cache_mask,
                torch.ones(t, t, dtype=torch.bool).tril()[None].contiguous(), slots[context:context + t])

    def seconds(run, *a):
        times = []
        for _ in range(4):
            start = time.perf_counter()
            run(*a)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    hidden = torch.zeros(1, length + 1, int(getattr(gen.config, "hidden_size", 0) or 1))
    costs = {"plain": seconds(stages.piece(0, blocks, True), *args(1)), "draft": {}, "tail": {}, "verify": {}}
    for e in (range(1, blocks) if exits is None else exits):
        costs["draft"][e] = seconds(stages.piece(0, e, True), *args(1))
        costs["tail"][e] = seconds(stages.piece(0, e, False), *args(1))
        costs["verify"][e] = {t: seconds(stages.piece(e, blocks, True), *args(t), hidden[:, :t].contiguous())
                              for t in range(2, length + 2)}
    if inline is not None:
        acache = inline.new_cache(1, size, dtype=layout.dtype)
        mask = cache_mask.bool()[:, None, :].clone()
        mask[:, :, context] = True
        position = torch.full((1, 1), context, dtype=torch.long)
        tail = stages.piece(0, inline.layer, False)

        def adapter_step(head: bool):
            h = tail(*args(1))[0]
            a = inline.step(h, position, acache, mask, slots[context:context + 1])
            if head:
                inline.logits(a).softmax(-1).argmax(-1)

        costs["adapter_draft"] = seconds(adapter_step, True)
        costs["adapter_tail"] = seconds(adapter_step, False)
    return costs
