"""A networkx view of a graph's dataflow, and the stage partitions built on it.

::

    dag = dataflow(gm)                                   # nx.DiGraph over fx nodes, edge = value use
    cut = stage_cut(dag, entry=h0, sinks=[logits, *cache_writes], boundary=h_k,
                    before_sinks=[cache writes of blocks < k])
    cut.crossing    # values computed in the stream before the boundary and used after it
    cut.context     # input-only values the stream reads (masks, RoPE tables): shared by every stage

A *stream* is everything that depends on ``entry`` (the residual stream entering the first
block) and feeds a sink; a cut at ``boundary`` is valid for early exit and split-token
scheduling when the only value crossing it is the boundary itself.
"""

from __future__ import annotations

import dataclasses

import torch.fx


@dataclasses.dataclass(frozen=True)
class StageCut:
    crossing: frozenset  # stream values from before the boundary used after it
    context: tuple  # input-only values the stream reads, in graph order


def dataflow(gm: torch.fx.GraphModule):
    """The dataflow DAG of ``gm``: one vertex per node, an edge from each input to its user."""
    import networkx as nx

    dag = nx.DiGraph()
    for node in gm.graph.nodes:
        dag.add_node(node)
        for src in node.all_input_nodes:
            dag.add_edge(src, node)
    return dag


def stream(dag, entry, sinks) -> set:
    """Nodes that depend on ``entry`` and feed one of ``sinks`` (``entry`` included)."""
    import networkx as nx

    live = set(sinks).union(*(nx.ancestors(dag, n) for n in sinks))
    return (nx.descendants(dag, entry) | {entry}) & live


def stage_cut(dag, flow: set, boundary, before_sinks=()) -> StageCut:
    """Cut ``flow`` (a :func:`stream`) at ``boundary``: the part before it is what ``boundary``
    and ``before_sinks`` (side effects of the earlier stages, such as cache writes) depend on."""
    import networkx as nx

    before = {boundary}.union(nx.ancestors(dag, boundary), *(nx.ancestors(dag, s) | {s} for s in before_sinks))
    before &= flow
    crossing = frozenset(u for u in before for v in dag.successors(u) if v in flow and v not in before)
    return StageCut(crossing, context(flow))


def context(flow: set) -> tuple:
    """Values outside the stream that it reads (computed from the inputs alone)."""
    order = {n: i for i, n in enumerate(next(iter(flow)).graph.nodes)} if flow else {}
    found = {src for n in flow for src in n.all_input_nodes if src not in flow and src.op == "call_function"}
    return tuple(sorted(found, key=order.get))
