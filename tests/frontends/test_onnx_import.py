"""``import_onnx`` / ``tokenfx.load("x.onnx")``: ONNX files the tests export themselves (both torch
exporters, opsets 17-20) import to a graph that computes what onnxruntime computes on the
original file, exports back to an ONNX file that does too, and maps to the same structure as the
captured PyTorch model. Bad files get one clear ModelLoadError."""

from __future__ import annotations

import json

import pytest
import torch

import onnx  # dev dependencies: a missing one must fail the suite, not skip it
import onnxruntime  # noqa: F401
import tokenfx
from models import FAMILIES, captured, export_onnx_file, token_inputs
from tokenfx.errors import ModelLoadError
from tokenfx.frontends import hf
from tokenfx.frontends.onnx import run_onnxruntime
from tokenfx.frontends.onnx_import import import_onnx

FP32_ATOL = 1e-4  # fp32 rounding over a few tiny layers (measured max |diff| ≈ 8e-6)

# (family, exporter, opset): the dynamo exporter keeps scopes in metadata_props at its native
# opsets (18+); at 17 its version conversion drops them (BERT here: scopes from weight names)
CASES = [
    ("bert", "torchscript", 17),
    ("bert", "dynamo", 17),
    ("llama", "torchscript", 17),
    ("llama", "dynamo", 20),
    ("gpt2", "dynamo", 18),
]
ROUND_TRIP = [("bert", "torchscript", 17), ("llama", "dynamo", 20)]  # once per exporter (time budget)


def _export(name: str, exporter: str, opset: int, path):
    module = hf.wrap(FAMILIES[name].model(), list(token_inputs(2, 7))).eval()
    return export_onnx_file(module, token_inputs(2, 7), path, exporter, opset)


_IMPORTED: dict = {}


def _imported(case, tmp_path_factory):
    """(case, path, graph) for one export; made once per session (exports and imports take seconds)."""
    if case not in _IMPORTED:
        name, exporter, opset = case
        path = _export(name, exporter, opset, tmp_path_factory.mktemp(f"{name}_{exporter}") / f"{name}.onnx")
        _IMPORTED[case] = (case, path, tokenfx.load(str(path)))
    return _IMPORTED[case]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}-opset{c[2]}")
def imported(request, tmp_path_factory):
    return _imported(request.param, tmp_path_factory)


def test_import_runs_like_onnxruntime(imported):
    _, path, graph = imported
    assert graph.source == "export" and graph.family == "onnx"
    # shapes the import never saw, a padded row, and a single token
    for batch, tokens in [(3, 13), (1, 1)]:
        inputs = token_inputs(batch, tokens, seed=tokens)
        (reference,) = run_onnxruntime(path, inputs)
        with torch.no_grad():
            out = graph.module()(**inputs)
        assert tuple(out.shape) == reference.shape
        torch.testing.assert_close(out, torch.from_numpy(reference), atol=FP32_ATOL, rtol=0)


def test_import_holds_aten_ops_of_a_captured_model(imported):
    (name, _, _), _, graph = imported
    ops = {n.target for n in graph.graph.nodes if n.op == "call_function"}
    aten = torch.ops.aten
    # MatMul by a weight (+ bias Add) / Gemm became linear; the embedding Gather an embedding
    assert aten.linear.default in ops and aten.embedding.default in ops
    # the exporters' MatMul-Softmax-MatMul attention is SDPA again, one per layer; matmuls left
    # are activation x activation (RoPE's frequencies): no projection by a weight stays a matmul
    assert graph.count(aten.scaled_dot_product_attention) == FAMILIES[name].layers
    assert not graph.count(aten.softmax) and not graph.count(aten._safe_softmax)
    matmuls = [n for n in graph.graph.nodes if n.op == "call_function" and n.target is aten.matmul.default]
    assert not [n for n in matmuls if any(a.op == "get_attr" for a in n.all_input_nodes)]
    assert {b.attention[0].core_kind for b in graph.structure.blocks} == {"sdpa"}
    per_block, head = {"bert": (6, 0), "llama": (7, 1), "gpt2": (4, 1)}[name]  # q k v o + MLP; lm_head
    assert graph.count(aten.linear) == per_block * FAMILIES[name].layers + head
    params = dict(graph.gm.named_parameters())
    assert params and all(not p.requires_grad for p in params.values())


def test_structure_equals_the_pytorch_model(imported):
    (name, _, _), _, graph = imported
    _, reference = captured(name)
    got, want = graph.structure.to_json(), reference.structure.to_json()
    for key in ("num_blocks", "position", "hidden_size", "final_norm", "embeddings", "head", "token_axis"):
        assert got[key] == want[key], key
    for b_got, b_want in zip(got["blocks"], want["blocks"]):
        assert b_got["name"] == b_want["name"]
        assert (b_got["norm"], b_got["norm_placement"]) == (b_want["norm"], b_want["norm_placement"])
        for key in ("heads", "kv_heads", "head_dim", "causal"):
            assert b_got["attention"][key] == b_want["attention"][key], (b_got["name"], key)
        assert b_got["mlp_projections"] == b_want["mlp_projections"]


@pytest.mark.parametrize("case", ROUND_TRIP, ids=lambda c: f"{c[0]}-{c[1]}-opset{c[2]}")
def test_export_back_to_onnx_equals_the_original(case, tmp_path, tmp_path_factory):
    _, path, graph = _imported(case, tmp_path_factory)
    out = tokenfx.export_onnx(graph, tmp_path / "round_trip.onnx")
    inputs = token_inputs(3, 11, seed=5)
    (reference,) = run_onnxruntime(path, inputs)
    (again,) = run_onnxruntime(out, inputs)
    torch.testing.assert_close(torch.from_numpy(again), torch.from_numpy(reference), atol=FP32_ATOL, rtol=0)
    names = [i.name for i in onnx.load(out).graph.input]
    assert names == ["input_ids", "attention_mask"]


def test_cli_inspect_prints_the_imported_structure(tmp_path_factory, capsys):
    from tokenfx.cli import main

    (name, _, _), path, _ = _imported(("llama", "dynamo", 20), tmp_path_factory)

    assert main(["inspect", "--json", str(path)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_blocks"] == FAMILIES[name].layers and data["position"] == "rope"
    assert data["blocks"][0]["attention"]["kv_heads"] == 2 and data["blocks"][0]["norm"] == "rmsnorm"


# -- bad input ------------------------------------------------------------------------------------
def _tiny_model(op_type: str = "Relu", **attrs) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(torch.randn(4, 4).numpy(), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="/proj/MatMul"),
             helper.make_node(op_type, ["h"], ["y"], name=f"/act/{op_type}", **attrs)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tiny_model_imports_and_runs(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_model(), path)
    graph = import_onnx(path)
    x = torch.randn(5, 4)
    (reference,) = run_onnxruntime(path, {"x": x})
    torch.testing.assert_close(graph.module()(x=x), torch.from_numpy(reference), atol=1e-6, rtol=0)


def test_unsupported_op_names_node_op_and_opset(tmp_path):
    path = tmp_path / "hardmax.onnx"
    onnx.save(_tiny_model("Hardmax"), path)
    with pytest.raises(ModelLoadError, match=r"'/act/Hardmax' \(op Hardmax, domain ai.onnx, opset 17\) has no translation"):
        tokenfx.load(str(path))


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x08\x07\x12\x04this is not protobuf" + bytes(range(256)))
    with pytest.raises(ModelLoadError, match="not a valid ONNX"):
        tokenfx.load(str(path))


def test_truncated_file(tmp_path):
    full = tmp_path / "full.onnx"
    onnx.save(_tiny_model(), full)
    data = full.read_bytes()
    for cut in (len(data) // 2, len(data) - 7):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="corrupt or truncated"):
            tokenfx.load(str(path))


def test_missing_external_data(tmp_path):
    path = tmp_path / "external.onnx"
    onnx.save_model(_tiny_model(), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").exists()
    import_onnx(path)  # present: loads
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelLoadError, match="external data file 'weights.bin' .* is missing"):
        tokenfx.load(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model file"):
        tokenfx.load(str(tmp_path / "absent.onnx"))


def test_cli_bad_file_exits_2_with_one_line(tmp_path, capsys):
    from tokenfx.cli import main

    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"garbage" * 10)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a valid ONNX" in err and "Traceback" not in err
