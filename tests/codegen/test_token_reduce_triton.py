"""Token reduction's Triton kernels (``bipartite_match``, ``merge_tokens``,
``attention_pagerank``) under TRITON_INTERPRET=1 on CPU tensors, and their emitted standalone
sources, against the plain-torch references of :mod:`tokenfx.codegen.token_reduce`.

Inputs are built as the passes build them: rows padded at the tail, a row whose single
participant is an A token with no B, merge roles alternating over the participating tokens,
prune roles from ``importance_roles`` over PageRank importance, plans from
``reduction_plan_reference``. Each kernel also runs with small blocks, so rows, columns and
channels span several blocks. Cosines / sums may differ from the reference by fp32 rounding;
a match may differ only where two candidates are within that rounding.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

# importing the references also registers torch.ops.tokenfx.{bipartite_match, ...}
from tokenfx.codegen.token_reduce import (attention_pagerank_reference, bipartite_match_reference,
                                          importance_roles_reference, merge_tokens_reference,
                                          reduction_plan_reference)
from tokenfx.errors import OpInputError

assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must set TRITON_INTERPRET=1"
from tokenfx.codegen.triton import token_reduce as k  # noqa: E402

H = 2
SMALL_MATCH = dict(block_m=16, block_n=16, block_c=16, num_warps=4)  # N = 33: 3 x 3 blocks; C = 24: 2 chunks
SCORE_TOL = dict(atol=1e-5, rtol=0)  # cosines in [-1, 1], fp32 with a different rounding order


# -- inputs -------------------------------------------------------------------------------------------
def _real(N):
    """Three rows: full, padded at the tail, two real tokens (CLS + one participant: an A without a B)."""
    return torch.arange(N) < torch.tensor([N, N // 2 + 1, 2])[:, None]


def _participates(real):
    part = real.clone()
    part[:, 0] = False  # ToMe §3: the class token is protected
    return part


def _merge_roles(real):
    part = _participates(real)
    return torch.where(part, 1 + (part.long().cumsum(-1) - 1) % 2, 0)


def _probs(N, seed):
    g = torch.Generator().manual_seed(seed)
    real = _real(N)
    logits = torch.randn(real.shape[0], H, N, N, generator=g).masked_fill(~real[:, None, None, :], float("-inf"))
    return logits.softmax(-1), real


def _prune_roles(real, seed):
    probs, _ = _probs(real.shape[1], seed)
    importance = attention_pagerank_reference(probs, real, 2, True).mean(1)
    return importance_roles_reference(importance, _participates(real))


def _roles(kind, real, seed=0):
    return _merge_roles(real) if kind == "merge" else _prune_roles(real, seed)


def _metric(B, N, C, seed):
    return torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed))


def _cosines(metric, role):
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    allowed = (role == 1)[..., None] & (role == 2)[:, None, :]
    return (m @ m.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))


def _check_match(got, metric, role):
    """Scores within fp32 rounding; the match the reference's, or (only where the best two
    candidates are within rounding) another B token whose cosine is within it of the best."""
    score, match = got
    want_score, want_match = bipartite_match_reference(metric, role)
    assert score.dtype == torch.float32 and match.dtype == torch.long
    assert torch.equal(score.isneginf(), want_score.isneginf())
    torch.testing.assert_close(score, want_score, **SCORE_TOL)
    cos = _cosines(metric, role)
    top2 = cos.topk(min(2, cos.shape[-1]), dim=-1).values
    clear = (top2[..., 0] - top2[..., -1] > 1e-4) | (top2[..., -1] == float("-inf"))  # no near tie
    assert torch.equal(match[clear], want_match[clear])
    chosen = cos.gather(-1, match[..., None])[..., 0]
    finite = want_score.isfinite()
    assert (chosen[finite] >= want_score[finite] - 1e-5).all()
    own = torch.arange(role.shape[1]).expand_as(match)
    assert torch.equal(match[~finite], own[~finite])


# -- bipartite_match ----------------------------------------------------------------------------------
@pytest.mark.parametrize("N,C,kind,blocks", [
    (7, 8, "merge", None), (16, 24, "prune", None), (16, 8, "merge", SMALL_MATCH), (33, 24, "merge", SMALL_MATCH),
    (33, 24, "prune", SMALL_MATCH),
], ids=lambda v: "small_blocks" if v is SMALL_MATCH else "default_blocks" if v is None else str(v))
def test_match_matches_reference(N, C, kind, blocks):
    real = _real(N)
    role = _roles(kind, real, seed=N)
    metric = _metric(real.shape[0], N, C, seed=C)
    got = k.bipartite_match_triton(metric, role) if blocks is None else k._match_launch(metric, role, **blocks)
    _check_match(got, metric, role)
    # the row whose only participant is an A token: no B, so -inf and its own index everywhere
    assert got[0][2].isneginf().all() and torch.equal(got[1][2], torch.arange(N))


def test_match_ties_go_to_the_lowest_index_across_blocks():
    # Integer metrics: dots and norms are exact in any order, so duplicated B tokens tie exactly.
    # Token 5's twin B tokens sit at 20 and 36 (other column blocks of 16): the first must win.
    N, C = 40, 24
    g = torch.Generator().manual_seed(3)
    metric = torch.randint(-3, 4, (1, N, C), generator=g).float()
    role = torch.where(torch.arange(N) % 2 == 0, 2, 1)[None]
    role[0, 5] = 1
    metric[0, 20] = metric[0, 36] = metric[0, 5]
    metric[0, 4] = metric[0, 5]  # also an exact tie inside token 5's own first block: 4 < 20
    for blocks in (SMALL_MATCH, k._match_blocks(N, C)):
        score, match = k._match_launch(metric, role, **blocks)
        want_score, want_match = bipartite_match_reference(metric, role)
        assert match[0, 5] == 4 == want_match[0, 5] and score[0, 5] == pytest.approx(1.0, abs=1e-6)
        _check_match((score, match), metric, role)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_match_low_precision_strided_input(dtype):
    # metric as a transposed view of [B, C, N] and role as int32: the kernel reads strides, computes in fp32
    real = _real(16)
    metric = _metric(3, 24, 16, seed=1).to(dtype).transpose(1, 2)
    role = _merge_roles(real).int()
    _check_match(k._match_launch(metric, role, **SMALL_MATCH), metric, role.long())


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), N=st.integers(1, 24), C=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_match_random_roles(B, N, C, seed):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(B, N, C, generator=g)
    role = torch.randint(0, 3, (B, N), generator=g)
    _check_match(k._match_launch(metric, role, **SMALL_MATCH), metric, role)


# -- merge_tokens -------------------------------------------------------------------------------------
def _plan(N, C, kind, r, merge, seed=0):
    real = _real(N)
    role = _roles(kind, real, seed)
    metric = _metric(real.shape[0], N, C, seed)
    score, match = bipartite_match_reference(metric, role)
    assign, _ = reduction_plan_reference(score, match, role, real, r, merge)
    size = torch.randint(1, 5, real.shape, generator=torch.Generator().manual_seed(seed)).float()
    return metric, size, assign


def _check_merge(got, x, size, assign, r):
    out, out_size = got
    want, want_size = merge_tokens_reference(x, size, assign, r)
    assert out.shape == want.shape and out.dtype == want.dtype and out_size.dtype == want_size.dtype
    torch.testing.assert_close(out, want)  # default tolerances: a few ulps of the dtype
    torch.testing.assert_close(out_size, want_size)


@pytest.mark.parametrize("N,C,r,block_c", [
    (7, 8, 0, None), (7, 8, 3, None), (16, 24, 1, None), (16, 24, 3, 16), (33, 8, 3, None),
], ids=lambda v: "default_block" if v is None else str(v))
def test_merge_matches_reference(N, C, r, block_c):
    x, size, assign = _plan(N, C, "merge", r, True, seed=N + r)
    got = k.merge_tokens_triton(x, size, assign, r) if block_c is None else k._merge_launch(x, size, assign, r,
                                                                                            block_c=block_c)
    _check_merge(got, x, size, assign, r)


@pytest.mark.parametrize("merge", [True, False], ids=["merge", "drop"])
def test_merge_with_prune_plan_and_strided_low_precision(merge):
    x, size, assign = _plan(16, 24, "prune", 3, merge, seed=5)
    x16 = x.to(torch.bfloat16).transpose(0, 1).contiguous().transpose(0, 1)  # [B, N, C] with N outermost
    size_t = size.t().contiguous().t()
    _check_merge(k._merge_launch(x16, size_t, assign.int(), 3, block_c=16), x16, size_t, assign, 3)


def test_merge_accumulates_fp64_as_the_reference():
    # fp64 x accumulates in fp64 (the reference's promote_types); fp64 sizes with fp32 x do not
    x, size, assign = _plan(7, 8, "merge", 3, True, seed=4)
    _check_merge(k.merge_tokens_triton(x.double(), size, assign, 3), x.double(), size, assign, 3)
    _check_merge(k.merge_tokens_triton(x, size.double(), assign, 3), x, size.double(), assign, 3)


def test_merge_discards_the_last_slot_and_sums_sizes():
    # 4 tokens, r = 2: token 1 merges into token 0 (sizes 1 and 3), token 3 is dropped.
    x = torch.tensor([[[1.0, 2.0], [5.0, 6.0], [7.0, 7.0], [9.0, 9.0]]])
    size = torch.tensor([[1.0, 3.0, 2.0, 1.0]])
    out, out_size = k.merge_tokens_triton(x, size, torch.tensor([[0, 0, 1, 2]]), 2)
    assert torch.equal(out, torch.tensor([[[4.0, 5.0], [7.0, 7.0]]])) and torch.equal(out_size, torch.tensor([[4.0, 2.0]]))


# -- attention_pagerank -------------------------------------------------------------------------------
def _check_pagerank(got, probs, real, iterations, cls_weight):
    want = attention_pagerank_reference(probs, real, iterations, cls_weight)
    assert got.shape == want.shape and got.dtype == torch.float32
    # s shrinks by n each step: the tolerance follows its scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert (got[~real[:, None, :].expand_as(got)] == 0).all()  # pads hold 0


@pytest.mark.parametrize("N,iterations,cls_weight,block_i", [
    (7, 0, True, None), (16, 1, False, None), (33, 3, True, None), (33, 1, False, 8), (16, 3, True, 4),
], ids=lambda v: "default_block" if v is None else str(v))
def test_pagerank_matches_reference(N, iterations, cls_weight, block_i):
    probs, real = _probs(N, seed=N)
    if block_i is None:
        got = k.attention_pagerank_triton(probs, real, iterations, cls_weight)
    else:
        blocks = dict(k._pagerank_blocks(N), block_i=block_i)
        got = k._pagerank_launch(probs, real, iterations, cls_weight, **blocks)
    _check_pagerank(got, probs, real, iterations, cls_weight)


def test_pagerank_strided_half_probs():
    # probs as a [B, N, H, N] buffer permuted to [B, H, N, N], in fp16
    probs, real = _probs(16, seed=2)
    strided = probs.half().permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    _check_pagerank(k.attention_pagerank_triton(strided, real, 2, True), strided, real, 2, True)


# -- determinism --------------------------------------------------------------------------------------
def test_runs_are_bit_identical():
    x, size, assign = _plan(16, 8, "merge", 3, True, seed=1)
    role = _merge_roles(_real(16))
    probs, real = _probs(16, seed=1)
    for run in (lambda: k.merge_tokens_triton(x, size, assign, 3), lambda: k.bipartite_match_triton(x, role),
                lambda: (k.attention_pagerank_triton(probs, real, 3, True),)):
        first, second = run(), run()
        assert all(torch.equal(a, b) for a, b in zip(first, second))


# -- emitted sources ----------------------------------------------------------------------------------
def _load_emitted(tmp_path, name, source):
    # A real file, not exec() of a string: @triton.jit reads the kernel's source back.
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"emitted_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _emitted(tmp_path, op, **specialisation):
    source = k.emit_source(op, **specialisation)
    compile(source, f"{op}.py", "exec")
    assert "import tokenfx" not in source and "from tokenfx" not in source
    assert source.count(f"def {op}_kernel(") == 1
    return source, _load_emitted(tmp_path, op, source)


def test_emitted_match_runs_standalone(tmp_path):
    source, module = _emitted(tmp_path, "bipartite_match", dtype="bfloat16", channels=24)
    assert "channels=24, dtype=bfloat16" in source.splitlines()[1]
    real = _real(16)
    metric, role = _metric(3, 16, 24, seed=2).bfloat16(), _merge_roles(real)
    _check_match(module.launch(metric, role), metric, role)
    with pytest.raises(ValueError, match="specialised to"):
        module.launch(metric.float(), role)


def test_emitted_merge_runs_standalone(tmp_path):
    source, module = _emitted(tmp_path, "merge_tokens", dtype="torch.float32", channels=24)
    assert "channels=24, dtype=float32" in source.splitlines()[1]
    x, size, assign = _plan(16, 24, "merge", 3, True, seed=2)
    _check_merge(module.launch(x, size, assign, 3), x, size, assign, 3)
    with pytest.raises(ValueError, match="specialised to"):
        module.launch(x[..., :8], size, assign, 3)


def test_emitted_pagerank_runs_standalone(tmp_path):
    source, module = _emitted(tmp_path, "attention_pagerank", dtype="float32", iterations=3, cls_weight=True)
    assert "iterations=3, cls_weight=True, dtype=float32" in source.splitlines()[1]
    probs, real = _probs(16, seed=3)
    _check_pagerank(module.launch(probs, real), probs, real, 3, True)
    with pytest.raises(ValueError, match="specialised to"):
        module.launch(probs.half(), real)


def test_emit_rejects_bad_specialisation():
    with pytest.raises(OpInputError, match="op must be one of"):
        k.emit_source("token_merge", dtype="float32", channels=8)
    with pytest.raises(OpInputError, match="dtype"):
        k.emit_source("merge_tokens", dtype="int8", channels=8)
    with pytest.raises(OpInputError, match="channels"):
        k.emit_source("bipartite_match", dtype="float32", channels=0)
    with pytest.raises(TypeError):
        k.emit_source("attention_pagerank", dtype="float32", channels=8)


def test_launchers_reject_bad_inputs():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="role"):
        k.bipartite_match_triton(x, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="r must be"):
        k.merge_tokens_triton(x, torch.ones(2, 5), torch.zeros(2, 5, dtype=torch.long), 6)
    with pytest.raises(ValueError, match="probs"):
        k.attention_pagerank_triton(torch.rand(2, 1, 5, 4), torch.ones(2, 5, dtype=torch.bool), 1, False)
