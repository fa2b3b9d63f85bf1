"""``split_overlap``: in a real gloo group of 2 ranks (spawned, bounded: the harness of
test_tensor_parallel), each rank's split graph gives its tensor_parallel graph's logits and the
single-rank logits within an fp32 tolerance, with no all-reduce left in flight; the schedule is
readable in the graph (each part's wait after the other part's next matmul, tied by data);
a graph that cannot reach ``min_tokens`` is left unchanged; ONNX export is refused with the reason.
"""

from __future__ import annotations

import functools
import operator

import pytest
import torch

import tokenfx
from models import llama, token_inputs
from test_tensor_parallel import spawn_ranks
from tokenfx.errors import ExportError, PassOptionError
from tokenfx.passes.base import PassManager, parse_pipeline, tolerance_for
from tokenfx.passes.split_overlap import FUSED, START, WAIT, SplitOverlap, balanced_fraction, token_costs
from tokenfx.passes.tensor_parallel import TensorParallel

RUN_SHAPES = ((3, 23), (1, 2))  # a padded batch (the split falls mid-sequence); the smallest split, 1 + 1 tokens


@functools.lru_cache(maxsize=None)
def _graph():
    return tokenfx.capture(llama(layers=2, heads=4, kv_heads=2), token_inputs(2, 7))


@functools.lru_cache(maxsize=None)
def _split():
    """Rank 0's tensor_parallel graph and its split (read only by the tests)."""
    tp = TensorParallel(world_size=2, rank=0).run(_graph()).graph
    return tp, SplitOverlap(min_tokens=4).run(tp).graph


def _compare_worker(rank, world, path):
    from tokenfx.codegen import allreduce_add_norm as ops

    graph = tokenfx.load(path)
    (tp,) = parse_pipeline(f"tensor_parallel(world_size={world}, rank={rank})")
    (so,) = parse_pipeline("split_overlap(min_tokens=4)")
    report = PassManager([tp, so]).run(graph)
    sharded = PassManager([tp]).run(graph).graph
    out = []
    for shape in RUN_SHAPES:
        inputs = token_inputs(*shape, seed=2)
        with torch.no_grad():
            single, unsplit, split = (g.gm(**inputs)[0] for g in (graph, sharded, report.graph))
        out.append({"vs_tp": float((split - unsplit).abs().max()), "vs_single": float((split - single).abs().max()),
                    "tol": tolerance_for(single, "exact", depth=2), "in_flight": len(ops._PENDING),
                    "shape": tuple(split.shape) == tuple(single.shape)})
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tokenfx.frontends.onnx import save_pt2

    return str(save_pt2(_graph(), tmp_path_factory.mktemp("split") / "llama.pt2"))


# -- numerics in a real process group ------------------------------------------------------------------
def test_two_ranks_split_gives_the_tensor_parallel_and_single_rank_logits(saved):
    for rank, by_shape in enumerate(spawn_ranks(2, _compare_worker, saved)):
        for shape, r in zip(RUN_SHAPES, by_shape):
            assert r["shape"], f"rank {rank} {shape}: logits shape changed"
            assert r["vs_tp"] <= r["tol"], f"rank {rank} {shape}: |split - tp| = {r['vs_tp']:.3g} > {r['tol']:.3g}"
            assert r["vs_single"] <= r["tol"], f"rank {rank} {shape}: |split - single| = {r['vs_single']:.3g}"
            assert r["in_flight"] == 0, f"rank {rank}: {r['in_flight']} all-reduces started and never waited"


# -- the schedule, read from the graph --------------------------------------------------------------------
def _part(node) -> str:
    return node.meta["tokenfx_part"]


def test_each_parts_wait_comes_after_the_other_parts_next_matmul():
    _, split = _split()
    nodes = list(split.gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    waits = [n for n in nodes if n.target in (FUSED, WAIT)]
    assert len(waits) == 8  # 2 blocks x (after o_proj, after down_proj) x 2 parts
    for wait in waits:
        start = wait.args[0]
        assert start.target is START and _part(start) == _part(wait)
        between = nodes[index[start] + 1:index[wait]]
        other_matmuls = [n for n in between if n.target is torch.ops.aten.linear.default
                         and _part(n) != _part(wait)]
        last = wait is waits[-1]  # B's final wait: part A has no compute left, only its head
        assert other_matmuls or last, f"{wait.name}: no matmul of the other part between its start and wait"
        if not last:  # the order is a data dependence: the wait reads the other part's start token
            (after,) = wait.args[-1]
            assert after.target is START and _part(after) != _part(wait)
            assert index[start] < index[after.args[0]] < index[wait], wait.name


def test_each_all_reduce_fuses_with_its_residual_add_and_norm():
    tp, split = _split()
    assert tp.count(torch.ops._c10d_functional.all_reduce.default) == 4
    assert split.count(START) == 8 == split.count(FUSED)
    assert split.count(torch.ops._c10d_functional.all_reduce.default) == 0 == split.count(WAIT)
    # the norms the ModelMap found after each all-reduce are gone (in the fused op): no rsqrt is
    # left but the two parts' first input norm of block 0
    assert tp.count(torch.ops.aten.rsqrt.default) == 5 and split.count(torch.ops.aten.rsqrt.default) == 2


def test_part_b_attends_part_a_keys_and_values():
    _, split = _split()
    cores = [n for n in split.gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(cores) == 4
    for core in cores:
        k = core.args[1]
        if _part(core) == "A":
            assert _part(k) == "A" and k.target is not torch.ops.aten.cat.default
        else:
            assert k.target is torch.ops.aten.cat.default
            assert [_part(x) for x in k.args[0]] == ["A", "B"]


def test_the_split_is_balanced_by_work_not_count():
    structure = _graph().structure
    linear, attention = token_costs(structure)
    assert linear > 0 and attention > 0
    short, long = balanced_fraction(structure, 16), balanced_fraction(structure, 4096)
    assert 512 <= short < long < 1024 * 0.75  # more early (cheap) tokens in part A as attention grows
    s = 4096 * long // 1024

    def cost(lo, hi):
        return sum(linear + attention * (i + 1) for i in range(lo, hi))

    total = cost(0, 4096)
    assert abs(cost(0, s) - cost(s, 4096)) < 0.01 * total  # balanced by work ...
    assert abs(cost(0, 2048) - cost(2048, 4096)) > 0.2 * total  # ... where halving the count is not


# -- unchanged / refused -----------------------------------------------------------------------------------
def test_below_min_tokens_the_graph_is_unchanged():
    tp, _ = _split()
    result = SplitOverlap(min_tokens=128).run(tp)  # the capture's token dim stops at 64
    assert [n.target for n in result.graph.gm.graph.nodes] == [n.target for n in tp.gm.graph.nodes]
    assert result.graph.count(START) == 0
    assert "< min_tokens=128" in result.refused[0][1]


def test_a_graph_without_all_reduce_is_refused():
    with pytest.raises(PassOptionError, match=r"no all-reduce to overlap; run tensor_parallel"):
        SplitOverlap(min_tokens=4).run(_graph())


def test_options_are_checked():
    with pytest.raises(PassOptionError, match="splits must be 2"):
        parse_pipeline("split_overlap(splits=3)")


def test_onnx_export_is_refused_with_the_reason(tmp_path):
    _, split = _split()
    path = tmp_path / "split.onnx"
    with pytest.raises(ExportError, match=r"allreduce_start\).*ONNX has no collective operations"):
        tokenfx.export_onnx(split, path)
    assert not path.exists()


def test_the_split_graph_exports_with_its_schedule():
    """torch.export keeps the order (the ops are opaque and tied by their tokens): the exported
    program has the same starts and fused waits in the same order."""
    _, split = _split()
    inputs = token_inputs(2, 9, seed=3)
    ep = torch.export.export(split.gm, (), inputs, strict=False)
    ours = [n.meta["tokenfx_part"] + n.target.name() for n in split.gm.graph.nodes if n.target in (START, FUSED)]
    exported = [n.target for n in ep.graph.nodes if n.target in (START, FUSED)]
    assert [t.name() for t in exported] == [o[1:] for o in ours]
    assert operator.countOf(exported, START) == 8
