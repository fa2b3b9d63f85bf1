"""``export_onnx`` of fuse_norm-rewritten models: standard ops only, symbolic batch and token
dims, onnxruntime equal to the torch graph at shapes the capture never saw, and no file left
behind when the export fails."""

from __future__ import annotations

import pytest
import torch

import tokenfx.codegen.add_norm  # noqa: F401  registers torch.ops.tokenfx.add_norm
from models import captured, token_inputs
from tokenfx.errors import ExportError
from tokenfx.passes.base import optimize

import onnx  # dev dependencies: a missing one must fail the suite, not skip it
import onnxruntime  # noqa: F401
import onnxscript  # noqa: F401
from tokenfx.frontends.onnx import export_onnx, run_onnxruntime  # noqa: E402

STANDARD_DOMAINS = {"", "ai.onnx"}
ADD_NORM = torch.ops.tokenfx.add_norm.default


@pytest.fixture(scope="module", params=["llama", "gpt2", "bert"])
def exported(request, tmp_path_factory):
    name = request.param
    _, graph = captured(name)
    fused = optimize(graph, "fuse_norm")
    assert fused.count(ADD_NORM) > 0
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    returned = export_onnx(fused, path)
    return name, fused, path, returned


def test_file_is_valid_standard_onnx(exported):
    name, _, path, returned = exported
    assert returned == path and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "temp files left next to the output"
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    domains = {node.domain for node in model.graph.node}
    assert domains <= STANDARD_DOMAINS, f"custom ops left: {domains - STANDARD_DOMAINS}"
    assert not {f.domain for f in model.functions} - STANDARD_DOMAINS


def test_inputs_have_symbolic_batch_and_token_dims(exported):
    _, _, path, _ = exported
    model = onnx.load(path)
    names = [i.name for i in model.graph.input]
    assert names == ["input_ids", "attention_mask"]
    batch, tokens = set(), set()
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert len(dims) == 2
        assert dims[0].dim_param and dims[1].dim_param, f"{graph_input.name}: batch and token dims must be symbolic"
        batch.add(dims[0].dim_param)
        tokens.add(dims[1].dim_param)
    # both inputs share one batch symbol and one token symbol, and the two differ
    assert len(batch) == 1 and len(tokens) == 1 and batch != tokens


@pytest.mark.parametrize("batch,length", [(1, 5), (3, 17)])
def test_onnxruntime_matches_torch(exported, batch, length):
    _, fused, path, _ = exported
    inputs = token_inputs(batch, length, seed=length)
    if batch > 1:
        assert not bool(inputs["attention_mask"].all())
    with torch.no_grad():
        reference = fused.module()(**inputs)
    (out,) = run_onnxruntime(path, inputs)
    assert tuple(out.shape) == tuple(reference.shape)
    torch.testing.assert_close(torch.from_numpy(out), reference, atol=1e-4, rtol=0)


def test_missing_directory_is_refused(tmp_path):
    _, graph = captured("bert")
    target = tmp_path / "missing" / "bert.onnx"
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(graph, target)
    assert not target.parent.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    _, graph = captured("bert")

    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    target = tmp_path / "bert.onnx"
    with pytest.raises(ExportError, match="exporter exploded"):
        export_onnx(graph, target)
    assert list(tmp_path.iterdir()) == [], "no output and no temp file may remain"


def test_failed_check_leaves_nothing(tmp_path, monkeypatch):
    _, graph = captured("bert")

    def reject(model, full_check=False):
        raise onnx.checker.ValidationError("checker says no")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    target = tmp_path / "bert.onnx"
    with pytest.raises(ExportError, match="checker"):
        export_onnx(graph, target)
    assert list(tmp_path.iterdir()) == []


def test_wrong_suffix_is_refused(tmp_path):
    _, graph = captured("bert")
    with pytest.raises(ExportError, match=r"\.onnx"):
        export_onnx(graph, tmp_path / "bert.pt2")
    assert list(tmp_path.iterdir()) == []
