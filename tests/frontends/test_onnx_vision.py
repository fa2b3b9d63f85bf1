"""ONNX import of a vision transformer: a ViT exported by both torch exporters (its patch
embedding is an ONNX ``Conv``) imports to a graph that computes what onnxruntime computes on the
file, maps to the structure of the captured PyTorch ViT, and takes ``token_merge`` like it."""

from __future__ import annotations

import pytest
import torch

import onnx
import onnxruntime as ort
import tokenfx
from models import FAMILIES, captured, export_onnx_file, image_inputs
from tokenfx.frontends import hf
from tokenfx.frontends.onnx import run_onnxruntime
from tokenfx.frontends.onnx_import import import_onnx

FP32_ATOL = 1e-5  # fp32 rounding through one tiny block (measured max ≈ 1e-6)
EXPORTERS = [("torchscript", 17), ("dynamo", 18)]


@pytest.fixture(scope="module", params=EXPORTERS, ids=lambda c: f"{c[0]}-opset{c[1]}")
def imported(request, tmp_path_factory):
    exporter, opset = request.param
    model, _ = captured("vit")
    module = hf.wrap(model, list(image_inputs(2))).eval()
    path = tmp_path_factory.mktemp(f"vit_{exporter}") / "vit.onnx"
    export_onnx_file(module, image_inputs(2), path, exporter, opset, tokens_dynamic=False)
    return path, import_onnx(path)


def test_patch_embedding_conv_imports_and_runs_like_onnxruntime(imported):
    path, graph = imported
    assert any(n.op_type == "Conv" for n in onnx.load(path).graph.node)
    assert graph.count(torch.ops.aten.conv2d) == 1  # what a captured ViT holds too
    for batch in (3, 1):  # batch sizes the export never saw
        inputs = image_inputs(batch, seed=batch)
        (reference,) = run_onnxruntime(path, inputs)
        with torch.no_grad():
            torch.testing.assert_close(graph.module()(**inputs), torch.from_numpy(reference), atol=FP32_ATOL, rtol=0)


def test_structure_equals_the_captured_vit(imported):
    _, graph = imported
    got, want = graph.structure.to_json(), captured("vit")[1].structure.to_json()
    for key in ("num_blocks", "position", "hidden_size", "final_norm", "embeddings", "head", "token_axis"):
        assert got[key] == want[key], key
    assert got["num_blocks"] == FAMILIES["vit"].layers
    for b_got, b_want in zip(got["blocks"], want["blocks"]):
        assert b_got["attention"] == b_want["attention"] and b_got["norm"] == b_want["norm"]


def test_token_merge_on_the_import_equals_it_on_the_captured_vit(imported, tmp_path):
    _, graph = imported
    model, reference = captured("vit")
    on_import = tokenfx.optimize(graph, "token_merge(r=4, unmerge=True)")
    on_capture = tokenfx.optimize(reference, "token_merge(r=4, unmerge=True)").module()
    session = ort.InferenceSession(str(tokenfx.export_onnx(on_import, tmp_path / "merged.onnx")),
                                   providers=["CPUExecutionProvider"])
    inputs = image_inputs(3, seed=7)
    (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = on_capture(**inputs)
        want = want if isinstance(want, torch.Tensor) else hf.plain_output(want)
        assert got.shape[1] == want.shape[1] == 17  # per-patch output: merged tokens are unmerged at the end
        torch.testing.assert_close(torch.from_numpy(got), want, atol=FP32_ATOL, rtol=1e-5)
        assert not torch.allclose(want, hf.plain_output(model(**inputs)), atol=1e-3)  # the pass changed the function
