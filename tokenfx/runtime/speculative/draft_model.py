"""A smaller model of the target's tokenizer drafts, with its own KV cache: a chain (greedy
or sampled) or a tree (top-k children per node, or DySpec's dynamic tree: expand the nodes
with the highest product of draft probabilities along the path until a node budget is
spent). ``speculate="draft[:MODEL]"``, ``"draft-tree[:MODEL]"``, ``"dynamic[:MODEL]"``.
"""

from __future__ import annotations

import torch

from tokenfx.errors import GenerationError
from tokenfx.frontends.load import tokenizer_vocab
from tokenfx.ir.tree import batch_closure
from tokenfx.runtime.speculative import verify as V
from tokenfx.runtime.speculative.decode import Draft, Drafter, State, positions_of


class DraftModel(Drafter):
    """A smaller causal LM with the target's tokenizer drafts a chain or a tree.

    ``mode="chain"``: ``length`` tokens, the draft's argmax (or samples, when decoding samples);
    ``"tree"``: ``width`` children per node (top-k, or sampled without replacement) to depth
    ``length``; ``"dynamic"``: DySpec — repeatedly add the ``wave`` candidates with the highest
    product of draft probabilities along their path, until ``budget`` nodes.

    The draft keeps its own cache of the committed tokens (slot = column, as the target's);
    each round it first catches up on the tokens committed since the last round, then
    expands the tree one level (or wave) per call of its tree-verify graph.
    """

    name = "draft"

    def __init__(self, model="tokenfx:tiny-code-draft", *, mode: str = "chain", length: int = 4, width: int = 2,
                 budget: int = 24, wave: int = 6, compile: bool | str | None = None):
        if mode not in ("chain", "tree", "dynamic"):
            raise GenerationError(f"draft: mode must be chain, tree or dynamic, got {mode!r}")
        self.model, self.mode, self.length, self.width, self.budget, self.wave = model, mode, length, width, budget, wave
        self.compile = compile
        self.name = "draft" if mode == "chain" else "dynamic" if mode == "dynamic" else "draft-tree"
        self.max_nodes = 1 + {"chain": length, "tree": sum(width ** d for d in range(1, length + 1)),
                              "dynamic": budget}[mode]
        self.gen = None
        self.cache = None  # [L, 2, B, Hkv, S, D] of the draft, allocated per request shape

    def prepare(self, generator) -> None:
        if self.gen is None:
            self.gen = generator.sibling(self.model, compile=self.compile)  # cached: built once per model
        if self.gen.vocab_size != generator.vocab_size:
            raise GenerationError(f"draft model {self.model} has a vocabulary of {self.gen.vocab_size} tokens, the "
                                  f"target {generator.vocab_size}: the drafter must share the target's tokenizer")
        mine, theirs = tokenizer_vocab(self.gen.spec), tokenizer_vocab(generator.spec)
        if mine is not None and theirs is not None and mine != theirs:
            raise GenerationError(f"draft model {self.model} uses another tokenizer than the target {generator.spec} "
                                  "(same vocabulary size, different tokens); the drafter must share the target's tokenizer")
        if generator.layout.max_positions > self.gen.layout.max_positions:
            raise GenerationError(f"draft model {self.model} covers {self.gen.layout.max_positions} positions, the target "
                                  f"{generator.layout.max_positions}")

    def begin(self, state: State) -> None:
        gen = self.gen
        b, width = state.tokens.shape
        prompt = state.prompt
        # its own buffers (not gen.start's: the draft may be the target model itself, with the same Generator)
        size = width + self.max_nodes  # committed columns, then a tree's scratch (never past max_positions)
        shape = gen.layout.cache_shape(b, size)
        if self.cache is None or tuple(self.cache.shape) != tuple(shape) or self.cache.device != state.tokens.device:
            self.cache = torch.zeros(shape, dtype=gen.layout.dtype, device=state.tokens.device)
            self.cache_mask = torch.zeros(b, size, dtype=torch.long, device=state.tokens.device)
            self.slots = torch.arange(size, device=state.tokens.device)
        self.cache_mask.zero_()
        mask = (torch.arange(prompt, device=state.tokens.device)[None, :] >= state.start[:, None]).long()
        ids = state.tokens[:, :prompt].contiguous()
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        self.cache_mask[:, :prompt] = mask
        dense = bool(mask.all())
        _, new_kv = gen.runner("prefill_dense")(ids, positions) if dense else gen.runner("prefill")(ids, positions, mask)
        self.cache[:, :, :, :, :prompt].copy_(new_kv)
        self.cached = torch.full((b,), prompt, dtype=torch.long, device=state.tokens.device)

    def propose(self, state: State) -> Draft:
        run = self.gen.runner("tree")
        device = state.tokens.device
        b = state.tokens.shape[0]
        rows = torch.arange(b, device=device)
        # 1. catch up: the committed tokens the draft has not seen (root included), as a padded chain
        pending = state.length - self.cached
        m = int(pending.max())
        cols = self.cached[:, None] + torch.arange(m, device=device)
        real = torch.arange(m, device=device)[None, :] < pending[:, None]
        tokens = torch.where(real, state.tokens.gather(1, cols.clamp(max=state.tokens.shape[1] - 1)), 0)
        parents = torch.where(real & (torch.arange(m, device=device) > 0), torch.arange(-1, m - 1, device=device), -1)
        depth, mask = batch_closure(parents)
        write = int(state.length.max())
        positions = positions_of(cols, state.start[:, None]).clamp(max=self.gen.layout.max_positions - 1)
        logits, _ = run(tokens.contiguous(), positions.contiguous(), self.cache, self.cache_mask, mask.contiguous(),
                        self.slots[write:write + m])
        src = write + torch.minimum(torch.arange(m, device=device)[None, :], (pending - 1)[:, None])
        dst = self.cached[:, None] + (src - write)
        torch.ops.tokenfx.kv_compact(self.cache, src, dst)
        keep = torch.arange(self.cache_mask.shape[1], device=device)[None, :]
        self.cache_mask |= ((keep >= self.cached[:, None]) & (keep < state.length[:, None])).long()
        self.cached = state.length.clone()
        root_logits = logits[rows, pending - 1]  # the draft's distribution after the root
        # 2. expand the tree from the root, one draft call per level / wave (the root is cached now)
        return self._expand(state, root_logits, run, write)

    def _dist(self, logits, state: State):
        if state.temperature > 0:
            return V.warp(logits, state.temperature, state.top_k, state.top_p)
        return logits.float().softmax(-1)

    def _expand(self, state: State, root_logits, run, write) -> Draft:
        """Grow each row's tree from the root. Level modes add every frontier node's children;
        ``dynamic`` keeps a pool of candidates (``width`` per node, in the order they were drafted)
        and adds each row's ``wave`` best by path probability, a candidate being eligible once its
        earlier-drafted sibling is in the tree (so sampled children stay a prefix of their draws,
        as the lossless verifier needs)."""
        device = state.tokens.device
        b = state.tokens.shape[0]
        rows = torch.arange(b, device=device)
        sampling = state.temperature > 0
        n_max = min(self.max_nodes, state.max_nodes)  # tree_budget
        per_node = 1 if self.mode == "chain" else self.width
        tokens = torch.zeros(b, n_max, dtype=torch.long, device=device)
        parents = torch.full((b, n_max), -1, dtype=torch.long, device=device)
        valid = torch.zeros(b, n_max, dtype=torch.bool, device=device)
        depth = torch.zeros(b, n_max, dtype=torch.long, device=device)
        tokens[:, 0], valid[:, 0] = state.root, True
        q = torch.zeros(b, n_max, root_logits.shape[-1], device=device) if sampling else None
        # candidate pool: parent node, token, log path probability, drafted rank, state
        c_parent, c_token, c_score, c_rank = [], [], [], []
        log_path = torch.zeros(b, n_max, device=device)
        max_depth = state.max_depth.clamp(max=self.length if self.mode != "dynamic" else n_max)

        def add_candidates(node: torch.Tensor, logits: torch.Tensor) -> None:  # node [B]: one new node per row
            p = self._dist(logits, state)
            if q is not None:
                q[rows, node] = p
            if sampling:
                picks, drawn = _sample_without_replacement(p, per_node, state.generator)
            else:
                picks = torch.topk(p, per_node, dim=-1).indices
                drawn = torch.ones_like(picks, dtype=torch.bool)
            for r in range(per_node):
                c_parent.append(node)
                c_token.append(picks[:, r])
                score = log_path[rows, node] + p.gather(1, picks[:, r:r + 1]).squeeze(1).clamp(min=1e-30).log()
                c_score.append(torch.where(drawn[:, r], score, float("-inf")))
                c_rank.append(torch.full((b,), r, dtype=torch.long, device=device))

        add_candidates(torch.zeros(b, dtype=torch.long, device=device), root_logits)
        taken = torch.zeros(b, 0, dtype=torch.bool, device=device)
        count, level_width = 1, 1
        while count < n_max:
            pool_parent, pool_score = torch.stack(c_parent, 1), torch.stack(c_score, 1)
            pool_rank = torch.stack(c_rank, 1)
            taken = torch.cat([taken, torch.zeros(b, pool_parent.shape[1] - taken.shape[1], dtype=torch.bool,
                                                  device=device)], 1)
            prev_taken = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=device), taken[:, :-1]], 1)
            too_deep = depth.gather(1, pool_parent) + 1 > max_depth[:, None]
            if self.mode == "dynamic":
                eligible = ~taken & ((pool_rank == 0) | prev_taken) & ~too_deep
            else:  # a level: all children of the newest nodes
                eligible = ~taken & ~too_deep & (pool_parent >= count - level_width)
            if not bool(eligible.any()):
                break
            want = min(self.wave if self.mode == "dynamic" else int(eligible.sum(1).max()), n_max - count)
            score = torch.where(eligible, pool_score, float("-inf"))
            pick = torch.topk(score, min(want, score.shape[1]), dim=1).indices.sort(dim=1).values  # pool = draw order
            ok = score.gather(1, pick) > float("-inf")
            new = torch.arange(count, count + pick.shape[1], device=device)
            r2 = rows[:, None].expand_as(pick)
            tokens[:, new] = torch.stack(c_token, 1).gather(1, pick)
            parents[:, new] = torch.where(ok, pool_parent.gather(1, pick), -1)
            valid[:, new] = ok
            depth[:, new] = torch.where(ok, depth.gather(1, pool_parent.gather(1, pick)) + 1, 0)
            log_path[:, new] = torch.where(ok, pool_score.gather(1, pick), float("-inf"))
            taken[r2[ok], pick[ok]] = True
            level_width = pick.shape[1]
            count += pick.shape[1]
            if count >= n_max or not bool((depth[:, :count] < max_depth[:, None]).any()):
                break
            # one draft call over every node so far (the root is cached) → distributions at the new nodes
            blk = slice(1, count)
            blk_parents = torch.where(valid[:, blk] & (parents[:, blk] > 0), parents[:, blk] - 1, -1)
            _, mask = batch_closure(blk_parents)
            positions = (positions_of(state.length - 1, state.start)[:, None] + depth[:, blk]).clamp(
                max=self.gen.layout.max_positions - 1)
            logits, _ = run(tokens[:, blk].contiguous(), positions.contiguous(), self.cache, self.cache_mask,
                            mask.contiguous(), self.slots[write + 1:write + count])
            for j, node in enumerate(new.tolist()):
                add_candidates(torch.full((b,), node, dtype=torch.long, device=device), logits[:, node - 1])
        return Draft(tokens[:, :count].contiguous(), parents[:, :count].contiguous(), valid[:, :count].contiguous(),
                     q[:, :count].contiguous() if q is not None else None)


def _sample_without_replacement(p: torch.Tensor, k: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` distinct draws from each row of ``p``, in draw order (sequential: each from p with the
    earlier draws removed, renormalised), and whether each draw had mass left (top-k / top-p
    can leave fewer than ``k`` tokens; later draws are then placeholders to drop)."""
    p = p.clone()
    out, ok = [], []
    for _ in range(k):
        left = p.sum(-1, keepdim=True)
        ok.append(left.squeeze(1) > 0)
        x = torch.multinomial(torch.where(left > 0, p, 1.0), 1, generator=generator).squeeze(1)
        out.append(x)
        p.scatter_(1, x[:, None], 0.0)
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
    return torch.stack(out, 1), torch.stack(ok, 1)
