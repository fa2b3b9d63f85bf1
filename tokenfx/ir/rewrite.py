"""Small graph-editing facts every rewrite shares: which ops are identities at inference, and
how nodes a pass inserts keep the module path the ModelMap finds blocks by."""

from __future__ import annotations

import torch
import torch.fx

_PATH_KEYS = ("nn_module_stack", "stack_trace")


def inherit_module_path(nodes, origin: torch.fx.Node) -> None:
    """Give ``nodes`` (inserted by a pass) ``origin``'s module path, so the ModelMap of the new
    graph places them in ``origin``'s block."""
    for key in _PATH_KEYS:
        if key in origin.meta:
            for n in nodes:
                n.meta[key] = origin.meta[key]


def remove_identity_ops(gm: torch.fx.GraphModule) -> None:
    """Drop ops that are identities in inference (dropout with train=False, alias, dtype
    asserts) and dead code, so structure recovery and pattern matching see the dataflow the
    model means."""
    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._assert_tensor_metadata.default:  # dtype asserts around casts
            gm.graph.erase_node(node)
            continue
        identity = (node.target is aten.dropout.default and (len(node.args) < 3 or node.args[2] is False)) or node.target in (
            aten.alias.default,
        )
        if identity:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()  # e.g. a pooler whose output the wrapper does not return
    gm.graph.lint()
    gm.recompile()
