"""``Tree`` and ``batch_closure``: the ancestor-or-self mask and depths against a naive walk up
the parent pointers, rank-path templates (prefixes added, depth-then-rank order), the Token
Recycling template's shape and rank monotonicity, and the inputs a tree must refuse."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenfx.errors import TokenfxError, TreeError
from tokenfx.ir.tree import RECYCLING_LEVELS, Tree, batch_closure

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def naive_closure(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth and ``mask[i, j]`` (``j`` is ``i`` or an ancestor of ``i``) by walking each node up to the root.
    Nodes other than 0 with parent -1 (batch padding) are roots of their own."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        j = i
        while j != -1:
            mask[i, j] = True
            depth[i] += j != i
            j = parents[j]
    return depth, mask


def children(tree: Tree, node: int) -> int:
    return int((tree.parents == node).sum())


def check_tree(tree: Tree) -> None:
    """Every invariant of a well-formed tree, against the naive closure."""
    parents = tree.parents.tolist()
    depth, mask = naive_closure(parents)
    assert torch.equal(tree.depth, depth)
    assert torch.equal(tree.mask, mask)
    assert tree.mask.dtype == torch.bool and tree.mask.shape == (len(tree), len(tree))
    assert bool(tree.mask.diagonal().all()) and bool(tree.mask[:, 0].all())  # itself, and the root
    assert not bool(tree.mask.triu(1).any())  # ancestors precede their descendants
    for i in range(1, len(tree)):  # a node's row is its parent's row plus itself
        expected = tree.mask[parents[i]].clone()
        expected[i] = True
        assert torch.equal(tree.mask[i], expected)
        assert tree.depth[i] == tree.depth[parents[i]] + 1
    assert tree.max_depth == int(depth.max())
    leaves = [i for i in range(len(tree)) if i not in parents]
    assert tree.leaves().tolist() == leaves
    paths = tree.paths()
    assert [p[-1] for p in paths] == leaves
    for path in paths:  # root-to-leaf, each step a parent-child edge, increasing indices
        assert path[0] == 0 and len(path) == int(tree.depth[path[-1]]) + 1
        assert all(parents[b] == a for a, b in zip(path, path[1:]))
    assert set(itertools.chain.from_iterable(paths)) == set(range(len(tree)))  # every node is on a path
    levels = tree.levels()
    assert [lvl.tolist() for lvl in levels] == [[i for i in range(len(tree)) if depth[i] == d]
                                                 for d in range(tree.max_depth + 1)]


# -- construction --------------------------------------------------------------------------------------
def test_hand_built_tree():
    tree = Tree([-1, 0, 0, 1, 1, 3])
    check_tree(tree)
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.paths() == [[0, 2], [0, 1, 4], [0, 1, 3, 5]]
    assert tree.mask[5].tolist() == [True, True, False, True, False, True]
    assert tree.ranks.tolist() == [-1] * 6  # no ranks given


def test_single_node_tree():
    tree = Tree([-1])
    check_tree(tree)
    assert tree.paths() == [[0]] and tree.max_depth == 0
    assert torch.equal(tree.mask, torch.ones(1, 1, dtype=torch.bool))


def test_chain():
    tree = Tree.chain(4)
    check_tree(tree)
    assert tree.parents.tolist() == [-1, 0, 1, 2, 3]
    assert tree.ranks.tolist() == [-1, 0, 0, 0, 0]
    assert torch.equal(tree.mask, torch.ones(5, 5, dtype=torch.bool).tril())  # a chain is causal attention
    assert tree.paths() == [[0, 1, 2, 3, 4]]
    assert len(Tree.chain(0)) == 1


def test_from_paths_adds_missing_prefixes_and_orders_by_depth_then_rank():
    tree = Tree.from_paths([(1, 2), (0, 0, 1), [2]])  # (1,), (0,), (0, 0) are implied
    check_tree(tree)
    assert tree.rank_paths() == [(), (0,), (1,), (2,), (0, 0), (1, 2), (0, 0, 1)]
    assert tree.parents.tolist() == [-1, 0, 0, 0, 1, 2, 4]
    assert tree.ranks.tolist() == [-1, 0, 1, 2, 0, 2, 1]
    assert tree.depth.tolist() == [0, 1, 1, 1, 2, 2, 3]
    # duplicates and already-present prefixes change nothing
    same = Tree.from_paths([(0,), (1,), (2,), (0, 0), (1, 2), (0, 0, 1), (0, 0, 1), (1,)])
    assert torch.equal(same.parents, tree.parents) and torch.equal(same.ranks, tree.ranks)
    assert len(Tree.from_paths([])) == 1


def test_from_level_sizes_takes_the_most_likely_candidates():
    tree = Tree.from_level_sizes([3, 2], k=4)
    check_tree(tree)
    # prior ∏ 1 / (rank + 1): level 1 takes ranks 0, 1, 2; level 2 (0, 0) = 1 and (0, 1) = (1, 0) = 1/2,
    # the tie broken by the smaller rank path
    assert tree.rank_paths() == [(), (0,), (1,), (2,), (0, 0), (0, 1)]
    sizes = [int((tree.depth == d).sum()) for d in range(1, tree.max_depth + 1)]
    assert sizes == [3, 2]


def test_recycling_template():
    tree = Tree.recycling()
    check_tree(tree)
    assert RECYCLING_LEVELS == (8, 21, 25, 15, 8, 3)
    assert len(tree) == 81 and tree.max_depth == 6  # 80 draft nodes + the root
    assert [int((tree.depth == d).sum()) for d in range(1, 7)] == [8, 21, 25, 15, 8, 3]
    assert int(tree.ranks[1:].min()) == 0 and int(tree.ranks.max()) == 7  # the top-8 candidates
    paths = tree.rank_paths()
    assert len(set(paths)) == len(paths)
    for level in tree.levels()[1:]:
        nodes = level.tolist()
        for a in nodes:  # a rank path that is no later at every step has at least as many children
            for b in nodes:
                if a != b and all(x <= y for x, y in zip(paths[a], paths[b])):
                    assert children(tree, a) >= children(tree, b), (paths[a], paths[b])
        by_rank = {}  # and summed over the level, rank r's nodes get at least as many as rank r + 1's
        for i in nodes:
            by_rank[paths[i][-1]] = by_rank.get(paths[i][-1], 0) + children(tree, i)
        counts = [by_rank.get(r, 0) for r in range(8)]
        assert counts == sorted(counts, reverse=True), counts
    # siblings of the first level: earlier ranks strictly dominate where it matters
    assert [children(tree, i) for i in tree.levels()[1].tolist()] == [8, 4, 3, 2, 1, 1, 1, 1]


# -- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parents, message", [
    ([], "root"),
    ([0, 0], "root"),  # no root
    ([1, -1], "root"),  # the root is not node 0
    ([-1, 0, -1], "topological"),  # a second root
    ([-1, 2, 0], "topological"),  # a parent after its child
    ([-1, 1], "topological"),  # its own parent
    ([-1, 0, 5], "topological"),  # a parent that does not exist
])
def test_bad_parent_arrays(parents, message):
    with pytest.raises(TreeError, match=message):
        Tree(parents)


def test_bad_templates():
    with pytest.raises(TreeError, match="ranks"):
        Tree([-1, 0, 0], ranks=[-1, 0])
    with pytest.raises(TreeError, match="negative rank"):
        Tree.from_paths([(0, -1)])
    with pytest.raises(TreeError, match="chain length"):
        Tree.chain(-1)
    with pytest.raises(TreeError, match="level sizes"):
        Tree.from_level_sizes([2, 0])
    with pytest.raises(TreeError, match="candidates"):
        Tree.from_level_sizes([9], k=8)  # 9 nodes under one root with only 8 candidates
    with pytest.raises(TreeError, match="k"):
        Tree.from_level_sizes([1], k=0)
    assert issubclass(TreeError, TokenfxError)


# -- batches -------------------------------------------------------------------------------------------
def padded_batch(trees: list[list[int]]) -> torch.Tensor:
    """Parent arrays of different sizes as one ``[B, T]`` batch, padding nodes with parent -1."""
    width = max(len(t) for t in trees)
    out = torch.full((len(trees), width), -1, dtype=torch.long)
    for b, t in enumerate(trees):
        out[b, :len(t)] = torch.tensor(t)
    return out


def check_batch(trees: list[list[int]]) -> None:
    parents = padded_batch(trees)
    depth, mask = batch_closure(parents)
    b, t = parents.shape
    assert depth.shape == (b, t) and mask.shape == (b, t, t) and mask.dtype == torch.bool
    for row, tree in enumerate(trees):
        n = len(tree)
        single = Tree(tree)
        assert torch.equal(depth[row, :n], single.depth)
        assert torch.equal(mask[row, :n, :n], single.mask)
        assert not bool(mask[row, :n, n:].any()) and not bool(mask[row, n:, :n].any())
        # padding nodes stay alone: depth 0, only themselves
        assert not bool(depth[row, n:].any())
        assert torch.equal(mask[row, n:, n:], torch.eye(t - n, dtype=torch.bool))
        # and the whole row (padding included) equals the naive walk
        naive_depth, naive_mask = naive_closure(parents[row].tolist())
        assert torch.equal(depth[row], naive_depth) and torch.equal(mask[row], naive_mask)


def test_batch_closure_equals_each_rows_tree():
    check_batch([Tree.recycling().parents.tolist(), [-1], Tree.chain(7).parents.tolist(), [-1, 0, 0, 1, 1, 3],
                 Tree.from_paths([(0, 0), (1,), (2, 1)]).parents.tolist()])


def test_batch_closure_cut_subtrees():
    """Draft.only_roots / trim_depth cut nodes by setting their parent to -1: a cut node (and a
    node under it, which the runtime cuts too) must not reach the real root."""
    parents = torch.tensor([[-1, 0, 1, 2, 0], [-1, 0, -1, 2, 1]])
    depth, mask = batch_closure(parents)
    assert depth.tolist() == [[0, 1, 2, 3, 1], [0, 1, 0, 1, 2]]
    assert mask[1, 3].tolist() == [False, False, True, True, False]  # 3 hangs under the cut node 2 only
    assert mask[1, 4].tolist() == [True, True, False, False, True]


# -- random trees --------------------------------------------------------------------------------------
@st.composite
def parent_arrays(draw, max_nodes: int = 40):
    n = draw(st.integers(1, max_nodes))
    return [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(parent_arrays())
def test_random_trees(parents):
    check_tree(Tree(parents))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(parent_arrays(max_nodes=20), min_size=1, max_size=5))
def test_random_batches(trees):
    check_batch(trees)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), max_size=12))
def test_random_rank_paths(paths):
    tree = Tree.from_paths(paths)
    check_tree(tree)
    rank_paths = tree.rank_paths()
    expected = {()} | {tuple(p[:d]) for p in paths for d in range(1, len(p) + 1)}
    assert set(rank_paths) == expected and len(rank_paths) == len(expected)
    assert rank_paths == sorted(rank_paths, key=lambda q: (len(q), q))
