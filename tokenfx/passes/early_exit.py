"""``early_exit``: exit heads after chosen blocks, and the decode graph cut into stages between them.

Contract: exact (the final logits are untouched; each exit head is the model's own final norm
+ LM head applied to the residual stream after that block, weights shared).

Before (any graph with a ModelMap head, e.g. ``kv_cache(mode=decode)`` or ``tree_verify``)::

    logits[B, T, V], new_kv = step(tokens, positions, kv_cache, cache_mask, mask [, slots])

After ``early_exit(layers=[2, 4])``::

    logits[B, T, V], new_kv, exits[2, B, T, V] = step(...)     # exits[i] = head(norm(h after block layers[i]))

The runtime does not run that graph whole: it runs *pieces* of it (:func:`piece`), so it can
stop after any stage. A piece takes the graph's inputs (+ the residual stream ``h`` entering
block ``start``), runs blocks ``[start, stop)`` (their cache writes included) and returns
``h`` after block ``stop`` and, with ``head=True``, the exit logits there::

    h[B, T, C], logits[B, T, V] = piece(start=0, stop=2, head=True)(tokens, positions, kv_cache, cache_mask, mask, slots)
    h[B, T, C], logits         = piece(start=2, stop=6, head=True)(tokens, positions, kv_cache, cache_mask, mask, slots, h)

:func:`kv_fill` gives CALM's state propagation: ``h`` fed to the K/V projections (input
norm, ``k_proj`` / ``v_proj``, RoPE) of blocks ``[start, stop)`` only, written into the cache.

:func:`partition` proves the cut is valid before anything runs: on the dataflow graph
(networkx), the only value computed at or after the residual stream enters the network that
crosses each stage boundary must be the residual stream itself (the rest is *context*: masks,
RoPE tables, computed from the inputs alone). A model whose blocks pass anything else along
is refused with the names of the values that cross.

The pass mutates the graph it is handed (a clone: ``Pass.run`` and the PassManager make it);
:func:`piece` and :func:`kv_fill` build new graphs and leave theirs alone.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.fx

from tokenfx.errors import MappingError, PassOptionError
from tokenfx.ir.graph import ModelGraph
from tokenfx.passes.base import Pass, PassResult, register

aten = torch.ops.aten
Node = torch.fx.Node


@dataclasses.dataclass(frozen=True)
class ExitPlan:
    """Where a graph can stop: after ``layers[i]`` blocks (the last is always all of them)."""

    layers: tuple[int, ...]
    num_blocks: int
    stages: tuple[tuple[int, int], ...]  # block ranges [start, stop) between consecutive exits
    context: tuple[str, ...]  # names of the input-only values the stages share (masks, RoPE tables)


def exit_layers(num_blocks: int, layers=None, every: int = 0) -> tuple[int, ...]:
    """Normalise ``layers`` (block counts, 1 … num_blocks) or ``every`` k blocks; the last block always exits."""
    if layers is None and not every:
        chosen = set(range(1, num_blocks + 1))
    elif layers is not None:
        chosen = {int(x) for x in ([layers] if isinstance(layers, int) else layers)}
        bad = sorted(x for x in chosen if not 1 <= x <= num_blocks)
        if bad:
            raise PassOptionError(f"early_exit: exit layer(s) {bad} out of range; the model has {num_blocks} blocks "
                                  f"(exit after 1 … {num_blocks})")
    else:
        if every < 1:
            raise PassOptionError(f"early_exit: every must be >= 1, got {every}")
        chosen = set(range(every, num_blocks + 1, every))
    return tuple(sorted(chosen | {num_blocks}))


# -- analysis ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Anatomy:
    hidden: list[Node]  # residual stream entering block i (i < L), and leaving the last (i = L)
    writes: list[list[Node]]  # per block: its cache sinks (kv_write, or the stack(k, v) that leaves as new_kv)
    final_in: Node  # what the final norm reads
    final_nodes: set[Node]  # the final norm's own nodes
    logits: Node


def _anatomy(graph: ModelGraph) -> _Anatomy:
    s = graph.structure
    if s.head is None or s.final_norm is None:
        raise MappingError("early_exit: the model has no final norm + LM head to exit through")
    g = graph.gm.graph
    hidden = [b.input for b in s.blocks] + [s.blocks[-1].output]
    writes = [[] for _ in s.blocks]
    kv_writes = [n for n in g.nodes if n.op == "call_function" and "kv_write" in str(n.target)]
    if kv_writes:
        for n in kv_writes:
            writes[int(n.args[1])].append(n)
    else:  # the output-cache layout: each layer's stack(k, v) feeds the new_kv output
        output = next(n for n in g.nodes if n.op == "output")
        outs = output.args[0]
        if isinstance(outs, (tuple, list)) and len(outs) > 1 and outs[1].target is aten.stack.default:
            for layer, pair in enumerate(outs[1].args[0]):
                writes[layer].append(pair)
    output = next(n for n in g.nodes if n.op == "output")
    outs = output.args[0]
    logits = outs[0] if isinstance(outs, (tuple, list)) else outs
    return _Anatomy(hidden, writes, s.final_norm.input, set(s.final_norm.nodes), logits)


def partition(graph: ModelGraph, layers) -> ExitPlan:
    """The stage partition for exits after ``layers`` blocks, checked on the dataflow graph
    (:mod:`tokenfx.ir.analysis`): only the residual stream may cross a stage boundary."""
    from tokenfx.ir import analysis

    a = _anatomy(graph)
    num_blocks = len(a.hidden) - 1
    layers = exit_layers(num_blocks, layers)
    dag = analysis.dataflow(graph.gm)
    flow = analysis.stream(dag, a.hidden[0], [a.logits, *(w for ws in a.writes for w in ws)])
    for boundary in layers[:-1]:
        h = a.hidden[boundary]
        cut = analysis.stage_cut(dag, flow, h, [w for ws in a.writes[:boundary] for w in ws])
        if cut.crossing - {h}:
            names = ", ".join(sorted(n.name for n in cut.crossing - {h}))
            raise MappingError(f"early_exit: cannot stop after block {boundary - 1}: besides the residual stream, "
                               f"{names} cross(es) into later blocks")
    starts = (0,) + layers[:-1]
    return ExitPlan(layers, num_blocks, tuple(zip(starts, layers)), tuple(n.name for n in analysis.context(flow)))


# -- pieces ----------------------------------------------------------------------------------------------
def piece(graph: ModelGraph, start: int, stop: int, head: bool = False, trace: bool = False) -> ModelGraph:
    """Blocks ``[start, stop)`` of ``graph`` as a graph of its own (module docstring).

    Inputs: ``graph``'s inputs, then ``h [B, T, C]`` (the residual stream entering block
    ``start``) when ``start > 0``. Outputs: ``(h after block stop - 1,)`` plus the exit
    logits there when ``head``, plus (``trace``) the residual stream after every block of the
    piece ``[stop - start, B, T, C]``. Only blocks ``[start, stop)`` write the cache."""
    a = _anatomy(graph)
    num_blocks = len(a.hidden) - 1
    if not 0 <= start <= stop <= num_blocks or (start == stop and not head):
        raise PassOptionError(f"early_exit: no piece [{start}, {stop}) of a {num_blocks}-block model")
    new, env, h = _copy(graph, a, start, stop, hidden_input=start > 0)
    g = new.gm.graph
    hidden = [env[n] for n in a.hidden]
    if h is not None:
        h.meta = dict(hidden[start].meta)  # the value it stands for: structure recovery finds the stream
        hidden[start].replace_all_uses_with(h)
        hidden[start] = h
    out = hidden[stop]
    outputs = [out]
    if head:
        logits = env[a.logits]
        if stop < num_blocks:
            final_nodes = {env[n] for n in a.final_nodes}
            env[a.final_in].replace_all_uses_with(out, delete_user_cb=lambda u: u in final_nodes)
        outputs.append(logits)
    if trace:
        last = [n for n in g.nodes if n.op != "output"][-1]
        with g.inserting_after(last):
            outputs.append(g.call_function(aten.stack.default, (hidden[start + 1:stop + 1], 0)))
    return _finish(new, graph, tuple(outputs), extra_hidden=start > 0)


def kv_fill(graph: ModelGraph, start: int, stop: int) -> ModelGraph:
    """CALM state propagation: ``h [B, T, C]`` → the K/V of blocks ``[start, stop)`` computed from
    ``h`` as those blocks' input (their input norm, K/V projections and RoPE; nothing else runs),
    written into the cache. Inputs: ``graph``'s inputs, then ``h``; output: ``()``."""
    a = _anatomy(graph)
    num_blocks = len(a.hidden) - 1
    if not 0 <= start < stop <= num_blocks:
        raise PassOptionError(f"early_exit: no blocks [{start}, {stop}) to fill in a {num_blocks}-block model")
    if not any(w.op == "call_function" and "kv_write" in str(w.target) for ws in a.writes for w in ws):
        raise PassOptionError("early_exit: kv_fill needs a graph that writes its cache (cache_update='inplace')")
    new, env, h = _copy(graph, a, start, stop, hidden_input=True)
    for layer in range(start, stop):
        env[a.hidden[layer]].replace_all_uses_with(h)
    return _finish(new, graph, (), extra_hidden=True)


def _copy(graph: ModelGraph, a: _Anatomy, start: int, stop: int, hidden_input: bool):
    """A clone of ``graph`` where only blocks ``[start, stop)`` write the cache, the map from
    ``graph``'s nodes to the clone's (clones copy nodes in order), and a new last input
    ``hidden`` when asked."""
    new = graph.clone()
    g = new.gm.graph
    env = dict(zip(graph.gm.graph.nodes, g.nodes))
    for layer, ws in enumerate(a.writes):
        if not start <= layer < stop:
            for w in ws:
                _drop_sink(g, env[w])
    h = None
    if hidden_input:
        last = [n for n in g.nodes if n.op == "placeholder"][-1]
        with g.inserting_after(last):
            h = g.placeholder("hidden")
    return new, env, h


def _drop_sink(g: torch.fx.Graph, node: Node) -> None:
    """A cache write of a block the piece does not run. ``kv_write`` is impure (dead-code
    elimination keeps it): erase it; a ``stack(k, v)`` feeding new_kv dies with that output."""
    if not node.users:
        g.erase_node(node)


def _finish(new: ModelGraph, graph: ModelGraph, outputs: tuple, extra_hidden: bool) -> ModelGraph:
    g = new.gm.graph
    output = next(n for n in g.nodes if n.op == "output")
    output.args = (outputs,)
    g.eliminate_dead_code()
    g.set_codegen(torch.fx.graph.CodeGen())
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(new.gm, attr):
            delattr(new.gm, attr)
    g.lint()
    new.gm.recompile()
    args, shapes = tuple(graph.example_args), graph.dynamic_shapes
    if extra_hidden:
        first = args[0]
        hidden = torch.zeros(*first.shape[:2], _hidden_size(graph), dtype=_float_dtype(graph), device=first.device)
        args = args + (hidden,)
        if shapes is not None:
            shapes = tuple(shapes) + (dict(shapes[0]),)  # h shares the tokens' batch and token dims
    return dataclasses.replace(new, example_args=args, dynamic_shapes=shapes, _structure=None)


def _hidden_size(graph: ModelGraph) -> int:
    return int(graph.structure.hidden_size)


def _float_dtype(graph: ModelGraph) -> torch.dtype:
    for p in graph.gm.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


# -- the pass -------------------------------------------------------------------------------------------
@register
class EarlyExit(Pass):
    """Add exit heads (shared final norm + LM head) after chosen blocks; record the stage plan (exact)."""

    name = "early_exit"
    contract = "exact"

    @dataclasses.dataclass
    class Options:
        layers: tuple[int, ...] | int = ()  # exit after these many blocks (1 … L); () with every=0: every block
        every: int = 0  # or: after every k blocks
        head: Literal["shared"] = "shared"  # the model's own final norm + LM head (the runtime trains adapters)

    def rewrite(self, graph: ModelGraph) -> PassResult:
        """Add the exit heads to ``graph`` itself (the clone :meth:`Pass.run` or the PassManager hands it)."""
        o = self.options
        a = _anatomy(graph)
        plan = partition(graph, exit_layers(len(a.hidden) - 1, o.layers or None, o.every))
        g = graph.gm.graph
        output = next(n for n in g.nodes if n.op == "output")
        exits = []
        final_order = [n for n in g.nodes if n in a.final_nodes]
        head_chain = _head_chain(a)
        for layer in plan.layers[:-1]:
            env = {a.final_in: a.hidden[layer]}
            with g.inserting_before(output):
                for node in final_order + head_chain:
                    env[node] = g.node_copy(node, lambda n: env.get(n, n))
            exits.append(env[a.logits])
        exits.append(a.logits)
        with g.inserting_before(output):
            stacked = g.call_function(aten.stack.default, (exits, 0))
        outs = output.args[0]
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        output.args = (outs + (stacked,),)
        codegen = g._codegen
        if isinstance(codegen, torch.fx.graph._PyTreeCodeGen):  # the inputs keep their convention; outputs are flat
            codegen.pytree_info = codegen.pytree_info._replace(out_spec=None)
        if hasattr(graph.gm, "_out_spec"):
            delattr(graph.gm, "_out_spec")
        g.lint()
        graph.gm.recompile()
        new = dataclasses.replace(graph, _structure=None)
        new.exits = plan
        return PassResult(new, matched=[f"exit head after block {layer - 1}" for layer in plan.layers[:-1]],
                          stats={"exits": list(plan.layers), "stages": [list(s) for s in plan.stages],
                                 "context": list(plan.context)})

    def verify_outputs(self, before: ModelGraph, after: ModelGraph):
        """The final logits are unchanged, and the last exit is exactly the final logits."""
        def call(graph):  # fresh copies: a graph that writes its cache must not see the other's writes
            args = [a.clone() if isinstance(a, torch.Tensor) else a for a in before.example_args]
            kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in before.example_kwargs.items()}
            with torch.no_grad():
                return graph.gm(*args, **kwargs)

        ref, got = call(before), call(after)
        ref0 = ref[0] if isinstance(ref, (tuple, list)) else ref
        return [(ref0, got[0]), (ref0, got[-1][-1])]


def _head_chain(a: _Anatomy) -> list[Node]:
    """Nodes from the final norm's output to the logits (the LM head, any slice / cast on the way)."""
    chain, frontier = [], [a.logits]
    seen = set()
    while frontier:
        n = frontier.pop()
        if n in seen or n in a.final_nodes or n.op in ("placeholder", "get_attr"):
            continue
        seen.add(n)
        chain.append(n)
        frontier.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(a.logits.graph.nodes)}
    return sorted(chain, key=order.get)
