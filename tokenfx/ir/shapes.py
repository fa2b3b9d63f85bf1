"""Symbolic shapes: re-propagate fake tensors, and re-derive size arguments when a pass
changes the token count.

A pass that turns ``[B, N, C]`` into ``[B, N - r, C]`` mid-network leaves every later size
argument (``view(B, N, H, D)``, ``expand(B, H, N, N)``, ``arange(N)`` ...) pointing at the old
``N``. :func:`rederive_token_sizes` rewrites them from the new tensor's own size with sympy, so
no pass hand-edits shape literals::

    reduced = gm.graph.call_function(token_reducing_op, ...)      # [B, N - r, C]
    rederive_token_sizes(gm, reduced, token_axis=1, old_tokens=N)  # N → sym_size(reduced, 1)
    propagate(gm)                                                 # fake tensors agree again

With a static token count (ViT at a fixed image size) sizes are plain ints: literals equal
to N are rewritten, and graphs where that is unsafe (N named twice in one size list, or a
literal that is a multiple of N, e.g. N·D) are refused with PassOptionError.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from tokenfx.errors import PassOptionError
from tokenfx.ir import aten as A

aten = torch.ops.aten

# ops whose int / int-list arguments are sizes
SIZE_OPS = A._ops(
    "view", "_unsafe_view", "reshape", "expand", "arange", "arange.start", "arange.start_step", "new_zeros",
    "new_ones", "new_empty", "new_full", "zeros", "ones", "empty.memory_format", "full", "slice.Tensor",
    "unflatten.int", "narrow", "repeat", "split.Tensor", "split_with_sizes",
) | {operator.mul, operator.add, operator.sub, operator.floordiv, A.aten.sym_size.int}


def propagate(gm: torch.fx.GraphModule, before_node=None) -> None:
    """Re-run fake tensors through ``gm`` so every node's ``meta['val']`` is current.

    Uses the placeholders' own fake values (and so their symbolic dims and ShapeEnv).
    ``before_node(node, env)``, when given, is called before each node runs, with ``env`` the
    new fake values computed so far: a pass that changes a tensor's size mid-graph rewrites the
    size arguments of later nodes there, from their inputs' new sizes.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = [n.meta.get("val") for n in placeholders]
    fake_mode = next((v.fake_mode for v in fakes if isinstance(v, torch._subclasses.FakeTensor)), None)
    if fake_mode is None:
        return
    _ParamFakeProp(gm, mode=fake_mode, before_node=before_node).propagate_dont_convert_inputs(*fakes)


class _ParamFakeProp(FakeTensorProp):
    """FakeTensorProp that fakes parameters reached through get_attr (unlifted graphs)."""

    def __init__(self, gm, mode=None, before_node=None):
        super().__init__(gm, mode=mode)
        self.before_node = before_node

    def run_node(self, n):
        if self.before_node is not None:
            self.before_node(n, self.env)
        if n.op == "call_module":  # export's input guard module: runtime checks only
            result = None
            n.meta["val"] = result
            return result
        return super().run_node(n)

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return self._mode.from_tensor(value, static_shapes=True)
        return value


def _int_literals(arg) -> list[int]:
    if isinstance(arg, (list, tuple)):
        return [x for a in arg for x in _int_literals(a)]
    return [arg] if isinstance(arg, int) and not isinstance(arg, bool) else []


def _refuse_ambiguous_static_sizes(graph: torch.fx.Graph, start: torch.fx.Node, tokens: int) -> None:
    """With a static token count, sizes are plain ints: a literal equal to N is taken to be N.
    Refuse the graphs where that reading is unsafe — a size list naming N twice (is the other
    one heads?) or a literal that is a multiple of N (a product such as N·D) — rather than
    rewrite them wrongly."""
    after = False
    for node in graph.nodes:
        if node is start:
            after = True
            continue
        if not after or node.op != "call_function" or node.target not in SIZE_OPS:
            continue
        for arg in node.args:
            literals = _int_literals(arg)
            if isinstance(arg, (list, tuple)) and literals.count(tokens) > 1:
                raise PassOptionError(f"static token count {tokens} is ambiguous in {node.name}{tuple(node.args[1:])}: "
                                      f"it appears more than once; capture with a dynamic token dim")
            product = next((x for x in literals if x > tokens and x % tokens == 0), None)
            if product is not None:
                raise PassOptionError(f"static token count {tokens}: size {product} in {node.name} may be a product "
                                      f"of it; capture with a dynamic token dim")


def _expr(value):
    if isinstance(value, torch.SymInt):
        return value.node.expr
    if isinstance(value, int):
        return sympy.Integer(value)
    return None


def symbol_sources(gm: torch.fx.GraphModule) -> dict:
    """``{sympy.Symbol: node}`` for nodes that produce a bare symbol (``sym_size`` of an input)."""
    out = {}
    for n in gm.graph.nodes:
        e = _expr(n.meta.get("val"))
        if isinstance(e, sympy.Symbol) and e not in out:
            out[e] = n
    return out


def rederive_token_sizes(gm: torch.fx.GraphModule, reduced: torch.fx.Node, *, token_axis: int, old_tokens,
                         until: torch.fx.Node | None = None) -> int:
    """Point every size argument downstream of ``reduced`` at its new token count.

    ``old_tokens`` is the old count: a sympy expression / SymInt (dynamic) or an int (static).
    Downstream means after ``reduced`` in topological order, and before ``until`` when given
    (where the count goes back, e.g. an unmerge). Returns how many arguments changed.
    """
    graph = gm.graph
    old = _expr(old_tokens) if not isinstance(old_tokens, sympy.Basic) else old_tokens
    with graph.inserting_after(reduced):
        new_n = graph.call_function(aten.sym_size.int, (reduced, token_axis))
    new_n.meta["val"] = A.val(reduced).shape[token_axis]
    sources = symbol_sources(gm)
    n_symbol = sympy.Symbol("__tokens_new__", integer=True, positive=True)
    built: dict = {}

    def build(expr, before: torch.fx.Node):
        """A node (or int) computing ``expr`` over graph values, placed before ``before``."""
        if expr in built:
            return built[expr]
        if expr.is_Integer:
            return int(expr)
        if expr == n_symbol:
            return new_n
        if isinstance(expr, sympy.Symbol):
            return sources[expr]
        if isinstance(expr, (sympy.Mul, sympy.Add)):
            fn = operator.mul if isinstance(expr, sympy.Mul) else operator.add
            parts = [build(a, before) for a in expr.args]
            acc = parts[0]
            for part in parts[1:]:
                with graph.inserting_before(before):
                    acc = graph.call_function(fn, (acc, part))
            built[expr] = acc
            return acc
        if isinstance(expr, sympy.floor) or type(expr).__name__ == "FloorDiv":
            a, b = expr.args
            with graph.inserting_before(before):
                node = graph.call_function(operator.floordiv, (build(a, before), build(b, before)))
            built[expr] = node
            return node
        # the same family as the ambiguity refusals above, so passes that catch those catch this too
        raise PassOptionError(f"size {expr} (in {before.name}) follows the token count through an operation "
                              "tokenfx cannot rebuild (only +, × and floor division); this graph cannot change N")

    def rewrite(arg, user):
        nonlocal changed
        if isinstance(arg, (list, tuple)):
            return type(arg)(rewrite(a, user) for a in arg)
        if isinstance(arg, torch.fx.Node):
            if arg is new_n:
                return arg
            e = _expr(arg.meta.get("val"))
        elif isinstance(arg, int) and not isinstance(arg, bool) and isinstance(old, sympy.Integer):
            e = sympy.Integer(arg)
        else:
            return arg
        matches = e == old if isinstance(old, sympy.Integer) else (e is not None and e.has(old))
        if not matches:
            return arg
        changed += 1
        return build(sympy.expand(e.subs(old, n_symbol)), user)

    if isinstance(old, sympy.Integer):
        _refuse_ambiguous_static_sizes(graph, new_n, int(old))
    changed = 0
    after = False
    for node in list(graph.nodes):
        if node is new_n:
            after = True
            continue
        if node is until:
            break
        if not after or node.op != "call_function" or node.target not in SIZE_OPS:
            continue
        node.args = rewrite(node.args, node)
        node.kwargs = {k: rewrite(v, node) for k, v in node.kwargs.items()}
    graph.lint()
    gm.recompile()
    return changed
