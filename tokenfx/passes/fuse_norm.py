"""``fuse_norm``: residual add followed by LayerNorm / RMSNorm → one ``tokenfx::add_norm``.

Contract: exact (the same arithmetic; statistics in fp32, so only rounding order differs).

Before::

    h   = add(x, attn_out)                     # residual add, same shapes
    n   = layer_norm(h, [C], w, b, eps)        # or rsqrt(mean(h²) + eps) * h * w
    ... = mlp(n) ;  h2 = add(h, mlp_out)

After::

    fused = tokenfx.add_norm(x, attn_out, w, b, eps, "layernorm")
    n, h  = fused[0], fused[1]
    ... = mlp(n) ;  h2 = add(h, mlp_out)

It works from the ModelMap's norms, so it fuses every norm the map knows (block norms,
the final norm) whose input is a non-broadcasting add; TokenWeave later fuses the same op
with the all-reduce. Norms over more than the last dim, and adds of mixed dtypes, are
refused with the reason recorded.

It mutates the graph it is handed (a clone: ``Pass.run`` and the PassManager make it).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx.passes.tools_common import legalize_graph

from tokenfx.codegen import add_norm as _add_norm  # noqa: F401  (registers tokenfx::add_norm)
from tokenfx.ir import aten as A
from tokenfx.ir.rewrite import inherit_module_path
from tokenfx.passes.base import Pass, PassResult, register


@register
class FuseNorm(Pass):
    """Fuse each residual add + LayerNorm/RMSNorm into one tokenfx::add_norm (exact)."""

    name = "fuse_norm"
    contract = "exact"

    @dataclasses.dataclass
    class Options:
        final_norm: bool = True  # also fuse the last residual add into the final norm

    def rewrite(self, graph):
        """Fuse in ``graph`` itself (the clone :meth:`Pass.run` or the PassManager hands it)."""
        structure = graph.structure
        g = graph.gm.graph
        matched, refused = [], []
        order = {n: i for i, n in enumerate(g.nodes)}
        final = structure.final_norm
        for norm in structure.norms:
            where = structure.path(norm.output)
            if norm is final and not self.options.final_norm:
                continue
            add, reshape = norm.input, None
            if add.op == "call_function" and add.target in _RESHAPES and isinstance(add.args[0], torch.fx.Node) \
                    and A.shape(add) and A.shape(add.args[0]) and A.shape(add)[-1] == A.shape(add.args[0])[-1]:
                # add → reshape (keeping the normalised last dim) → norm, as OPT flattens before
                # its final norm: fuse on the add's shape and reshape the normed output instead
                add, reshape = add.args[0], add
            if add.op != "call_function" or add.target not in A.ADD:
                continue
            a, b = add.args[0], add.args[1]
            if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
                continue
            if A.shape(a) != A.shape(b) or A.shape(a) != A.shape(add):
                continue  # a broadcasting add (bias, position embedding), not a residual add
            if A.val(a).dtype != A.val(b).dtype:
                refused.append((where, f"residual add mixes {A.val(a).dtype} and {A.val(b).dtype}"))
                continue
            if add.kwargs.get("alpha", 1) != 1:
                refused.append((where, "residual add has alpha != 1"))
                continue
            if norm.kind == "layernorm" and len(norm.nodes[0].args[1]) != 1:
                refused.append((where, "LayerNorm normalises more than the last dim"))
                continue
            anchor = max([add] + [x for x in (norm.weight, norm.bias) if isinstance(x, torch.fx.Node)], key=order.get)
            with g.inserting_after(anchor):
                fused = g.call_function(torch.ops.tokenfx.add_norm.default,
                                        (a, b, norm.weight, norm.bias, norm.eps, norm.kind))
            with g.inserting_after(fused):
                normed = g.call_function(operator.getitem, (fused, 0))
                summed = g.call_function(operator.getitem, (fused, 1))
            for origin, new in ((norm.output, normed), (add, summed)):
                if "val" in origin.meta:  # the same value: later matches in this pass read its shape
                    new.meta["val"] = origin.meta["val"]
            inherit_module_path([fused, normed], norm.output)  # the ModelMap places the fused norm where the norm was
            inherit_module_path([summed], add)
            if reshape is not None:
                with g.inserting_after(summed):
                    normed = g.call_function(reshape.target, (normed, *reshape.args[1:]), dict(reshape.kwargs))
            norm.output.replace_all_uses_with(normed)
            add.replace_all_uses_with(summed, delete_user_cb=lambda user: user is not fused)
            matched.append(where)
        if not _topologically_ordered(g):
            # a norm weight computed inside the norm (Gemma's 1 + w) can sit after users of the
            # residual sum; a stable topological sort puts every node after its inputs again
            legalize_graph(graph.gm)
        graph.gm.graph.eliminate_dead_code()
        graph.invalidate()  # recompiled, map dropped: usable straight from Pass.run
        return PassResult(graph, matched, refused, {"fused": len(matched)})


_RESHAPES = A._ops("view", "reshape", "_unsafe_view")


def _topologically_ordered(graph: torch.fx.Graph) -> bool:
    seen = set()
    for node in graph.nodes:
        if any(arg not in seen for arg in node.all_input_nodes):
            return False
        seen.add(node)
    return True
