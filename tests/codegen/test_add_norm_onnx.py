"""tokenfx::add_norm exported to ONNX through the onnxscript translation: standard ops only,
dynamic batch / token dims, onnxruntime output equal to torch's at two shapes."""

from __future__ import annotations

import pytest
import torch

import tokenfx.codegen.add_norm  # noqa: F401  registers torch.ops.tokenfx.add_norm

import onnx  # dev dependencies: a missing one must fail the suite, not skip it
import onnxruntime as ort
import onnxscript  # noqa: F401
from tokenfx.codegen.onnx_add_norm import translate  # noqa: E402

C = 24
STANDARD_DOMAINS = {"", "ai.onnx"}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


class AddNorm(torch.nn.Module):
    def __init__(self, kind, *, weight=True, bias=True, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.kind = kind
        self.weight = torch.nn.Parameter((1 + 0.5 * torch.randn(C, generator=g)).to(dtype)) if weight else None
        self.bias = torch.nn.Parameter(torch.randn(C, generator=g).to(dtype)) if bias else None

    def forward(self, x, r):
        normed, summed = torch.ops.tokenfx.add_norm(x, r, self.weight, self.bias, 1e-5, self.kind)
        return normed, summed


def _export(model, dtype):
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    example = (torch.randn(2, 5, C).to(dtype), torch.randn(2, 5, C).to(dtype))
    program = torch.onnx.export(
        model.eval(),
        example,
        dynamo=True,
        dynamic_shapes={"x": {0: batch, 1: tokens}, "r": {0: batch, 1: tokens}},
        custom_translation_table={torch.ops.tokenfx.add_norm.default: translate},
        verbose=False,
    )
    return program.model_proto


@pytest.mark.parametrize(
    "kind,weight,bias,dtype",
    [
        ("layernorm", True, True, torch.float32),
        ("layernorm", True, False, torch.float32),
        ("layernorm", False, False, torch.float32),
        ("rmsnorm", True, True, torch.float32),
        ("rmsnorm", True, False, torch.float32),
        ("rmsnorm", False, True, torch.float32),
        ("rmsnorm", True, False, torch.float16),
    ],
    ids=lambda v: {torch.float32: "fp32", torch.float16: "fp16"}.get(v, str(v)),
)
def test_onnx_export_runs_in_onnxruntime(kind, weight, bias, dtype):
    model = AddNorm(kind, weight=weight, bias=bias, dtype=dtype)
    proto = _export(model, dtype)

    onnx.checker.check_model(proto, full_check=True)
    assert not proto.functions, "the translation must inline to standard ops, not local functions"
    domains = {node.domain for node in proto.graph.node}
    assert domains <= STANDARD_DOMAINS, f"non-standard ONNX domains: {domains - STANDARD_DOMAINS}"
    op_types = {node.op_type for node in proto.graph.node}
    assert ("LayerNormalization" in op_types) == (kind == "layernorm")
    for graph_input in proto.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, "batch and token dims must stay symbolic"
        assert dims[2].dim_value == C

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    for shape in [(2, 5, C), (3, 11, C)]:
        g = torch.Generator().manual_seed(shape[1])
        x = (3 * torch.randn(shape, generator=g) + 1).to(dtype)
        r = torch.randn(shape, generator=g).to(dtype)
        normed, summed = session.run(None, dict(zip(input_names, (x.numpy(), r.numpy()))))
        with torch.no_grad():
            want_normed, want_summed = model(x, r)
        assert torch.equal(torch.from_numpy(summed), want_summed)
        torch.testing.assert_close(torch.from_numpy(normed), want_normed, **TOL[dtype])
