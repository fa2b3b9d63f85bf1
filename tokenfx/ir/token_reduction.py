"""Reducing the token count inside blocks: the state ``token_merge`` and ``token_prune`` carry,
and the graph edits they share.

A reduction *step* sits in a block after the attention residual and before the MLP (ToMe §3),
on the value both the MLP and its residual read (pre-norm: the residual add; post-norm, BERT:
the norm after it). Beside the residual stream ``x [B, N, C]`` every step carries

    size   [B, N] f32   how many input tokens each token stands for (starts at 1)
    real   [B, N] bool  not padding (from the attention mask; all true without one)
    part   [B, N] bool  may take part in a reduction: real and not protected (CLS …)
    origin [B, N0] i64  where each *input* token went (its current index; N = "dropped"),
                        so ``unmerge`` can copy values back to the original positions
    bias   [B, 1, 1, N] the attention mask of every later block: the key-padding mask as an
                        additive float bias, plus ``log(size)`` (proportional attention)

and turns them into their ``N - r`` versions::

    role            = chosen by the pass (1 = A may be removed, 2 = B may receive)
    score, match    = tokenfx.bipartite_match(metric, role)
    assign, keep    = tokenfx.reduction_plan(score, match, role, real, r, True)
    x', size'       = tokenfx.merge_tokens(x, size, assign, r)          # merge
                      x[keep], scatter_add(size, assign)                  # prune
    real', part'    = real[keep], part[keep]
    origin'         = [assign, N - r][origin]

Every later block's attention reads ``bias'`` instead of the old mask (SDPA stays SDPA: the
bias is its float ``attn_mask``), and every later size argument follows the new count
(:func:`tokenfx.ir.shapes.rederive_token_sizes`). After the last step, a masked mean pooling
that reads the attention mask becomes size-weighted (the mask it reads becomes ``real ·
size``), a plain mean over tokens likewise, and ``unmerge`` copies each token's value back to
every input token it stands for. Steps record themselves in ``gm.meta`` (by node name, which
survives :meth:`ModelGraph.clone`), so a second pass (``token_prune(...),token_merge(...)``)
inserts its steps into the same chain: a new step takes the state in force where it sits,
and everything after it that read that state reads the new one.

Padding: pads never act as A or B (``part`` is false), so they never merge into real tokens
or receive one; a row with fewer candidates than r drops pads instead, so every row removes
exactly r and shapes stay uniform. Roles are computed over a row's participating tokens only
(merge alternates by rank among them, not by position), so a sample's result does not depend
on how much padding its batch has.
"""

from __future__ import annotations

import dataclasses
import fractions
import operator

import torch
import torch.fx

from tokenfx.codegen import token_reduce as _ops  # noqa: F401  (registers the tokenfx ops)
from tokenfx.errors import MappingError, PassOptionError
from tokenfx.ir import aten as A
from tokenfx.ir.rewrite import inherit_module_path
from tokenfx.ir.shapes import propagate, rederive_token_sizes

aten = torch.ops.aten
tfx = torch.ops.tokenfx
Node = torch.fx.Node
META = "tokenfx_token_reduction"
MASK_ADD = "tokenfx_attention_mask_add"  # on token_prune's eager attention: the add that applies the mask
_STATE = ("size", "real", "part", "origin", "bias")


@dataclasses.dataclass
class ReductionOptions:
    """The options of every pass that adds steps to the chain (``token_merge``, ``token_prune``
    extend it): what happens around the tokens a step removes."""

    proportional: bool = True  # add log(size) to later attention's keys (ToMe's proportional attention)
    protect: list[int] = dataclasses.field(default_factory=lambda: [0])  # positions that never take part (CLS)
    unmerge: bool = False  # copy reduced values back so outputs keep the input's N tokens


@dataclasses.dataclass
class State:
    size: Node
    real: Node
    part: Node
    origin: Node
    bias: Node | None  # None: the blocks still read the graph's own masks


@dataclasses.dataclass
class Step:
    block: int
    output: Node  # the reduced residual stream
    state: State
    r: int | Node
    kind: str


class Chain:
    """The reduction steps of one graph (read from and written back to ``gm.meta``)."""

    def __init__(self, graph, protect: tuple[int, ...] = (0,), unmerge: bool = False):
        self.graph = graph
        self.gm = graph.gm
        self.g = graph.gm.graph
        self.structure = graph.structure
        self.nodes = {n.name: n for n in self.g.nodes}
        record = self.gm.meta.get(META)
        self.unmerge_node = self.unmerge_start = None
        if record is None:
            _check_structure(self.structure)
            if graph.source == "aot" and isinstance(self.tokens(self.structure.blocks[0].input), int):
                raise PassOptionError("token reduction under torch.compile needs dynamic shapes (a static AOT graph "
                                      "names the token count inside products such as batch·tokens): use "
                                      "torch.compile(model, backend='tokenfx', dynamic=True, options=...)")
            self.mask_input = _mask_input(self.structure)
            self.initial = self._initial_state(protect)
            self.steps: list[Step] = []
            self.protect = tuple(protect)
            self.unmerge = unmerge
            # pooling reads the state from the start, so each step's rewiring keeps it current
            self.pooling = [] if unmerge else self._weighted_pooling(self.initial)
        else:
            get = lambda name: None if name is None else self.nodes[name]  # noqa: E731
            self.initial = State(*(get(record["initial"][k]) for k in _STATE))
            self.steps = [Step(s["block"], get(s["output"]), State(*(get(s["state"][k]) for k in _STATE)),
                               get(s["r"]) if isinstance(s["r"], str) else s["r"], s["kind"]) for s in record["steps"]]
            self.mask_input = get(record["mask_input"])
            self.unmerge_node = get(record.get("unmerge"))
            self.unmerge_start = get(record.get("unmerge_start"))
            self.protect = tuple(record["protect"])
            self.unmerge = record["unmerge_requested"]
            self.pooling = []
            if unmerge != self.unmerge:
                raise PassOptionError(f"unmerge={unmerge} differs from the earlier reduction pass's unmerge="
                                      f"{self.unmerge}; give every token reduction pass the same unmerge")
            if tuple(protect) != self.protect:
                raise PassOptionError(f"protect={list(protect)} differs from the earlier reduction pass's "
                                      f"{list(self.protect)}; give every token reduction pass the same protect")

    # -- where steps go ------------------------------------------------------------------------------
    def merge_point(self, index: int) -> Node:
        """The value after block ``index``'s attention residual that the MLP and its residual read."""
        block = self.structure.blocks[index]
        if len(block.residual_adds) < 2:
            raise MappingError(f"block {block.name}: expected an attention and an MLP residual add, found "
                               f"{len(block.residual_adds)}")
        add = block.residual_adds[0]
        if block.norm_placement == "post":
            after = [n for n in block.norms if n.input is add]
            if not after:
                raise MappingError(f"block {block.name}: post-norm block without a norm after its attention residual")
            return after[0].output
        return add

    def state_at(self, index: int) -> tuple[State, Node]:
        """The state in force at block ``index``'s merge point, and the stream value there."""
        before = [s for s in self.steps if s.block <= index]
        if not before:
            return self.initial, self.merge_point(index)
        last = before[-1]
        return last.state, (last.output if last.block == index else self.merge_point(index))

    def tokens(self, x: Node):
        return A.val(x).shape[1]

    # -- the step ------------------------------------------------------------------------------------
    def insert(self, index: int, r, kind: str, roles, metric, proportional: bool, quota=None,
               reads_attention: bool = False) -> Step:
        """Insert a step at block ``index``. ``roles(x, state) -> role node`` and ``metric(x) ->
        metric node`` build the pass's own choice (called with the insertion point set);
        ``reads_attention``: they read the block's attention (keys, probabilities)."""
        state, x = self.state_at(index)
        if reads_attention and any(s.block == index for s in self.steps):
            raise PassOptionError(
                f"block {self.structure.blocks[index].name} already has a reduction step; a second step in the same "
                f"block sees the tokens after it, but the block's attention (keys, PageRank) saw those before: reduce "
                f"in different blocks, or use token_merge(metric='hidden') for the second step")
        g = self.g
        n_before = self.tokens(x)
        hint = getattr(getattr(n_before, "node", None), "hint", None)
        if isinstance(r, int) and isinstance(hint, int) and hint - r < 2:
            # shapes are re-derived at the capture example; a count of 0 or 1 there would be specialised
            raise PassOptionError(f"block {self.structure.blocks[index].name} removes {r} of the {hint} tokens the "
                                  f"capture example has left there; capture with a longer example (at least as long "
                                  f"as the inputs the schedule is meant for)")
        existing = set(g.nodes)
        with g.inserting_before(x.next):
            if callable(r):  # a count computed from the tokens reaching the step (keep ratios)
                r = r(x)
            role = roles(x, state)
            limit = quota(x, state) if quota is not None else None
            score_match = g.call_function(tfx.bipartite_match.default, (metric(x), role))
            score = g.call_function(operator.getitem, (score_match, 0))
            match = g.call_function(operator.getitem, (score_match, 1))
            plan = g.call_function(tfx.reduction_plan.default, (score, match, role, state.real, r, True, limit))
            assign = g.call_function(operator.getitem, (plan, 0))
            keep = g.call_function(operator.getitem, (plan, 1))
            kept = g.call_function(aten.sym_size.int, (keep, 1))
            batch = g.call_function(aten.sym_size.int, (x, 0))
            if kind == "merge":
                merged = g.call_function(tfx.merge_tokens.default, (x, state.size, assign, r))
                size = g.call_function(operator.getitem, (merged, 1))
            else:  # prune: survivors keep their values; each partner now also stands for what it absorbed
                slots = g.call_function(operator.add, (kept, 1))
                zeros = g.call_function(aten.new_zeros.default, (state.size, [batch, slots]))
                summed = g.call_function(aten.scatter_add.default, (zeros, 1, assign, state.size))
                size = g.call_function(aten.slice.Tensor, (summed, 1, 0, kept))
            real = g.call_function(aten.gather.default, (state.real, 1, keep))
            part = g.call_function(aten.gather.default, (state.part, 1, keep))
            trash = g.call_function(aten.new_full.default, (assign, [batch, 1], kept))
            route = g.call_function(aten.cat.default, ([assign, trash], 1))
            origin = g.call_function(aten.gather.default, (route, 1, state.origin))
            bias = self._bias(real, size, proportional, A.val(x).dtype)
            # the reduced stream comes last, so re-deriving sizes "after it" leaves the step's
            # own count arithmetic (slice ends, the discard index) alone
            if kind == "merge":
                out = g.call_function(operator.getitem, (merged, 0))
            else:
                width = g.call_function(aten.sym_size.int, (x, 2))
                index3 = g.call_function(aten.expand.default, (g.call_function(aten.unsqueeze.default, (keep, -1)),
                                                                [batch, kept, width]))
                out = g.call_function(aten.gather.default, (x, 1, index3))
        new_nodes = set(g.nodes) - existing
        inherit_module_path(new_nodes, x)
        order = {n: i for i, n in enumerate(g.nodes)}
        end = order[out]
        # everything after the step reads the new stream and the new state
        for user in list(x.users):
            if user not in new_nodes:
                user.replace_input_with(x, out)
        new_state = State(size, real, part, origin, bias)
        for node in _fields(new_state):
            node.meta["tokenfx_keep"] = True  # a later reduction pass may continue from here
        for old, new in zip(_fields(state), _fields(new_state)):
            if old is None:
                continue
            for user in list(old.users):
                if user not in new_nodes and order[user] > end:
                    user.replace_input_with(old, new)
        if state.bias is None:  # no step before this one: later blocks stop reading the graph's own masks,
            # up to the block of the next existing step (its own bias serves the blocks after it)
            following = [s.block for s in self.steps if s.block > index]
            stop = following[0] + 1 if following else len(self.structure.blocks)
            for later in self.structure.blocks[index + 1:stop]:
                for att in later.attention:
                    _set_attention_mask(att.core, bias)
        _fake_values(self.gm, new_nodes)
        # an unmerge (from an earlier pass) restores the input's count: sizes after it stay
        rederive_token_sizes(self.gm, out, token_axis=1, old_tokens=n_before, until=self.unmerge_start)
        propagate(self.gm)
        step = Step(index, out, new_state, r, kind)
        position = len([s for s in self.steps if s.block <= index])
        self.steps.insert(position, step)
        for later in self.steps[position + 1:]:  # steps of an earlier pass now see fewer tokens
            n_later = self.tokens(later.output)
            if isinstance(n_later, int) and n_later < 2:
                raise PassOptionError(f"with this pass's step in block {self.structure.blocks[index].name}, the "
                                      f"earlier pass's step in block {self.structure.blocks[later.block].name} "
                                      f"would leave {n_later} tokens; lower one of the schedules")
        return step

    def _bias(self, real: Node, size: Node, proportional: bool, dtype) -> Node:
        g = self.g
        if proportional:
            value = g.call_function(aten.log.default, (size,))
        else:
            value = g.call_function(aten.zeros_like.default, (size,))
        low = torch.finfo(dtype).min if dtype.is_floating_point else torch.finfo(torch.float32).min
        bias = g.call_function(aten.where.ScalarOther, (real, value, low))
        bias = g.call_function(aten._to_copy.default, (bias,), {"dtype": dtype})
        bias = g.call_function(aten.unsqueeze.default, (bias, 1))
        return g.call_function(aten.unsqueeze.default, (bias, 1))

    def _initial_state(self, protect) -> State:
        g = self.g
        x = self.structure.blocks[0].input
        n0 = self.tokens(x)
        if isinstance(n0, int):
            bad = [p for p in protect if not -n0 <= p < n0]
        else:
            bad = [p for p in protect if p < 0]
        if bad:
            raise PassOptionError(f"protect={list(protect)}: position {bad[0]} is outside the {n0} input tokens")
        existing = set(g.nodes)
        with g.inserting_before(x.next):
            first = g.call_function(aten.select.int, (x, 2, 0))  # [B, N]
            if self.mask_input is not None:
                real = g.call_function(aten.ne.Scalar, (self.mask_input, 0))
            else:
                real = g.call_function(aten.ones_like.default, (first,), {"dtype": torch.bool})
            tokens = g.call_function(aten.sym_size.int, (x, 1))
            positions = g.call_function(aten.arange.default, (tokens,), {"device": A.val(x).device})
            protected = None
            for p in protect:
                at = p if p >= 0 else g.call_function(operator.add, (tokens, p))
                hit = g.call_function(aten.eq.Scalar, (positions, at))
                protected = hit if protected is None else g.call_function(aten.logical_or.default, (protected, hit))
            part = real if protected is None else g.call_function(
                aten.logical_and.default, (real, g.call_function(aten.logical_not.default, (protected,))))
            size = g.call_function(aten.ones_like.default, (first,), {"dtype": torch.float32})
            origin = g.call_function(aten.expand.default, (positions, [g.call_function(aten.sym_size.int, (x, 0)), tokens]))
            origin = g.call_function(aten.clone.default, (origin,))
        inherit_module_path(set(g.nodes) - existing, x)
        _fake_values(self.gm, set(g.nodes) - existing)
        for node in (size, real, part, origin):
            node.meta["tokenfx_keep"] = True
        return State(size, real, part, origin, None)

    # -- after the last block ------------------------------------------------------------------------
    def finish(self) -> list[str]:
        """Unmerge, or make pooling size-weighted; refuse per-token outputs that changed length.
        Returns what it did (for the pass's ``matched``)."""
        done = []
        g = self.g
        final = self.steps[-1].state if self.steps else self.initial
        last_output = self.structure.blocks[-1].output
        if self.unmerge and self.unmerge_node is None and self.steps:
            call = g.call_function
            n_now = self.tokens(last_output)
            existing = set(g.nodes)
            with g.inserting_before(last_output.next):
                batch = call(aten.sym_size.int, (last_output, 0))
                self.unmerge_start = batch
                channels = call(aten.sym_size.int, (last_output, 2))
                zero = call(aten.new_zeros.default, (last_output, [batch, 1, channels]))
                padded = call(aten.cat.default, ([last_output, zero], 1))
                n0 = call(aten.sym_size.int, (final.origin, 1))
                index = call(aten.expand.default, (call(aten.unsqueeze.default, (final.origin, -1)), [batch, n0, channels]))
                out = call(aten.gather.default, (padded, 1, index))
            new_nodes = set(g.nodes) - existing
            inherit_module_path(new_nodes, last_output)
            for user in list(last_output.users):
                if user not in new_nodes:
                    user.replace_input_with(last_output, out)
            _fake_values(self.gm, new_nodes)
            rederive_token_sizes(self.gm, out, token_axis=1, old_tokens=n_now)
            propagate(self.gm)
            self.unmerge_node = out
            done.append("unmerge after the last block")
        done += self.pooling
        if self.unmerge_node is None and self.steps:
            self._refuse_token_outputs()
        self._contiguous_reshapes()
        self._raise_token_minimum()
        self.save()
        return done

    def _weighted_pooling(self, final: State) -> list[str]:
        """Uses of the attention mask, and means over tokens, after the last block: weighted by size."""
        g = self.g
        done = []
        order = {n: i for i, n in enumerate(g.nodes)}
        end = order[self.structure.blocks[-1].output]
        if self.mask_input is not None:
            late = [u for u in self.mask_input.users if order[u] > end and u not in _state_nodes(self)]
            if late:
                with g.inserting_before(min(late, key=order.get)):
                    weight = g.call_function(aten.mul.Tensor, (final.real, final.size))
                    mask_dtype = A.val(self.mask_input).dtype
                    # a bool mask would lose the sizes: hand the pooling a float weight instead
                    weight = g.call_function(aten._to_copy.default, (weight,), {
                        "dtype": torch.float32 if mask_dtype == torch.bool else mask_dtype})
                for user in late:
                    user.replace_input_with(self.mask_input, weight)
                done.append("mask-weighted pooling → size-weighted (" + ", ".join(u.name for u in late) + ")")
        means = [n for n in g.nodes if n.op == "call_function" and n.target is aten.mean.dim and order.get(n, 0) > end
                 and _token_dims(n) == [1]]
        for mean in means:
            x = mean.args[0]
            keepdim = bool(mean.args[2]) if len(mean.args) > 2 else bool(mean.kwargs.get("keepdim", False))
            with g.inserting_before(mean):
                w = g.call_function(aten.mul.Tensor, (final.size, g.call_function(aten._to_copy.default, (final.real,),
                                                                                   {"dtype": torch.float32})))
                w = g.call_function(aten.unsqueeze.default, (w, -1))
                w = g.call_function(aten._to_copy.default, (w,), {"dtype": A.val(x).dtype})
                num = g.call_function(aten.sum.dim_IntList, (g.call_function(aten.mul.Tensor, (x, w)), [1], keepdim))
                den = g.call_function(aten.sum.dim_IntList, (w, [1], keepdim))
                out = g.call_function(aten.div.Tensor, (num, den))
            mean.replace_all_uses_with(out)
            g.erase_node(mean)
            done.append(f"mean over tokens → size-weighted ({out.name})")
        if done:
            propagate(self.gm)
        return done

    def _refuse_token_outputs(self) -> None:
        reduced = self.tokens(self.steps[-1].output)
        original = self.tokens(self.structure.blocks[0].input)
        if _same(reduced, original):
            return
        output = next(n for n in self.g.nodes if n.op == "output")
        for leaf in torch.utils._pytree.tree_leaves(output.args):
            if isinstance(leaf, Node) and isinstance(A.val(leaf), torch.Tensor):
                if any(_same(d, reduced) for d in A.val(leaf).shape):
                    raise PassOptionError(
                        f"output {leaf.name} {tuple(A.val(leaf).shape)} is per token; reducing tokens would change its "
                        f"length: pass unmerge=True for per-token outputs, or capture a pooled model "
                        f"(e.g. tokenfx.frontends.hf.SentenceEmbedder)")

    def _contiguous_reshapes(self) -> None:
        """Copy explicitly before each ``reshape`` of a non-contiguous tensor after the first step.

        The reshape copies anyway; but with a reduced count ``N - r`` its strides read
        ``Max(1, N - r)`` (sympy cannot prove ``N - r ≥ 1``) and the ONNX exporter's reshape
        decomposition then refuses to decide between view and copy."""
        if not self.steps:
            return
        order = {n: i for i, n in enumerate(self.g.nodes)}
        start = min(order[s.output] for s in self.steps)
        for node in list(self.g.nodes):
            if node.op != "call_function" or node.target is not aten.reshape.default or order[node] < start:
                continue
            value = A.val(node.args[0])
            try:
                contiguous = value is None or bool(value.is_contiguous())
            except Exception:  # undecidable symbolic strides: leave the reshape as it is
                contiguous = True
            if not contiguous:
                with self.g.inserting_before(node):
                    copy = self.g.call_function(aten.clone.default, (node.args[0],),
                                                {"memory_format": torch.contiguous_format})
                copy.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
                node.update_arg(0, copy)
        propagate(self.gm)

    def _raise_token_minimum(self) -> None:
        """A re-export (ONNX, .pt2) needs every reduced count to stay ≥ 2 over the token dim's
        range (torch.export specialises sizes 0 and 1): raise the dim's minimum to match."""
        spec = self.graph.dynamic_shapes
        removed = sum(s.r for s in self.steps if isinstance(s.r, int))
        if any(not isinstance(s.r, int) for s in self.steps):  # ratio / keep counts leave ≥ half: 4 keeps ≥ 2
            removed = max(removed, 2)
        if spec is None or not removed:
            return
        replaced = {}

        def fix(dim):
            name = getattr(dim, "__name__", "")
            if name != "tokens":
                return dim
            if id(dim) not in replaced:
                low = max(getattr(dim, "min", 0) or 0, removed + 2)
                high = getattr(dim, "max", None)
                replaced[id(dim)] = torch.export.Dim("tokens", min=low, max=high) if high else \
                    torch.export.Dim("tokens", min=low)
            return replaced[id(dim)]

        def walk(value):
            if isinstance(value, dict):
                return {k: walk(v) if isinstance(v, (dict, list, tuple)) else fix(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(walk(v) for v in value)
            return value

        self.graph.dynamic_shapes = walk(spec)

    def save(self) -> None:
        name = lambda n: None if n is None else n.name  # noqa: E731
        self.gm.meta[META] = {
            "initial": {k: name(getattr(self.initial, k)) for k in _STATE},
            "steps": [{"block": s.block, "output": s.output.name, "kind": s.kind,
                       "r": s.r.name if isinstance(s.r, Node) else s.r,
                       "state": {k: name(getattr(s.state, k)) for k in _STATE}} for s in self.steps],
            "mask_input": name(self.mask_input), "unmerge": name(self.unmerge_node), "protect": list(self.protect),
            "unmerge_requested": self.unmerge, "unmerge_start": name(self.unmerge_start),
        }
        self.g.lint()
        self.gm.recompile()
        self.graph._structure = None  # blocks now hold reduction nodes: recover the map afresh


# -- helpers ----------------------------------------------------------------------------------------
def participating_parity(g: torch.fx.Graph, part: Node) -> Node:
    """Merge roles: alternate A, B over a row's participating tokens by their rank among them."""
    rank = g.call_function(aten.cumsum.default, (part, 1))
    odd = g.call_function(aten.remainder.Scalar, (g.call_function(aten.sub.Tensor, (rank, 1)), 2))
    role = g.call_function(aten.add.Tensor, (odd, 1))
    return g.call_function(aten.where.ScalarOther, (part, role, 0))


def ratio_count(g: torch.fx.Graph, x: Node, *, ratio: float, protected: int):
    """``floor(ratio · (N - protected))``: the tokens a ratio step removes from the batch shape
    (a graph value when N is symbolic)."""
    n = A.val(x).shape[1]
    frac = fractions.Fraction(ratio).limit_denominator(1000)
    if isinstance(n, int):
        return max(n - protected, 0) * frac.numerator // frac.denominator
    tokens = g.call_function(aten.sym_size.int, (x, 1))
    usable = g.call_function(operator.sub, (tokens, protected))
    return g.call_function(operator.floordiv, (g.call_function(operator.mul, (usable, frac.numerator)), frac.denominator))


def ratio_quota(g: torch.fx.Graph, part: Node, ratio: float) -> Node:
    """``floor(ratio · U_b)`` per row: each sample merges its own share of its participating tokens."""
    frac = fractions.Fraction(ratio).limit_denominator(1000)
    count = g.call_function(aten.sum.dim_IntList, (part, [1]))
    scaled = g.call_function(aten.mul.Tensor, (count, frac.numerator))
    return g.call_function(aten.div.Tensor_mode, (scaled, frac.denominator), {"rounding_mode": "floor"})


def keys_metric(g: torch.fx.Graph, attention) -> Node:
    """ToMe's metric: the block's keys averaged over heads, ``[B, N, D]``."""
    return g.call_function(aten.mean.dim, (attention.k, [1]))


def schedule(r, num_blocks: int, inflect: float = 0.0, name: str = "r") -> list[int]:
    """Per-block removals: an int for every block, an explicit list, or a ramp around r.

    With ``inflect`` ≠ 0 an int r becomes a linear ramp with the same total, from
    ``r·(1 - inflect)`` in the first block to ``r·(1 + inflect)`` in the last (inflect > 0
    removes more late, where merging costs less fidelity)."""
    if isinstance(r, (list, tuple)):
        if len(r) != num_blocks:
            raise PassOptionError(f"{name}={list(r)} has {len(r)} entries; the model has {num_blocks} blocks")
        values = [int(v) for v in r]
    else:
        if not -1.0 <= inflect <= 1.0:
            raise PassOptionError(f"inflect={inflect} must be in [-1, 1]")
        if num_blocks == 1 or inflect == 0.0:
            values = [int(r)] * num_blocks
        else:
            values = [int(round(r * (1 - inflect + 2 * inflect * i / (num_blocks - 1)))) for i in range(num_blocks)]
    if any(v < 0 for v in values):
        raise PassOptionError(f"{name}={values}: a block cannot remove a negative number of tokens")
    return values


def check_cap(chain: Chain, index: int, r: int, clamp: bool = False) -> int:
    """ToMe's cap: a step removes at most half of the tokens that can take part. With a static
    token count an over-large r is clamped (``clamp``, ToMe's behaviour for a constant r) or
    refused (an explicit per-block count); a dynamic count is checked when the graph runs."""
    _, x = chain.state_at(index)
    n = chain.tokens(x)
    if isinstance(n, int):
        cap = max((n - len(chain.protect)) // 2, 0)
        if r > cap:
            if clamp:
                return cap
            raise PassOptionError(f"r={r} at block {chain.structure.blocks[index].name}: only {n} tokens reach it "
                                  f"({len(chain.protect)} protected), so r may be at most {cap}")
    return r


def _check_structure(structure) -> None:
    for block in structure.blocks:
        for att in block.attention:
            if att.causal:
                raise MappingError(f"token reduction needs bidirectional attention; block {block.name} is causal "
                                   f"(a decoder's tokens cannot be merged without breaking its cache)")
            if att.core_kind != "sdpa":
                raise MappingError(f"block {block.name}: token reduction feeds SDPA a float mask; this attention core "
                                   f"is {att.core_kind} (capture with attn_implementation='sdpa')")


def _mask_input(structure) -> Node | None:
    """The ``[B, N]`` graph input the attention masks come from (the attention mask), if any."""
    masks = [att.mask for b in structure.blocks for att in b.attention if att.mask is not None]
    if not masks:
        return None
    inputs = {n for n in A.ancestors(masks[0]) if n.op == "placeholder" and A.shape(n) is not None and len(A.shape(n)) == 2}
    if not inputs:  # made from shapes alone (ViT's all-true mask): no padding
        return None
    if len(inputs) != 1:
        raise MappingError("token reduction: cannot tell which input the attention mask comes from "
                           f"({sorted(n.name for n in inputs) or 'none'}); expected one [batch, tokens] mask input")
    return inputs.pop()


def _set_attention_mask(core: Node, bias: Node) -> None:
    if MASK_ADD in core.meta:  # token_prune's softmax(q kᵀ + mask) v: replace the added mask
        add = next((n for n in core.graph.nodes if n.name == core.meta[MASK_ADD]), None)
        if add is not None:
            add.update_arg(1, bias)
            return
    schema = getattr(core.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    key = "attn_mask" if "attn_mask" in names else None
    if key is None:
        raise MappingError(f"{core.name}: attention core {core.target} takes no attn_mask")
    position = names.index(key)
    if position < len(core.args) and not schema.arguments[position].kwarg_only:
        core.update_arg(position, bias)
    else:
        core.update_kwarg(key, bias)


def _token_dims(mean: Node) -> list[int]:
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    rank = len(A.shape(mean.args[0]) or ())
    return sorted(d % rank for d in dims) if dims and rank else []


def _state_nodes(chain: Chain) -> set:
    return {n for n in _fields(chain.initial) if n is not None}


def _fake_values(gm: torch.fx.GraphModule, nodes) -> None:
    """Fill ``meta['val']`` of freshly inserted ``nodes`` (in graph order) from their inputs'
    fake values, before the rest of the graph agrees with them again."""
    from torch._guards import detect_fake_mode

    placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in placeholders if isinstance(v, torch.Tensor)])
    fetch = lambda a: a.meta.get("val") if isinstance(a, Node) else a  # noqa: E731
    with mode:
        for node in gm.graph.nodes:
            if node in nodes:
                args = torch.fx.node.map_aggregate(node.args, fetch)
                kwargs = torch.fx.node.map_aggregate(node.kwargs, fetch)
                node.meta["val"] = node.target(*args, **kwargs)


def _fields(state: State) -> tuple:
    return tuple(getattr(state, k) for k in _STATE)


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # symbolic comparisons that cannot be decided
        return False
