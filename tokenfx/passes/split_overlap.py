"""``split_overlap``: TokenWeave's split-token overlap of tensor-parallel all-reduces with compute.

Contract: exact (each token's arithmetic is the single-graph arithmetic; only the all-reduce's
reduction order and the attention kernel's blocking differ).

Precondition: a ``tensor_parallel`` graph (functional ``all_reduce`` + ``wait_tensor`` after each
row-parallel projection) captured with a dynamic token dim; SDPA attention cores. Run it
before ``fuse_norm`` (it fuses the norms after the all-reduces itself).

Before (one block of one rank, ``N`` tokens)::

    o  = linear(attn(norm1(x)), Wo_r) ; o = wait_tensor(all_reduce(o))  ; h = x + o ; n = norm2(h)
    d  = linear(mlp(n), Wd_r)         ; d = wait_tensor(all_reduce(d))  ; x' = h + d ; ...

After (parts A = tokens ``[0, s)``, B = ``[s, N)``; one line per step, in graph order)::

    oA   = linear(attn(qA, kA, vA, mask[:s, :s]), Wo_r) ; tA1 = allreduce_start(oA)
    oB   = linear(attn(qB, cat(kA, kB), cat(vA, vB), mask[s:, :]), Wo_r) ; tB1 = allreduce_start(oB)
    nA, hA = allreduce_add_norm(tA1, oA, xA, ..., after=[tB1]) ; dA = linear(mlp(nA)) ; tA2 = allreduce_start(dA)
    nB, hB = allreduce_add_norm(tB1, oB, xB, ..., after=[tA2]) ; dB = linear(mlp(nB)) ; tB2 = allreduce_start(dB)
    nA', xA' = allreduce_add_norm(tA2, dA, hA, ..., after=[tB2]) ; ...       (next block: part A first)
    logits = cat(head(nA_final), head(nB_final), dim=tokens)

So each part's all-reduce travels while the other part computes: A's wait comes after B's
attention (and B's wait after A's MLP). Causal attention across the split: part B's queries
read part A's keys and values of the same layer (``cat(kA, kB)``) and the mask's rows
``[s, N)`` over all ``N`` columns; part A reads its own only (a later token is masked for it
anyway). The ``after=[token]`` inputs make the order a data dependence (see
:mod:`tokenfx.codegen.allreduce_add_norm`): no compiler can hoist a wait above the other part's
compute or sink a start below it.

Cost model (split by work, not by count): on one rank a token at position ``i`` costs
``L + 4·H'·D·(i + 1)`` FLOPs per block: ``L = 2·Σ in·out`` of the block's (sharded)
projections, and its attention reads ``i + 1`` keys (``q·kᵀ`` and ``p·v``, ``2·H'·D`` each). The
split point ``s`` equalises the two parts' sums at ``balance_tokens`` tokens (the pass's
``min_tokens`` when not given); it is stored as a fraction ``s = N·f // 1024`` of the runtime
token count, so the graph stays valid (and exact) at every ``N``, only best balanced near
``balance_tokens``. Early tokens are cheaper, so part A holds more of them (``f`` ≥ 1/2: 0.5
when the projections dominate, towards 1/√2 when attention does). TokenWeave also pads to the
GPU's waves (multiples of 256 tokens); a CPU has no waves, so no padding here.

Below ``min_tokens`` the graph is left unsplit: a graph whose token dim cannot reach
``min_tokens`` (its dynamic dim's upper bound, or its static size) is returned unchanged with
the reason recorded; a runtime picks the split graph for prefills of at least ``min_tokens``
tokens, as TokenWeave turns its split on at ≥ 1024 tokens.

What the split graph is for, and not: it runs eagerly at any ``N >= 2`` (both parts non-empty;
a 1-token call has nothing to split), and ``torch.export`` re-exports it at a fixed shape with
its schedule intact; re-exporting it with a dynamic token dim fails (export cannot prove its
guards over ``N · f // 1024``). The ModelMap does not map it (blocks appear twice): put
``split_overlap`` last in a pipeline.

Refused with one :class:`PassOptionError`: no all-reduce in the graph (run ``tensor_parallel``
first), ``kv_cache`` graphs, eager (matmul-softmax-matmul) attention cores, a causal core without
a mask, a static token dim, a token-dim tensor the pass cannot slice unambiguously.
"""

from __future__ import annotations

import dataclasses
import operator

import sympy
import torch
import torch.fx

from tokenfx.codegen import allreduce_add_norm as _ops  # noqa: F401  (registers the tokenfx all-reduce ops)
from tokenfx.errors import PassOptionError
from tokenfx.ir import aten as A
from tokenfx.ir.shapes import propagate
from tokenfx.passes.base import Pass, PassResult, register

aten = torch.ops.aten
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
WAIT_TENSOR = torch.ops._c10d_functional.wait_tensor.default
START = torch.ops.tokenfx.allreduce_start.default
WAIT = torch.ops.tokenfx.allreduce_wait.default
FUSED = torch.ops.tokenfx.allreduce_add_norm.default
FRACTION_SCALE = 1024  # the split fraction's denominator: s = N · f // 1024
PARTS = ("A", "B")


@register
class SplitOverlap(Pass):
    """Split a tensor-parallel graph's tokens in two parts by cost and interleave them so each
    part's all-reduce overlaps the other part's compute (exact)."""

    name = "split_overlap"
    contract = "exact"

    @dataclasses.dataclass
    class Options:
        splits: int = 2
        min_tokens: int = 1024
        balance_tokens: int = 0  # the token count the split is balanced for (0: min_tokens)

        def __post_init__(self):
            if self.splits != 2:
                raise ValueError(f"splits must be 2 (TokenWeave's two interleaved parts), got {self.splits}")
            if self.min_tokens < 2:
                raise ValueError(f"min_tokens must be at least 2 (one token per part), got {self.min_tokens}")
            if self.balance_tokens < 0:
                raise ValueError(f"balance_tokens must be >= 0, got {self.balance_tokens}")

    def rewrite(self, graph):
        if graph.kv is not None:
            raise PassOptionError("split_overlap: kv_cache graphs are not supported (a decode step has too few "
                                  "tokens to split); apply it to the full-sequence prefill graph")
        gm, g = graph.gm, graph.gm.graph
        reduces = [n for n in g.nodes if n.op == "call_function" and n.target is ALL_REDUCE]
        if not reduces:
            raise PassOptionError("split_overlap: the graph has no all-reduce to overlap; run "
                                  "tensor_parallel(world_size=N, rank=r) first (world_size > 1)")
        structure = graph.structure
        x0, axis = structure.blocks[0].input, structure.token_axis
        tokens = A.shape(x0)[axis]
        upper = _upper_bound(tokens)
        if upper < self.options.min_tokens:
            return PassResult(graph, refused=[("graph", f"at most {upper} tokens < min_tokens="
                                                        f"{self.options.min_tokens}: left unsplit")],
                              stats={"split": False})
        if not isinstance(tokens, torch.SymInt):
            raise PassOptionError(f"split_overlap: the token dim is static ({tokens}); capture with a dynamic "
                                  "token dim so each part's sizes can be re-derived")
        cores = []
        for block in structure.blocks:
            for a in block.attention:
                if a.core_kind != "sdpa":
                    raise PassOptionError(f"split_overlap: block {block.name} has an eager attention core; only "
                                          "scaled_dot_product_attention cores are supported")
                cores.append(a.core)
        fraction = balanced_fraction(structure, self.options.balance_tokens or self.options.min_tokens)
        fused = _fuse_reduces(g, structure, reduces)
        propagate(gm)
        plan = _Split(gm, x0, axis, tokens.node.expr, set(cores), fraction)
        plan.emit()
        g.eliminate_dead_code()
        propagate(gm)
        graph.invalidate()
        return PassResult(graph, matched=[b.name for b in structure.blocks],
                          stats={"split": True, "fraction": fraction / FRACTION_SCALE,
                                 "balanced_at": self.options.balance_tokens or self.options.min_tokens,
                                 "all_reduces": 2 * len(reduces), "fused_add_norm": 2 * fused})


# -- cost model --------------------------------------------------------------------------------------------
def token_costs(structure) -> tuple[float, float]:
    """``(L, a)``: one rank's FLOPs per token per model, ``L + a·(i + 1)`` for the token at position i."""
    linear, attention = 0.0, 0.0
    for block in structure.blocks:
        projections = list(block.mlp)
        for a in block.attention:
            attention += 4.0 * a.heads * a.head_dim
            projections += [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
        for p in projections:
            if p is not None:
                x, _ = A.linear_input_weight(p)
                linear += 2.0 * int(A.shape(x)[-1]) * int(A.shape(p)[-1])
    return linear, attention


def balanced_fraction(structure, tokens: int) -> int:
    """``f`` (of :data:`FRACTION_SCALE`) such that tokens ``[0, N·f/1024)`` cost what ``[N·f/1024, N)``
    cost at ``N = tokens`` under :func:`token_costs`."""
    linear, attention = token_costs(structure)

    def prefix(s: int) -> float:  # cost of tokens [0, s)
        return linear * s + attention * s * (s + 1) / 2

    total = prefix(tokens)
    s = min(range(1, tokens), key=lambda k: abs(2 * prefix(k) - total), default=1)
    return max(1, min(FRACTION_SCALE - 1, round(s * FRACTION_SCALE / tokens)))


def _upper_bound(tokens) -> int:
    if not isinstance(tokens, torch.SymInt):
        return int(tokens)
    bound = tokens.node.shape_env.bound_sympy(tokens.node.expr).upper
    return int(bound) if bound.is_finite else 1 << 62


# -- step 1: all_reduce + wait_tensor (+ add + norm) -> start, fused wait -------------------------------------
def _fuse_reduces(g: torch.fx.Graph, structure, reduces) -> int:
    """Each functional all-reduce becomes ``allreduce_start`` + a wait; where the wait feeds a
    residual add that a norm reads, the wait, the add and the norm become one
    ``allreduce_add_norm``. Returns how many were fused."""
    norm_of = {norm.input: norm for norm in structure.norms}
    fused = 0
    for reduce in reduces:
        partial, _, group = reduce.args[:3]
        (wait,) = list(reduce.users)
        with g.inserting_after(reduce):
            token = g.call_function(START, (partial, group))
        _copy_meta(token, wait)
        users = list(wait.users)
        add = users[0] if len(users) == 1 else None
        norm = norm_of.get(add)
        residual = None
        if norm is not None and add.target in A.ADD and not add.kwargs and len(add.args) == 2:
            residual = add.args[1] if add.args[0] is wait else add.args[0]
            if not (isinstance(residual, torch.fx.Node) and A.shape(residual) == A.shape(wait)
                    and A.val(residual).dtype == A.val(wait).dtype):
                residual = None
        if residual is None:
            with g.inserting_after(token):
                done = g.call_function(WAIT, (token, partial, []))
            _copy_meta(done, wait)
            wait.replace_all_uses_with(done)
        else:
            with g.inserting_after(add):
                node = g.call_function(FUSED, (token, partial, residual, norm.weight, norm.bias, norm.eps,
                                               norm.kind, []))
            with g.inserting_after(node):
                normed = g.call_function(operator.getitem, (node, 0))
                summed = g.call_function(operator.getitem, (node, 1))
            _copy_meta(node, norm.output)
            _copy_meta(normed, norm.output)
            _copy_meta(summed, add)
            norm.output.replace_all_uses_with(normed)
            add.replace_all_uses_with(summed, delete_user_cb=lambda u: u is not node)
            fused += 1
        if not wait.users:
            g.erase_node(wait)
    g.eliminate_dead_code()
    for reduce in reduces:  # functional collectives count as side effects: erase them by hand
        for u in list(reduce.users):
            if not u.users:
                g.erase_node(u)
        if not reduce.users:
            g.erase_node(reduce)
    leftover = [n for n in g.nodes if n.target in (ALL_REDUCE, WAIT_TENSOR)]
    if leftover:
        raise PassOptionError(f"split_overlap: all-reduce {leftover[0].name} is still read after the rewrite")
    return fused


def _copy_meta(new: torch.fx.Node, origin: torch.fx.Node) -> None:
    new.meta.update({k: v for k, v in origin.meta.items() if k != "val"})


# -- step 2: the two parts, interleaved ---------------------------------------------------------------------
class _Split:
    """Clone every node downstream of the first block's input once per part and emit the clones
    in the schedule ``(segment 0, A), (0, B), (1, A), (1, B) ...``: a segment is the compute
    between two all-reduces, so each part's start is followed by the other part's segment
    before its wait. Nodes not downstream of the first block's input (weights, the mask, the
    rotary tables, sizes) are shared, sliced per part where they have a token dim."""

    def __init__(self, gm, x0, axis: int, n_expr, cores: set, fraction: int):
        self.gm, self.g = gm, gm.graph
        self.x0, self.axis, self.n_expr, self.cores = x0, axis, n_expr, cores
        order = {n: i for i, n in enumerate(self.g.nodes)}
        region = set()
        for n in self.g.nodes:  # graph order is topological: downstream of x0 = reads a region node
            if n.op == "call_function" and any(a is x0 or a in region for a in n.all_input_nodes):
                region.add(n)
        self.region = sorted(region, key=order.get)
        self.output = next(n for n in self.g.nodes if n.op == "output")
        g = self.g
        with g.inserting_before(self.output):
            n_node = g.call_function(aten.sym_size.int, (x0, axis))
            s_node = g.call_function(operator.floordiv,
                                     (g.call_function(operator.mul, (n_node, fraction)), FRACTION_SCALE))
            rest = g.call_function(operator.sub, (n_node, s_node))
            self.bounds = {"A": (0, s_node), "B": (s_node, n_node)}
            self.count = {"A": s_node, "B": rest}
            self.sliced: dict = {}
            self.env = {p: {x0: self._slice(x0, p, [axis])} for p in PARTS}

    # where a shared value goes in a part
    def _slice(self, node, part, axes):
        key = (node, part, tuple(axes))
        if key not in self.sliced:
            value = node
            for axis in axes:
                lo, hi = self.bounds[part]
                value = self.g.call_function(aten.slice.Tensor, (value, axis, lo, hi))
            self.sliced[key] = value
        return self.sliced[key]

    def _token_axes(self, node) -> list[int]:
        shape = A.shape(node) or ()
        return [i for i, d in enumerate(shape) if isinstance(d, torch.SymInt) and d.node.expr == self.n_expr]

    def _shared(self, node, part, user):
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            free = sympy.sympify(val.node.expr).free_symbols
            if val.node.expr == self.n_expr:
                return self.count[part]
            if free & sympy.sympify(self.n_expr).free_symbols:
                raise PassOptionError(f"split_overlap: size {node.name} ({val.node.expr}) used by {user.name} "
                                      "depends on the token count but is not it; cannot re-derive it per part")
            return node
        if isinstance(val, torch.Tensor):
            axes = self._token_axes(node)
            if len(axes) > 1:
                raise PassOptionError(f"split_overlap: {user.name} reads {node.name} with {len(axes)} token dims "
                                      f"{tuple(val.shape)} outside an attention core; cannot slice it per part")
            return self._slice(node, part, axes) if axes else node
        return node

    def _map(self, node, part):
        def one(a):
            if a in self.env[part]:
                return self.env[part][a]
            if a in self.region:
                raise PassOptionError(f"split_overlap: {node.name} reads {a.name} before it is computed")
            return self._shared(a, part, node)

        return torch.fx.node.map_arg((node.args, node.kwargs), one)

    def _core(self, node, part):
        sd = A.sdpa_args(node)
        if sd["mask"] is None:
            raise PassOptionError(f"split_overlap: attention core {node.name} is causal without a mask; part B "
                                  "would need a bottom-right causal mask (capture with an attention_mask)")
        mask = sd["mask"]
        if mask in self.region:
            raise PassOptionError(f"split_overlap: attention core {node.name}'s mask is computed per block; "
                                  "only a mask shared by the blocks is supported")
        q, k, v = (self.env[part][sd[x]] for x in ("q", "k", "v"))
        rank = len(A.shape(mask))
        axes = self._token_axes(mask)
        rows = [a for a in axes if a == rank - 2]  # query rows (absent in a [B, 1, 1, N] padding mask)
        if part == "A":  # its own queries over its own keys (a later key is masked for it anyway)
            mask = self._slice(mask, "A", axes)
        else:  # part B: its query rows over every key, part A's included
            k = self.g.call_function(aten.cat.default, ([self.env["A"][sd["k"]], k], -2))
            v = self.g.call_function(aten.cat.default, ([self.env["A"][sd["v"]], v], -2))
            mask = self._slice(mask, "B", rows)
        kwargs = {k_: v_ for k_, v_ in node.kwargs.items() if k_ not in ("attn_mask", "is_causal")}
        return self.g.call_function(node.target, (q, k, v, mask), kwargs)

    def emit(self) -> None:
        segment = {}
        for n in self.region:
            seg = max((segment[a] for a in n.all_input_nodes if a in segment), default=0)
            segment[n] = seg + (1 if n.target in (WAIT, FUSED) else 0)
        order = sorted(self.region, key=lambda n: segment[n])  # stable: graph order within a segment
        last_start = {}
        g = self.g
        with g.inserting_before(self.output):
            for seg in sorted(set(segment.values())):
                for part in PARTS:
                    other = PARTS[1 - PARTS.index(part)]
                    for n in (m for m in order if segment[m] == seg):
                        if n in self.cores:
                            new = self._core(n, part)
                        else:
                            args, kwargs = self._map(n, part)
                            if n.target in (WAIT, FUSED) and other in last_start:
                                args = (*args[:-1], [last_start[other]])
                            new = g.call_function(n.target, args, kwargs)
                        new.meta.update({k: v for k, v in n.meta.items() if k != "val"})
                        new.meta["tokenfx_part"] = part
                        new._rename(f"{n.name}_{part.lower()}")
                        self.env[part][n] = new
                        if n.target is START:
                            last_start[part] = new
            outputs = self.output.args[0]
            self.output.args = (torch.fx.node.map_arg(outputs, self._joined),)
        for n in reversed(self.region):  # the unsplit originals: erased by hand, since DCE keeps custom ops
            if n.users:                  # (an unsplit start left behind would launch an extra all-reduce)
                raise PassOptionError(f"split_overlap: {n.name} is still read after the split "
                                      f"(by {next(iter(n.users)).name})")
            g.erase_node(n)

    def _joined(self, node):
        if node not in self.region:
            return node
        axes = self._token_axes(node)
        if len(axes) != 1:
            raise PassOptionError(f"split_overlap: output {node.name} has {len(axes)} token dims; cannot join "
                                  "the parts")
        return self.g.call_function(aten.cat.default, ([self.env["A"][node], self.env["B"][node]], axes[0]))
