"""``early_exit``: exit heads equal the model's own head on each block's residual stream; the
stage pieces compose to the whole graph exactly; ``kv_fill`` writes the K/V of its definition."""

from __future__ import annotations

import pytest
import torch

from models import gpt2, llama
from tokenfx.errors import MappingError, PassOptionError
from tokenfx.passes import early_exit as EE
from tokenfx.passes.base import PassManager, optimize
from tokenfx.ir.kv_layout import example_inputs
from tokenfx.passes.kv_cache import KVCache
from tokenfx.passes.tree_verify import TreeVerify
from tokenfx.frontends.load import decoder_graph

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request):
    model = llama(layers=4) if request.param == "llama" else gpt2(layers=4)
    full = decoder_graph(model)
    decode = optimize(full, [KVCache(mode="decode", logits="all", cache_update="inplace")])
    tree = optimize(decode, [TreeVerify()])
    return model, full, tree


def _args(graph, seed=0):
    args = list(example_inputs(graph.kv, batch=2, tokens=4, past=5, vocab=graph.config.vocab_size))
    args[2] = torch.randn(args[2].shape, generator=torch.Generator().manual_seed(seed))
    return args


def test_exit_heads_are_the_models_head_on_each_block(family):
    model, full, _ = family
    report = PassManager("early_exit(layers=[1, 3])", verify=True).run(full)  # last exit == logits, logits unchanged
    graph = report.graph
    assert graph.exits.layers == (1, 3, 4) and graph.exits.stages == ((0, 1), (1, 3), (3, 4))
    ids = full.example_kwargs.get("input_ids", full.example_args[0] if full.example_args else None)
    with torch.no_grad():
        out = graph.run_example()
        hidden = model(ids, output_hidden_states=True).hidden_states
        norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
        for i, layer in enumerate((1, 3)):
            torch.testing.assert_close(out[-1][i], model.lm_head(norm(hidden[layer])), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[-1][-1], out[0], rtol=0, atol=0)  # exit at the last layer = the full model, exactly


def test_pieces_compose_to_the_whole_graph(family):
    _, _, tree = family
    args = _args(tree)
    cache0 = args[2].clone()
    with torch.no_grad():
        ref, _ = tree.gm(*args)
        ref_cache = args[2].clone()
        for cuts in ([0, 4], [0, 1, 4], [0, 2, 3, 4], [0, 1, 2, 3, 4]):
            args[2] = cache0.clone()
            h = ()
            for start, stop in zip(cuts, cuts[1:]):
                outs = EE.piece(tree, start, stop, head=stop == 4).gm(*args, *h)
                h = (outs[0],)
            assert torch.equal(outs[1], ref), cuts  # same arithmetic, split across calls
            assert torch.equal(args[2], ref_cache), cuts  # every block wrote its own K/V once


def test_piece_structure(family):
    _, _, tree = family
    p = EE.piece(tree, 1, 3, head=True)
    writes = [n.args[1] for n in p.gm.graph.nodes if n.op == "call_function" and "kv_write" in str(n.target)]
    assert writes == [1, 2]  # only its own blocks write the cache
    names = [n.name for n in p.gm.graph.nodes if n.op == "placeholder"]
    assert names[-1] == "hidden" and len(names) == len(tree.kv.inputs) + 1
    emb = [n for n in p.gm.graph.nodes if n.op == "call_function" and "embedding" in str(n.target)]
    assert not emb or all(not n.users for n in emb)  # the embedding does not run in a later piece
    trace = EE.piece(tree, 0, 4, head=True, trace=True).gm(*_args(tree))[2]
    assert trace.shape[0] == 4 and trace.shape[-1] == p.example_args[-1].shape[-1]


def test_kv_fill_is_state_propagation(family):
    """The K/V ``kv_fill`` writes for blocks >= E equal those the model computes when ``h`` is
    fed to each of those blocks (a one-block piece from ``h`` writes them too)."""
    _, _, tree = family
    args = _args(tree)
    h = torch.randn(2, 4, tree.structure.hidden_size, generator=torch.Generator().manual_seed(3))
    cache0 = args[2].clone()
    with torch.no_grad():
        EE.kv_fill(tree, 2, 4).gm(*args, h)
        filled = args[2].clone()
        for layer in (2, 3):
            args[2] = cache0.clone()
            EE.piece(tree, layer, layer + 1).gm(*args, h)  # block `layer` run on h: writes K/V(h) at `layer`
            slots = args[5]
            torch.testing.assert_close(filled[layer][:, :, :, slots], args[2][layer][:, :, :, slots], rtol=0, atol=0)
    assert torch.equal(filled[:2], cache0[:2])  # blocks before the exit untouched


def test_options_and_refusals(family):
    _, full, tree = family
    with pytest.raises(PassOptionError, match=r"exit layer\(s\) \[5\] out of range; the model has 4 blocks"):
        optimize(full, "early_exit(layers=[2, 5])")
    with pytest.raises(PassOptionError, match="exit layer"):
        optimize(full, "early_exit(layers=[0])")
    with pytest.raises(PassOptionError, match="head must be 'shared'"):
        optimize(full, "early_exit(head='adapter')")
    assert optimize(full, "early_exit(every=2)").exits.layers == (2, 4)
    assert optimize(full, "early_exit").exits.layers == (1, 2, 3, 4)
    with pytest.raises(PassOptionError, match="no piece"):
        EE.piece(tree, 3, 2)
    with pytest.raises(PassOptionError, match="cache_update='inplace'"):
        EE.kv_fill(full, 1, 2)


def test_partition_refuses_a_value_crossing_the_cut():
    """A block that reads an earlier block's output besides the residual stream (a cross-layer
    skip connection) cannot be cut there: the error names the value."""
    import transformers

    model = llama(layers=3)
    original = transformers.models.llama.modeling_llama.LlamaModel.forward
    first = model.model.layers[0]
    old_forward = first.forward

    def leaky(hidden_states, *a, **kw):  # block 0 stashes its output; block 2 adds it back
        out = old_forward(hidden_states, *a, **kw)
        model._stash = out[0] if isinstance(out, tuple) else out
        return out

    third = model.model.layers[2]
    third_forward = third.forward

    def reads_stash(hidden_states, *a, **kw):
        return third_forward(hidden_states + model._stash, *a, **kw)

    first.forward, third.forward = leaky, reads_stash
    try:
        graph = decoder_graph(model)
    finally:
        first.forward, third.forward = old_forward, third_forward
    assert transformers.models.llama.modeling_llama.LlamaModel.forward is original
    EE.partition(graph, [1, 3])  # after block 0 the stash is the residual stream itself: a valid cut
    with pytest.raises(MappingError, match="cannot stop after block 1"):
        EE.partition(graph, [2, 3])


def test_onnx_export_with_exit_heads(tmp_path):
    """The output-cache decode graph with exit heads exports to ONNX and runs in onnxruntime with
    the same logits, new K/V and exit logits (a batch and cache length the export never saw)."""
    import tokenfx
    from tokenfx.frontends.onnx import run_onnxruntime

    decode = optimize(decoder_graph(llama(layers=3)), [KVCache(mode="decode", logits="all")])
    graph = optimize(decode, "early_exit(layers=[1, 2])")
    path = tokenfx.export_onnx(graph, tmp_path / "exits.onnx")
    g = torch.Generator().manual_seed(2)
    b, past, t = 3, 6, 2
    args = {"tokens": torch.randint(0, 100, (b, t), generator=g),
            "positions": (torch.arange(t) + past).expand(b, t).contiguous(),
            "kv_cache": torch.randn(graph.kv.cache_shape(b, past), generator=g),
            "cache_mask": torch.ones(b, past, dtype=torch.long), "token_mask": torch.ones(b, t, dtype=torch.long)}
    with torch.no_grad():
        ref = graph.gm(*args.values())
    outs = run_onnxruntime(path, args)
    assert len(outs) == 3 and tuple(outs[2].shape) == (3, b, t, 100)
    for r, o in zip(ref, outs):
        torch.testing.assert_close(torch.as_tensor(o), r, atol=1e-4, rtol=1e-4)
