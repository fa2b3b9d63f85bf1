"""``tensor_parallel``: one rank's shard of a transformer, Megatron-style, with functional
all-reduces so the result is still an ordinary exportable graph.

Contract: exact (each rank computes a slice of every block; the all-reduce sums the
slices, so only the reduction order differs from the single-rank graph).

Before (one block, ``H`` heads, ``KV`` kv-heads, head dim ``D``, MLP width ``I``)::

    q = linear(x, Wq[H·D, C]) ; k = linear(x, Wk[KV·D, C]) ; v = ...
    a = sdpa(view(q, [B, N, -1, D]) ..., repeat(k, H/KV) ...)       # [B, H, N, D]
    h = x + linear(reshape(a, [B, N, H·D]), Wo[C, H·D])
    h = h + linear(silu(linear(n, Wg[I, C])) * linear(n, Wu[I, C]), Wd[C, I])

After, for rank ``r`` of ``W`` (``H' = H/W`` heads, ``KV'`` kv-heads, ``I' = I/W``)::

    q = linear(x, Wq[r·H'·D : (r+1)·H'·D]) ; k = linear(x, Wk[its kv-heads]) ; ...
    a = sdpa(..., repeat(k, H'/KV') ...)                              # [B, H', N, D]
    o = wait_tensor(all_reduce(linear(reshape(a, [B, N, H'·D]), Wo[:, r·H'·D : ...]), "sum"))
    h = x + (o + bo)                                                  # bias after the sum
    h = h + wait_tensor(all_reduce(linear(silu(...) * ..., Wd[:, r·I' : (r+1)·I']), "sum"))

With ``vocab_parallel=True`` the LM head (vocabulary ``V``, ``V' = V/W``) is vocab-parallel too::

    Before:  logits = linear(h, Wh[V, C], bh)                                    # [B, N, V]
    After:   part = linear(h, Wh[r·V' : (r+1)·V'], bh[r·V' : (r+1)·V'])          # [B, N, V']
             g = wait_tensor(all_gather_into_tensor(part, W, group))             # [W·B, N, V']
             logits = flatten(movedim(unflatten(g, 0, [W, -1]), 0, -2), -2, -1)  # [B, N, V]

Every rank ends with the full logits, each vocabulary row computed by one rank only (the
same dot products as the single-rank graph: exact, no reduction). A tied head gets its own
row slice as a new parameter; the embedding lookup keeps the full (replicated) table.

How, from the ModelMap (no model-family cases):

1. per block, q/k/v and the MLP's input projections are column-parallel (rows of the weight,
   and of the bias), o and the MLP's output projection row-parallel (columns) followed by
   ``_c10d_functional.all_reduce`` + ``wait_tensor`` on the default (world) group; a row
   projection's bias is added once, after the sum;
2. GQA: rank ``r`` owns q heads ``[r·H', (r+1)·H')``; q head ``h`` reads kv head
   ``h // (H/KV)``, so with ``KV >= W`` the rank owns ``KV/W`` kv-heads, and with ``KV < W``
   the ``W/KV`` ranks sharing a kv-head each hold a replica of it;
3. sizes: the sliced weights change the width of every tensor between the projections;
   fake tensors are re-propagated and each ``view`` / ``reshape`` / ``expand`` /
   ``repeat_interleave`` on the way gets sizes re-derived from its input's new size (the head
   factor of a split width shrinks; a GQA repeat of ``H/KV`` becomes ``H'/KV'``), so no
   literal is assumed to mean "heads" by family;
4. the rank's graph holds only what it reads: its shards, the replicated embedding, norms and
   head (the caller's model and graph are not changed);
5. ``kv_cache`` graphs (prefill, decode, and ``tree_verify`` graphs built on decode): the
   ``kv_cache`` input ``[L, 2, B, Hkv, S, D]`` and the ``new_kv`` output become the rank's
   ``[L, 2, B, Hkv', S, D]`` (``Hkv' = max(1, KV/W)``: its kv-heads, or its replica), the
   KVLayout says ``H'`` heads and ``Hkv'`` kv-heads, so a runtime sized from the layout holds
   the rank's heads only. Attention there reads K/V from the cache, so the ModelMap finds no K/V
   projections behind the core; they are the q projection's two siblings (same input) with
   ``KV·D`` outputs, sliced alike.
6. fused QKV projections (GPT-2's ``c_attn``: HF Conv1D, ``addmm(b, x, W[C, (H+2·KV)·D])``,
   its output cut into q | k | v by ``split`` / ``split_with_sizes`` / last-dim ``slice``s):
   the rank's weight is its q heads' columns, then its kv-heads' columns of k and of v,
   concatenated (``[C, (H'+2·KV')·D]``, bias alike), and the cut gets the local widths. The
   part feeding the core's q is q; the other two are k and v (sliced alike, so which is which
   does not matter, also in a kv_cache graph whose K/V come from the cache). Weight layout
   (``linear``'s ``[out, in]`` vs ``addmm`` / ``mm``'s ``[in, out]``) is read from the op, so
   Conv1D's ``c_fc`` / ``c_proj`` are column / row parallel like any projection.
7. ``vocab_parallel``: the ModelMap's head is a column shard of its vocabulary rows (as q's
   rows are); the all-gather stacks the ranks' ``[B, ..., V']`` parts along dim 0 (all the
   functional collective gathers along), and ``unflatten`` / ``movedim`` / ``flatten`` put the
   rank axis next to the vocabulary axis so the parts concatenate along it in rank order. Sizes
   are never literals, so dynamic batch and sequence dims stay dynamic.

Refused with one :class:`PassOptionError` naming the block and counts: heads, kv-heads
(when neither ``KV % W`` nor ``W % KV`` is 0) or MLP width not divisible by the world size;
a fused projection not cut into one q part and two k/v parts of the head widths, or two of
q, k, v sharing a projection whose output is not cut; MLPs that are not "input projections →
one output projection"; a kv graph sharded already; with ``vocab_parallel``, a graph without
a head or a vocabulary not divisible by the world size (the error names the head).

The pass mutates the graph it is handed (a clone: ``Pass.run`` and the PassManager make it).
It does not need a process group to rewrite; running the result needs one of ``world_size``
ranks (gloo or NCCL) whose default group is the world.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import torch
import torch.fx

from tokenfx.errors import PassOptionError
from tokenfx.ir import aten as A
from tokenfx.ir.rewrite import inherit_module_path
from tokenfx.ir.shapes import propagate
from tokenfx.passes.base import Pass, PassResult, register

aten = torch.ops.aten
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
ALL_GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
_RESHAPES = A._ops("view", "_unsafe_view", "reshape")
_REPEATS = A._ops("expand", "repeat_interleave.self_int")


@dataclasses.dataclass
class _Shard:
    """One projection's slice: ``parallel`` is "column" (output rows ``lo:hi``) or "row"
    (input columns ``lo:hi``). A fused QKV projection keeps several output ranges (its q, k
    and v heads), concatenated in order: ``more`` holds the ranges after the first."""

    node: torch.fx.Node
    parallel: str
    lo: int
    hi: int
    more: tuple[tuple[int, int], ...] = ()

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        return ((self.lo, self.hi),) + self.more


@register
class TensorParallel(Pass):
    """Shard every block's attention (by heads) and MLP (by width) for one rank (exact)."""

    name = "tensor_parallel"
    contract = "exact"

    @dataclasses.dataclass
    class Options:
        world_size: int = 2
        rank: int = 0
        vocab_parallel: bool = False  # the head computes the rank's vocabulary rows; logits all-gathered

        def __post_init__(self):
            if self.world_size < 1:
                raise ValueError(f"world_size must be at least 1, got {self.world_size}")
            if not 0 <= self.rank < self.world_size:
                raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    def rewrite(self, graph):
        """Shard ``graph`` itself (the clone :meth:`Pass.run` or the PassManager hands it)."""
        world, rank = self.options.world_size, self.options.rank
        structure = graph.structure
        shards: list[_Shard] = []
        repeats: dict[torch.fx.Node, tuple[int, int]] = {}  # GQA repeat node -> (old factor, new factor)
        resplits: dict[torch.fx.Node, tuple] = {}  # a fused QKV output's split / slice -> its rank-local args
        for block in structure.blocks:
            attention = _attention_shards(block, world, rank, repeats, resplits)
            shards += attention + _mlp_shards(block, world, rank, {s.node for s in attention})
        head = _head_shard(structure, world, rank) if self.options.vocab_parallel else None
        stats = {"world_size": world, "rank": rank, "blocks": len(structure.blocks),
                 "vocab_parallel": self.options.vocab_parallel}
        if world == 1:
            return PassResult(graph, matched=[], stats=stats)

        gm, g = graph.gm, graph.gm.graph
        old_shapes = {n: A.shape(n) for n in g.nodes}
        cache_input = _shrink_cache_input(graph, world, rank) if graph.kv is not None else None
        all_reduces = 0
        for node, (target, args) in resplits.items():
            node.target, node.args, node.kwargs = target, args, {}
        for shard in shards:
            _slice_weight(gm, shard)
            if shard.parallel == "row":
                _reduce_after(gm, shard.node, _group_name())
                all_reduces += 1
        if head is not None:
            _slice_weight(gm, head)
            _gather_after(gm, head.node, world, _group_name())
        try:
            propagate(gm, before_node=lambda n, env: _rederive_sizes(n, env, old_shapes, repeats))
        except PassOptionError:
            raise
        except Exception as exc:  # a size this pass could not re-derive: name where, not the fake-tensor trace
            raise PassOptionError(f"tensor_parallel: cannot re-derive the graph's sizes for {world} ranks "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
        _rehome(graph)
        if graph.kv is not None:
            _shard_layout(graph, world, cache_input)
        graph.invalidate()
        stats.update(all_reduces=all_reduces, all_gathers=int(head is not None),
                     sharded_projections=len(shards) + int(head is not None))
        return PassResult(graph, matched=[b.name for b in structure.blocks], stats=stats)


# -- plan --------------------------------------------------------------------------------------------
def _attention_shards(block, world: int, rank: int, repeats: dict, resplits: dict) -> list[_Shard]:
    if len(block.attention) != 1:
        raise PassOptionError(f"tensor_parallel: block {block.name} has {len(block.attention)} attention cores; "
                              "only one per block is supported")
    a = block.attention[0]
    heads, kv_heads, d = a.heads, a.kv_heads, a.head_dim
    split = _output_split(a.q_proj) if a.q_proj is not None else None
    fused = split is not None and a.k_proj in (None, a.q_proj) and a.v_proj in (None, a.q_proj)
    if fused:  # in a kv_cache graph the ModelMap's walk from K/V ends at the cache: k_proj / v_proj are None
        a = dataclasses.replace(a, k_proj=a.q_proj, v_proj=a.q_proj)
    elif a.q_proj is not None and (a.k_proj is None or a.v_proj is None):
        a = _with_cached_kv_projections(block, a)
    projections = (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
    if any(p is None for p in projections):
        raise PassOptionError(f"tensor_parallel: block {block.name}: attention projections not all found "
                              "(q, k, v, o)")
    if not fused and (a.q_proj is a.k_proj or a.k_proj is a.v_proj or a.q_proj is a.v_proj):
        raise PassOptionError(f"tensor_parallel: block {block.name} computes two of q, k, v with one projection "
                              f"({a.k_proj.name}) whose output is not split along its last dim into q, k and v parts")
    if heads % world:
        raise PassOptionError(f"tensor_parallel: block {block.name} has {heads} attention heads, not divisible "
                              f"by world_size={world}")
    if kv_heads % world and world % kv_heads:
        raise PassOptionError(f"tensor_parallel: block {block.name} has {kv_heads} kv-heads for world_size={world}: "
                              "neither divides the other, so the ranks' q heads would not share whole kv-heads")
    local = heads // world
    group = heads // kv_heads  # q heads per kv head (GQA)
    kv_lo = rank * local // group  # the kv-head of this rank's first q head
    kv_local = max(1, kv_heads // world)
    q_range, kv_range = (rank * local * d, (rank + 1) * local * d), (kv_lo * d, (kv_lo + kv_local) * d)
    if fused:
        columns = [_fused_qkv_shard(block, a, split, q_range, kv_range, resplits)]
    else:
        widths = {a.q_proj: heads * d, a.k_proj: kv_heads * d, a.v_proj: kv_heads * d}
        for p, width in widths.items():
            if _out_features(p) != width:
                raise PassOptionError(f"tensor_parallel: block {block.name}: projection {p.name} has "
                                      f"{_out_features(p)} outputs, not heads × head_dim = {width}")
        columns = [_Shard(a.q_proj, "column", *q_range), _Shard(a.k_proj, "column", *kv_range),
                   _Shard(a.v_proj, "column", *kv_range)]
    for node in _gqa_repeats(a):
        repeats[node] = (group, local // kv_local)
    return columns + [_Shard(a.o_proj, "row", *q_range)]


@dataclasses.dataclass
class _Split:
    """A projection's output cut along its last dim: ``node`` is the ``split`` /
    ``split_with_sizes`` (``kind`` "split", parts are its getitems) or ``None`` (``kind``
    "slice", parts are ``slice`` nodes); ``parts``: ``(part node, lo, hi)`` in column order."""

    kind: str
    node: torch.fx.Node | None
    dim: int
    parts: list


def _output_split(proj: torch.fx.Node) -> _Split | None:
    """How a fused QKV projection's output is cut into q, k and v (through views that keep the
    last dim), or None when it is not cut: that is what tells a fused projection apart."""
    x, width = proj, _out_features(proj)
    while len(x.users) == 1:
        (u,) = x.users
        if u.target not in _RESHAPES or A.shape(u) is None or A.shape(u)[-1] != width:
            break
        x = u
    ndim, users = len(A.shape(x)), list(x.users)
    if len(users) == 1 and users[0].target in (aten.split.Tensor, aten.split_with_sizes.default):
        (sp,) = users
        dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
        if dim % ndim != ndim - 1:
            return None
        sizes = sp.args[1]
        if isinstance(sizes, int):  # split(x, size): equal chunks, the last one shorter
            sizes = [min(sizes, width - lo) for lo in range(0, width, sizes)]
        offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        parts = []
        for u in sp.users:
            if u.op != "call_function" or u.target.__name__ != "getitem":
                return None
            i = u.args[1]
            parts.append((u, offsets[i], offsets[i + 1]))
        return _Split("split", sp, ndim - 1, sorted(parts, key=lambda p: p[1]))
    parts = []
    for u in users:
        if u.target is not aten.slice.Tensor or (u.args[1] if len(u.args) > 1 else 0) % ndim != ndim - 1:
            return None
        if (u.args[4] if len(u.args) > 4 else 1) != 1:
            return None
        lo, hi = (u.args[2] if len(u.args) > 2 else 0) or 0, u.args[3] if len(u.args) > 3 else width
        if not isinstance(lo, int) or not isinstance(hi, int):
            return None
        parts.append((u, lo % width if lo < 0 else lo, min(hi if hi >= 0 else hi + width, width)))
    if len(parts) < 2:
        return None
    return _Split("slice", None, ndim - 1, sorted(parts, key=lambda p: p[1]))


def _fused_qkv_shard(block, a, split: _Split, q_range, kv_range, resplits: dict) -> _Shard:
    """One projection computing q, k and v (GPT-2's ``c_attn``, weight ``[C, (H + 2·KV)·D]``,
    column blocks cut apart by ``split``): the rank keeps its q heads' columns and its kv-heads'
    columns of each of k and v, concatenated in the same order, and the cut gets the local
    widths (``H·D → H'·D``, ``KV·D → KV'·D``). The part feeding the core's q is q; the two others
    are k and v, sliced alike (so which is which does not matter, as in a kv_cache graph)."""
    d = a.head_dim
    covered = [lo for _, lo, _ in split.parts] + [split.parts[-1][2]]
    if covered[0] != 0 or covered[-1] != _out_features(a.q_proj) or any(
            hi != lo for (_, _, hi), (_, lo, _) in zip(split.parts, split.parts[1:])):
        raise PassOptionError(f"tensor_parallel: block {block.name}: the fused projection {a.q_proj.name}'s output "
                              f"is not cut into contiguous parts covering it ({[p[1:] for p in split.parts]})")
    q_ancestors = A.ancestors(a.q)
    is_q = [node in q_ancestors or node is a.q for node, _, _ in split.parts]
    widths = [hi - lo for _, lo, hi in split.parts]
    expected = sorted([a.heads * d, a.kv_heads * d, a.kv_heads * d])
    if len(split.parts) != 3 or sum(is_q) != 1 or sorted(widths) != expected or widths[is_q.index(True)] != a.heads * d:
        raise PassOptionError(f"tensor_parallel: block {block.name}: the fused projection {a.q_proj.name} is cut into "
                              f"parts of widths {widths}, not q ({a.heads} heads × {d}) and k, v "
                              f"({a.kv_heads} kv-heads × {d}) each")
    ranges, new_parts, at = [], [], 0
    for (node, lo, _), q in zip(split.parts, is_q):
        r_lo, r_hi = q_range if q else kv_range
        ranges.append((lo + r_lo, lo + r_hi))
        new_parts.append((node, at, at + r_hi - r_lo))
        at += r_hi - r_lo
    if split.kind == "split":
        sp = split.node
        sizes = [hi - lo for _, lo, hi in new_parts]
        # the getitem indices keep their meaning: sizes in the original part order
        by_index = [0] * len(sizes)
        for node, lo, hi in new_parts:
            by_index[node.args[1]] = hi - lo
        if len(set(by_index)) == 1 and sp.target is aten.split.Tensor:
            resplits[sp] = (aten.split.Tensor, (sp.args[0], by_index[0], split.dim))
        else:
            resplits[sp] = (aten.split_with_sizes.default, (sp.args[0], by_index, split.dim))
    else:
        for node, lo, hi in new_parts:
            resplits[node] = (aten.slice.Tensor, (node.args[0], split.dim, lo, hi))
    (first, *more) = ranges
    return _Shard(a.q_proj, "column", *first, more=tuple(more))


def _with_cached_kv_projections(block, a):
    """In a kv_cache graph attention reads K/V from the cache (``cat(cache, k)`` or the buffer
    the graph wrote ``k`` into), so the ModelMap's walk back from the core ends at the cache
    input. The K and V projections are then the two siblings of the q projection (the same
    input) with ``kv_heads × head_dim`` outputs; they are sliced alike, so which is which does
    not matter here."""
    x = A.linear_input_weight(a.q_proj)[0]
    width = a.kv_heads * a.head_dim
    siblings = [u for u in x.users if u is not a.q_proj and A.is_linear(u) and A.linear_input_weight(u)[0] is x
                and _out_features(u) == width]
    if len(siblings) != 2:
        raise PassOptionError(f"tensor_parallel: block {block.name}: the K and V projections of a kv_cache graph "
                              f"not found ({len(siblings)} projections of the attention input have "
                              f"kv_heads × head_dim = {width} outputs, expected 2)")
    return dataclasses.replace(a, k_proj=siblings[0], v_proj=siblings[1])


def _mlp_shards(block, world: int, rank: int, attention: set) -> list[_Shard]:
    """The MLP's input projections (gate, up / fc) column-parallel, its one output projection
    (down / proj: the projection that reads the others) row-parallel. ``attention``: the
    block's attention projections (a kv_cache graph's ModelMap counts K and V with the MLP)."""
    projections = [p for p in block.mlp if p not in attention]
    if not projections:
        return []
    mlp = set(projections)
    reads_mlp = [p for p in projections if A.ancestors(p, 200) & mlp]
    inputs = [p for p in projections if p not in reads_mlp]
    if len(reads_mlp) != 1 or not inputs:
        raise PassOptionError(f"tensor_parallel: block {block.name}: the MLP is not input projections followed by "
                              f"one output projection ({len(inputs)} inputs, {len(reads_mlp)} reading them)")
    down = reads_mlp[0]
    width = _in_features(down)
    if any(_out_features(p) != width for p in inputs):
        raise PassOptionError(f"tensor_parallel: block {block.name}: MLP projections disagree on the width "
                              f"({[_out_features(p) for p in inputs]} vs {width})")
    if width % world:
        raise PassOptionError(f"tensor_parallel: block {block.name} has MLP width {width}, not divisible by "
                              f"world_size={world}")
    local = width // world
    lo, hi = rank * local, (rank + 1) * local
    return [_Shard(p, "column", lo, hi) for p in inputs] + [_Shard(down, "row", lo, hi)]


def _head_shard(structure, world: int, rank: int) -> _Shard:
    """The LM head's vocabulary rows ``[r·V/W, (r+1)·V/W)`` (a column shard: its outputs)."""
    head = structure.head
    if head is None:
        raise PassOptionError("tensor_parallel: vocab_parallel needs the model's LM head, and the ModelMap "
                              "found none in this graph")
    vocab = _out_features(head)
    if vocab % world:
        raise PassOptionError(f"tensor_parallel: head {structure.path(head)} has a vocabulary of {vocab}, not "
                              f"divisible by world_size={world} (vocab_parallel)")
    local = vocab // world
    return _Shard(head, "column", rank * local, (rank + 1) * local)


def _gqa_repeats(a) -> list[torch.fx.Node]:
    """The expand / repeat_interleave nodes between the K/V projections and the core (GQA's
    head repeat): their factor ``H/KV`` becomes ``H'/KV'`` on a rank."""
    found = []
    for proj in (a.k_proj, a.v_proj):
        frontier, seen = [proj], set()
        while frontier:
            n = frontier.pop()
            for u in n.users:
                if u in seen or u is a.core:
                    continue
                seen.add(u)
                if u.target in _REPEATS:
                    found.append(u)
                frontier.append(u)
            if len(seen) > 200:
                break
    return found


# -- weights -----------------------------------------------------------------------------------------
def _weight_layout(node: torch.fx.Node):
    """``(weight get_attr node, axis of the weight tensor holding the outputs, bias node)``."""
    _, w = A.linear_input_weight(node)
    transposed = w.op == "call_function" and w.target in A._ops("t", "transpose.int", "permute")
    attr = A.skip_views(w)
    if attr.op != "get_attr":
        raise PassOptionError(f"tensor_parallel: projection {node.name} reads a weight that is not a parameter "
                              "of the graph (a torch.compile graph input?); capture with tokenfx.capture")
    if node.target is aten.linear.default:
        out_axis = 1 if transposed else 0
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    else:  # addmm(bias, x, W[in, out]) / mm(x, W[in, out])
        out_axis = 0 if transposed else 1
        bias = node.args[0] if node.target is aten.addmm.default else None
    return attr, out_axis, bias


def _out_features(node) -> int:
    return int(A.shape(node)[-1])


def _in_features(node) -> int:
    return int(A.shape(A.linear_input_weight(node)[0])[-1])


def _fetch(gm, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _new_tensor(gm, like: torch.fx.Node, tensor: torch.Tensor, suffix: str) -> torch.fx.Node:
    """A get_attr of a new parameter at the root of ``gm`` holding ``tensor`` (a copy, so the
    caller's parameter is neither changed nor kept alive by the shard)."""
    name = "tp_" + like.target.replace(".", "_") + suffix
    gm.register_parameter(name, torch.nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=False))
    with gm.graph.inserting_before(like):
        node = gm.graph.get_attr(name)
    node.meta.update({k: v for k, v in like.meta.items() if k != "val"})
    return node


def _slice_weight(gm, shard: _Shard) -> None:
    node = shard.node
    attr, out_axis, bias = _weight_layout(node)
    weight = _fetch(gm, attr.target)
    axis = out_axis if shard.parallel == "column" else 1 - out_axis
    suffix = "".join(f"_{lo}_{hi}" for lo, hi in shard.ranges)

    def cut(t: torch.Tensor, dim: int) -> torch.Tensor:  # a fused QKV shard: its q, k and v pieces side by side
        return torch.cat([t.narrow(dim, lo, hi - lo) for lo, hi in shard.ranges], dim)

    new_w = _new_tensor(gm, attr, cut(weight, axis), suffix)
    attr.replace_all_uses_with(new_w, delete_user_cb=lambda u: u is node or node in u.users)
    if shard.parallel == "column" and isinstance(bias, torch.fx.Node):
        new_b = _new_tensor(gm, bias, cut(_fetch(gm, bias.target), -1), suffix)
        node.replace_input_with(bias, new_b)


def _reduce_after(gm, node: torch.fx.Node, group: str) -> None:
    """``linear(x, W, b)`` → ``wait(all_reduce(linear(x, W), "sum")) + b``: the partial sums of
    the row shards meet, and the bias is counted once."""
    g = gm.graph
    _, _, bias = _weight_layout(node)
    with g.inserting_before(node):
        if node.target is aten.linear.default:
            x, w = A.linear_input_weight(node)
            partial = g.call_function(aten.linear.default, (x, w))
        elif node.target is aten.addmm.default:
            partial = g.call_function(aten.mm.default, tuple(node.args[1:3]))
        else:
            partial = g.call_function(node.target, node.args, node.kwargs)
    with g.inserting_after(partial):
        reduced = g.call_function(ALL_REDUCE, (partial, "sum", group))
    with g.inserting_after(reduced):
        done = g.call_function(WAIT, (reduced,))
    out = done
    if isinstance(bias, torch.fx.Node):
        with g.inserting_after(done):
            out = g.call_function(aten.add.Tensor, (done, bias))
    inherit_module_path([n for n in (partial, reduced, done, out)], node)
    node.replace_all_uses_with(out)
    g.erase_node(node)


def _gather_after(gm, node: torch.fx.Node, world: int, group: str) -> None:
    """``part [B, ..., V']`` → the full ``[B, ..., V]``: the ranks' parts stacked along dim 0
    (``[W·B, ..., V']``, rank order), the rank axis moved next to the vocabulary axis, the two
    merged, so rank ``r``'s part lands at columns ``[r·V', (r+1)·V')``."""
    g = gm.graph
    with g.inserting_after(node):
        gathered = g.call_function(ALL_GATHER, (node, world, group))
    with g.inserting_after(gathered):
        done = g.call_function(WAIT, (gathered,))
    with g.inserting_after(done):
        by_rank = g.call_function(aten.unflatten.int, (done, 0, [world, -1]))  # [W, B, ..., V']
    with g.inserting_after(by_rank):
        beside = g.call_function(aten.movedim.int, (by_rank, 0, -2))  # [B, ..., W, V']
    with g.inserting_after(beside):
        logits = g.call_function(aten.flatten.using_ints, (beside, -2, -1))  # [B, ..., V]
    inherit_module_path([gathered, done, by_rank, beside, logits], node)
    node.replace_all_uses_with(logits, delete_user_cb=lambda u: u is not gathered)


def _group_name() -> str:
    """The default (world) group's name: what torch names it when a group is initialised, "0"
    (its name in every torch this project supports) when the graph is built without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD.group_name
    return "0"


def _rehome(graph) -> None:
    """A new root module holding only the tensors the graph reads (its shards, not the full
    weights they came from): torch.fx copies exactly the get_attr targets."""
    old = graph.gm
    old.graph.eliminate_dead_code()
    gm = torch.fx.GraphModule(old, old.graph, class_name=type(old).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(old, attr):
            setattr(gm, attr, getattr(old, attr))
    gm.meta = dict(getattr(old, "meta", {}))
    graph.gm = gm


# -- kv_cache graphs ----------------------------------------------------------------------------------
def _local_kv_heads(kv_heads: int, world: int) -> int:
    """kv-heads one rank holds: its share, or one replica when ``kv_heads < world``."""
    return max(1, kv_heads // world)


def _shrink_cache_input(graph, world: int, rank: int) -> int | None:
    """The ``kv_cache`` input ``[L, 2, B, Hkv, S, D]`` of a decode / tree graph becomes the
    rank's ``[L, 2, B, Hkv', S, D]`` (its fake value, before sizes are re-propagated); its
    position among the graph's inputs, or None for a prefill graph (no cache input: its
    ``new_kv`` output shrinks with the K/V projections)."""
    layout = graph.kv
    if "kv_cache" not in layout.inputs:
        return None
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    (cache,) = [n for n in placeholders if n.name == "kv_cache"]
    fake = cache.meta["val"]
    if fake.shape[3] != layout.kv_heads:
        raise PassOptionError(f"tensor_parallel: the kv_cache input has {fake.shape[3]} kv-heads, the layout "
                              f"{layout.kv_heads}: the graph was sharded already?")
    with fake.fake_mode:
        cache.meta["val"] = fake.narrow(3, 0, _local_kv_heads(layout.kv_heads, world)).contiguous()
    return placeholders.index(cache)


def _shard_layout(graph, world: int, cache_input: int | None) -> None:
    """The rank's KVLayout (its heads and kv-heads) and example inputs (its cache)."""
    layout = graph.kv
    local_kv = _local_kv_heads(layout.kv_heads, world)
    graph.kv = dataclasses.replace(layout, heads=layout.heads // world, kv_heads=local_kv)
    if cache_input is not None and cache_input < len(graph.example_args):
        args = list(graph.example_args)
        args[cache_input] = args[cache_input].narrow(3, 0, local_kv).contiguous()
        graph.example_args = tuple(args)


# -- sizes -------------------------------------------------------------------------------------------
def _rederive_sizes(node: torch.fx.Node, env: dict, old_shapes: dict, repeats: dict) -> None:
    """Before ``node`` runs on the new fake values: rewrite its size argument from its input's
    new shape (reshape / view: the changed group of dims keeps its factorisation with the
    outermost factor, the heads, shrunk; expand / repeat: GQA's repeat factor re-derived)."""
    if node.op != "call_function" or node.target not in _RESHAPES | _REPEATS or not isinstance(node.args[0], torch.fx.Node):
        return
    x = node.args[0]
    new_in = getattr(env.get(x), "shape", None)
    old_in, old_out = old_shapes.get(x), old_shapes.get(node)
    if new_in is None or old_in is None or old_out is None:
        return
    numbers = _Numbers()
    a, a2, b = numbers.of(old_in), numbers.of(new_in), numbers.of(old_out)
    if a == a2 and node not in repeats:
        return
    if node.target in _RESHAPES:
        node.args = (x, _reshape_sizes(node, list(node.args[1]), a, a2, b)) + tuple(node.args[2:])
    elif node.target is aten.expand.default:
        node.args = (x, _expand_sizes(list(node.args[1]), a, a2, repeats.get(node), new_in)) + tuple(node.args[2:])
    elif node in repeats and node.args[1] == repeats[node][0]:  # repeat_interleave(x, H/KV, dim)
        node.args = (x, repeats[node][1]) + tuple(node.args[2:])


class _Numbers:
    """Dims as integers: symbolic dims (B, N) become distinct large primes, so products of dims
    compare exactly and a symbolic dim never matches a literal."""

    def __init__(self):
        self.primes: dict = {}

    def of(self, shape) -> list[int]:
        out = []
        for d in shape:
            if isinstance(d, torch.SymInt):
                expr = d.node.expr
                for s in sorted(expr.free_symbols, key=str):
                    self.primes.setdefault(s, _PRIMES[len(self.primes) % len(_PRIMES)])
                out.append(int(expr.subs(self.primes)))
            else:
                out.append(int(d))
        return out


_PRIMES = (1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081, 1_000_099)


def _groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]]:
    """Split a reshape ``a → b`` into runs of dims with equal products."""
    i = j = 0
    out = []
    while i < len(a) or j < len(b):
        gi, go, pa, pb = [], [], 1, 1
        if i < len(a):
            gi.append(i)
            pa, i = pa * a[i], i + 1
        if j < len(b):
            go.append(j)
            pb, j = pb * b[j], j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa, i = pa * a[i], i + 1
            elif j < len(b):
                go.append(j)
                pb, j = pb * b[j], j + 1
            else:
                break
        out.append((gi, go))
    return out


def _reshape_sizes(node, sizes: list, a: list[int], a2: list[int], b: list[int]) -> list:
    if len(sizes) != len(b):
        return sizes
    new = list(sizes)
    for gi, go in _groups(a, b):
        before, after = math.prod(a[i] for i in gi), math.prod(a2[i] for i in gi)
        if before == after or any(isinstance(sizes[j], int) and sizes[j] == -1 for j in go):
            continue
        ratio = Fraction(after, before)
        for j in go:  # head sharding shrinks the outermost factor of a split width (heads of heads × D)
            if isinstance(sizes[j], int) and sizes[j] != 1 and (sizes[j] * ratio).denominator == 1:
                new[j] = int(sizes[j] * ratio)
                break
        else:
            raise PassOptionError(f"tensor_parallel: cannot re-derive the sizes {tuple(sizes)} of {node.name} "
                                  f"for its sharded input (dims {[a[i] for i in gi]} became {[a2[i] for i in gi]})")
    return new


def _expand_sizes(sizes: list, a: list[int], a2: list[int], repeat, new_in) -> list:
    new = list(sizes)
    offset = len(sizes) - len(a)
    for j, size in enumerate(sizes):
        if not isinstance(size, int) or size == -1:
            continue
        i = j - offset
        if i >= 0 and a[i] == size:  # an existing dim, not broadcast: follows the input
            if a2[i] != a[i]:
                new[j] = int(new_in[i])
        elif repeat is not None and size == repeat[0]:  # GQA's broadcast repeat of each kv head
            new[j] = repeat[1]
    return new
