"""ATen op families as the two capture paths spell them, and small node queries.

``torch.export`` (training IR) keeps ``aten.linear`` / ``aten.layer_norm`` /
``aten.scaled_dot_product_attention``; AOTAutograd (the torch.compile path) gives
``addmm``/``mm`` with ``t``, ``native_layer_norm`` and ``_scaled_dot_product_*`` variants.
Structure recovery asks these predicates so it sees one structure in both paths.
"""

from __future__ import annotations

import collections
import operator
import re

import torch
import torch.fx

aten = torch.ops.aten


def _ops(*names: str) -> frozenset:
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            found.append(getattr(op, overload or "default"))
    return frozenset(found)


def _tree_attention_op():
    from tokenfx.codegen import tree_attention  # noqa: F401  (registers tokenfx::tree_attention)

    return torch.ops.tokenfx.tree_attention.default


SDPA = _ops(
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
) | frozenset({_tree_attention_op()})
SOFTMAX = _ops("softmax.int", "_softmax", "_safe_softmax")
MATMUL = _ops("matmul", "bmm", "baddbmm")
LINEAR = _ops("linear", "addmm", "mm")
LAYER_NORM = _ops("layer_norm", "native_layer_norm")
RMS_NORM = _ops("rms_norm", "_fused_rms_norm")
CAST = _ops("to.dtype", "to.dtype_layout", "to.device", "_to_copy", "type_as", "clone", "contiguous")
ADD = _ops("add.Tensor")
MUL = _ops("mul.Tensor")
# Ops that move or reshape data without computing: walked through when following a tensor.
VIEW_LIKE = _ops(
    "view", "_unsafe_view", "reshape", "transpose.int", "permute", "expand", "unsqueeze", "squeeze.dim",
    "squeeze", "unflatten.int", "flatten.using_ints", "select.int", "t", "contiguous", "clone", "repeat_interleave.self_int",
    "split.Tensor", "split_with_sizes", "chunk", "slice.Tensor", "to.dtype", "to.dtype_layout", "_to_copy",
) | {operator.getitem}
COMPARE = _ops("le.Tensor", "lt.Tensor", "ge.Tensor", "gt.Tensor", "le.Scalar", "lt.Scalar", "ge.Scalar", "gt.Scalar")
TRI = _ops("tril", "triu")
TRIG = _ops("cos", "sin")

_PREFIXES = (re.compile(r"^L\['self'\]\.?"), re.compile(r"^L\['fn'\]\.?"), re.compile(r"^L\['args'\]\[\d+\]\.?"),
             re.compile(r"^L\['mod'\]\.?"), re.compile(r"^L__self___"))


def normalize_path(path: str) -> str:
    """``L['self'].model.layers.0`` / ``L['args'][0]._orig_mod.x`` → ``model.layers.0`` / ``x``."""
    for prefix in _PREFIXES:
        path = prefix.sub("", path)
    path = path.replace("._orig_mod", "").replace("_orig_mod.", "")
    # Dynamo sometimes spells indices as ['0'] or [0]
    path = re.sub(r"\[['\"]?(\w+)['\"]?\]", r".\1", path).lstrip(".")
    return path


def module_path(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return normalize_path(list(stack.values())[-1][0])


def val(node) :
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def shape(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def is_float_tensor(node) -> bool:
    v = val(node)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, torch.fx.Node) and isinstance(val(a), torch.Tensor):
            out.append(a)
    return out


def is_parameter_like(node) -> bool:
    """A graph input that holds weights: get_attr (export) or a placeholder (AOT graph)."""
    return isinstance(node, torch.fx.Node) and node.op in ("get_attr", "placeholder")


def skip_casts(node: torch.fx.Node) -> torch.fx.Node:
    """Follow dtype casts / clones back to the tensor they copy."""
    while node.op == "call_function" and node.target in CAST and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def sdpa_args(node: torch.fx.Node) -> dict:
    """q, k, v, attn_mask, is_causal of any SDPA variant, by name."""
    schema = node.target._schema
    bound = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
    mask = bound.get("attn_mask", bound.get("attn_bias", bound.get("tree_mask")))
    tree = "tree_mask" in bound  # tokenfx::tree_attention: a decoder's tokens over the cache and their ancestors
    return {"q": bound["query"], "k": bound["key"], "v": bound["value"], "mask": mask,
            "is_causal": tree or bool(bound.get("is_causal", False)), "scale": bound.get("scale")}


def linear_input_weight(node: torch.fx.Node):
    """(input, weight) of a linear-like node; the weight may be behind a ``t``/``permute``."""
    if node.target is aten.linear.default:
        return node.args[0], node.args[1]
    if node.target is aten.addmm.default:
        return node.args[1], node.args[2]
    if node.target in (aten.mm.default, aten.matmul.default, aten.bmm.default):
        return node.args[0], node.args[1]
    return None, None


def is_linear(node: torch.fx.Node) -> bool:
    """A projection: linear / addmm / mm / matmul whose weight is a parameter (maybe transposed)."""
    if node.op != "call_function" or node.target not in LINEAR | MATMUL:
        return False
    _, weight = linear_input_weight(node)
    if not isinstance(weight, torch.fx.Node):
        return False
    weight = skip_views(weight)
    return is_parameter_like(weight)


def skip_views(node: torch.fx.Node) -> torch.fx.Node:
    while node.op == "call_function" and node.target in VIEW_LIKE and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def ancestors(node: torch.fx.Node, limit: int = 400) -> set[torch.fx.Node]:
    """Nodes ``node`` depends on (bounded breadth-first search)."""
    seen: set = set()
    frontier = collections.deque([node])
    while frontier and len(seen) < limit:
        current = frontier.popleft()
        for arg in current.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                frontier.append(arg)
    return seen
