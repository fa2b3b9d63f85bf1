"""``ModelMap``: the transformer structure recovered from an ATen graph.

Recovery reads ``nn_module_stack`` metadata (module paths such as ``model.layers.3.self_attn``)
plus op patterns, so it works on any family whose blocks sit in an indexed module list:

1. attention cores: any SDPA variant, or the eager ``matmul → (scale, mask) → softmax → matmul``
   pattern;
2. blocks: the outermost indexed module path (``<collection>.<i>``) around each core; every
   member of a collection that holds a core must hold one;
3. per block: the residual stream entering and leaving it, its norms (LayerNorm / RMSNorm,
   fused op or the decomposed ``rsqrt(mean(x²)+eps)`` pattern), pre- or post-norm placement,
   q/k/v/o projections (followed through views, splits and RoPE), heads / kv-heads / head dim,
   causal or bidirectional mask, MLP projections, residual adds;
4. around the blocks: embeddings, final norm, head, token axis, position scheme.

A graph it cannot map raises one :class:`MappingError` naming the missing piece.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any

import torch
import torch.fx

from tokenfx.errors import MappingError
from tokenfx.ir import aten as A

Node = torch.fx.Node


@dataclasses.dataclass
class Norm:
    kind: str  # "layernorm" | "rmsnorm"
    input: Node  # the tensor normalised (before any fp32 cast)
    output: Node  # the normalised (and scaled) tensor
    weight: Node | None
    bias: Node | None
    eps: float
    nodes: list[Node]  # every node of the pattern, input excluded


@dataclasses.dataclass
class Attention:
    core: Node  # SDPA node, or the probabilities @ V matmul
    core_kind: str  # "sdpa" | "eager"
    q: Node
    k: Node
    v: Node
    mask: Node | None
    causal: bool
    heads: int
    kv_heads: int
    head_dim: int
    q_proj: Node | None
    k_proj: Node | None
    v_proj: Node | None
    o_proj: Node | None
    softmax: Node | None = None  # eager pattern only
    uses_rope: bool = False
    path: str = ""


@dataclasses.dataclass
class Block:
    name: str
    index: int
    nodes: list[Node]
    input: Node  # residual stream entering
    output: Node  # residual stream leaving
    attention: list[Attention]
    norms: list[Norm]
    norm_placement: str  # "pre" | "post"
    residual_adds: list[Node]
    mlp: list[Node]  # projections of the feed-forward part

    @property
    def norm_kind(self) -> str:
        return self.norms[0].kind


@dataclasses.dataclass
class ModelMap:
    family: str
    blocks: list[Block]
    embeddings: list[Node]
    final_norm: Norm | None
    head: Node | None
    token_axis: int
    position: str  # "learned" | "rope" | "none"
    hidden_size: int
    norms: list[Norm]  # every norm in the graph, in order
    path_prefix: str = ""  # the capture wrapper's attribute path, hidden from users

    def path(self, node: Node) -> str:
        p = A.module_path(node) or node.name
        return p[len(self.path_prefix):] if self.path_prefix and p.startswith(self.path_prefix) else p

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "num_blocks": self.num_blocks,
            "position": self.position,
            "token_axis": self.token_axis,
            "hidden_size": self.hidden_size,
            "embeddings": [self.path(n) for n in self.embeddings],
            "final_norm": None if self.final_norm is None else self.final_norm.kind,
            "head": None if self.head is None else self.path(self.head),
            "blocks": [
                {
                    "name": b.name,
                    "norm": b.norm_kind,
                    "norm_placement": b.norm_placement,
                    "attention": {
                        "heads": b.attention[0].heads,
                        "kv_heads": b.attention[0].kv_heads,
                        "head_dim": b.attention[0].head_dim,
                        "causal": b.attention[0].causal,
                        "core": b.attention[0].core_kind,
                    },
                    "num_attention": len(b.attention),
                    "mlp_projections": len(b.mlp),
                }
                for b in self.blocks
            ],
        }


# ---------------------------------------------------------------------------------------------
def recover_model_map(graph) -> ModelMap:
    gm = graph.gm
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    raw = {n: A.module_path(n) for n in nodes}
    # tokenfx.capture wraps Hugging Face models as ``.model``; hide that attribute (also in a
    # saved .pt2, where the config is gone) so names read as the user's module paths
    named = [p for p in raw.values() if p and not p.startswith("_")]  # "_empty_nn_module_stack…" hooks
    wrapped = graph.source == "export" and bool(named) and all(p == "model" or p.startswith("model.") for p in named)
    prefix = "model." if wrapped else ""
    paths = {n: _strip(p, prefix) for n, p in raw.items()}
    if not any(paths.values()):
        raise MappingError("the graph carries no module metadata (nn_module_stack); cannot find transformer blocks")

    norms = sorted(_find_norms(nodes), key=lambda nm: order[nm.output])
    cores = _find_attention_cores(nodes)
    if not cores:
        raise MappingError(
            "no attention core found in the graph (looked for scaled_dot_product_attention and the "
            "matmul-softmax-matmul pattern)"
        )

    # -- blocks: outermost indexed module path around each core --------------------------------
    core_block: dict[Node, str] = {}
    for core in cores:
        path = paths.get(core) or ""
        block = _outermost_indexed(path)
        if block is None:
            raise MappingError(f"attention at {path or core.name!r} is not inside an indexed block list (e.g. layers.0)")
        core_block[core] = block
    collections = {b.rsplit(".", 1)[0] if "." in b else "" for b in core_block.values()}
    block_names = sorted(
        {p_block for n, p in paths.items() if p for p_block in [_outermost_indexed(p)] if p_block and _collection(p_block) in collections},
        key=lambda b: min(order[n] for n, p in paths.items() if p and (p == b or p.startswith(b + "."))),
    )
    for name in block_names:
        if name not in core_block.values():
            raise MappingError(f"no attention core found in block {name}")

    blocks = []
    for index, name in enumerate(block_names):
        members = [n for n in nodes if paths[n] and (paths[n] == name or paths[n].startswith(name + "."))]
        block_cores = [c for c in cores if core_block[c] == name]
        try:
            blocks.append(_build_block(name, index, members, block_cores, norms, order))
        except MappingError:
            raise
        except (AttributeError, IndexError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            # an op pattern this recovery does not know: name the block, not the Python error site
            raise MappingError(f"cannot recover the structure of block {name}: unexpected graph pattern "
                               f"({type(exc).__name__}: {exc})") from exc

    hidden = _last_dim(blocks[-1].output)
    block_node_set = {n for b in blocks for n in b.nodes}
    first_block_start = min(order[n] for n in blocks[0].nodes)
    last_out = blocks[-1].output

    final_norm = next(
        (nm for nm in norms if order[nm.output] > order[last_out] and nm.output not in block_node_set
         and _reaches(nm.input, last_out)), None)
    head_src = final_norm.output if final_norm else last_out
    head = next((n for n in nodes if order[n] > order[head_src] and A.is_linear(n) and n not in block_node_set
                 and _reaches(A.linear_input_weight(n)[0], head_src)), None)
    embeddings = [n for n in nodes if order[n] < first_block_start and n.target in _EMBED_OPS]
    position = _position_scheme(blocks, nodes, order, first_block_start, paths)
    token_axis = _token_axis(graph, blocks[0].input)
    family = graph.family
    return ModelMap(family, blocks, embeddings, final_norm, head, token_axis, position, hidden, norms, prefix)


_EMBED_OPS = A._ops("embedding", "conv2d", "convolution", "conv1d", "conv3d")


def _strip(path: str | None, prefix: str) -> str | None:
    if path is None:
        return None
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


def _outermost_indexed(path: str) -> str | None:
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
        if part.isdigit() and i == 0:
            return part
    return None


def _collection(block: str) -> str:
    return block.rsplit(".", 1)[0] if "." in block else ""


def _last_dim(node) -> int | None:
    s = A.shape(node) if node is not None else None
    return int(s[-1]) if s else None


def _reaches(node: Node | None, target: Node) -> bool:
    """``node`` is ``target`` seen through views and casts."""
    if node is None:
        return False
    while True:
        if node is target:
            return True
        if node.op == "call_function" and node.target in A.VIEW_LIKE | A.CAST and node.args and isinstance(node.args[0], Node):
            node = node.args[0]
        else:
            return False


# -- norms --------------------------------------------------------------------------------------
def _find_norms(nodes: list[Node]) -> list[Norm]:
    found = []
    for n in nodes:
        if n.target in A.LAYER_NORM:
            w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
            b = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
            eps = n.args[4] if len(n.args) > 4 else n.kwargs.get("eps", 1e-5)
            out = n
            if n.target is A.aten.native_layer_norm.default:
                out = next((u for u in n.users if u.target is operator.getitem and u.args[1] == 0), None)
                if out is None:
                    continue
            found.append(Norm("layernorm", n.args[0], out, w, b, float(eps), [n] + ([out] if out is not n else [])))
        elif n.target in A.RMS_NORM:
            w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
            eps = n.args[3] if len(n.args) > 3 else n.kwargs.get("eps")
            out, nodes = n, [n]
            if n.target is not A.aten.rms_norm.default:
                out = next((u for u in n.users if u.target is operator.getitem and u.args[1] == 0), None)
                if out is None:
                    continue
                nodes.append(out)
            if eps is None:  # torch's default: the machine epsilon of the computation dtype
                eps = torch.finfo(torch.promote_types(A.val(n.args[0]).dtype, torch.float32)).eps
            found.append(Norm("rmsnorm", n.args[0], out, w, None, float(eps), nodes))
        elif n.target is _add_norm_op():
            # a norm fused by fuse_norm: input is the residual sum, output the normed tensor
            outs = {u.args[1]: u for u in n.users if u.target is operator.getitem}
            if 0 not in outs:
                continue
            x, _, w, b, eps, kind = n.args
            found.append(Norm(kind, outs.get(1, n), outs[0], w, b, float(eps), [n] + list(outs.values())))
        elif n.target is A.aten.rsqrt.default:
            norm = _match_decomposed_rms(n)
            if norm is not None:
                found.append(norm)
    return found


def _add_norm_op():
    ops = getattr(torch.ops, "tokenfx", None)
    return getattr(ops, "add_norm").default if ops is not None and hasattr(ops, "add_norm") else None


def _match_decomposed_rms(rsqrt: Node) -> Norm | None:
    """rsqrt(mean(pow(h, 2), -1, keepdim) + eps) * h [→ cast] [* weight]."""
    add = rsqrt.args[0]
    if not (isinstance(add, Node) and add.target in A.ADD):
        return None
    mean, eps = (add.args[0], add.args[1]) if isinstance(add.args[0], Node) else (add.args[1], add.args[0])
    if not (isinstance(mean, Node) and mean.target in A._ops("mean.dim") and isinstance(eps, (int, float))):
        return None
    dims = mean.args[1] if len(mean.args) > 1 else None
    if list(dims or []) not in ([-1], [len(A.shape(mean)) - 1]):
        return None
    sq = mean.args[0]
    if not isinstance(sq, Node):
        return None
    if sq.target in A._ops("pow.Tensor_Scalar") and sq.args[1] == 2:
        h = sq.args[0]
    elif sq.target in A.MUL and sq.args[0] is sq.args[1]:
        h = sq.args[0]
    else:
        return None
    scaled = next((u for u in rsqrt.users if u.target in A.MUL and h in u.args), None)
    if scaled is None:
        return None
    pattern = [sq, mean, add, rsqrt, scaled]
    out = scaled
    if len(out.users) == 1:
        nxt = next(iter(out.users))
        if nxt.target in A.CAST:
            pattern.append(nxt)
            out = nxt
    weight = None
    if len(out.users) == 1:
        nxt = next(iter(out.users))
        if nxt.target in A.MUL:
            other = nxt.args[1] if nxt.args[0] is out else nxt.args[0]
            if isinstance(other, Node) and A.shape(other) is not None and len(A.shape(other)) == 1:
                weight, out = other, nxt
                pattern.append(nxt)
    source = A.skip_casts(h)
    if h is not source:
        pattern.insert(0, h)
    return Norm("rmsnorm", source, out, weight, None, float(eps), pattern)


# -- attention ----------------------------------------------------------------------------------
def _find_attention_cores(nodes: list[Node]) -> list[Node]:
    cores = []
    for n in nodes:
        if n.target in A.SDPA:
            cores.append(n)
        elif n.target in A.SOFTMAX and _eager_pattern(n) is not None:
            cores.append(_eager_pattern(n)[1])
    return cores


def _eager_pattern(softmax: Node):
    """(scores_matmul, output_matmul) around an attention softmax, else None."""
    scores = None
    frontier, depth = [softmax.args[0]], 0
    while frontier and depth < 8 and scores is None:
        nxt = []
        for cur in frontier:
            if not isinstance(cur, Node):
                continue
            if cur.target in A.MATMUL and A.shape(cur) == A.shape(softmax):
                scores = cur
                break
            if cur.op == "call_function" and cur.target not in A.SOFTMAX:
                nxt.extend(a for a in A.tensor_args(cur) if A.shape(a) == A.shape(softmax) or cur.target in A.CAST)
        frontier, depth = nxt, depth + 1
    if scores is None:
        return None
    cur = softmax
    for _ in range(6):
        users = list(cur.users)
        out = next((u for u in users if u.target in A.MATMUL and u.args[0] is cur), None)
        if out is not None:
            return scores, out
        if len(users) != 1 or next(iter(users)).target not in A.CAST | A._ops("dropout"):
            return None
        cur = next(iter(users))
    return None


def _attention_for_core(core: Node, path: str) -> Attention:
    if core.target in A.SDPA:
        a = A.sdpa_args(core)
        q, k, v, mask, causal_flag, kind, softmax = a["q"], a["k"], a["v"], a["mask"], a["is_causal"], "sdpa", None
    else:
        softmax = A.skip_casts(core.args[0])
        while softmax.target not in A.SOFTMAX:
            softmax = softmax.args[0]
        scores, _ = _eager_pattern(softmax)
        q, k_t, v = scores.args[0], scores.args[1], core.args[1]
        k = k_t.args[0] if k_t.target in A._ops("transpose.int", "permute", "t") else k_t
        mask = _mask_of_scores(softmax, scores)
        causal_flag, kind = False, "eager"
    qs = A.shape(q)
    head_dim = int(qs[-1])
    heads = int(qs[-3]) if len(qs) >= 4 else None
    q_width, q_proj, q_path = _projection_of(q, head_dim)
    k_width, k_proj, k_path = _projection_of(k, head_dim)
    _, v_proj, _ = _projection_of(v, head_dim)
    if heads is None:
        heads = q_width // head_dim
    ks = A.shape(k)
    if len(ks) >= 4 and isinstance(ks[-3], int):
        # heads of K at the core, before GQA's repeat (expand / repeat_interleave) on its path
        kv_heads = ks[-3] // _repeat_factor(k_path)
    else:
        kv_heads = k_width // head_dim if k_width else heads
    causal = causal_flag or (mask is not None and _is_causal_mask(mask))
    uses_rope = any(
        n.target in A.MUL and any(isinstance(x, Node) and any(an.target in A.TRIG for an in A.ancestors(x, 60) | {x})
                                  for x in n.args if x not in q_path)
        for n in q_path
    )
    return Attention(core, kind, q, k, v, mask, causal, heads, kv_heads, head_dim, q_proj, k_proj, v_proj,
                     _output_projection(core), softmax, uses_rope, path)


def _mask_of_scores(softmax: Node, scores: Node) -> Node | None:
    cur = softmax.args[0]
    while isinstance(cur, Node) and cur is not scores:
        if cur.target in A.ADD | A._ops("masked_fill.Scalar", "masked_fill.Tensor", "where.self", "where.ScalarOther"):
            others = [a for a in A.tensor_args(cur) if a is not scores and not _reaches(a, scores) and scores not in A.ancestors(a, 50)]
            if others:
                return others[0]
        cur = cur.args[0] if cur.args and isinstance(cur.args[0], Node) else None
    return None


def _projection_of(x: Node, head_dim: int):
    """Walk back from an attention input to its projection.

    Returns (width, projection node, path): ``width`` is the feature size of the tensor on
    the path still laid out like the projection's rows (e.g. the k_proj output's 16 for
    2 kv-heads × 8, or a fused-QKV split's slice), found by comparing the product of its
    leading dims with the projection input's.
    """
    path, cur, projection = [], x, None
    for _ in range(40):
        path.append(cur)
        if A.is_linear(cur):
            projection = cur
            break
        if cur.op != "call_function":
            break
        nxt = _data_input(cur)
        if nxt is None:
            break
        cur = nxt
    if projection is None:  # no projection found: the widest non-head tensor on the path
        widths = [A.shape(n) for n in path if A.shape(n) and len(A.shape(n)) <= 3 and A.shape(n)[-1] != head_dim]
        return (int(widths[0][-1]) if widths else None), None, path
    rows = _leading_product(A.shape(A.linear_input_weight(projection)[0]))
    for node in path:
        s = A.shape(node)
        if s is not None and len(s) >= 2 and _leading_product(s) == rows:
            return int(s[-1]), projection, path
    return int(A.shape(projection)[-1]), projection, path


def _repeat_factor(path: list[Node]) -> int:
    """How many times K/V heads are repeated along ``path`` (1 without GQA repeats)."""
    factor = 1
    for node in path:
        if node.target in A._ops("expand", "repeat_interleave.self_int", "repeat"):
            before, after = A.shape(_data_input(node)), A.shape(node)
            if before is None or after is None:
                continue
            before = (1,) * (len(after) - len(before)) + tuple(before)
            for b, a in zip(before, after):
                if isinstance(a, int) and isinstance(b, int) and b and a != b:
                    factor *= a // b
    return factor


def _data_input(node: Node) -> Node | None:
    """The input that carries the data through ``node``: for getitem / cat the first piece,
    else the tensor argument with the most elements that is not a parameter (so a q-norm's
    weight or RoPE's cos table is not followed)."""
    if node.target is operator.getitem:
        return node.args[0] if isinstance(node.args[0], Node) else None
    if node.target in A._ops("cat") and node.args and isinstance(node.args[0], (list, tuple)):
        return next((a for a in node.args[0] if isinstance(a, Node)), None)
    candidates = [a for a in A.tensor_args(node) if not A.is_parameter_like(a)]
    if not candidates:
        return None
    return max(candidates, key=lambda a: (_numel_rank(a), -candidates.index(a)))


def _leading_product(s):
    product = 1
    for d in s[:-1]:
        product = product * d
    return str(product.node.expr if isinstance(product, torch.SymInt) else product)


def _output_projection(core: Node) -> Node | None:
    cur = core
    if core.target in A.SDPA and isinstance(A.val(core), (tuple, list)):  # fused variants: (out, logsumexp, ...)
        cur = next((u for u in core.users if u.args[1] == 0), core)
    for _ in range(12):
        users = list(cur.users)
        lin = next((u for u in users if A.is_linear(u)), None)
        if lin is not None:
            return lin
        if len(users) != 1:
            return None
        cur = users[0]
        if cur.op != "call_function" or cur.target not in A.VIEW_LIKE | A.CAST:
            return None
    return None


def _is_causal_mask(mask: Node) -> bool:
    nodes = A.ancestors(mask, 300) | {mask}
    for n in nodes:
        if n.op == "call_function" and n.target in A.TRI:
            return True
        if n.op == "call_function" and n.target in A.COMPARE:
            args = [a for a in n.args if isinstance(a, Node)]
            if len(args) == 2 and all(any(x.target is A.aten.arange.default or x.target in A._ops("arange.start", "arange.start_step")
                                             for x in A.ancestors(a, 40) | {a}) for a in args):
                return True
        if n.op == "get_attr":
            try:
                t = _fetch_attr(n)
            except AttributeError:
                continue
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] > 1:
                tb = t.bool() if t.dtype == torch.bool else t != 0
                keep_lower = torch.equal(tb, tb.tril()) and not bool(tb.all())
                masked_upper = torch.equal(tb, tb.triu(1)) and bool(tb.any())
                if keep_lower or masked_upper:
                    return True
    return False


def _fetch_attr(node: Node):
    obj = node.graph.owning_module
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


# -- blocks ---------------------------------------------------------------------------------------
def _build_block(name: str, index: int, members: list[Node], cores: list[Node], norms: list[Norm], order) -> Block:
    member_set = set(members)
    attention = [_attention_for_core(c, A.module_path(c) or "") for c in cores]
    first = attention[0]
    hidden = None
    if first.q_proj is not None:
        hidden = _last_dim(A.linear_input_weight(first.q_proj)[0])
    # residual stream entering: an outside float tensor with the hidden size, largest shape
    entering = []
    for n in members:
        for a in n.all_input_nodes:
            if a not in member_set and A.is_float_tensor(a) and len(A.shape(a)) >= 3 and (hidden is None or A.shape(a)[-1] == hidden):
                entering.append(a)
    if not entering:
        raise MappingError(f"no residual stream input found for block {name}")
    block_input = max(entering, key=lambda a: (_numel_rank(a), order[a]))
    hidden = hidden or _last_dim(block_input)
    leaving = [n for n in members if any(u not in member_set for u in n.users) and A.is_float_tensor(n)
               and A.shape(n) is not None and len(A.shape(n)) >= 3 and A.shape(n)[-1] == hidden]
    if not leaving:
        raise MappingError(f"no residual stream output found for block {name}")
    block_output = max(leaving, key=lambda n: order[n])

    block_norms = [nm for nm in norms if nm.output in member_set]
    if not block_norms:
        raise MappingError(f"no norm (LayerNorm or RMSNorm) found in block {name}")
    attn_in = A.linear_input_weight(first.q_proj)[0] if first.q_proj is not None else first.q
    # pre-norm: a norm of this block feeds the attention; post-norm: the block's norms come
    # after attention (the attention reads the previous block's normed output)
    placement = "pre" if any(_reaches(attn_in, nm.output) for nm in block_norms) else "post"
    attn_nodes = {first.q_proj, first.k_proj, first.v_proj, first.o_proj} | {a.o_proj for a in attention}
    mlp = [n for n in members if A.is_linear(n) and n not in attn_nodes
           and not any(n in (a.q_proj, a.k_proj, a.v_proj) for a in attention)]
    res_shape = A.shape(block_input)
    adds = [n for n in members if n.target in A.ADD and A.shape(n) == res_shape
            and all(isinstance(x, Node) and A.shape(x) == res_shape for x in n.args[:2])]
    return Block(name, index, members, block_input, block_output, attention, block_norms, placement, adds, mlp)


def _numel_rank(node: Node):
    s = A.shape(node)
    known = 1
    free = 0
    for d in s:
        if isinstance(d, int):
            known *= d
        else:
            free += 1
    return (free, known)


def _position_scheme(blocks, nodes, order, first_block_start, paths) -> str:
    if any(a.uses_rope for b in blocks for a in b.attention):
        return "rope"
    for n in nodes:
        if order[n] >= first_block_start:
            break
        if n.target is A.aten.embedding.default:
            path = paths.get(n) or ""
            idx = n.args[1]
            if re.search(r"pos|wpe", path.split(".")[-1]) or any(x.target in A._ops("arange", "arange.start") for x in A.ancestors(idx, 40) | {idx}):
                return "learned"
        if n.target in A.ADD:
            for x in n.args:
                if A.is_parameter_like(x):
                    s = A.shape(x)
                    if s is not None and len(s) == 3 and s[0] == 1:
                        return "learned"
    return "none"


def _token_axis(graph, block_input: Node) -> int:
    s = A.shape(block_input)
    batch = None
    first_input = next((p for p in graph.gm.graph.nodes if p.op == "placeholder" and A.shape(p) and len(A.shape(p)) >= 1), None)
    if graph.source == "export" and first_input is not None:
        batch = A.shape(first_input)[0]
    candidates = [i for i in range(len(s) - 1) if not (batch is not None and str(s[i]) == str(batch))]
    if len(candidates) == 1:
        return candidates[0]
    return len(s) - 2
