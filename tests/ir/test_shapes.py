"""``rederive_token_sizes``: cutting tokens mid-network (``[B, N, C] → [B, N - r, C]``) and
re-deriving every later size argument from the cut tensor gives the same function as a
model that cuts the tokens itself, at shapes other than the capture's."""

from __future__ import annotations

import pytest
import torch

import tokenfx
from tokenfx.ir.shapes import propagate, rederive_token_sizes

aten = torch.ops.aten
C, H, D = 32, 4, 8
SIZE_OPS = {aten.view.default, aten.reshape.default, aten.expand.default, aten.arange.default, aten._unsafe_view.default}


class Net(torch.nn.Module):
    """``[B, N, C] → [B, H, N']``. Sizes come from ``x.shape`` at the top and feed views,
    reshapes, ``arange`` and ``expand`` before and after the residual add. With ``drop`` the
    model itself cuts the first ``drop`` tokens after the add (the reference)."""

    def __init__(self, drop: int = 0, products: bool = True):
        super().__init__()
        self.a, self.b = torch.nn.Linear(C, C), torch.nn.Linear(C, C)
        self.pos = torch.nn.Embedding(64, C)
        self.drop, self.products = drop, products

    def forward(self, x):
        B, N, _ = x.shape
        h = self.a(x).view(B, N, H, D).transpose(1, 2)  # [B, H, N, D]
        h = h.transpose(1, 2).reshape(B, N, C)
        h = h + x  # ← the test cuts tokens here
        if self.drop:
            h = h[:, self.drop:]
            N = h.shape[1]
        h = h + self.pos(torch.arange(N)).expand(B, N, C)
        h = self.b(h).view(B, N, H, D).permute(0, 2, 1, 3)  # [B, H, N, D]
        if self.products:  # sizes that are products of N: N * D, B * H
            h = h.reshape(B, H, N * D).view(B * H, N, D)
        else:
            h = h.reshape(B * H, N, D)
        return h.sum(-1).view(B, H, N)


def make(drop=0, products=True):
    torch.manual_seed(0)
    net = Net(products=products).eval()
    if drop:
        ref = Net(drop, products).eval()
        ref.load_state_dict(net.state_dict())
        return net, ref
    return net


def residual_add(gm):
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return next(n for n in gm.graph.nodes if n.target is aten.add.Tensor and x in n.args), x


def cut_tokens(gm, r: int, end):
    """Insert ``slice(add, 1, r, end)`` after the residual add; every later use reads the slice."""
    add, x = residual_add(gm)
    if end == "sym_size":  # the symbolic token count itself
        end = next(n for n in gm.graph.nodes if n.target is aten.sym_size.int and n.args == (x, 1))
    with gm.graph.inserting_after(add):
        sliced = gm.graph.call_function(aten.slice.Tensor, (add, 1, r, end))
    add.replace_all_uses_with(sliced, delete_user_cb=lambda user: user is not sliced)
    fake = add.meta["val"]
    end_val = end.meta["val"] if isinstance(end, torch.fx.Node) else end
    with fake.fake_mode:
        sliced.meta["val"] = aten.slice.Tensor(fake, 1, r, end_val)
    gm.graph.lint()
    gm.recompile()
    return sliced, x


def run(gm, x):
    with torch.no_grad():
        return gm(x)


@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("end", [2**62, "sym_size"])
def test_dynamic_tokens_cut_mid_network(r, end):
    net, ref = make(drop=r)
    graph = tokenfx.capture(net, (torch.randn(2, 7, C),))
    gm = graph.gm
    sliced, x = cut_tokens(gm, r, end)
    old_tokens = x.meta["val"].shape[1]
    assert isinstance(old_tokens, torch.SymInt)

    changed = rederive_token_sizes(gm, sliced, token_axis=1, old_tokens=old_tokens)
    propagate(gm)
    assert changed > 0

    # no live size argument after the cut reads the old token count any more
    gm.graph.eliminate_dead_code()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    old_n = next(n for n in gm.graph.nodes if n.target is aten.sym_size.int and n.args == (x, 1))
    late_users = [u for u in old_n.users if order[u] > order[sliced]]
    assert late_users == [], f"still sized by the old N: {late_users}"
    assert str(sliced.meta["val"].shape[1]) != str(old_tokens)

    for batch, tokens in [(2, 7), (3, 12), (1, 5)]:
        inputs = torch.randn(batch, tokens, C, generator=torch.Generator().manual_seed(tokens))
        out = run(gm, inputs)
        assert out.shape == (batch, H, tokens - r)
        torch.testing.assert_close(out, run(ref, inputs), atol=1e-5, rtol=1e-5)


def test_cut_without_rederiving_fails():
    graph = tokenfx.capture(make(), (torch.randn(2, 7, C),))
    cut_tokens(graph.gm, 2, 2**62)
    with pytest.raises(RuntimeError, match="size"):
        run(graph.gm, torch.randn(2, 7, C))


def static_tokens_graph(net, tokens=7):
    batch = torch.export.Dim("batch", min=1, max=64)
    return tokenfx.capture(net, (torch.randn(2, tokens, C),), dynamic_shapes=({0: batch},))


@pytest.mark.parametrize("products,tokens,refusal", [
    (True, 7, "may be a product"),  # N * D = 56 is a literal: cannot be told from an unrelated size
    (False, 4, "static token count 4[: ]"),  # H == N == 4 (and C = 32 = 8·N): which 4 is the token count?
], ids=["static-products", "static-N-equals-H"])
def test_static_tokens_refuses_ambiguous_literals(products, tokens, refusal):
    """Literal matching is unsafe here; the helper refuses instead of rewriting wrongly."""
    from tokenfx.errors import PassOptionError

    net, _ = make(drop=2, products=products)
    gm = static_tokens_graph(net, tokens).gm
    sliced, _ = cut_tokens(gm, 2, 2**62)
    with pytest.raises(PassOptionError, match=refusal):
        rederive_token_sizes(gm, sliced, token_axis=1, old_tokens=tokens)


@pytest.mark.parametrize("products,tokens", [(False, 7)], ids=["static"])
def test_static_tokens_literals_are_rewritten(products, tokens):
    r = 2
    net, ref = make(drop=r, products=products)
    graph = static_tokens_graph(net, tokens)
    gm = graph.gm
    literal_users = [n for n in gm.graph.nodes if n.target in SIZE_OPS and tokens in _flat(n.args)]
    assert literal_users, "the static capture should spell N as the literal 7"

    sliced, _ = cut_tokens(gm, r, 2**62)
    changed = rederive_token_sizes(gm, sliced, token_axis=1, old_tokens=tokens)
    propagate(gm)
    assert changed > 0
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        if n.target in SIZE_OPS and order[n] > order[sliced]:
            assert tokens not in _flat(n.args), f"{n.name} still has the literal {tokens}: {n.args}"

    for batch in (1, 2, 5):
        inputs = torch.randn(batch, tokens, C, generator=torch.Generator().manual_seed(batch))
        out = run(gm, inputs)
        assert out.shape == (batch, H, tokens - r)
        torch.testing.assert_close(out, run(ref, inputs), atol=1e-5, rtol=1e-5)


def _flat(args):
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.extend(_flat(a))
        elif isinstance(a, int) and not isinstance(a, bool):
            out.append(a)
    return out


def test_static_tokens_named_twice_is_refused():
    from tokenfx.errors import PassOptionError
    from tokenfx.ir.shapes import _refuse_ambiguous_static_sizes

    g = torch.fx.Graph()
    x = g.placeholder("x")
    start = g.call_function(aten.relu.default, (x,))
    g.output(g.call_function(aten.view.default, (start, [2, 5, 5, 3])))
    with pytest.raises(PassOptionError, match="appears more than once"):
        _refuse_ambiguous_static_sizes(g, start, 5)
