"""Passes on imported encoders: an ONNX sentence embedder (BERT + masked mean pooling, exported
by the tests with both torch exporters) imports with SDPA re-formed from the exporters'
MatMul-Softmax-MatMul, so ``fuse_norm`` / ``token_merge`` / ``token_prune`` apply unchanged; the
rewritten graph exports back to ONNX that onnxruntime runs like the same pass applied to the
captured PyTorch model. ``tokenfx rewrite x.onnx --verify`` checks against the input file."""

from __future__ import annotations

import math

import pytest
import torch

import onnx
import onnxruntime as ort
import tokenfx
from models import bert, export_onnx_file, token_inputs
from tokenfx.frontends.hf import SentenceEmbedder
from tokenfx.frontends.onnx import run_onnxruntime
from tokenfx.frontends.onnx_import import import_onnx

FP32_ATOL = 1e-5  # fp32 rounding through two tiny layers and a pooling (measured max ≈ 5e-7)
EXPORTERS = [("torchscript", 17), ("dynamo", 18)]
aten = torch.ops.aten


def ragged(lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": torch.randint(0, 100, (len(lengths), width), generator=g), "attention_mask": mask}


CASES = [([13, 6, 9], 13, 13), ([17, 17], 17, 17)]


def export_embedder(model, path, exporter: str, opset: int):
    return export_onnx_file(model, token_inputs(2, 9), path, exporter, opset, outputs=("embedding",))


_CACHE: dict = {}


@pytest.fixture(scope="module")
def torch_side():
    model = SentenceEmbedder(bert(2), normalize=False).eval()
    return model, tokenfx.capture(model, token_inputs(2, 16))


@pytest.fixture(scope="module", params=EXPORTERS, ids=lambda c: f"{c[0]}-opset{c[1]}")
def imported(request, torch_side, tmp_path_factory):
    exporter, opset = request.param
    path = export_embedder(torch_side[0], tmp_path_factory.mktemp(exporter) / "embedder.onnx", exporter, opset)
    return path, import_onnx(path)


def test_import_reforms_sdpa_and_pooling_runs_like_onnxruntime(imported):
    path, graph = imported
    # the exporters' q·kᵀ / softmax / p·v is one SDPA per block again, and the ModelMap says so
    assert graph.count(aten.scaled_dot_product_attention) == 2
    assert not graph.count(aten.softmax) and not graph.count(aten._safe_softmax)
    assert [b.attention[0].core_kind for b in graph.structure.blocks] == ["sdpa", "sdpa"]
    assert graph.count(aten.clamp) == 1  # the pooling's clamp(min=1e-9): ONNX Clip
    for lengths, width, seed in CASES:
        inputs = ragged(lengths, width, seed)
        (reference,) = run_onnxruntime(path, inputs)
        with torch.no_grad():
            torch.testing.assert_close(graph.module()(**inputs), torch.from_numpy(reference), atol=FP32_ATOL, rtol=0)


def test_fuse_norm_exports_to_onnx_equal_to_the_original(imported, tmp_path):
    path, graph = imported
    fused = tokenfx.optimize(graph, "fuse_norm")
    assert fused.count(torch.ops.tokenfx.add_norm) == 4  # two per post-norm BERT block
    out = tokenfx.export_onnx(fused, tmp_path / "fused.onnx")
    for lengths, width, seed in CASES:
        inputs = ragged(lengths, width, seed)
        (want,) = run_onnxruntime(path, inputs)
        (got,) = run_onnxruntime(out, inputs)
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("pipeline", ["token_merge(r=[3, 2])", "token_prune(r=2)"])  # metric='hidden': the CLI test
def test_token_reduction_parity_with_the_captured_model(imported, torch_side, pipeline, tmp_path):
    """The approximate pass on the imported file, run in onnxruntime, equals the same pass on the
    captured PyTorch model (both paths apply one algorithm to one function)."""
    path, graph = imported
    model, captured = torch_side
    on_import = tokenfx.optimize(graph, pipeline)
    on_capture = tokenfx.optimize(captured, pipeline).module()
    assert on_import.count(torch.ops.tokenfx.reduction_plan) == on_capture.graph.find_nodes(
        op="call_function", target=torch.ops.tokenfx.reduction_plan.default).__len__() > 0
    session = ort.InferenceSession(str(tokenfx.export_onnx(on_import, tmp_path / "reduced.onnx")),
                                   providers=["CPUExecutionProvider"])
    for lengths, width, seed in CASES:
        inputs = ragged(lengths, width, seed)
        (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            want = on_capture(**inputs)
            torch.testing.assert_close(torch.from_numpy(got), want, atol=FP32_ATOL, rtol=1e-5)
            assert not torch.allclose(want, model(**inputs), atol=1e-3)  # the pass changed the function


def test_attention_fusion_on_an_eager_style_graph(tmp_path):
    """HF eager attention's export: ``Div(q @ kᵀ, √D)``, the mask on the *left* of the Add, plain
    Softmax → one SDPA with scale 1/√D, equal to onnxruntime."""
    from onnx import TensorProto, helper

    d = 8
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Constant", [], ["root"], value=helper.make_tensor("root", TensorProto.FLOAT, [], [math.sqrt(d)])),
             helper.make_node("Div", ["s", "root"], ["s2"]),
             helper.make_node("Add", ["mask", "s2"], ["s3"]),
             helper.make_node("Softmax", ["s3"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"])]
    four = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", 2, "n", d])  # noqa: E731
    graph = helper.make_graph(nodes, "attention", [four("q"), four("k"), four("v"),
                              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["b", 1, 1, "n"])], [four("y")])
    path = tmp_path / "attention.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    imported = import_onnx(path)
    assert imported.count(aten.scaled_dot_product_attention) == 1 and not imported.count(aten.matmul)
    core = next(n for n in imported.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    assert core.kwargs["scale"] == pytest.approx(1 / math.sqrt(d))
    g = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(3, 2, 5, d, generator=g) for k in "qkv"}
    inputs["mask"] = torch.where(torch.rand(3, 1, 1, 5, generator=g) > 0.3, 0.0, -1e9)
    (want,) = run_onnxruntime(path, inputs)
    with torch.no_grad():
        torch.testing.assert_close(imported.module()(**inputs), torch.from_numpy(want), atol=1e-6, rtol=0)


# -- tokenfx rewrite model.onnx --verify -----------------------------------------------------------
@pytest.fixture(scope="module")
def embedder_file(torch_side, tmp_path_factory):
    return export_embedder(torch_side[0], tmp_path_factory.mktemp("cli") / "embedder.onnx", "torchscript", 17)


@pytest.mark.parametrize("passes", ["fuse_norm", "token_merge(r=2, metric='hidden')"])
def test_cli_rewrite_onnx_verifies_against_the_input_file(embedder_file, passes, tmp_path, capsys):
    from tokenfx.cli import main

    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(embedder_file), "--passes", passes, "-o", str(out), "--verify", "--json"]) == 0
    import json

    check = json.loads(capsys.readouterr().out)["onnx_verify"]
    if passes == "fuse_norm":  # exact: within fp32 tolerance of the input file in onnxruntime
        assert check["max_abs_error"] <= min(check["tolerance"], 1e-4) and check["cosine"] > 1 - 1e-6
    else:  # approximate: reported, bounded only by being finite
        assert 0 < check["max_abs_error"] < math.inf and check["tolerance"] == math.inf and 0.5 < check["cosine"] < 1
    assert out.is_file() and not list(tmp_path.glob(".*"))


def test_cli_rewrite_onnx_verify_failure_is_one_line_exit_2_no_file(embedder_file, tmp_path, capsys, monkeypatch):
    """A rewritten file that disagrees with the input (here: an export that perturbs a weight, as
    a translation bug would) fails --verify in onnxruntime, not just in torch."""
    from tokenfx.cli import main
    from tokenfx.frontends import onnx as onnx_frontend

    real_export = onnx_frontend.export_onnx

    def bad_export(graph, path, **kw):
        with torch.no_grad():
            next(p for n, p in graph.gm.named_parameters() if n.endswith("bias")).add_(0.5)
        return real_export(graph, path, **kw)

    monkeypatch.setattr(onnx_frontend, "export_onnx", bad_export)
    out = tmp_path / "out.onnx"
    assert main(["rewrite", str(embedder_file), "--passes", "fuse_norm", "-o", str(out), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--verify: in onnxruntime out.onnx differs from" in err and "Traceback" not in err
    assert len(err.splitlines()) <= 2  # one message (rich may wrap it)
    assert not out.exists() and not list(tmp_path.glob(".*"))
