"""The dataflow view: streams, stage cuts and the values that cross them."""

from __future__ import annotations

import torch
import torch.fx

from tokenfx.ir import analysis


class Chain(torch.nn.Module):
    """Three "blocks" on a residual stream; ``skip`` adds block 0's output into block 2."""

    def __init__(self, skip: bool):
        super().__init__()
        self.skip = skip

    def forward(self, x, bias):
        scale = bias * 2  # input-only context every block reads
        h1 = x + scale
        h2 = h1 * scale
        h3 = h2 - scale + (h1 if self.skip else 0)
        return h3


def _nodes(gm):
    return {n.name: n for n in gm.graph.nodes}


def test_only_the_boundary_crosses_a_plain_chain():
    gm = torch.fx.symbolic_trace(Chain(skip=False))
    n = _nodes(gm)
    dag = analysis.dataflow(gm)
    flow = analysis.stream(dag, n["x"], [n["sub"]])
    assert n["mul"] not in flow and n["add"] in flow  # `scale` depends on the inputs only
    cut = analysis.stage_cut(dag, flow, n["add"])
    assert cut.crossing == {n["add"]} and cut.context == (n["mul"],)


def test_a_skip_connection_crosses_the_later_cut():
    gm = torch.fx.symbolic_trace(Chain(skip=True))
    n = _nodes(gm)
    dag = analysis.dataflow(gm)
    flow = analysis.stream(dag, n["x"], [n["add_1"]])
    assert analysis.stage_cut(dag, flow, n["add"]).crossing == {n["add"]}
    assert analysis.stage_cut(dag, flow, n["mul_1"]).crossing == {n["mul_1"], n["add"]}  # h1 reaches block 2
