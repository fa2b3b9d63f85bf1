"""tokenfx::add_norm: the Triton kernel (under TRITON_INTERPRET=1, on CPU tensors), its
emitted standalone source, and the op's schema / fake impl via opcheck.

Ground truth is ``add_norm_reference``. ``summed`` must be bit-identical to ``x + residual``;
``normed`` within a tolerance derived from the output dtype.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import tokenfx.codegen.add_norm  # noqa: F401  registers torch.ops.tokenfx.add_norm
from tokenfx.codegen.add_norm import add_norm_reference
from tokenfx.errors import OpInputError

import triton  # noqa: F401  (runs under TRITON_INTERPRET=1; a dev dependency)
assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must set TRITON_INTERPRET=1"
from tokenfx.codegen.triton.add_norm import add_norm_triton, emit_source  # noqa: E402

# atol / rtol for `normed`: a few ulps of the output dtype (fp32 statistics in both paths).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _inputs(shape, dtype, *, weight=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (3 * torch.randn(shape, generator=g) + 1).to(dtype)  # non-zero mean exercises layernorm centring
    r = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(dtype) if weight else None
    b = torch.randn(C, generator=g).to(dtype) if bias else None
    return x, r, w, b


def _check(got, x, r, w, b, eps, kind):
    normed, summed = got
    want_normed, want_summed = add_norm_reference(x, r, w, b, eps, kind)
    assert normed.shape == x.shape and summed.shape == x.shape
    assert normed.dtype == x.dtype and summed.dtype == x.dtype
    assert torch.equal(summed, x + r), "summed must be exactly x + residual"
    torch.testing.assert_close(normed, want_normed, **TOL[x.dtype])
    assert torch.equal(want_summed, summed)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(1, 1), (3, 7), (17, 33), (3, 100), (2, 3, 384)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_matches_reference(kind, dtype, shape):
    x, r, w, b = _inputs(shape, dtype)
    _check(add_norm_triton(x, r, w, b, 1e-5, kind), x, r, w, b, 1e-5, kind)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)])
def test_optional_weight_and_bias(kind, weight, bias):
    x, r, w, b = _inputs((2, 5, 33), torch.float32, weight=weight, bias=bias)
    _check(add_norm_triton(x, r, w, b, 1e-6, kind), x, r, w, b, 1e-6, kind)


def test_fp16_and_noncontiguous_input():
    x, r, w, b = _inputs((4, 3, 48), torch.float16)
    x = x.transpose(0, 1)  # [3, 4, 48], not contiguous
    r = r.transpose(0, 1)
    _check(add_norm_triton(x, r, w, b, 1e-5, "layernorm"), x, r, w, b, 1e-5, "layernorm")


def test_bf16_sum_rounds_to_nearest_even():
    # Each x + r lies exactly halfway between two bf16 values or just off it; truncating
    # the fp32 sum (what the CPU interpreter's cast does) would differ from torch here.
    x = torch.tensor([[1.0, 1.0, -1.0, 3.0]], dtype=torch.bfloat16)
    r = torch.tensor([[2**-8, 3 * 2**-8, -(2**-8) - 2**-12, 2**-7 + 2**-9]], dtype=torch.bfloat16)
    _, summed = add_norm_triton(x, r, None, None, 1e-5, "rmsnorm")
    assert torch.equal(summed, x + r)


def test_unknown_kind_is_rejected():
    x, r, w, b = _inputs((2, 8), torch.float32)
    with pytest.raises(OpInputError, match="kind must be one of"):
        add_norm_triton(x, r, w, b, 1e-5, "batchnorm")


def _load_emitted(tmp_path, source):
    # A real file, not exec() of a string: @triton.jit reads the kernel's source back.
    path = tmp_path / "add_norm_kernel.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("emitted_add_norm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "kind,dtype,weight,bias",
    [("layernorm", torch.float32, True, True), ("rmsnorm", torch.bfloat16, True, False)],
)
def test_emitted_source_runs_standalone(tmp_path, kind, dtype, weight, bias):
    C, eps = 100, 1e-6
    dtype_name = str(dtype).removeprefix("torch.")
    source = emit_source(C=C, kind=kind, has_weight=weight, has_bias=bias, dtype=dtype_name, eps=eps)
    compile(source, "add_norm_kernel.py", "exec")
    assert f"C={C}, kind={kind}, dtype={dtype_name}" in source.splitlines()[1]
    assert "BLOCK_C = 128" in source
    assert "import tokenfx" not in source and "from tokenfx" not in source
    assert source.count("def add_norm_kernel(") == 1

    module = _load_emitted(tmp_path, source)
    x, r, w, b = _inputs((3, 5, C), dtype, weight=weight, bias=bias)
    _check(module.launch(x, r, w, b), x, r, w, b, eps, kind)
    with pytest.raises(ValueError, match="specialised to"):
        module.launch(x[..., :50], r[..., :50], w, b)


def test_emit_rejects_bad_specialisation():
    with pytest.raises(OpInputError, match="dtype"):
        emit_source(C=8, kind="rmsnorm", has_weight=True, has_bias=False, dtype="int8", eps=1e-5)
    with pytest.raises(OpInputError, match="kind"):
        emit_source(C=8, kind="groupnorm", has_weight=True, has_bias=False, dtype="float32", eps=1e-5)


@pytest.mark.parametrize(
    "kind,shape,weight,bias",
    [("layernorm", (2, 3, 16), True, True), ("rmsnorm", (5, 7), True, False), ("layernorm", (4, 9), False, False)],
)
def test_opcheck(kind, shape, weight, bias):
    x, r, w, b = _inputs(shape, torch.float32, weight=weight, bias=bias)
    torch.library.opcheck(torch.ops.tokenfx.add_norm.default, (x, r, w, b, 1e-5, kind))
