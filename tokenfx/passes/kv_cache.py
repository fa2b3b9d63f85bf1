"""``kv_cache``: a full-sequence causal decoder → a prefill graph or a decode-step graph.

Contract: exact (the same arithmetic on the same values; attention sees the cached K/V
instead of recomputing them).

Before (what ``tokenfx.capture`` gives for a causal LM)::

    logits[B, N, V] = model(input_ids[B, N])          # positions = arange(N), causal mask

After, ``mode="decode"``::

    logits[B, T, V], new_kv[L, 2, B, Hkv, T, D] = step(
        input_ids[B, T], positions[B, T],
        kv_cache[L, 2, B, Hkv, S, D], cache_mask[B, S], token_mask[B, T])

``S`` is the cache buffer's length (slots not yet written have ``cache_mask = 0``).
``mode="prefill"`` has no cache inputs (``S = 0``); with ``padded=False`` it has no
``token_mask`` either and attention runs SDPA's ``is_causal`` path (no mask tensor, the upper
triangle skipped: the fast prefill of unpadded batches). ``logits="last"`` returns only the
last position's logits ``[B, 1, V]`` (the head runs on one token: what generation needs
after a prompt). The runtime writes ``new_kv`` into its preallocated cache; the graph
never copies the cache except to read it.

How it works, from the ModelMap (no model-family cases):

1. every attention core (SDPA) gets K and V = ``cat(cached, new)`` where ``new`` is the
   block's K/V *before* the GQA head repeat (so the cache holds ``kv_heads``; SDPA's
   ``enable_gqa`` replaces the repeat, never materialised over the cache), and the mask lets a new token see the cache slots
   ``cache_mask`` marks valid plus the new tokens up to itself that are not padding, and
   always itself (a left-pad query has a non-empty row, so no NaN reaches the cache). The
   cache input can be the whole preallocated buffer: unwritten slots are masked, and the
   graph needs no cache length (contiguous inputs, one compiled shape per buffer size);
2. position information is whatever part of the graph depends on the token *count* but
   not on token *values* (RoPE cos/sin, learned position embeddings): each such tensor
   that meets data is precomputed for positions ``0 … max_positions-1`` once, stored as a
   buffer, and gathered by the explicit ``positions`` input. RoPE, learned absolute
   positions and any other function of the position alone work the same way;
3. the graph is exported again, so the result is an ordinary captured graph with dynamic
   batch / token / cache-length dims (it exports to ONNX and compiles).

``causal=False`` (approximate when the runtime reuses the cache, and labelled so) is the
bidirectional mode for masked-diffusion LMs (LLaDA-style dLLMs, :mod:`tokenfx.runtime.diffusion`):
the graph's attention must be bidirectional (no mask, or an all-visible one), and a new token
sees every valid cache slot and every new token that is not padding (itself always). The
graph computes exactly what a full bidirectional forward computes *given* the cached K/V; a
dLLM runtime that reuses K/V across denoising rounds is approximate because bidirectional
attention would have changed those K/V (Fast-dLLM's prefix / dual cache, FreeCache).

Refused, with the reason: attention cores in the eager matmul-softmax-matmul form,
attention masks that are not plain causal masks (ALiBi, learned biases), and inputs other
than ``input_ids`` that the computation still needs. Sliding-window models (config
``sliding_window``) are limited to sequences within the window, where they are causal.

The pass mutates the graph it is handed (a clone: ``Pass.run`` and the PassManager make it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.fx

from tokenfx.errors import MappingError, PassOptionError
from tokenfx.ir import aten as A
from tokenfx.ir.graph import ModelGraph, max_tokens
from tokenfx.ir.kv_layout import KVLayout, drop_guards, reexport
from tokenfx.ir.rewrite import inherit_module_path
from tokenfx.passes.base import Pass, PassResult, register

aten = torch.ops.aten
Node = torch.fx.Node

_SHAPE_QUERIES = A._ops("sym_size.int", "sym_numel", "sym_stride.int", "sym_storage_offset")
# ops through which HF-style code repeats K/V heads for GQA (``repeat_kv``)
_REPEAT_OPS = A._ops("reshape", "view", "_unsafe_view", "expand", "unsqueeze", "clone", "contiguous",
                     "repeat_interleave.self_int")


@register
class KVCache(Pass):
    """Rewrite a causal decoder into a prefill or decode-step graph with an explicit KV cache (exact)."""

    name = "kv_cache"
    contract = "exact"

    @dataclasses.dataclass
    class Options:
        mode: Literal["decode", "prefill"] = "decode"  # cache in, or no cache
        logits: Literal["all", "last"] = "all"  # every position's logits, or only the last one's
        max_positions: int = 0  # 0: the model's own limit (config / capture range)
        cache_update: Literal["output", "inplace"] = "output"  # new K/V an output (ONNX), or written into kv_cache
        padded: bool = True  # prefill only: False = no token_mask, SDPA's is_causal fast path (unpadded batches)
        causal: bool = True  # False: bidirectional attention over cache + new tokens (masked-diffusion LMs)

    def rewrite(self, graph: ModelGraph) -> PassResult:
        """Rewrite ``graph``'s module in place, then export it again (the clone :meth:`Pass.run` or
        the PassManager hands it)."""
        o = self.options
        structure = graph.structure
        attentions = [(b, a) for b in structure.blocks for a in b.attention]
        for block, att in attentions:
            if att.core_kind != "sdpa":
                raise MappingError(f"kv_cache: block {block.name} computes attention in the eager matmul-softmax-matmul "
                                   "form; load the model with attn_implementation='sdpa'")
            if o.causal and not att.causal:
                raise MappingError(f"kv_cache: block {block.name} attention is not causal; kv_cache needs a decoder "
                                   "(kv_cache(causal=False) is the bidirectional mode for masked-diffusion LMs)")
            if not o.causal and att.causal:
                raise MappingError(f"kv_cache(causal=False): block {block.name} attention is causal; the bidirectional "
                                   "mode is for masked-diffusion LMs (config is_causal: false, loaded by tokenfx.load)")
        if structure.head is None:
            raise MappingError("kv_cache: no LM head found; kv_cache needs a causal language model")
        gm, g = graph.gm, graph.gm.graph
        placeholders = [n for n in g.nodes if n.op == "placeholder"]
        ids = _token_input(placeholders)
        example_ids = _example_for(graph, ids.name, placeholders.index(ids))
        max_positions = o.max_positions or _max_positions(graph)
        window = getattr(graph.config, "sliding_window", None) if graph.config is not None else None
        if isinstance(window, int) and window > 0 and getattr(graph.config, "use_sliding_window", True) is not False:
            max_positions = min(max_positions, window)  # within the window, sliding-window attention is plain causal
        _check_masks(gm, attentions, ids, o.causal)

        decode = o.mode == "decode"
        inplace = decode and o.cache_update == "inplace"
        dense = not decode and not o.padded  # no mask tensor: SDPA's is_causal path (or plain bidirectional SDPA)
        first = next(n for n in g.nodes if n.op != "placeholder")
        with g.inserting_before(first):
            new_ids = g.placeholder("tokens")
            positions = g.placeholder("positions")
            cache = g.placeholder("kv_cache") if decode else None
            cache_mask = g.placeholder("cache_mask") if decode else None
            token_mask = None if dense else g.placeholder("token_mask")
            slots = g.placeholder("slots") if inplace else None
        ids.replace_all_uses_with(new_ids)

        allowed = None
        if not dense:
            with g.inserting_before(first):
                allowed = _attention_mask(g, new_ids, cache, cache_mask, token_mask, example_ids.device, slots, o.causal)

        new_kv = []
        for layer, (block, att) in enumerate(attentions):
            kv_heads = att.kv_heads
            k_new, v_new = _before_repeat(att.k, kv_heads), _before_repeat(att.v, kv_heads)
            sdpa = A.sdpa_args(att.core)
            existing = set(g.nodes)
            with g.inserting_before(att.core):
                pair = g.call_function(aten.stack.default, ([k_new, v_new], 0))
                new_kv.append(pair)
                k_all, v_all = k_new, v_new
                if inplace:  # write first, then attend over the buffer itself: no copy of the cache
                    g.call_function(_kv_write_op(), (cache, layer, slots, k_new, v_new))
                    layer_cache = g.call_function(aten.select.int, (cache, 0, layer))
                    k_all = g.call_function(aten.select.int, (layer_cache, 0, 0))
                    v_all = g.call_function(aten.select.int, (layer_cache, 0, 1))
                elif decode:
                    layer_cache = g.call_function(aten.select.int, (cache, 0, layer))
                    k_all = g.call_function(aten.cat.default, ([g.call_function(aten.select.int, (layer_cache, 0, 0)), k_new], 2))
                    v_all = g.call_function(aten.cat.default, ([g.call_function(aten.select.int, (layer_cache, 0, 1)), v_new], 2))
                kwargs: dict[str, Any] = ({"dropout_p": 0.0, "is_causal": o.causal} if dense else
                                          {"attn_mask": allowed, "dropout_p": 0.0, "is_causal": False})
                if sdpa.get("scale") is not None:
                    kwargs["scale"] = sdpa["scale"]
                if att.heads != kv_heads:
                    # SDPA reads each kv head for its group of query heads: materialising the repeat
                    # over the whole cache cost 5x the attention time (B=4, 1280 slots, GQA 8/2)
                    kwargs["enable_gqa"] = True
                core = g.call_function(aten.scaled_dot_product_attention.default, (sdpa["q"], k_all, v_all), kwargs)
            inherit_module_path(set(g.nodes) - existing, att.core)  # the ModelMap of the new graph finds the block
            att.core.replace_all_uses_with(core)
            g.erase_node(att.core)
        output = next(n for n in g.nodes if n.op == "output")
        outs = output.args[0]
        logits = outs[0] if isinstance(outs, (tuple, list)) else outs
        with g.inserting_before(output):
            stacked = g.call_function(aten.stack.default, (new_kv, 0))
        output.args = ((logits, stacked),)
        drop_guards(g)
        g.eliminate_dead_code()

        tables = _position_tables(gm, new_ids, positions, A.shape(ids), example_ids, max_positions)

        head = structure.head
        if o.logits == "last":
            x, _ = A.linear_input_weight(head)
            with g.inserting_before(head):
                last = g.call_function(aten.slice.Tensor, (x, 1, -1, None))
            head.replace_input_with(x, last)
        g.eliminate_dead_code()
        batch_sym, tokens_sym = A.shape(ids)
        for p in placeholders:
            for user in list(p.users):  # another input's size (an attention mask's batch / length) → the tokens'
                if user.target is aten.sym_size.int and p is not ids:
                    size = A.val(user)
                    dim = 0 if str(size) == str(batch_sym) else 1 if str(size) == str(tokens_sym) else None
                    if dim is not None:
                        with g.inserting_before(user):
                            user.replace_all_uses_with(g.call_function(aten.sym_size.int, (new_ids, dim)))
                        g.erase_node(user)
            if p.users:
                used = ", ".join(sorted(u.name for u in p.users))
                raise MappingError(f"kv_cache: the model input {p.name!r} is still needed (by {used}); "
                                   "capture the decoder with input_ids only")
            g.erase_node(p)
        g.set_codegen(torch.fx.graph.CodeGen())
        for attr in ("_in_spec", "_out_spec"):
            if hasattr(gm, attr):
                delattr(gm, attr)
        g.lint()
        gm.recompile()

        layout = KVLayout(o.mode, o.logits, len(attentions), attentions[0][1].heads, attentions[0][1].kv_heads,
                          attentions[0][1].head_dim, max_positions, _kv_dtype(attentions[0][1].k),
                          ("tokens", "positions", "kv_cache", "cache_mask", "token_mask") + (("slots",) if inplace else ())
                          if decode else ("tokens", "positions") + (() if dense else ("token_mask",)),
                          o.cache_update if decode else "output")
        new = reexport(gm, graph, layout, example_ids)
        matched = [f"{b.name}: attention reads the cache" for b, _ in attentions]
        matched += [f"position table {name} [{max_positions} positions]" for name in tables]
        return PassResult(new, matched=matched, stats={"layers": layout.layers, "kv_heads": layout.kv_heads,
                                                        "head_dim": layout.head_dim, "position_tables": len(tables)})

    def verify_outputs(self, before: ModelGraph, after: ModelGraph):
        """(reference, rewritten) output pairs for PassManager(verify=True): the full-sequence
        logits against prefill (and, for decode graphs, a two-step run through the cache)."""
        return reference_pairs(before, after, causal=self.options.causal)


# -- the rewrite's pieces ---------------------------------------------------------------------------
def _token_input(placeholders: list[Node]) -> Node:
    for p in placeholders:
        v = A.val(p)
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point() and v.dtype != torch.bool:
            return p
    raise MappingError("kv_cache: the graph has no token-id input [batch, tokens] (integer ids)")


def _example_for(graph: ModelGraph, name: str, index: int) -> torch.Tensor:
    if name in graph.example_kwargs:
        return graph.example_kwargs[name]
    values = list(graph.example_args) + list(graph.example_kwargs.values())
    return values[index]


def _max_positions(graph: ModelGraph) -> int:
    if graph.config is not None and max_tokens(graph.config):
        return int(max_tokens(graph.config))
    raise PassOptionError("kv_cache: the model does not say how many positions it supports; pass max_positions=N")


def _check_masks(gm: torch.fx.GraphModule, attentions, ids: Node, causal: bool = True) -> None:
    """Only plain causal masks (all-visible ones when not ``causal``) may be replaced by the cache
    mask: evaluate each distinct mask at a small length and compare with ``tril`` (or ones); refuse
    ALiBi / sliding windows / custom biases."""
    masks = {a.mask for _, a in attentions if a.mask is not None}
    if not masks:
        return
    n = 9
    values = _evaluate(gm, list(masks), _shape_inputs(gm, ids, torch.zeros(1, n, dtype=torch.long)))
    expected = torch.ones(n, n, dtype=torch.bool)
    expected = expected.tril() if causal else expected
    for (block, att) in attentions:
        if att.mask is None:
            continue
        m = values[att.mask]
        allowed = m if m.dtype == torch.bool else (m == 0)
        if not m.dtype == torch.bool and bool(((m != 0) & (m > torch.finfo(m.dtype).min / 2)).any()):
            allowed = None  # a finite non-zero bias (ALiBi, relative positions)
        if allowed is None or not torch.equal(allowed.reshape(-1, n, n)[0], expected):
            kind = "causal" if causal else "all-visible (bidirectional)"
            raise MappingError(f"kv_cache: block {block.name} uses an attention mask that is not a plain {kind} mask "
                               "(ALiBi, sliding window or a learned bias); not supported")


def _shape_inputs(gm: torch.fx.GraphModule, ids: Node, dummy_ids: torch.Tensor) -> dict[Node, torch.Tensor]:
    """Inputs for evaluating content-independent parts: ``dummy_ids`` for the token ids, and for
    any other input (an attention mask) ones of the same batch / token size."""
    inputs = {ids: dummy_ids}
    batch, tokens = dummy_ids.shape
    for p in gm.graph.nodes:
        v = A.val(p)
        if p.op != "placeholder" or p is ids or not isinstance(v, torch.Tensor):
            continue
        ref = A.shape(ids) if A.shape(ids) is not None else ()
        size = [batch if i == 0 else tokens if (len(ref) > 1 and str(d) == str(ref[1])) else int(d)
                for i, d in enumerate(v.shape)]
        inputs[p] = torch.ones(size, dtype=v.dtype, device=dummy_ids.device)
    return inputs


def _evaluate(gm: torch.fx.GraphModule, targets: list[Node], inputs: dict[Node, torch.Tensor]) -> dict[Node, torch.Tensor]:
    """Run only the part of ``gm`` that ``targets`` depend on, with ``inputs`` for placeholders
    (content-independent subgraphs need only the inputs' shapes)."""
    needed: set[Node] = set()
    stack = list(targets)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    env: dict[Node, Any] = {}
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            if node not in inputs:
                raise MappingError(f"kv_cache: position / mask computation needs the input {node.name!r}")
            env[node] = inputs[node]
        elif node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            env[node] = obj
        elif node.op == "call_function":
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
            env[node] = node.target(*args, **kwargs)
        else:
            raise MappingError(f"kv_cache: cannot evaluate {node.op} node {node.name} ahead of time")
    return {t: env[t] for t in targets}


def _attention_mask(g, ids, cache, cache_mask, token_mask, device, slots=None, causal: bool = True) -> Node:
    """``[B, 1, T, S+T]`` bool (``[B, 1, T, S]`` with ``slots``). Cache slot j is visible where
    ``cache_mask[b, j]`` (every valid slot precedes the new tokens, so no position test is
    needed and the cache may be the whole preallocated buffer); new token j is visible to new
    token i when ``j <= i`` (any j when not ``causal``) and it is not padding; the diagonal is
    always allowed. With ``slots`` the new tokens live in the cache at those slots, and their
    part of the mask is placed there."""
    call = g.call_function
    t = call(aten.sym_size.int, (ids, 1))
    i = call(aten.arange.default, (t,), {"dtype": torch.long, "device": device})
    if causal:
        earlier = call(aten.le.Tensor, (call(aten.unsqueeze.default, (i, 0)), call(aten.unsqueeze.default, (i, 1))))  # [T, T]
    diagonal = call(aten.eq.Tensor, (call(aten.unsqueeze.default, (i, 0)), call(aten.unsqueeze.default, (i, 1))))
    keys = _as_key_mask(g, token_mask)  # [B, 1, 1, T]
    visible = call(aten.bitwise_and.Tensor, (keys, earlier)) if causal else keys
    allowed = call(aten.bitwise_or.Tensor, (visible, diagonal))  # [B, 1, T, T]
    if cache is None:
        return allowed
    cached = call(aten.expand.default, (_as_key_mask(g, cache_mask), [-1, -1, t, -1]))  # [B, 1, T, S]
    if slots is None:
        return call(aten.cat.default, ([cached, allowed], 3))
    placed = call(aten.index_copy.default, (call(aten.zeros_like.default, (cached,)), 3, slots, allowed))
    return call(aten.bitwise_or.Tensor, (cached, placed))


def _as_key_mask(g, mask: Node) -> Node:
    """``[B, K]`` (nonzero = valid) → ``[B, 1, 1, K]`` bool."""
    call = g.call_function
    keep = call(aten.ne.Scalar, (mask, 0))
    return call(aten.unsqueeze.default, (call(aten.unsqueeze.default, (keep, 1)), 1))


def _before_repeat(x: Node, kv_heads: int) -> Node:
    """The K (or V) tensor ``[B, kv_heads, N, D]`` before GQA's head repeat on the way to the core."""
    chain = [x]
    while chain[-1].op == "call_function" and chain[-1].target in _REPEAT_OPS:
        chain.append(chain[-1].args[0])
    for node in reversed(chain):
        s = A.shape(node)
        if s is not None and len(s) == 4 and s[1] == kv_heads:
            return node
    raise MappingError(f"kv_cache: cannot find K/V with {kv_heads} heads before the attention core (at {x.name})")


def _kv_write_op():
    from tokenfx.codegen import kv_write  # noqa: F401  (registers tokenfx::kv_write)

    return torch.ops.tokenfx.kv_write.default


def _kv_dtype(k: Node) -> torch.dtype:
    v = A.val(k)
    return v.dtype if isinstance(v, torch.Tensor) else torch.float32


def _data_dependent(g: torch.fx.Graph) -> set[Node]:
    """Nodes whose value depends on input *values* (not only on input shapes)."""
    dep: set[Node] = set()
    for node in g.nodes:
        v = A.val(node)
        if node.op == "placeholder":
            if not isinstance(v, (torch.SymInt, int)):
                dep.add(node)
        elif node.op == "call_function" and node.target not in _SHAPE_QUERIES and not isinstance(v, (torch.SymInt, int)):
            if any(a in dep for a in node.all_input_nodes):
                dep.add(node)
    return dep


def _position_tables(gm, ids: Node, positions: Node, ids_shape, example_ids: torch.Tensor, max_positions: int) -> list[str]:
    """Replace every token-count-dependent, token-value-independent tensor that meets data by a
    gather from a table precomputed for ``max_positions`` positions (module docstring, step 2)."""
    g = gm.graph
    dep = _data_dependent(g)
    batch, tokens = ids_shape
    if not isinstance(tokens, torch.SymInt):
        raise MappingError("kv_cache: the graph was captured with a fixed token count; capture it with dynamic=True")
    frontier = [n for n in g.nodes if n.op == "call_function" and n not in dep and isinstance(A.val(n), torch.Tensor)
                and any(u in dep for u in n.users)]
    frontier = [n for n in frontier if any(_same(d, tokens) for d in A.shape(n))]
    if not frontier:
        return []
    dummy = torch.zeros(1, max_positions, dtype=example_ids.dtype, device=example_ids.device)
    values = _evaluate(gm, frontier, _shape_inputs(gm, ids, dummy))
    names = []
    for i, node in enumerate(frontier):
        shape = A.shape(node)
        axes = [k for k, d in enumerate(shape) if _same(d, tokens)]
        others = [d for k, d in enumerate(shape) if k not in axes and not isinstance(d, int) and not _same(d, batch)]
        if len(axes) != 1 or others:
            raise MappingError(f"kv_cache: {node.name} {tuple(shape)} depends on the token count in a way that is not "
                               "a per-position value; not supported")
        table, axis = values[node], axes[0]
        users_rank = max(len(A.shape(u) or ()) for u in node.users if u in dep)
        while table.dim() < users_rank or axis == 0:  # broadcast dims the consumer adds on the left
            table, axis = table.unsqueeze(0), axis + 1
            shape = (1, *shape)
        if not (shape[0] == 1 or _same(shape[0], batch)):
            raise MappingError(f"kv_cache: {node.name} {tuple(shape)} has no batch-broadcast dim; not supported")
        table = table[0].movedim(axis - 1, 0).contiguous()  # [max_positions, *rest]
        name = f"kv_position_table_{i}"
        gm.register_buffer(name, table)
        rest = table.dim() - 1
        with g.inserting_before(node):
            attr = g.get_attr(name)
            gathered = g.call_function(aten.index.Tensor, (attr, [positions]))  # [B, T, *rest]
            perm = [0] + list(range(2, axis + 1)) + [1] + list(range(axis + 1, rest + 2))
            placed = g.call_function(aten.permute.default, (gathered, perm)) if perm != list(range(rest + 2)) else gathered
        node.replace_all_uses_with(placed, delete_user_cb=lambda u: u in dep)
        names.append(name)
    g.eliminate_dead_code()
    return names


def _same(d, sym) -> bool:
    """Is size ``d`` the symbolic dim ``sym`` (static sizes never are: a literal is ambiguous)?"""
    return isinstance(d, torch.SymInt) and isinstance(sym, torch.SymInt) and d.node.expr == sym.node.expr


# -- verification -----------------------------------------------------------------------------------
def reference_pairs(before: ModelGraph, after: ModelGraph, causal: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Full-sequence logits of ``before`` vs the kv graph's logits for the same tokens (not
    ``causal``: the second half against the cached K/V of a whole-sequence call, the case where
    nothing changed since the cache was written)."""
    layout: KVLayout = after.kv
    ids = before.example_args[0] if before.example_args else next(iter(before.example_kwargs.values()))
    with torch.no_grad():
        full = before.run_example()
        full = full[0] if isinstance(full, (tuple, list)) else full
        b, n = ids.shape
        pos = torch.arange(n).expand(b, n)
        ones = torch.ones(b, n, dtype=torch.long)
        if layout.mode == "prefill":
            logits, _ = after.gm(ids, pos, ones) if "token_mask" in layout.inputs else after.gm(ids, pos)
            ref = full[:, -1:] if layout.logits == "last" else full
            return [(ref, logits)]
        split = max(n // 2, 1)
        if not causal:
            return _bidirectional_pairs(after, layout, full, ids, pos, ones, split)
        if layout.cache_update == "inplace":  # one buffer, the graph writes each chunk's K/V at its slots
            cache = torch.zeros(layout.cache_shape(b, n), dtype=layout.dtype)
            cache_mask = torch.zeros(b, n, dtype=torch.long)
            first, _ = after.gm(ids[:, :split], pos[:, :split], cache, cache_mask, ones[:, :split], torch.arange(split))
            cache_mask[:, :split] = 1
            second, _ = after.gm(ids[:, split:].contiguous(), pos[:, split:].contiguous(), cache, cache_mask,
                                 ones[:, split:], torch.arange(split, n))
        else:  # the first chunk's new_kv is the second chunk's cache
            empty = torch.zeros(layout.cache_shape(b, 0), dtype=layout.dtype)
            first, kv = after.gm(ids[:, :split], pos[:, :split], empty, ones[:, :0], ones[:, :split])
            second, _ = after.gm(ids[:, split:], pos[:, split:], kv, ones[:, :split], ones[:, split:])
        if layout.logits == "last":
            return [(full[:, split - 1:split], first), (full[:, -1:], second)]
        return [(full[:, :split], first), (full[:, split:], second)]


def _bidirectional_pairs(after, layout: KVLayout, full, ids, pos, ones, split):
    """A bidirectional decode graph: one call over the whole sequence from an empty cache (its
    K/V are those of the full forward), then the second half again against the first half's
    cached K/V — both must give the full forward's logits."""
    b, n = ids.shape
    if layout.cache_update == "inplace":
        cache = torch.zeros(layout.cache_shape(b, n), dtype=layout.dtype)
        cache_mask = torch.zeros(b, n, dtype=torch.long)
        whole, _ = after.gm(ids, pos, cache, cache_mask, ones, torch.arange(n))
        cache_mask[:, :split] = 1
        second, _ = after.gm(ids[:, split:].contiguous(), pos[:, split:].contiguous(), cache, cache_mask,
                             ones[:, split:], torch.arange(split, n))
    else:
        empty = torch.zeros(layout.cache_shape(b, 0), dtype=layout.dtype)
        whole, kv = after.gm(ids, pos, empty, ones[:, :0], ones)
        second, _ = after.gm(ids[:, split:], pos[:, split:], kv[:, :, :, :, :split].contiguous(), ones[:, :split],
                             ones[:, split:])
    if layout.logits == "last":
        return [(full[:, -1:], whole), (full[:, -1:], second)]
    return [(full, whole), (full[:, split:], second)]
