"""tokenfx::linear: the CPU GEMM picked by row count gives F.linear's result at every row count,
follows its weight (a weight changed in place or freed is not served from the old layout), and
the runtime's lowering leaves the graph's outputs as they were."""

import gc

import pytest
import torch

from tokenfx.codegen import linear as L
from tokenfx.runtime import executor
from tokenfx.runtime.generate import Generator

op = torch.ops.tokenfx.linear.default


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear_at_every_row_count(rows, bias):
    torch.manual_seed(rows)
    w = torch.randn(96, 64)
    b = torch.randn(96) if bias else None
    x = torch.randn(1, rows, 64)
    torch.testing.assert_close(op(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the decode loop's mode: inference tensors have no version counter
        torch.testing.assert_close(op(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_a_weight_changed_in_place_is_laid_out_again():
    w = torch.randn(32, 16)
    x1, x4 = torch.randn(1, 1, 16), torch.randn(4, 16)
    op(x1, w, None), op(x4, w, None)  # both cached layouts made
    with torch.no_grad():
        w.mul_(-2.0)
    torch.testing.assert_close(op(x1, w, None), x1 @ w.t())
    torch.testing.assert_close(op(x4, w, None), x4 @ w.t(), rtol=1e-5, atol=1e-5)


def test_a_freed_weight_does_not_serve_a_new_one():
    x = torch.randn(1, 1, 16)
    for seed in range(8):  # new weights of the same shape, likely at a freed one's address
        w = torch.randn(32, 16, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(op(x, w, None), x @ w.t())
        del w
        gc.collect()


def test_lowering_keeps_the_decode_graph_outputs(monkeypatch):
    monkeypatch.setattr(L, "MIN_WEIGHT", 1)  # tiny-code's weights are small: lower every linear
    gen = Generator("tokenfx:tiny-code", compile=False)
    graph = gen.tree_graph
    lowered = executor.lower(graph)
    targets = [n.target for n in lowered.gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.tokenfx.linear.default in targets and torch.ops.aten.linear.default not in targets
    assert torch.ops.aten.linear.default in [n.target for n in graph.gm.graph.nodes]  # the given graph is unchanged
    layout = gen.layout
    for t in (1, 4):
        args = (torch.randint(0, 100, (2, t)), torch.arange(t).expand(2, t) + 8, torch.randn(layout.cache_shape(2, 16)),
                torch.ones(2, 16, dtype=torch.long), torch.ones(t, t, dtype=torch.bool).tril().expand(2, t, t),
                torch.arange(8, 8 + t))
        want = graph.gm(*[a.clone() for a in args])
        got = lowered.gm(*[a.clone() for a in args])
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
