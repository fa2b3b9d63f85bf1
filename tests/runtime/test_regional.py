"""Block-wise compilation's cut: prologue, one piece per block (all the same code), epilogue,
and the pieces run in order equal the whole graph."""

from __future__ import annotations

import pytest
import torch

import models
from tokenfx.runtime import regional
from tokenfx.runtime.generate import Generator


@pytest.fixture(scope="module")
def gen():
    return Generator(models.llama(layers=3, heads=4, kv_heads=2, head_dim=8), compile=False)


@pytest.mark.parametrize("kind", ["decode", "prefill", "prefill_dense", "tree"])
def test_blocks_share_one_piece_and_the_cut_is_exact(gen, kind):
    graph = {"decode": lambda: gen.decode_graph, "prefill": lambda: gen.graph("prefill"),
             "prefill_dense": lambda: gen.graph("prefill", padded=False), "tree": lambda: gen.tree_graph}[kind]()
    pieces = regional.partition(graph)
    assert len(pieces) == 3 + 2 and [p.layer for p in pieces] == [None, 0, 1, 2, None]
    assert len({p.key for p in pieces[1:-1]}) == 1, "every block is the same code"
    assert all(len(p.params) == len(pieces[1].params) for p in pieces[1:-1])
    assert all(not any(n.op == "get_attr" for n in p.gm.graph.nodes) for p in pieces), "weights are inputs"
    runner = regional.Blockwise(graph, pieces, {p.key: p.gm for p in pieces})
    a, b = ([x.clone() if isinstance(x, torch.Tensor) else x for x in graph.example_args] for _ in range(2))
    with torch.inference_mode():
        whole, cut = graph.gm(*a), runner(*b)
    for w, c in zip(whole, cut):
        torch.testing.assert_close(c, w, rtol=1e-5, atol=1e-5)  # the same ops; GEMM rounding may differ by layout
    for x, y in zip(a, b):  # the cache writes (decode / tree) land in the same slots
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def test_blockwise_generation_is_token_identical_to_hf(gen):
    model = models.llama(layers=3, heads=4, kv_heads=2, head_dim=8)
    runners = {}
    for label in ("prefill", "prefill_dense", "decode"):
        graph = gen.graph(*{"prefill": ("prefill",), "prefill_dense": ("prefill", "output", False),
                            "decode": ("decode", "inplace")}[label])
        pieces = regional.partition(graph)
        runners[label] = regional.Blockwise(graph, pieces, {p.key: p.gm for p in pieces})
    plain = Generator(model, compile=False)
    for label, run in runners.items():
        plain.install(label, run)
    ids = torch.randint(0, models.VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=[], pad_token_id=0)
    assert torch.equal(plain.generate(ids, attention_mask=mask, max_new_tokens=8, stop=[]), ref)


def test_a_graph_without_blocks_is_uncuttable():
    from tokenfx.frontends.torch_export import capture

    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    graph = capture(mlp, (torch.randn(2, 4),), dynamic=False)
    with pytest.raises(regional.Uncuttable):
        regional.partition(graph)


def test_an_early_exit_piece_cuts_at_its_own_layers(gen):
    from tokenfx.passes import early_exit as E

    graph = E.piece(gen.tree_graph, 1, 3, True)  # blocks 1 and 2, from the residual stream entering block 1
    pieces = regional.partition(graph)
    assert [p.layer for p in pieces] == [None, 1, 2, None] and pieces[1].key == pieces[2].key
    runner = regional.Blockwise(graph, pieces, {p.key: p.gm for p in pieces})
    a, b = ([x.clone() for x in graph.example_args] for _ in range(2))
    with torch.inference_mode():
        for w, c in zip(graph.gm(*a), runner(*b)):
            torch.testing.assert_close(c, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[2], a[2], rtol=1e-5, atol=1e-5)  # layers 1 and 2 of the cache written alike
