"""Block-wise compilation: compile one transformer block once and run it for every block.

A decoder's blocks are the same code with different weights. Compiling the whole graph with
AOTInductor makes Inductor lower, schedule and C++-compile every block again: 84 s for
SmolLM2's 30-block decode graph on 2 cores, a quarter of an hour for its tree-verify graph.
:func:`partition` cuts a graph at the residual stream (the ModelMap's block inputs) into a
*prologue* (embedding, masks, position tables), one graph per block and an *epilogue*
(final norm, head) whose weights are inputs, not constants; blocks whose code is the same
after that (every block of a uniform decoder) share one compiled package::

    prologue(tokens, positions, …, embed_w)          -> h0, mask, cos, sin …
    block(h_i, mask, cos, sin, kv_cache[i:i+1], …, w_i) -> h_{i+1}     # one package, called L times
    epilogue(h_L, norm_w, head_w)                     -> logits

Exact: the same ATen ops run in the same order on the same values (the compiled block reads
its layer of the cache through a view). The cost is one call per block (~tens of µs) and the
cache key no longer depends on the weights, so a package serves every model of the same
architecture and shapes. A graph whose blocks do not cut cleanly (no ModelMap, a value other
than the residual stream crossing blocks) is compiled whole, as before.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.fx

from tokenfx.codegen.linear import lower_linears
from tokenfx.ir.graph import ModelGraph

aten = torch.ops.aten
Node = torch.fx.Node


@dataclasses.dataclass
class Piece:
    """One partition: a graph over canonical inputs, which values feed it, which it produces."""

    gm: torch.fx.GraphModule
    inputs: list  # original nodes (graph inputs or other pieces' outputs) in placeholder order
    params: list[torch.Tensor]  # weights, passed after the inputs
    outputs: list  # original nodes it produces, in output order
    layer: int | None  # block index: its cache input is kv_cache[layer : layer + 1]
    key: str  # hash of the canonical code (equal for identical blocks)


class Uncuttable(Exception):
    """The graph does not cut into uniform blocks (compile it whole)."""


def partition(graph: ModelGraph) -> list[Piece]:
    """``graph`` as prologue, blocks and epilogue pieces (raises :class:`Uncuttable`)."""
    try:
        s = graph.structure
    except Exception as exc:  # no ModelMap: nothing to share
        raise Uncuttable(str(exc)) from exc
    if len(s.blocks) < 2:
        raise Uncuttable("fewer than two blocks")
    gm = graph.gm
    nodes = list(gm.graph.nodes)
    hidden = [s.blocks[0].input] + [b.output for b in s.blocks]
    if len(set(hidden)) != len(hidden):
        raise Uncuttable("blocks share a residual-stream node")
    num = len(s.blocks)
    epilogue = num + 1
    # stream nodes: the piece is the last residual-stream boundary they descend from
    level: dict[Node, int] = {}
    part: dict[Node, int] = {}
    boundary = {h: i for i, h in enumerate(hidden)}
    if hidden[0].op == "placeholder":  # an early-exit piece: the stream enters as an input
        level[hidden[0]] = 0
    for n in nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        ins = [level[a] for a in n.all_input_nodes if a in level]
        if n in boundary and boundary[n] == 0:
            level[n], part[n] = 0, 0
            continue
        if not ins:
            continue
        lv = max(ins)
        # piece 0 is the prologue, piece i + 1 is block i; a value gathered from several blocks
        # (prefill's stack of every layer's K/V) is the epilogue's
        part[n] = lv + 1 if lv < num and min(ins) == lv else epilogue
        level[n] = boundary.get(n, lv)
    if any(level.get(h) != i for i, h in enumerate(hidden)):
        raise Uncuttable("the residual stream does not pass through every block in order")
    # free nodes (weights, shape arithmetic) are copied into every piece that reads them
    free = {n for n in nodes if n.op == "get_attr" or (n.op == "call_function" and n not in part
                                                        and not isinstance(n.meta.get("val"), torch.Tensor)
                                                        and n.target is not torch.ops.tokenfx.kv_write.default)}
    # the rest (input-only values): in the one piece that uses them, else the prologue (shared context)
    for n in reversed(nodes):
        if n.op != "call_function" or n in part or n in free:
            continue
        users = _user_pieces(n, part, free)
        part[n] = users.pop() if len(users) == 1 and -1 not in users else 0
    cache = next((n for n in nodes if n.op == "placeholder" and n.name == "kv_cache"), None)
    # on CPU the pieces run their linears as tokenfx::linear (see tokenfx.codegen.linear)
    lower = all(a.device.type == "cpu" for a in graph.example_args if isinstance(a, torch.Tensor))
    pieces = []
    for p in range(num + 2):
        members = [n for n in nodes if part.get(n) == p]
        layer = _cache_layer(members, cache, default=p - 1) if 1 <= p <= num else None
        pieces.append(_extract(gm, members, part, free, p, cache, layer, lower))
    _check_order(pieces)
    return pieces


def _cache_layer(members: list, cache, default: int) -> int:
    """The cache layer a block's nodes read and write (their ``select`` / ``kv_write`` index)."""
    layers = {n.args[1] for n in members if n.args and n.args[0] is cache and cache is not None
              and n.target is torch.ops.tokenfx.kv_write.default}
    layers |= {n.args[2] for n in members if n.args and n.args[0] is cache and cache is not None
               and n.target is aten.select.int and n.args[1] == 0}
    if len(layers) > 1:
        raise Uncuttable(f"a block touches cache layers {sorted(layers)}")
    return layers.pop() if layers else default


def _user_pieces(node: Node, part: dict, free: set) -> set:
    """The pieces that read ``node`` (through free nodes too); -1 for the graph output."""
    out = set()
    for u in node.users:
        if u.op == "output":
            out.add(-1)
        elif u in free:
            out |= _user_pieces(u, part, free)
        else:
            out.add(part.get(u, -1))
    return out


def _extract(gm, members, part, free, p, cache, layer, lower: bool) -> Piece:
    """Copy ``members`` into a fresh graph with canonical names; the layer index of the cache
    ops becomes 0 over an input that is this block's slice of the cache; with ``lower`` the
    linears over weights become ``tokenfx::linear``."""
    inputs, attrs = [], []  # first-use order, found by a dry walk over what the members read

    def visit(x: Node) -> None:
        if x.op == "get_attr":
            if x not in attrs:
                attrs.append(x)
        elif x in free:
            for a in x.all_input_nodes:
                visit(a)
        elif part.get(x) != p and x not in inputs:
            inputs.append(x)

    for n in members:
        for a in n.all_input_nodes:
            visit(a)
    g = torch.fx.Graph()
    env: dict[Node, Node] = {}
    for i, x in enumerate(inputs):
        env[x] = g.placeholder(f"i{i}")
        env[x].meta = dict(x.meta)
    for i, x in enumerate(attrs):
        env[x] = g.placeholder(f"w{i}")
        env[x].meta = dict(x.meta)
    counter = iter(range(1 << 30))

    def value(x: Node) -> Node:
        if x not in env:  # a free node: copy it (and its free inputs) before its first user
            args, kwargs = _map(x, value)
            env[x] = g.create_node(x.op, x.target, args, kwargs, name=f"v{next(counter)}")
            env[x].meta = dict(x.meta)
        return env[x]

    for n in members:
        args, kwargs = _map(n, value)
        if layer is not None and cache is not None and n.args and n.args[0] is cache:
            if n.target is torch.ops.tokenfx.kv_write.default and n.args[1] == layer:
                args = (args[0], 0, *args[2:])
            elif n.target is aten.select.int and tuple(n.args[1:]) == (0, layer):
                args = (args[0], 0, 0)
        env[n] = g.create_node(n.op, n.target, args, kwargs, name=f"v{next(counter)}")
        env[n].meta = dict(n.meta)
    outputs = [n for n in members if any(u.op == "output" or (u not in free and part.get(u) != p) for u in n.users)]
    g.output(tuple(env[n] for n in outputs))
    if lower:
        lower_linears(g, {env[x] for x in attrs})
    g.lint()
    module = torch.fx.GraphModule(torch.nn.Module(), g)
    params = [_attr(gm, x.target) for x in attrs]
    shapes = [(tuple(t.shape), str(t.dtype)) for t in params]
    key = hashlib.sha256((module.code + repr(shapes) + repr([_sig(x) for x in inputs])).encode()).hexdigest()[:24]
    return Piece(module, inputs, params, outputs, layer, key)


def _sig(node: Node) -> str:
    val = node.meta.get("val")
    return f"{tuple(val.shape)}:{val.dtype}" if isinstance(val, torch.Tensor) else repr(type(val))


def _map(n: Node, value):
    return (torch.fx.node.map_arg(n.args, value), torch.fx.node.map_arg(n.kwargs, value))


def _attr(gm, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, torch.nn.Parameter) else obj


def _check_order(pieces: list[Piece]) -> None:
    """Every input of a piece is a graph input or an output of an earlier piece."""
    made: set = set()
    for piece in pieces:
        for x in piece.inputs:
            if x.op != "placeholder" and x not in made:
                raise Uncuttable(f"{x.name} is read before the piece that computes it")
        made |= set(piece.outputs)
    blocks = [p for p in pieces if p.layer is not None]
    if len({p.key for p in blocks}) > max(1, len(blocks) // 2):
        raise Uncuttable("the blocks are not the same code")


class Blockwise:
    """Runs ``pieces`` in order, called like the graph they came from; ``run[key]`` is the callable
    for each distinct piece (compiled, or the piece's own GraphModule)."""

    def __init__(self, graph: ModelGraph, pieces: list[Piece], run: dict):
        placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
        slot = {n: i for i, n in enumerate(placeholders)}
        cache = next((n for n in placeholders if n.name == "kv_cache"), None)
        self._steps = []
        for piece in pieces:
            ins = [(slot[x], piece.layer if x is cache else None) for x in piece.inputs]
            outs = []
            for x in piece.outputs:
                slot[x] = len(slot)
                outs.append(slot[x])
            self._steps.append((run[piece.key], ins, tuple(piece.params), outs))
        self._keys = [piece.key for piece in pieces]
        self._size = len(slot)
        output = next(n for n in graph.gm.graph.nodes if n.op == "output").args[0]
        self._single = not isinstance(output, (tuple, list))
        self._result = [slot[x] if isinstance(x, Node) else None for x in ((output,) if self._single else output)]
        self.pieces = len(pieces)
        self.compiled = len(run)

    @classmethod
    def _restored(cls, steps, keys, size, result, single):
        self = cls.__new__(cls)
        self._steps, self._keys, self._size, self._result, self._single = steps, keys, size, result, single
        self.pieces, self.compiled = len(steps), len(set(keys))
        return self

    def describe(self, module: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        """A JSON plan naming each step's package and weights (by their name in ``module``), and the
        tensors that are not ``module``'s (tables a pass computed) to save beside it."""
        owned = {}
        for name, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
            owned.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), name)
        extras: dict[str, torch.Tensor] = {}
        steps = []
        for (fn, ins, params, outs), key in zip(self._steps, self._keys):
            refs = []
            for t in params:
                identity = (t.data_ptr(), tuple(t.shape), t.dtype)
                name = owned.get(identity)
                if name is None:  # a table a pass computed (RoPE cos / sin, shared by every block): saved once
                    name = owned[identity] = f"extra:{len(extras)}"
                    extras[name.split(":", 1)[1]] = t.contiguous()
                refs.append(name)
            steps.append({"package": str(fn.package), "key": key, "inputs": ins, "params": refs, "outputs": outs})
        return {"steps": steps, "size": self._size, "result": self._result, "single": self._single}, extras

    @classmethod
    def restore(cls, plan: dict, module: torch.nn.Module, extras: dict, load) -> "Blockwise":
        """The runner :meth:`describe` described, over ``module``'s weights; ``load(path)`` opens a package."""
        named = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
        opened: dict = {}
        steps = []
        for step in plan["steps"]:
            fn = opened.get(step["package"]) or opened.setdefault(step["package"], load(step["package"]))
            params = tuple(extras[r.split(":", 1)[1]] if r.startswith("extra:") else named[r].detach() for r in step["params"])
            steps.append((fn, [tuple(i) for i in step["inputs"]], params, step["outputs"]))
        return cls._restored(steps, [s["key"] for s in plan["steps"]], plan["size"], plan["result"], plan["single"])

    def __call__(self, *args):
        vals = list(args) + [None] * (self._size - len(args))
        for fn, ins, params, outs in self._steps:
            got = fn(*[vals[i] if layer is None else vals[i][layer:layer + 1] for i, layer in ins], *params)
            for j, value in zip(outs, got):
                vals[j] = value
        result = tuple(vals[i] if i is not None else None for i in self._result)
        return result[0] if self._single else result


def example_values(graph: ModelGraph, pieces: list[Piece]) -> dict:
    """``{piece key: example inputs}``: the pieces run eagerly on (copies of) the graph's examples."""
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    cache = next((n for n in placeholders if n.name == "kv_cache"), None)
    env = {n: (a.clone() if isinstance(a, torch.Tensor) else a) for n, a in zip(placeholders, graph.example_args)}
    examples = {}
    with torch.inference_mode():
        for piece in pieces:
            args = [env[x][piece.layer:piece.layer + 1] if x is cache and piece.layer is not None else env[x]
                    for x in piece.inputs]
            examples.setdefault(piece.key, (args, piece))
            for x, value in zip(piece.outputs, piece.gm(*args, *piece.params)):
                env[x] = value
    return {key: (tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args) + tuple(piece.params),
                  _dynamic(piece)) for key, (args, piece) in examples.items()}


def _dynamic(piece: Piece):
    """``Dim.AUTO`` for every dim that is symbolic in the source graph; weights are static."""
    specs = []
    for x in piece.inputs:
        val = x.meta.get("val")
        dims = {i: torch.export.Dim.AUTO for i, d in enumerate(getattr(val, "shape", ())) if isinstance(d, torch.SymInt)}
        specs.append(dims or None)
    return tuple(specs) + (None,) * len(piece.params)
