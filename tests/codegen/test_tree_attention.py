"""tokenfx::tree_attention: the Triton kernel (under TRITON_INTERPRET=1, on CPU tensors), its
emitted standalone source, the op's schema / fake impl via opcheck, and its ONNX export.

Ground truth is an fp64 dense attention written here from the op's definition: per row,
softmax over ``concat(cached keys, tree keys)`` with each query allowed its ancestors and
itself. Both the CPU reference and the Triton kernel must match it; the kernel must also
match the reference within a tolerance derived from the dtype.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenfx.codegen.tree_attention  # noqa: F401  registers torch.ops.tokenfx.tree_attention
from tokenfx.codegen.tree_attention import tree_attention_reference
from tokenfx.errors import OpInputError

import triton  # noqa: F401  (runs under TRITON_INTERPRET=1; a dev dependency)
assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must set TRITON_INTERPRET=1"
from tokenfx.codegen.triton.tree_attention import emit_source, tree_attention_triton  # noqa: E402

# Kernel vs reference, both fp32-accumulated: a few ulps of the output dtype (bf16 / fp16 add
# the rounding of p before p·v and of the output).
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """``[T, T]`` bool: ``mask[i, j]`` iff ``j`` is ``i`` or one of its ancestors (``parents[root] == -1``)."""
    mask = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for i in range(len(parents)):
        j = i
        while j != -1:
            mask[i, j] = True
            j = parents[j]
    return mask


def dense_attention_fp64(q, k, v, key_mask, parents, slots, scale):
    """The op by its definition, in fp64, one row at a time: the row's cached keys (key_mask
    != 0) visible to all queries, then the tree's keys (buffer rows at ``slots``) under the
    ancestor mask of ``parents[b]``."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    out = torch.empty(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        cached = key_mask[b].nonzero().flatten()
        keys = torch.cat([k[b][:, cached], k[b][:, slots]], dim=1).double().repeat_interleave(group, dim=0)
        values = torch.cat([v[b][:, cached], v[b][:, slots]], dim=1).double().repeat_interleave(group, dim=0)
        visible = torch.cat([torch.ones(T, len(cached), dtype=torch.bool), ancestor_mask(parents[b])], dim=1)
        scores = (q[b].double() @ keys.transpose(-1, -2)) * scale  # [H, T, P + T]
        out[b] = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values
    return out


def random_parents(T: int, g: torch.Generator) -> list[int]:
    """A random tree in topological order: ``parents[0] == -1``, ``parents[i] < i``."""
    return [-1] + [int(torch.randint(0, i, (), generator=g)) for i in range(1, T)]


def make_inputs(B, H, Hkv, T, S, D, dtype=torch.float32, *, seed=0, parents=None, slots=None, key_mask=None):
    """Random q / k / v; unless given, a random tree per row, T distinct random slots in the
    buffer of S and a random prefix mask that is 0 at those slots."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    if parents is None:
        parents = [random_parents(T, g) for _ in range(B)]
    if slots is None:
        slots = torch.randperm(S, generator=g)[:T]
    if key_mask is None:
        key_mask = (torch.rand(B, S, generator=g) < 0.6).long()
        key_mask[:, slots] = 0
    tree_mask = torch.stack([ancestor_mask(p) for p in parents])
    return (q, k, v, key_mask, tree_mask, slots), parents


SHAPES = [  # B, H, Hkv, T, S, D
    (1, 2, 2, 1, 5, 8),  # a single token (T = 1)
    (2, 4, 2, 3, 37, 12),  # GQA group 2, D not a power of two, S not a multiple of BLOCK_S
    (2, 8, 2, 7, 70, 8),  # group 4, two prefix blocks
    (1, 2, 1, 20, 90, 12),  # T > 16: a 32-wide query / tree-key block
    (1, 1, 1, 70, 80, 8),  # T > 64: two query blocks and two tree-key blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}_Hkv{}_T{}_S{}_D{}".format(*s))
def test_kernel_matches_reference(shape, dtype):
    args, _ = make_inputs(*shape, dtype)
    scale = shape[-1] ** -0.5
    got = tree_attention_triton(*args, scale)
    want = tree_attention_reference(*args, scale)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_fp16_noncontiguous_and_empty_prefix():
    # k / v as transposed views of [B, S, Hkv, D] projections, q likewise; row 1 has no prefix.
    (q, k, v, key_mask, tree_mask, slots), _ = make_inputs(2, 4, 2, 5, 40, 12, torch.float16, seed=3)
    key_mask[1] = 0
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not k.is_contiguous()
    got = tree_attention_triton(q, k, v, key_mask, tree_mask, slots, 0.25)
    torch.testing.assert_close(got, tree_attention_reference(q, k, v, key_mask, tree_mask, slots, 0.25),
                               **TOL[torch.float16])


def test_bool_key_mask_and_large_scores():
    # Scores of ~±200 overflow exp() without the running max; a bool key_mask reads as bytes.
    (q, k, v, key_mask, tree_mask, slots), _ = make_inputs(2, 2, 2, 4, 30, 8, seed=5)
    q = q * 50
    got = tree_attention_triton(q, k, v, key_mask.bool(), tree_mask, slots, 1.0)
    want = tree_attention_reference(q, k, v, key_mask, tree_mask, slots, 1.0)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_rejects_mismatched_shapes():
    (q, k, v, key_mask, tree_mask, slots), _ = make_inputs(1, 3, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        tree_attention_triton(q, k, v, key_mask, tree_mask, slots, 1.0)
    (q, k, v, key_mask, tree_mask, slots), _ = make_inputs(1, 2, 2, 2, 8, 8)
    with pytest.raises(ValueError, match="slots"):
        tree_attention_triton(q, k, v, key_mask, tree_mask, slots[:1], 1.0)


@st.composite
def tree_problems(draw):
    """A batch of 1-3 random trees (topological parent arrays), their slots scattered in a
    buffer, a random prefix mask (0 at the slots) and random tensors."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 6))
    parents = [[-1] + [draw(st.integers(0, i - 1)) for i in range(1, T)] for _ in range(B)]
    S = draw(st.integers(T, T + 20))
    slots = torch.tensor(draw(st.permutations(range(S)))[:T])
    key_mask = torch.tensor([draw(st.lists(st.integers(0, 1), min_size=S, max_size=S)) for _ in range(B)])
    key_mask[:, slots] = 0
    H, Hkv = draw(st.sampled_from([(1, 1), (2, 2), (2, 1), (4, 2)]))
    D = draw(st.sampled_from([8, 12]))
    seed = draw(st.integers(0, 2**16))
    return make_inputs(B, H, Hkv, T, S, D, seed=seed, parents=parents, slots=slots, key_mask=key_mask)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(tree_problems())
def test_random_trees_match_dense_fp64(problem):
    (q, k, v, key_mask, tree_mask, slots), parents = problem
    scale = q.shape[-1] ** -0.5
    want = dense_attention_fp64(q, k, v, key_mask, parents, slots, scale).float()
    torch.testing.assert_close(torch.ops.tokenfx.tree_attention(q, k, v, key_mask, tree_mask, slots, scale), want,
                               **TOL[torch.float32])
    torch.testing.assert_close(tree_attention_triton(q, k, v, key_mask, tree_mask, slots, scale), want,
                               **TOL[torch.float32])


@pytest.mark.parametrize("shape", [(1, 2, 2, 1, 5, 8), (2, 4, 2, 3, 9, 12)], ids=["T1", "gqa"])
def test_opcheck(shape):
    args, _ = make_inputs(*shape)
    # Inputs without requires_grad: the op has no autograd formula (it runs at inference only).
    result = torch.library.opcheck(torch.ops.tokenfx.tree_attention.default, (*args, 0.5))
    assert set(result.values()) == {"SUCCESS"}


# --- emitted source ----------------------------------------------------------------------


def _load_emitted(tmp_path, source):
    # A real file, not exec() of a string: @triton.jit reads the kernel's source back.
    path = tmp_path / "tree_attention_kernel.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("emitted_tree_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype,group", [(torch.float32, 2), (torch.bfloat16, 1)], ids=["fp32_g2", "bf16_g1"])
def test_emitted_source_runs_standalone(tmp_path, dtype, group):
    D, T = 12, 5
    dtype_name = str(dtype).removeprefix("torch.")
    source = emit_source(head_dim=D, dtype=dtype_name, group=group, tree_size=T, block_s=32)
    compile(source, "tree_attention_kernel.py", "exec")
    assert f"head_dim={D}, dtype={dtype_name}, group={group}, block_t=16, block_s=32" in source.splitlines()[1]
    assert "import tokenfx" not in source and "from tokenfx" not in source
    assert source.count("def tree_attention_kernel(") == 1

    module = _load_emitted(tmp_path, source)
    assert (module.HEAD_DIM, module.GROUP, module.BLOCK_S) == (D, group, 32)
    args, _ = make_inputs(2, 2 * group, 2, T, 45, D, dtype, seed=7)
    got = module.launch(*args, 0.3)
    torch.testing.assert_close(got, tree_attention_reference(*args, 0.3), **TOL[dtype])
    bad, _ = make_inputs(2, 2 * group, 2, T, 45, 8, dtype)
    with pytest.raises(ValueError, match="specialised to"):
        module.launch(*bad, 0.3)


def test_emit_rejects_bad_specialisation():
    with pytest.raises(OpInputError, match="dtype"):
        emit_source(head_dim=64, dtype="int8", group=1)
    with pytest.raises(OpInputError, match="block_s"):
        emit_source(head_dim=64, dtype="float16", group=1, block_s=24)


class TreeAttention(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, key_mask, tree_mask, slots):
        return torch.ops.tokenfx.tree_attention(q, k, v, key_mask, tree_mask, slots, self.scale)


def test_emit_kernels_specialises_to_the_graph():
    from tokenfx.codegen.emit import kernel_sources, kernel_specialisations

    args, _ = make_inputs(1, 8, 2, 5, 20, 12, torch.float16)
    gm = torch.export.export(TreeAttention(0.5), args).module()
    specs = kernel_specialisations(gm)
    assert specs == {"tree_attention_D12_G4_T5_float16.py": (
        "tokenfx.codegen.triton.tree_attention", dict(head_dim=12, dtype="float16", group=4, tree_size=5))}
    source = kernel_sources(gm)["tree_attention_D12_G4_T5_float16.py"]
    compile(source, "tree_attention_D12_G4_T5_float16.py", "exec")
    assert "HEAD_DIM = 12\nGROUP = 4" in source


# --- ONNX --------------------------------------------------------------------------------


def test_onnx_export_runs_in_onnxruntime():
    import onnx  # dev dependencies: a missing one must fail the suite, not skip it
    import onnxruntime as ort

    from tokenfx.codegen.ops import onnx_translation_table

    batch, tokens, slots_dim = torch.export.Dim("batch"), torch.export.Dim("tokens"), torch.export.Dim("slots")
    dynamic_shapes = {
        "q": {0: batch, 2: tokens}, "k": {0: batch, 2: slots_dim}, "v": {0: batch, 2: slots_dim},
        "key_mask": {0: batch, 1: slots_dim}, "tree_mask": {0: batch, 1: tokens, 2: tokens}, "slots": {0: tokens},
    }
    model = TreeAttention(0.3).eval()
    example, _ = make_inputs(2, 4, 2, 3, 10, 12)
    proto = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=dynamic_shapes,
                              custom_translation_table=onnx_translation_table(), verbose=False).model_proto

    onnx.checker.check_model(proto, full_check=True)
    assert not proto.functions, "the translation must inline to standard ops, not local functions"
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    assert {"Softmax", "Where", "Range"} <= {node.op_type for node in proto.graph.node}
    q_dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert q_dims[0].dim_param and q_dims[2].dim_param and q_dims[1].dim_value == 4

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for shape in [(2, 4, 2, 3, 10, 12), (3, 4, 2, 6, 29, 12)]:
        args, _ = make_inputs(*shape, seed=shape[3])
        (got,) = session.run(None, dict(zip(names, (a.numpy() for a in args))))
        torch.testing.assert_close(torch.from_numpy(got), tree_attention_reference(*args, 0.3), **TOL[torch.float32])
