"""The kv_cache graphs leave Python: ONNX (cache as inputs / outputs) in onnxruntime, and the
decode step under ``torch.compile(backend="tokenfx")``."""

from __future__ import annotations

import models
import onnx
import pytest
import torch

import tokenfx
from tokenfx.frontends.onnx import run_onnxruntime
from tokenfx.ir.kv_layout import example_inputs


@pytest.fixture(scope="module")
def graphs():
    g = tokenfx.capture(models.llama(), (torch.randint(0, models.VOCAB, (2, 8)),))
    return {mode: tokenfx.optimize(g, f"kv_cache(mode={mode})") for mode in ("prefill", "decode")}


def _inputs(graph, batch, tokens, past):
    args = list(example_inputs(graph.kv, batch=batch, tokens=tokens, past=past, vocab=models.VOCAB))
    if graph.kv.mode == "decode":
        args[2] = torch.randn(args[2].shape, generator=torch.Generator().manual_seed(past))  # a non-trivial cache
        args[3][0, : past // 2] = 0  # the first row is left-padded
    return tuple(args)


@pytest.fixture(scope="module")
def exported(graphs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv_onnx")
    return {mode: tokenfx.export_onnx(g, folder / f"{mode}.onnx") for mode, g in graphs.items()}


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_onnx_signature_names_the_cache(exported, mode):
    model = onnx.load(exported[mode])
    inputs = [i.name for i in model.graph.input]
    expected = ["tokens", "positions", "kv_cache", "cache_mask", "token_mask"] if mode == "decode" else ["tokens", "positions", "token_mask"]
    assert inputs == expected
    assert [o.name for o in model.graph.output] == ["logits", "new_kv"]
    if mode == "decode":  # batch and cache length stay symbolic
        dims = model.graph.input[2].type.tensor_type.shape.dim
        assert dims[2].dim_param and dims[4].dim_param and not dims[4].HasField("dim_value")


@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("batch,tokens,past", [(1, 1, 5), (3, 4, 11)])
def test_onnxruntime_matches_torch(graphs, exported, mode, batch, tokens, past):
    graph = graphs[mode]
    args = _inputs(graph, batch, tokens, past)
    with torch.no_grad():
        ref = graph.gm(*args)
    names = [i.name for i in onnx.load(exported[mode]).graph.input]
    outs = run_onnxruntime(exported[mode], dict(zip(names, args)))
    for r, o in zip(ref, outs):
        assert o.shape == tuple(r.shape)
        assert float((torch.as_tensor(o) - r).abs().max()) < 1e-4


def test_decode_step_under_torch_compile_tokenfx(graphs):
    graph = graphs["decode"]
    compiled = torch.compile(graph.gm, backend="tokenfx", options={"inner": "eager", "passes": "fuse_norm"})
    args = _inputs(graph, 2, 1, 7)
    with torch.no_grad():
        ref, out = graph.gm(*args), compiled(*args)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=0, atol=1e-5)
    from tokenfx.frontends import dynamo

    assert dynamo.COMPILE_LOG[-1]["passes"][0]["matched"], "fuse_norm found the decode graph's norms"


def test_decode_graph_keeps_its_structure(graphs):
    """The rewritten graph still maps (blocks, heads), so later passes (tree_verify, early_exit) can run on it."""
    structure = graphs["decode"].structure
    assert structure.num_blocks == 2
    att = structure.blocks[0].attention[0]
    assert (att.heads, att.kv_heads, att.head_dim) == (4, 2, 8)
