"""The speculative decoding loop: draft a tree per row, verify all of it in one call of the
``tree_verify`` graph, keep the accepted path's K/V, repeat.

One round, for a batch of ``B`` rows (each row its own prefix length, tree and accepted
length)::

    draft  = drafter.propose(state)                      # tokens[B, T], parents[B, T]; node 0 = root
    logits = verify_graph(tokens, prefix + depth, cache, cache_mask, tree_mask, slots[W : W + T])
    verdict = greedy(...) or sample(...)                   # accepted path + bonus token per row
    kv_compact(cache, src = W + path, dst = row length + 0 … len(path) - 1)
    cache_mask[b, length_b : length_b + len(path_b)] = 1

The cache keeps each row dense: committed column ``j`` of a row (left-padded prompt, then
generated tokens) lives at slot ``j``; the tree is written at a shared scratch range
``W = max_b(length_b)`` after every row's tokens (its slots masked, so no row sees another
row's tree or a stale slot) and the accepted path is moved down to the row's end. No slot
is ever wasted, so the buffer needs ``prompt + max_new_tokens + T`` slots.

The root (node 0) is the token committed last: its K/V are computed in the same call. Rows
that finish (a stop token, or ``max_new_tokens``) keep running on a one-node tree until the
whole batch is done and are padded like Hugging Face's ``generate``.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from tokenfx.codegen import kv_compact  # noqa: F401  (registers tokenfx::kv_compact)
from tokenfx.errors import GenerationError
from tokenfx.ir.tree import batch_closure
from tokenfx.runtime.speculative import verify as V
from tokenfx.runtime.timing import RoundClock


@dataclasses.dataclass
class State:
    """What a drafter may read (and nothing it should write)."""

    tokens: torch.Tensor  # [B, width] committed tokens per row: left-padded prompt, then generated
    length: torch.Tensor  # [B] committed columns of each row (the root is column length - 1)
    start: torch.Tensor  # [B] first real column (left padding before it)
    prompt: int  # prompt columns (same for all rows)
    finished: torch.Tensor  # [B] rows that stopped (their drafts are ignored)
    max_nodes: int  # nodes a row's tree may have (cache room, tree budget)
    max_depth: torch.Tensor  # [B] deepest useful node per row (tokens still allowed)
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    # the target's buffers and this round's scratch slots (from ``write`` on), for drafters that
    # share the target's cache (self-speculation writes its layers' K/V there while drafting)
    cache: torch.Tensor | None = None
    cache_mask: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    write: int = 0

    @property
    def root(self) -> torch.Tensor:
        return self.tokens.gather(1, (self.length - 1)[:, None]).squeeze(1)

    def row(self, b: int) -> torch.Tensor:
        """Row ``b``'s real tokens (prompt without padding + generated, root last)."""
        return self.tokens[b, int(self.start[b]):int(self.length[b])]


@dataclasses.dataclass
class Draft:
    """A batch of draft trees; node 0 of each row is its root (the last committed token)."""

    tokens: torch.Tensor  # [B, T]
    parents: torch.Tensor  # [B, T]; root and padding: -1
    valid: torch.Tensor  # [B, T] bool; padding nodes are False
    q: torch.Tensor | None = None  # [B, T, V] sampled drafts: the distribution node i's children came from
    closure: tuple | None = None  # (depth [B, T], mask [B, T, T]) when known (static trees)

    @classmethod
    def from_tree(cls, tree, tokens: torch.Tensor) -> "Draft":
        """Every row drafts the same template ``tree`` (its closure is reused, not recomputed)."""
        b = tokens.shape[0]
        parents = tree.parents.to(tokens.device).expand(b, -1)
        closure = (tree.depth.to(tokens.device).expand(b, -1), tree.mask.to(tokens.device).expand(b, -1, -1))
        return cls(tokens, parents, torch.ones_like(tokens, dtype=torch.bool), closure=closure)

    @classmethod
    def stack(cls, rows: list[tuple[list[int], list[int]]], device=None) -> "Draft":
        """Per-row ``(tokens, parents)`` lists of different sizes → one padded batch."""
        t = max(len(tokens) for tokens, _ in rows)
        b = len(rows)
        tokens = torch.zeros(b, t, dtype=torch.long)
        parents = torch.full((b, t), -1, dtype=torch.long)
        valid = torch.zeros(b, t, dtype=torch.bool)
        for i, (tk, pa) in enumerate(rows):
            tokens[i, :len(tk)] = torch.tensor(tk, dtype=torch.long)
            parents[i, :len(pa)] = torch.tensor(pa, dtype=torch.long)
            valid[i, :len(tk)] = True
        return cls(tokens.to(device), parents.to(device), valid.to(device))

    def only_roots(self, rows: torch.Tensor) -> "Draft":
        """The same batch with ``rows``' trees cut to their root."""
        valid = self.valid.clone()
        valid[rows, 1:] = False
        parents = torch.where(valid, self.parents, -1)
        return dataclasses.replace(self, valid=valid, parents=parents, closure=None)

    def trim_depth(self, depth: torch.Tensor, max_depth: torch.Tensor) -> "Draft":
        """Drop nodes deeper than each row's ``max_depth`` (their subtrees go with them)."""
        keep = self.valid & (depth <= max_depth[:, None])
        if bool((keep == self.valid).all()):
            return self
        return dataclasses.replace(self, valid=keep, parents=torch.where(keep, self.parents, -1), closure=None)


class Drafter:
    """Proposes a token tree per row. Subclasses: :mod:`.recycling`, :mod:`.prompt_lookup`,
    :mod:`.draft_model`, :mod:`.self_spec` (:func:`~tokenfx.runtime.speculative.drafters.make_drafter`
    picks one by name). ``generator`` / ``gen`` below is the target's
    :class:`~tokenfx.runtime.generate.Generator`; a drafter uses its public interface only."""

    name = "drafter"
    max_nodes = 1  # the most nodes (root included) a proposal can have

    def prepare(self, generator) -> None:
        """Called once per target Generator before the first request (check vocabularies …)."""

    def begin(self, state: State) -> None:
        """Called per request, after the prompt's prefill (state.length = prompt + 1)."""

    def propose(self, state: State) -> Draft:
        raise NotImplementedError

    def update(self, state: State, draft: Draft, logits: torch.Tensor, verdict: V.Verdict) -> None:
        """Called after each verify step with the target's logits at every node."""

    def verify(self, gen, tokens, positions, cache, cache_mask, tree_mask, slots) -> torch.Tensor:
        """The target's logits ``[B, T, V]`` at every node of the proposed tree: one call of the
        tree-verify graph (self-speculation overrides it to reuse what drafting computed)."""
        return gen.runner("tree")(tokens, positions, cache, cache_mask, tree_mask, slots)[0]


def speculative_generate(gen, drafter: Drafter, ids, mask, *, max_new_tokens: int, temperature: float, top_k, top_p,
                         seed, stop_ids, pad, stream=None, tree_budget=None) -> torch.Tensor:
    """``gen.generate(..., speculate=...)``'s loop (module docstring), over the Generator ``gen``'s
    public interface: ``start``, ``runner("tree")`` (through ``drafter.verify``), ``layout``,
    ``verify_cost``, ``prefix_cache``; it sets ``gen.last_stats``. ``ids``/``mask`` are checked."""
    batch, prompt = ids.shape
    device = ids.device
    drafter.prepare(gen)
    auto = tree_budget in (None, "auto") and hasattr(drafter, "set_budget")
    if tree_budget not in (None, "auto") and (not isinstance(tree_budget, int) or tree_budget < 1):
        raise GenerationError(f"tree_budget must be a positive number of nodes or 'auto', got {tree_budget!r}")
    nodes = drafter.max_nodes if tree_budget in (None, "auto") else min(drafter.max_nodes, int(tree_budget))
    if prompt + max_new_tokens + nodes > gen.layout.max_positions:
        raise GenerationError(f"prompt ({prompt}) + max_new_tokens ({max_new_tokens}) + a {nodes}-node draft tree "
                              f"exceeds the model's {gen.layout.max_positions} positions; use a smaller tree "
                              "(tree_budget) or fewer new tokens")
    if hasattr(drafter, "set_budget"):
        drafter.set_budget(nodes)
    sizer = _Sizer(gen.verify_cost(batch), drafter) if auto else None
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    start_time = time.perf_counter()
    clock = RoundClock()
    request = gen.start(ids, mask, prompt + max_new_tokens + nodes)
    cache, cache_mask, out, slots, logits = request.cache, request.cache_mask, request.out, request.slots, request.logits
    clock.lap("prefill")
    seq = out[:, :prompt + max_new_tokens]  # committed tokens per row (a view of the request's buffer)
    seq[:, prompt:] = pad  # columns a finished row never reaches read as padding
    first_token_s = time.perf_counter() - start_time

    sampling = temperature > 0
    scores = logits[:, -1, :]
    first = V.sample_token(scores, temperature, top_k, top_p, generator) if sampling else scores.argmax(-1)
    seq[:, prompt] = first
    if stream is not None:
        stream(first)
    stop_tensor = torch.tensor(stop_ids, device=device) if stop_ids else None
    finished = torch.isin(first, stop_tensor) if stop_tensor is not None else torch.zeros(batch, dtype=torch.bool, device=device)
    length = torch.full((batch,), prompt + 1, dtype=torch.long, device=device)  # committed columns, root included
    cached = torch.full((batch,), prompt, dtype=torch.long, device=device)  # columns whose K/V are in the cache
    pads = prompt - mask.sum(-1)
    state = State(seq, length, pads, prompt, finished, nodes, torch.zeros(batch, dtype=torch.long, device=device),
                  temperature, top_k, top_p, generator, cache, cache_mask, slots)
    clock.lap("bookkeeping")
    drafter.begin(state)  # per-request drafter set-up (Token Recycling seeds the prompt's tokens) counts as drafting
    clock.lap("draft")
    rounds, row_steps, emitted_total = 0, 0, 0
    rows = torch.arange(batch, device=device)
    while not bool(finished.all()) and bool((length < prompt + max_new_tokens).any()):
        finished |= length >= prompt + max_new_tokens
        if bool(finished.all()):
            break
        state.max_depth = (prompt + max_new_tokens - length).clamp(min=0)
        if sizer is not None:
            sizer.resize(rounds)
        round_start = time.perf_counter()
        write = int(length.max()) - 1  # scratch after every row's cached columns (the root's slot onwards)
        state.write = write
        clock.lap("bookkeeping")
        draft = drafter.propose(state)
        clock.lap("draft")
        if draft.tokens.shape[1] > nodes:
            raise GenerationError(f"drafter {drafter.name} proposed {draft.tokens.shape[1]} nodes; at most {nodes} fit")
        depth, tree_mask = draft.closure if draft.closure is not None else batch_closure(draft.parents)
        cut = draft.only_roots(finished) if bool(finished.any()) else draft
        cut = cut.trim_depth(depth, state.max_depth)
        if cut is not draft:  # rows finished, or trees deeper than the tokens still allowed
            draft = cut
            depth, tree_mask = batch_closure(draft.parents)
        t = draft.tokens.shape[1]
        node_positions = (positions_of(length - 1, pads)[:, None] + depth).clamp(max=gen.layout.max_positions - 1)
        tokens = torch.where(draft.valid, draft.tokens, 0)  # padding nodes: any id in the vocabulary (masked)
        clock.lap("bookkeeping")
        call_start = time.perf_counter()
        logits = drafter.verify(gen, tokens.contiguous(), node_positions.contiguous(), cache, cache_mask,
                                tree_mask.contiguous(), slots[write:write + t])
        call_seconds = time.perf_counter() - call_start
        clock.lap("forward")
        if sampling:
            probs = V.warp(logits, temperature, top_k, top_p)
            verdict = V.sample(tokens, draft.parents, draft.valid, tree_mask, depth, probs, generator, draft.q)
        else:
            verdict = V.greedy(tokens, draft.parents, draft.valid, tree_mask, depth, logits)
        clock.lap("verdict")
        # K/V of the root and the accepted nodes → the row's next slots (columns)
        steps = verdict.path.shape[1]
        src = write + verdict.path
        dst = cached[:, None] + torch.arange(steps, device=device)
        dst = torch.minimum(dst, (cached + verdict.length - 1)[:, None])  # padding repeats the last pair
        torch.ops.tokenfx.kv_compact(cache, src, dst)
        clock.lap("kv_compact")
        keep = torch.arange(cache_mask.shape[1], device=device)[None, :]
        cache_mask |= ((keep >= cached[:, None]) & (keep < (cached + verdict.length)[:, None])).long()
        # the emitted tokens: accepted draft tokens, then the bonus
        emitted = torch.cat([tokens.gather(1, verdict.path[:, 1:]), verdict.bonus[:, None]], 1)  # [B, steps]
        count = verdict.length.clone()  # accepted (length - 1) + bonus
        emitted = _place_bonus(emitted, count)
        count = torch.minimum(count, prompt + max_new_tokens - length)
        if stop_tensor is not None:
            hit = torch.isin(emitted, stop_tensor) & (torch.arange(steps, device=device)[None, :] < count[:, None])
            first_hit = torch.where(hit.any(1), hit.float().argmax(1) + 1, count)
            count = torch.minimum(count, first_hit)
            newly = hit.any(1)
        else:
            newly = torch.zeros_like(finished)
        count = torch.where(finished, 0, count)
        cols = length[:, None] + torch.arange(steps, device=device)[None, :]
        write_ok = torch.arange(steps, device=device)[None, :] < count[:, None]
        seq[rows[:, None].expand_as(cols)[write_ok], cols[write_ok]] = emitted[write_ok]
        if stream is not None:
            for j in range(int(count.max())):  # one call per emitted column; -1: this row has no token there
                stream(torch.where(count > j, emitted[:, j], -1))
        clock.lap("bookkeeping")
        drafter.update(state, draft, logits, verdict)
        clock.lap("update")
        active = ~finished
        row_steps += int(active.sum())
        emitted_total += int(count[active].sum())
        cached = torch.where(finished, cached, cached + verdict.length)
        length = length + count
        finished |= newly & (count > 0)
        state.length, state.finished = length, finished
        rounds += 1
        if sizer is not None:
            sizer.observe(time.perf_counter() - round_start - call_seconds, t, call_seconds)
    total = int(length.max())
    clock.lap("bookkeeping")
    seconds = time.perf_counter() - start_time
    new_tokens = total - prompt
    gen.last_stats = {"prompt_tokens": prompt, "new_tokens": new_tokens, "batch": batch, "reused_tokens": request.reused,
                      "seconds": seconds, "first_token_seconds": first_token_s, "steps": rounds,
                      "accepted_per_step": emitted_total / max(row_steps, 1),  # tokens per verify step and row
                      "stages": clock.stats(),
                      "drafter": drafter.name, "tree_nodes": len(drafter.tree) if hasattr(drafter, "tree") else nodes,
                      "decode_tokens_per_s": (new_tokens - 1) * batch / max(seconds - first_token_s, 1e-9)}
    if gen.prefix_cache is not None:  # each row's columns [pad, cached) hold its tokens' K/V
        for b in range(batch):
            lo, hi = int(pads[b]), int(cached[b])
            if hi > lo:
                gen.prefix_cache.insert(seq[b, lo:hi], cache[:, :, b, :, lo:hi])
    return seq[:, :total].clone()


class _Sizer:
    """``tree_budget="auto"``: every few rounds, give the drafter the node budget that maximises
    expected tokens per second = ``drafter.expected_gain(n) / (verify_cost(n) + overhead)``, where
    ``verify_cost`` is the measured curve of this machine and ``overhead`` the running mean of the
    round's time outside the verify call (drafting, verification, bookkeeping)."""

    every = 8

    def __init__(self, cost: dict[int, float], drafter):
        self.cost, self.drafter, self.overhead = dict(cost), drafter, None

    def resize(self, rounds: int) -> None:
        if rounds % self.every:
            return
        overhead = self.overhead or 0.0
        sizes = sorted({n for n in self.cost if n <= self.drafter.max_nodes} | {1, self.drafter.max_nodes})
        rate = {n: self.drafter.expected_gain(n) / (self._cost(n) + overhead) for n in sizes}
        self.drafter.set_budget(max(rate, key=rate.get))

    def _cost(self, n: int) -> float:
        """The measured curve, linearly interpolated (and extended flat past its ends)."""
        points = sorted(self.cost.items())
        if n <= points[0][0]:
            return points[0][1]
        for (t0, c0), (t1, c1) in zip(points, points[1:]):
            if n <= t1:
                return c0 + (c1 - c0) * (n - t0) / (t1 - t0)
        return points[-1][1]

    def observe(self, overhead: float, nodes: int, call_seconds: float) -> None:
        """One round: its time outside the verify call, and the call's time for ``nodes`` nodes
        (which refines the curve: the fastest time seen per size, like the measurement)."""
        self.overhead = overhead if self.overhead is None else 0.8 * self.overhead + 0.2 * overhead
        if nodes in self.cost:
            self.cost[nodes] = min(self.cost[nodes], call_seconds)


def positions_of(columns: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
    """The position of a row's column: columns count from the left padding's end."""
    return (columns - pads).clamp(min=0)


def _place_bonus(emitted: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``emitted`` holds accepted tokens then the bonus in the last column; move each row's bonus
    right after its accepted tokens (column ``count - 1``)."""
    steps = emitted.shape[1]
    bonus = emitted[:, -1]
    out = emitted.clone()
    out.scatter_(1, (count - 1).clamp(max=steps - 1)[:, None], bonus[:, None])
    return out


