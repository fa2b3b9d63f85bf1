"""``token_shuffle``: fuse each s×s window of grid tokens into one before the blocks, split it
back after them (Token-Shuffle for ViT patches / image tokens), so the blocks run on s² fewer
grid tokens while everything downstream still sees the original ``N``.

Contract: approximate (changes the function). The adapters start as window average in and copy
out, so the rewritten graph is usable untrained; :func:`finetune` trains only the adapters.

Before (``P`` prefix tokens — CLS, registers — then an ``h × w`` grid, row-major)::

    x = cat([cls, patches]) + pos                       # [B, P + h·w, C]  stream entering block 0
    y = blocks(x)                                       # [B, P + h·w, C]  stream leaving the last
    out = final_norm(y) …

After ``token_shuffle(s=2)`` (``M = h·w / s²`` windows, ``k = C // s²``)::

    win = windows(x[:, P:], s)                                        # [B, M, s², C]
    z   = mean(win, 2) + mlp_in(concat_s²(proj_in(win)))              # [B, M, C]  (C → k → s²k → C)
    y'  = blocks(cat([x[:, :P], z]))                                  # [B, P + M, C]
    t   = y'[:, P:, None] + proj_out(split_s²(mlp_out(y'[:, P:])))    # [B, M, s², C]  (C → s²k, k → C)
    y   = cat([y'[:, :P], unwindows(t, s)])                           # [B, P + h·w, C]
    out = final_norm(y) …

An exact average cannot pass a ``k``-wide bottleneck, hence the residual form: the last layers
of ``mlp_in`` and ``mlp_out`` (and ``proj_out``'s bias) start at zero, so the untrained adapters
add exactly 0. The adapters are ``nn.Parameter`` s of a submodule ``token_shuffle`` on the
GraphModule, read by ``get_attr`` + ``aten.linear`` nodes: standard ops only, so torch.export,
ONNX and torch.compile see nothing new.

Preconditions: the grid comes from a patch embedding (a 2-D convolution before block 0 whose
``[B, C, h, w]`` output reaches the stream) or from ``grid=[h, w]``; the grid tokens are the
last ``h·w`` tokens of the stream, row-major; ``s`` divides ``h`` and ``w``; the token count is
static (an image size fixes it; the batch may be symbolic). Sizes downstream are re-derived with
:func:`tokenfx.ir.shapes.rederive_token_sizes`, twice (N → P + M after the shuffle, back after
the unshuffle); static literals that helper would refuse as ambiguous but that are provably N
(an SDPA mask's last two dims, ``B·N`` of a static-batch flatten) are named first. Passes that
run later see P + M tokens inside the blocks.

The pass mutates the graph it is handed (a clone: ``Pass.run`` and the PassManager make it).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import operator

import torch
import torch.fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from tokenfx.errors import MappingError, PassOptionError
from tokenfx.ir import aten as A
from tokenfx.ir.shapes import SIZE_OPS, propagate, rederive_token_sizes
from tokenfx.passes.base import Pass, PassResult, register

aten = torch.ops.aten
Node = torch.fx.Node
ADAPTER_NAME = "token_shuffle"  # the GraphModule attribute holding the adapters


class ShuffleAdapters(torch.nn.Module):
    """The trainable parts: ``proj_in`` C→k, ``mlp_in`` s²k→C→C, ``mlp_out`` C→C→s²k, ``proj_out`` k→C."""

    def __init__(self, hidden: int, s: int, *, seed: int, dtype, device):
        super().__init__()
        k, w = max(hidden // (s * s), 1), s * s
        make = functools.partial(torch.nn.Linear, dtype=dtype, device=device)
        self.proj_in = make(hidden, k)
        self.mlp_in_1, self.mlp_in_2 = make(w * k, hidden), make(hidden, hidden)
        self.mlp_out_1, self.mlp_out_2 = make(hidden, hidden), make(hidden, w * k)
        self.proj_out = make(k, hidden)
        g = torch.Generator().manual_seed(seed)  # the same adapters in every capture path, whatever the global RNG
        with torch.no_grad():
            for layer in self.children():
                bound = 1 / math.sqrt(layer.in_features)
                for p in (layer.weight, layer.bias):
                    p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
            # zero-shot = window average in, copy out: the residual branches start at exactly 0
            for p in (self.mlp_in_2.weight, self.mlp_in_2.bias, self.mlp_out_2.weight, self.mlp_out_2.bias,
                      self.proj_out.bias):
                p.zero_()


@register
class TokenShuffle(Pass):
    """Fuse s×s windows of grid tokens into one before block 0 and split them after the last (approximate)."""

    name = "token_shuffle"
    contract = "approximate"

    @dataclasses.dataclass
    class Options:
        s: int = 2  # window side: the blocks see s² times fewer grid tokens
        grid: list[int] | None = None  # [h, w] of the grid tokens; default: the patch embedding's output size
        seed: int = 0  # adapter initialisation

    def rewrite(self, graph) -> PassResult:
        """Shuffle ``graph`` itself (the clone :meth:`Pass.run` or the PassManager hands it)."""
        o = self.options
        if not isinstance(o.s, int) or o.s < 2:
            raise PassOptionError(f"token_shuffle: s must be an integer >= 2, got {o.s!r}")
        if hasattr(graph.gm, ADAPTER_NAME):  # nesting would re-read the outer unshuffle's sizes as token counts
            raise PassOptionError("token_shuffle: this graph is already token-shuffled; apply the pass once, with a larger s")
        structure = graph.structure
        gm, g = graph.gm, graph.gm.graph
        x, y = structure.blocks[0].input, structure.blocks[-1].output
        if structure.token_axis != 1:
            raise MappingError(f"token_shuffle needs tokens on axis 1 of the residual stream, found axis {structure.token_axis}")
        if len(A.shape(x)) != 3:
            raise MappingError(f"token_shuffle needs a [B, N, C] residual stream, found {list(A.shape(x))}")
        batch, tokens, hidden = A.shape(x)
        (h, w), where = _grid(graph, structure, x, o.grid)
        if not isinstance(tokens, int):  # a grid's token count is fixed by the image size
            raise PassOptionError(f"token_shuffle needs a static token count; this graph's is symbolic ({tokens})")
        s, prefix = o.s, tokens - h * w
        if prefix < 0:
            raise PassOptionError(f"token_shuffle: the stream has {tokens} tokens, fewer than the {h}x{w} grid ({where})")
        if h % s or w % s:
            raise PassOptionError(f"token_shuffle: the {h}x{w} grid is not divisible by s={s} ({where})")
        windows = h * w // (s * s)
        val = A.val(x)
        with unset_fake_temporarily():  # torch.compile runs backends under a fake mode; weights must be real
            adapters = ShuffleAdapters(hidden, s, seed=o.seed, dtype=val.dtype, device=val.device)
        gm.add_module(ADAPTER_NAME, adapters)
        k = adapters.proj_in.out_features
        original_out = [str(A.shape(n)) for n in _outputs(g)]

        # 1. shuffle in, then every size after it follows the reduced count (masks, views, aranges)
        with g.inserting_before(x.next):
            new_in, reduced = _shuffle_in(g, x, prefix, h, w, s, k)
        block_nodes = {n for b in structure.blocks for n in b.nodes}
        x.replace_all_uses_with(reduced, delete_user_cb=lambda user: user in block_nodes and user not in new_in)
        reduced.meta["val"] = val.narrow(1, 0, prefix + windows)  # a fake [B, P + M, C] for the size helper
        _name_static_token_sizes(g, structure, x, batch, tokens)
        _rederive(gm, reduced, tokens)  # static N: no sizes built from the new count, so no propagation needed yet

        # 2. unshuffle after the last block; sizes after it point back at the full count
        fewer = prefix + windows
        later = [n for n in _after(g, y) if n.op == "call_function" and n.target in SIZE_OPS]
        clash = next((n for n in later if fewer in _literals(n.args)), None)
        if clash is not None:  # token sizes there are nodes by now: a literal equal to P + M is something else
            raise PassOptionError(f"token_shuffle: size {fewer} in {clash.name} after the last block would be read as the "
                                  f"reduced token count; choose another s")
        y_val = A.val(y)
        with g.inserting_before(y.next):
            new_out, restored = _unshuffle(g, y, prefix, h, w, s, k)
        y.replace_all_uses_with(restored, delete_user_cb=lambda user: user not in new_out)
        restored.meta["val"] = y_val.new_empty(y_val.shape[:1] + (tokens,) + y_val.shape[2:])
        _rederive(gm, restored, fewer)
        try:
            propagate(gm)
        except Exception as exc:  # e.g. a mask built before block 0 that still has N tokens
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PassOptionError(f"token_shuffle: the rewritten graph's shapes do not agree: {first}") from exc
        if [str(A.shape(n)) for n in _outputs(g)] != original_out:
            raise PassOptionError("token_shuffle: an output changed shape after the unshuffle (a size the helper "
                                  "could not re-derive); refusing a wrong graph")
        g.eliminate_dead_code()
        graph.invalidate()  # recompiled, map dropped: usable straight from Pass.run
        stats = {"s": s, "grid": [h, w], "prefix": prefix, "tokens": tokens, "tokens_in_blocks": fewer,
                 "adapter": ADAPTER_NAME, "adapter_parameters": sum(p.numel() for p in adapters.parameters())}
        return PassResult(graph, matched=[where], stats=stats)


# -- grid detection -------------------------------------------------------------------------------------
def _grid(graph, structure, x: Node, grid):
    """``(h, w)`` and where it came from: the option, or the patch embedding feeding ``x``."""
    if grid is not None:
        if len(grid) != 2 or not all(isinstance(v, int) and v > 0 for v in grid):
            raise PassOptionError(f"token_shuffle: grid must be [h, w] of positive ints, got {grid!r}")
        return (grid[0], grid[1]), "grid option"
    feeding = A.ancestors(x, 2000)
    convs = [n for n in structure.embeddings if n.target in _CONV and n in feeding and len(A.shape(n) or ()) == 4]
    if not convs:
        raise MappingError(f"token_shuffle needs grid tokens (image patches); found no patch embedding in {graph.family}")
    conv = convs[-1]
    h, w = A.shape(conv)[2:]
    if not (isinstance(h, int) and isinstance(w, int)):
        raise PassOptionError(f"token_shuffle needs a static grid; the patch embedding's output is {h}x{w}")
    return (h, w), structure.path(conv)


_CONV = A._ops("conv2d", "convolution")


# -- the rewrite ----------------------------------------------------------------------------------------
def _shuffle_in(g, x: Node, prefix: int, h: int, w: int, s: int, k: int):
    """``x [B, P + h·w, C]`` → ``[B, P + M, C]``: window mean + mlp_in(concat(proj_in(window)))."""
    hidden = A.shape(x)[-1]
    new, op, param = _builder(g)
    grid = op(aten.slice.Tensor, x, 1, prefix, prefix + h * w)
    win = op(aten.reshape.default, grid, [-1, h // s, s, w // s, s, hidden])
    win = op(aten.permute.default, win, [0, 1, 3, 2, 4, 5])  # [B, h/s, w/s, s, s, C]: a window's tokens together
    win = op(aten.reshape.default, win, [-1, h * w // (s * s), s * s, hidden])
    mean = op(aten.mean.dim, win, [2])
    proj = op(aten.linear.default, win, param("proj_in.weight"), param("proj_in.bias"))  # [B, M, s², k]
    concat = op(aten.reshape.default, proj, [-1, h * w // (s * s), s * s * k])
    hid = op(aten.gelu.default, op(aten.linear.default, concat, param("mlp_in_1.weight"), param("mlp_in_1.bias")))
    delta = op(aten.linear.default, hid, param("mlp_in_2.weight"), param("mlp_in_2.bias"))
    fused = op(aten.add.Tensor, mean, delta)
    if prefix:  # CLS / register tokens pass through untouched
        fused = op(aten.cat.default, [op(aten.slice.Tensor, x, 1, 0, prefix), fused], 1)
    return new, fused


def _unshuffle(g, y: Node, prefix: int, h: int, w: int, s: int, k: int):
    """``y [B, P + M, C]`` → ``[B, P + h·w, C]``: each window token copied, plus proj_out(split(mlp_out))."""
    hidden, windows = A.shape(y)[-1], h * w // (s * s)
    new, op, param = _builder(g)
    fused = op(aten.slice.Tensor, y, 1, prefix, prefix + windows)
    hid = op(aten.gelu.default, op(aten.linear.default, fused, param("mlp_out_1.weight"), param("mlp_out_1.bias")))
    parts = op(aten.linear.default, hid, param("mlp_out_2.weight"), param("mlp_out_2.bias"))  # [B, M, s²k]
    parts = op(aten.reshape.default, parts, [-1, windows, s * s, k])
    back = op(aten.linear.default, parts, param("proj_out.weight"), param("proj_out.bias"))  # [B, M, s², C]
    tokens = op(aten.add.Tensor, op(aten.unsqueeze.default, fused, 2), back)
    tokens = op(aten.reshape.default, tokens, [-1, h // s, w // s, s, s, hidden])
    tokens = op(aten.permute.default, tokens, [0, 1, 3, 2, 4, 5])  # back to [B, h/s, s, w/s, s, C]: row-major
    tokens = op(aten.reshape.default, tokens, [-1, h * w, hidden])
    if prefix:
        tokens = op(aten.cat.default, [op(aten.slice.Tensor, y, 1, 0, prefix), tokens], 1)
    return new, tokens


def _builder(g):
    """``op(target, *args)`` / ``param(name)`` that add nodes at the current insert point, recorded in ``new``."""
    new: set[Node] = set()

    def op(target, *args):
        node = g.call_function(target, args)
        new.add(node)
        return node

    def param(name):
        node = g.get_attr(f"{ADAPTER_NAME}.{name}")
        new.add(node)
        return node

    return new, op, param


# -- sizes ----------------------------------------------------------------------------------------------
def _name_static_token_sizes(g, structure, x: Node, batch, tokens: int) -> None:
    """Turn the static size literals that are provably the token count into nodes, so the size
    helper rewrites them instead of refusing them as ambiguous: the last two dims of an SDPA mask
    (query and key tokens, by SDPA's contract; ViT's mask is ``[B, 1, N, N]``), and ``B·N`` where a
    ``[B, N, …]`` tensor is flattened (AOT graphs at a static batch: ``view(x, [B·N, C])``)."""
    later = set(_after(g, x))  # only sizes the helper will visit; a node before x cannot read the new nodes
    with g.inserting_after(x):
        n_node = g.call_function(aten.sym_size.int, (x, 1))
        b_node = g.call_function(aten.sym_size.int, (x, 0))
    n_node.meta["val"], b_node.meta["val"] = tokens, batch
    for block in structure.blocks:
        for attention in block.attention:
            if attention.mask is None or tuple(A.shape(attention.mask) or ())[-2:] != (tokens, tokens):
                continue
            for node in (A.ancestors(attention.mask, 60) | {attention.mask}) & later:
                if node.target in SIZE_OPS and tuple(A.shape(node) or ())[-2:] == (tokens, tokens):
                    node.args = tuple(_replace_last_two(a, tokens, n_node) for a in node.args)
    if not isinstance(batch, int) or batch < 2 or batch == tokens:
        return
    for node in [n for n in g.nodes if n in later]:
        source = node.args[0] if node.args else None
        if node.op != "call_function" or node.target not in SIZE_OPS or tuple((A.shape(source) or ())[:2]) != (batch, tokens):
            continue
        if batch * tokens in _literals(node.args[1:]):
            with g.inserting_before(node):
                flat = g.call_function(operator.mul, (b_node, n_node))  # in SIZE_OPS: re-derived
            flat.meta["val"] = batch * tokens
            node.args = (source,) + tuple(_swap(a, batch * tokens, flat) for a in node.args[1:])


def _replace_last_two(arg, tokens: int, n_node: Node):
    if isinstance(arg, (list, tuple)) and len(arg) >= 2 and list(arg[-2:]) == [tokens, tokens]:
        return type(arg)(list(arg[:-2]) + [n_node, n_node])
    return arg


def _swap(arg, value: int, node: Node):
    if isinstance(arg, (list, tuple)):
        return type(arg)(_swap(a, value, node) for a in arg)
    return node if isinstance(arg, int) and not isinstance(arg, bool) and arg == value else arg


def _rederive(gm, node: Node, old_tokens) -> None:
    try:
        rederive_token_sizes(gm, node, token_axis=1, old_tokens=old_tokens)
    except PassOptionError as exc:
        raise PassOptionError(f"token_shuffle: {exc}") from exc


def _literals(arg) -> list[int]:
    if isinstance(arg, (list, tuple)):
        return [v for a in arg for v in _literals(a)]
    return [arg] if isinstance(arg, int) and not isinstance(arg, bool) else []


def _after(g, node: Node):
    cur = node.next
    while cur.op != "root":
        yield cur
        cur = cur.next


def _outputs(g) -> list[Node]:
    output = next(n for n in g.nodes if n.op == "output")
    leaves, _ = torch.utils._pytree.tree_flatten(output.args[0])
    return [n for n in leaves if isinstance(n, Node)]


# -- training -------------------------------------------------------------------------------------------
def adapter_parameters(graph) -> list[torch.nn.Parameter]:
    """The token_shuffle adapters' parameters of a rewritten graph (empty for any other graph)."""
    return [p for name, p in graph.module().named_parameters() if name.startswith(ADAPTER_NAME + ".")]


def finetune(graph, batches, *, steps: int, lr: float = 1e-3, loss_fn=None, on_step=None) -> list[float]:
    """Train only the token_shuffle adapters of ``graph`` (eager, autograd through the ATen graph).

    ``batches``: an iterable of ``(inputs, target)``, cycled for ``steps`` steps; ``inputs`` is the
    graph's calling convention (a dict of keyword tensors or a tuple). ``loss_fn(output, target)``
    defaults to cross-entropy for integer targets (``output [..., classes]``) and MSE otherwise
    (e.g. distilling the original graph's output). Every other weight is frozen and left exactly
    as it was (``requires_grad`` flags are restored). ``on_step(step, loss)`` is called after each
    step (progress bars). Returns the loss of each step.
    """
    params = adapter_parameters(graph)
    if not params:
        raise PassOptionError("finetune: this graph has no token_shuffle adapters; run the token_shuffle pass first")
    if steps < 1:
        raise PassOptionError(f"finetune: steps must be >= 1, got {steps}")
    loss_fn = loss_fn or _default_loss
    module = graph.module()
    adapter_ids = {id(p) for p in params}
    frozen = [p for p in module.parameters() if id(p) not in adapter_ids and p.requires_grad]
    thawed = [p for p in params if not p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    try:
        for p in frozen:
            p.requires_grad_(False)
        for p in thawed:
            p.requires_grad_(True)
        with torch.enable_grad():
            for (inputs, target), step in zip(itertools.cycle(batches), range(steps)):
                out = module(**inputs) if isinstance(inputs, dict) else module(*inputs)
                loss = loss_fn(_first_tensor(out), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(step, losses[-1])
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in thawed:
            p.requires_grad_(False)
        for p in params:
            p.grad = None
    return losses


def _default_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not target.is_floating_point():
        return torch.nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target.reshape(-1))
    return torch.nn.functional.mse_loss(output.float(), target.float())


def _first_tensor(out) -> torch.Tensor:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return next(x for x in leaves if isinstance(x, torch.Tensor))
