"""``Tree``: a draft token tree as a parent array in topological order.

::

    tree = Tree.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])   # Medusa-style rank paths
    tree.parents     # [-1, 0, 0, 1, 1, 3]        node 0 is the root (the last committed token)
    tree.depth       # [0, 1, 1, 2, 2, 3]         → positions = prefix length + depth
    tree.mask        # [T, T] bool, mask[i, j] = j is i itself or one of its ancestors
    tree.ranks       # [-1, 0, 1, 0, 1, 0]        which of its parent's candidates a node takes
    tree.paths()     # root-to-leaf node lists

Node 0 is always the root: the token generated last, whose K/V are not in the cache yet, so
one verify call computes its K/V and the target's distribution after every node. A parent
always precedes its children (``parents[i] < i``), which makes the ancestor closure one
vectorised pointer-jumping pass per tree level, and any root-to-node path increasing (the
runtime relies on that to compact accepted K/V in place).

Static templates: :func:`Tree.from_paths` (rank paths, as Medusa / EAGLE publish them),
:func:`Tree.chain` (k tokens in a line), :func:`Tree.from_level_sizes` (a fixed number of
nodes per level, each level's nodes going to the candidates most likely to be accepted
under a rank prior, so earlier ranks get more children) and :data:`RECYCLING_LEVELS`, the
Token Recycling template (80 nodes over depth 6: 8 / 21 / 25 / 15 / 8 / 3).
"""

from __future__ import annotations

import functools
import heapq
from typing import Iterable, Sequence

import torch

from tokenfx.errors import TreeError

RECYCLING_LEVELS = (8, 21, 25, 15, 8, 3)  # Token Recycling's template: nodes per level, depth 6


class Tree:
    """An immutable draft tree (root at node 0). ``ranks[i]`` is the candidate rank of node ``i``
    among its parent's proposals (template trees); drafters that build trees from
    probabilities may leave it ``-1``."""

    def __init__(self, parents: Sequence[int] | torch.Tensor, ranks: Sequence[int] | torch.Tensor | None = None):
        p = torch.as_tensor(parents, dtype=torch.long).flatten()
        if p.numel() == 0 or int(p[0]) != -1:
            raise TreeError("a tree's node 0 must be the root (parent -1)")
        idx = torch.arange(p.numel())
        if p.numel() > 1 and not bool(((p[1:] >= 0) & (p[1:] < idx[1:])).all()):
            raise TreeError("parents must be in topological order: 0 <= parents[i] < i for every non-root node")
        self.parents = p
        self.ranks = torch.full_like(p, -1) if ranks is None else torch.as_tensor(ranks, dtype=torch.long).flatten()
        if self.ranks.shape != p.shape:
            raise TreeError(f"ranks has {self.ranks.numel()} entries for {p.numel()} nodes")
        self.depth, self.mask = _closure(p)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def chain(cls, length: int) -> "Tree":
        """Root plus ``length`` tokens in a line (a draft model's or prompt lookup's chain)."""
        if length < 0:
            raise TreeError(f"chain length must be >= 0, got {length}")
        return cls([-1] + list(range(length)), [-1] + [0] * length)

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]]) -> "Tree":
        """A tree from rank paths: ``(0, 1)`` = the second candidate after the first candidate.
        Every prefix of a path must be a path too (or is added); order: by depth, then rank."""
        nodes = {()}
        for path in paths:
            path = tuple(int(r) for r in path)
            if any(r < 0 for r in path):
                raise TreeError(f"rank path {path} has a negative rank")
            for d in range(1, len(path) + 1):
                nodes.add(path[:d])
        order = sorted(nodes, key=lambda q: (len(q), q))
        index = {q: i for i, q in enumerate(order)}
        parents = [-1] + [index[q[:-1]] for q in order[1:]]
        ranks = [-1] + [q[-1] for q in order[1:]]
        return cls(parents, ranks)

    @classmethod
    def from_level_sizes(cls, sizes: Sequence[int], k: int = 8, decay: float = 1.0) -> "Tree":
        """``sizes[d]`` nodes at depth ``d + 1``, each level taking the candidates with the highest
        prior acceptance ``∏ 1 / (rank + 1) ** decay`` along the path (so earlier ranks get
        more children, at most ``k`` per node)."""
        return _level_tree(tuple(int(s) for s in sizes), int(k), float(decay))

    @classmethod
    def recycling(cls) -> "Tree":
        """The Token Recycling template: 80 draft nodes + root, depth 6."""
        return cls.from_level_sizes(RECYCLING_LEVELS, k=8)

    @classmethod
    def parse(cls, spec: str) -> "Tree":
        """A template from text: ``recycling``, ``chain:K``, ``levels:8,4,2`` (nodes per level) or the
        path of a JSON file holding a list of rank paths (Medusa's format, e.g. ``[[0], [0, 0], [1]]``)."""
        import json
        from pathlib import Path

        name, _, arg = spec.partition(":")
        try:
            if name == "recycling" and not arg:
                return cls.recycling()
            if name == "chain":
                return cls.chain(int(arg))
            if name == "levels":
                return cls.from_level_sizes([int(x) for x in arg.split(",") if x.strip()])
        except ValueError as exc:
            raise TreeError(f"tree {spec!r}: {exc}") from exc
        path = Path(spec)
        if path.is_file():
            try:
                paths = json.loads(path.read_text())
                return cls.from_paths(paths)
            except (json.JSONDecodeError, TypeError) as exc:
                raise TreeError(f"tree file {path}: expected a JSON list of rank paths ({exc})") from exc
        raise TreeError(f"unknown tree {spec!r}: give recycling, chain:K, levels:A,B,... or a JSON file of rank paths")

    # -- views -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.parents.numel())

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    def rank_paths(self) -> list[tuple[int, ...]]:
        """Every node's rank path (root: ``()``)."""
        out: list[tuple[int, ...]] = [()]
        for i in range(1, len(self)):
            out.append(out[int(self.parents[i])] + (int(self.ranks[i]),))
        return out

    def leaves(self) -> torch.Tensor:
        has_child = torch.zeros(len(self), dtype=torch.bool)
        has_child[self.parents[1:]] = True
        return torch.nonzero(~has_child).flatten()

    def paths(self) -> list[list[int]]:
        """Root-to-leaf node lists."""
        return [torch.nonzero(self.mask[leaf]).flatten().tolist() for leaf in self.leaves().tolist()]

    def levels(self) -> list[torch.Tensor]:
        """Node indices per depth (level 0 is the root)."""
        return [torch.nonzero(self.depth == d).flatten() for d in range(self.max_depth + 1)]

    def __repr__(self) -> str:
        sizes = [int((self.depth == d).sum()) for d in range(1, self.max_depth + 1)]
        return f"Tree({len(self)} nodes, depth {self.max_depth}, per level {sizes})"


def _closure(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth and ancestor-or-self mask by pointer jumping: one gather per level."""
    n = parents.numel()
    idx = torch.arange(n)
    mask = torch.eye(n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    up = parents.clamp(min=0)
    cur = idx.clone()
    alive = idx > 0
    while bool(alive.any()):
        cur = torch.where(alive, up[cur], cur)
        mask[idx[alive], cur[alive]] = True
        depth += alive.long()
        alive = alive & (cur > 0)
    return depth, mask


@functools.lru_cache(maxsize=64)
def _level_tree(sizes: tuple[int, ...], k: int, decay: float) -> Tree:
    if any(s < 1 for s in sizes):
        raise TreeError(f"level sizes must be >= 1, got {list(sizes)}")
    if k < 1:
        raise TreeError(f"k (candidates per node) must be >= 1, got {k}")
    paths: list[tuple[int, ...]] = []
    level: list[tuple[float, tuple[int, ...]]] = [(1.0, ())]
    for size in sizes:
        candidates = [(-score / (r + 1) ** decay, path + (r,)) for score, path in level for r in range(k)]
        if size > len(candidates):
            raise TreeError(f"a level of {size} nodes needs more than {k} candidates under each of {len(level)} parents")
        chosen = heapq.nsmallest(size, candidates)
        level = [(-s, path) for s, path in chosen]
        paths.extend(path for _, path in level)
    return Tree.from_paths(paths)


def batch_closure(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_closure` for a batch of parent arrays ``[B, T]`` (each row its own tree; padding
    nodes have parent -1 and stay alone): ``depth [B, T]``, ``mask [B, T, T]``."""
    b, t = parents.shape
    idx = torch.arange(t, device=parents.device).expand(b, t)
    mask = torch.eye(t, dtype=torch.bool, device=parents.device).repeat(b, 1, 1)
    depth = torch.zeros(b, t, dtype=torch.long, device=parents.device)
    up = parents.clamp(min=0)
    cur = idx.clone()
    alive = parents >= 0
    rows = torch.arange(b, device=parents.device)[:, None].expand(b, t)
    while bool(alive.any()):
        cur = torch.where(alive, up.gather(1, cur), cur)
        mask[rows[alive], idx[alive], cur[alive]] = True
        depth += alive.long()
        alive = alive & (parents.gather(1, cur) >= 0)
    return depth, mask
