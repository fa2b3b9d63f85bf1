"""Drafters: each proposes a token tree per row (:class:`~tokenfx.runtime.speculative.decode.Draft`).

- :class:`TokenRecycling` — an adjacency matrix ``adj[V, k]`` of each token's top-k next tokens,
  refreshed from the target's logits at *every* node of every verify step (the rejected
  candidates are recycled) and kept across requests; drafts walk a static template tree:
  ``ids[node] = adj[ids[parent], rank]``, one gather per level. Starts hot: the matrix is
  seeded from the target's own next-token top-k after each single token.
- :class:`PromptLookup` — n-gram match of the last tokens in the row's own text (prompt and
  generated, largest n first); the continuations after the most recent matches form a trie.
- :class:`DraftModel` — a smaller model of the same tokenizer with its own KV cache: a chain
  (greedy or sampled) or a tree (top-k children per node, or DySpec's dynamic tree: expand
  the nodes with the highest product of draft probabilities along the path until a node
  budget is spent).
- self-speculation (``"self:E"``, ``"self:auto"``) drafts with the target's own first blocks
  in the target's own cache: :mod:`tokenfx.runtime.speculative.self_spec`.

:func:`make_drafter` turns the ``speculate=`` strings into drafters.
"""

from __future__ import annotations

import torch

from tokenfx.errors import GenerationError
from tokenfx.runtime.speculative import verify as V
from tokenfx.runtime.speculative.decode import Draft, Drafter, State, positions_of
from tokenfx.ir.tree import Tree, batch_closure


class TokenRecycling(Drafter):
    """Token Recycling: ``adj[V, k]`` of candidate next tokens, a static template tree."""

    name = "recycling"

    def __init__(self, tree: Tree | None = None, k: int = 8, warm_start: bool = True):
        self.template = tree if tree is not None else Tree.recycling()
        self.k = int(k)
        if len(self.template) > 1 and (self.template.ranks[1:] < 0).any():
            raise GenerationError("recycling: the template tree needs a candidate rank for every node (Tree.from_paths)")
        if int(self.template.ranks.max()) >= self.k:
            raise GenerationError(f"recycling: the tree uses candidate rank {int(self.template.ranks.max())}; "
                                  f"the matrix keeps only k={self.k}")
        self.warm_start = warm_start
        self.adj: torch.Tensor | None = None
        self.max_nodes = len(self.template)
        # how often each template node was on an accepted path, for sizing the tree (expected_gain)
        # P(node accepted | parent accepted): a rank prior worth 4 observations, then counts over
        # the rounds where the node was drafted and its parent accepted
        self._prior = torch.tensor([1.0] + [0.5 / (int(r) + 1) for r in self.template.ranks[1:]])
        self.hits = torch.zeros(len(self.template))
        self.tries = torch.zeros(len(self.template))
        self.set_budget(len(self.template))

    def set_budget(self, nodes: int) -> None:
        """Use the ``nodes`` template nodes most often accepted so far (a subtree: a node is never
        accepted more often than its parent, and ties keep parents first)."""
        nodes = max(1, min(int(nodes), len(self.template)))
        accept = self.acceptance().tolist()
        order = sorted(range(len(self.template)), key=lambda i: (-accept[i], i))
        self.active = torch.tensor(sorted(order[:nodes]))
        remap = {int(old): new for new, old in enumerate(self.active.tolist())}
        parents = [-1] + [remap[int(self.template.parents[i])] for i in self.active.tolist()[1:]]
        self.tree = Tree(parents, self.template.ranks[self.active])
        self._levels = [(lvl, self.tree.parents[lvl], self.tree.ranks[lvl]) for lvl in self.tree.levels()[1:]]

    def acceptance(self) -> torch.Tensor:
        """Estimated probability that each template node is on the accepted path: the product of
        the conditional acceptance rates along its path. A node's conditional rate starts from its
        rank's pooled rate over every node of that rank tried so far (itself a rank prior worth 4
        tries), so nodes outside the current tree are judged by their tried siblings of the same
        rank, not by the optimistic prior alone (measured: with the bare prior the budget grew to
        16 nodes on chat text where 8 ran 1.37× faster)."""
        ranks = self.template.ranks
        pooled = self._prior.clone()
        for r in torch.unique(ranks[1:]).tolist():
            same = ranks == r
            same[0] = False
            pooled[same] = (self.hits[same].sum() + 4 * self._prior[same]) / (self.tries[same].sum() + 4)
        conditional = (self.hits + 4 * pooled) / (self.tries + 4)
        p = conditional.clone()
        for level in self.template.levels()[1:]:
            p[level] = conditional[level] * p[self.template.parents[level]]
        return p

    def expected_gain(self, nodes: int) -> float:
        """Expected tokens per step (accepted + the bonus) with the best ``nodes``-node subtree."""
        p = self.acceptance()[1:].sort(descending=True).values
        return 1.0 + float(p[:max(0, nodes - 1)].sum())

    def prepare(self, generator) -> None:
        vocab = generator.vocab_size
        if self.adj is not None and self.adj.shape[0] == vocab:
            return  # hot: kept across requests
        self._store = _matrix_file(generator, self.k)
        if self._store is not None and self._store.exists():  # kept across processes, as across requests
            try:
                from safetensors.torch import load_file

                saved = load_file(str(self._store))
                if saved["adj"].shape == (vocab, self.k):
                    self.adj, self.seeded = saved["adj"].long(), saved["seeded"].bool()
                    self._generator = generator
                    return
            except Exception:  # a damaged file: start over
                pass
        self.adj = torch.arange(self.k).expand(vocab, self.k).contiguous()
        self.seeded = torch.zeros(vocab, dtype=torch.bool)
        self._generator = generator
        if self.warm_start and vocab <= 8192:  # small vocabularies: seed every row at once
            self._seed(torch.arange(vocab))

    def begin(self, state: State) -> None:
        """Seed the rows of the prompt's tokens not seen yet (the target's next-token top-k after
        each token alone: one batched call over the new ones), and keep the matrix on disk."""
        if not self.warm_start:
            return
        tokens = torch.unique(torch.cat([state.row(b) for b in range(state.tokens.shape[0])]).cpu())
        fresh = tokens[~self.seeded[tokens]]
        if fresh.numel():
            self._seed(fresh)
        self.save()

    def _seed(self, tokens: torch.Tensor) -> None:
        self.adj[tokens] = _next_token_topk(self._generator, self.k, tokens)
        self.seeded[tokens] = True

    def save(self) -> None:
        """Write the matrix to the tokenfx cache (per model), atomically."""
        if getattr(self, "_store", None) is None:
            return
        import os

        from safetensors.torch import save_file

        self._store.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._store.with_suffix(".tmp")
        save_file({"adj": self.adj.to(torch.int32), "seeded": self.seeded.to(torch.uint8)}, str(tmp))
        os.replace(tmp, self._store)

    def propose(self, state: State) -> Draft:
        b = state.tokens.shape[0]
        adj = self.adj.to(state.tokens.device)
        ids = torch.empty(b, len(self.tree), dtype=torch.long, device=state.tokens.device)
        ids[:, 0] = state.root
        for nodes, parents, ranks in self._levels:
            ids[:, nodes] = adj[ids[:, parents], ranks]
        return Draft.from_tree(self.tree, ids)

    def update(self, state, draft, logits, verdict) -> None:
        top = torch.topk(logits[draft.valid], self.k, dim=-1).indices
        self.adj[draft.tokens[draft.valid].to(self.adj.device)] = top.to(self.adj.device)
        live = ~state.finished.cpu()
        if bool(live.any()):
            t = len(self.tree)
            steps = torch.arange(verdict.path.shape[1])
            on_path = torch.zeros(int(live.sum()), t, dtype=torch.bool)
            paths = verdict.path.cpu()[live]
            on_path.scatter_(1, torch.where(steps < verdict.length.cpu()[live, None], paths, 0), True)
            tried = on_path[:, self.tree.parents.clamp(min=0)]  # drafted, and its parent accepted
            tried[:, 0] = False
            self.hits.index_add_(0, self.active, on_path.float().sum(0))
            self.tries.index_add_(0, self.active, tried.float().sum(0))


def _next_token_topk(generator, k: int, tokens: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """``[len(tokens), k]``: the target's top-k next tokens after each token alone (position 0)."""
    run = generator.runner("prefill_dense")
    rows = []
    with torch.inference_mode():
        for lo in range(0, tokens.numel(), chunk):
            ids = tokens[lo:lo + chunk, None].contiguous()
            logits, _ = run(ids, torch.zeros_like(ids))
            rows.append(torch.topk(logits[:, -1], k, dim=-1).indices)
    return torch.cat(rows)


def _matrix_file(generator, k: int):
    """Where a model's Token Recycling matrix is kept (None for a graph without its module)."""
    module = generator._source if isinstance(generator._source, torch.nn.Module) else None
    if module is None:
        return None
    key = getattr(generator, "_warm_key", None)
    if key is None:
        from tokenfx.runtime import executor

        key = executor.module_key(module, "generator")
    from tokenfx.cache import cache_dir

    return cache_dir() / "drafters" / f"recycling-{key}-k{k}.safetensors"


class PromptLookup(Drafter):
    """Prompt lookup decoding as a tree: continuations of the most recent n-gram matches."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, length: int = 10, branches: int = 3):
        if not 1 <= min_ngram <= max_ngram:
            raise GenerationError(f"lookup: need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.length, self.branches = max_ngram, min_ngram, length, branches
        self.max_nodes = 1 + length * branches

    def propose(self, state: State) -> Draft:
        rows = []
        for b in range(state.tokens.shape[0]):
            seq = state.row(b)
            continuations = [] if bool(state.finished[b]) else self._continuations(seq)
            rows.append(_trie(int(seq[-1]), continuations, min(self.max_nodes, state.max_nodes)))
        return Draft.stack(rows, state.tokens.device)

    def _continuations(self, seq: torch.Tensor) -> list[list[int]]:
        found: list[list[int]] = []
        n_tokens = seq.numel()
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            suffix = seq[-n:]
            windows = seq[:-1].unfold(0, n, 1)  # every earlier n-gram (not the suffix itself)
            hits = torch.nonzero((windows == suffix).all(1)).flatten().tolist()
            for start in reversed(hits):  # most recent first
                cont = seq[start + n:start + n + self.length].tolist()
                if cont and cont not in found:
                    found.append(cont)
                if len(found) >= self.branches:
                    return found
            if found:
                return found
        return found


def _trie(root: int, continuations: list[list[int]], max_nodes: int) -> tuple[list[int], list[int]]:
    """Merge continuations into a tree under ``root``: (tokens, parents) in topological order."""
    tokens, parents = [root], [-1]
    children: dict[tuple[int, int], int] = {}
    for cont in continuations:
        node = 0
        for tok in cont:
            key = (node, tok)
            if key not in children:
                if len(tokens) >= max_nodes:
                    break
                children[key] = len(tokens)
                tokens.append(tok)
                parents.append(node)
            node = children[key]
    return tokens, parents


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
        from tokenfx.runtime.generate import generator_for

        if self.gen is None:
            compile = generator.compile if self.compile is None else self.compile
            self.gen = generator_for(self.model, compile=compile, max_positions=generator.layout.max_positions)
        if self.gen.vocab_size != generator.vocab_size:
            raise GenerationError(f"draft model {self.model} has a vocabulary of {self.gen.vocab_size} tokens, the "
                                  f"target {generator.vocab_size}: the drafter must share the target's tokenizer")
        from tokenfx.runtime.generate import tokenizer_vocab

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
        # its own buffers (not gen._allocate's: the draft may be the target model itself, with the same Generator)
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


def make_drafter(spec, *, tree=None, compile: bool | str | None = None) -> Drafter:
    """A Drafter from ``speculate=``: a Drafter object, or ``"recycling"``, ``"lookup"``, ``"draft"``,
    ``"draft:<model spec>"``, ``"draft-tree[:<model spec>]"``, ``"dynamic[:<model spec>]"``, ``"self[:<layer>|auto|adapter]"``, ``"adapter:<file>"`` (a Kangaroo exit adapter, run inside
    self-speculation; ``self:adapter``: the one trained for the model).
    ``tree``: a :class:`Tree` template for recycling."""
    if isinstance(spec, Drafter):
        return spec
    if not isinstance(spec, str):
        raise GenerationError(f"speculate must be a string or a Drafter, got {type(spec).__name__}")
    name, _, arg = spec.partition(":")
    if name == "recycling":
        return TokenRecycling(tree=tree)
    if name == "lookup":
        return PromptLookup()
    if name in ("draft", "draft-tree", "dynamic"):
        mode = {"draft": "chain", "draft-tree": "tree", "dynamic": "dynamic"}[name]
        return DraftModel(arg or "tokenfx:tiny-code-draft", mode=mode, compile=compile)
    if name == "adapter" or spec == "self:adapter":
        from tokenfx.runtime.speculative.self_spec import SelfSpeculation

        if name == "adapter" and not arg:
            raise GenerationError("speculate='adapter:<file>': give the exit adapter's .safetensors file (or "
                                  "speculate='self:adapter' for the one trained for the model)")
        return SelfSpeculation(adapter=arg if name == "adapter" else "find")
    if name == "self":
        from tokenfx.runtime.speculative.self_spec import SelfSpeculation

        if arg in ("", "auto"):
            return SelfSpeculation(arg or None)
        try:
            layer = int(arg)
        except ValueError:
            raise GenerationError(f"speculate='self:{arg}': the exit layer must be a number or 'auto'") from None
        return SelfSpeculation(layer)
    raise GenerationError(f"unknown speculate={spec!r}; choose recycling, lookup, draft[:MODEL], draft-tree[:MODEL], "
                          "dynamic[:MODEL], self[:LAYER|auto|adapter], adapter:FILE or pass a Drafter")
