"""tokenfx::kv_compact: the reference's gather-before-scatter semantics, and the Triton kernel
(under TRITON_INTERPRET=1, on CPU tensors) and its emitted source against the reference.

The kernel copies values, so it must be bit-identical to the reference, in every dtype, on
the runtime's accepted paths (increasing, ``dst <= src``, ragged rows padded by repeating
their last pair).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import tokenfx.codegen.kv_compact  # noqa: F401  registers torch.ops.tokenfx.kv_compact
from tokenfx.codegen.kv_compact import kv_compact_reference
from tokenfx.errors import OpInputError

import triton  # noqa: F401  (runs under TRITON_INTERPRET=1; a dev dependency)
assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py must set TRITON_INTERPRET=1"
from tokenfx.codegen.triton.kv_compact import emit_source, kv_compact_triton  # noqa: E402


def accepted_paths(B: int, T: int, prefix: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``src, dst [B, A]`` as the runtime builds them: row b's tree of T tokens sits at slots
    ``prefix[b] .. prefix[b] + T - 1``; it accepts an increasing subset of them (the root, slot
    prefix[b], first), moved to ``prefix[b], prefix[b] + 1, ...``; shorter rows repeat their last pair."""
    rows = []
    for b in range(B):
        n = int(torch.randint(1, T + 1, (), generator=g))
        rest = (torch.randperm(T - 1, generator=g)[: n - 1] + 1).sort().values
        src = prefix[b] + torch.cat([torch.zeros(1, dtype=torch.long), rest])
        dst = prefix[b] + torch.arange(n)
        rows.append((src, dst))
    A = max(len(src) for src, _ in rows)
    pad = lambda x: torch.cat([x, x[-1:].expand(A - len(x))])  # noqa: E731
    return torch.stack([pad(src) for src, _ in rows]), torch.stack([pad(dst) for _, dst in rows])


def make_problem(L, B, Hkv, S, D, T, dtype, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(L, 2, B, Hkv, S, D, generator=g).to(dtype)
    prefix = torch.randint(0, S - T + 1, (B,), generator=g).tolist()
    src, dst = accepted_paths(B, T, prefix, g)
    return cache, src, dst


def test_reference_gathers_before_it_scatters():
    # Pair 0 writes slot 3, which pair 1 reads: the reference must read the old slot 3.
    cache = torch.arange(6, dtype=torch.float32).view(1, 1, 1, 1, 6, 1).expand(1, 2, 1, 1, 6, 1).contiguous()
    old = cache.clone()
    kv_compact_reference(cache, torch.tensor([[2, 3]]), torch.tensor([[3, 4]]))
    assert cache[..., 3, 0].eq(old[..., 2, 0]).all() and cache[..., 4, 0].eq(old[..., 3, 0]).all()
    assert torch.equal(cache[..., [0, 1, 2, 5], :], old[..., [0, 1, 2, 5], :])


def test_reference_moves_accepted_path_and_ignores_repeated_pairs():
    # Row 0 accepts slots 4, 6 -> 4, 5; row 1 accepts only its root, slot 2 -> 2, padded by repeating it.
    cache = torch.randn(2, 2, 2, 3, 8, 4)
    old = cache.clone()
    src, dst = torch.tensor([[4, 6], [2, 2]]), torch.tensor([[4, 5], [2, 2]])
    torch.ops.tokenfx.kv_compact(cache, src, dst)
    assert torch.equal(cache[:, :, 0, :, 5], old[:, :, 0, :, 6])
    assert torch.equal(cache[:, :, 0, :, [0, 1, 2, 3, 4, 6, 7]], old[:, :, 0, :, [0, 1, 2, 3, 4, 6, 7]])
    assert torch.equal(cache[:, :, 1], old[:, :, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "L,B,Hkv,S,D,T",
    [(1, 1, 1, 6, 8, 1), (2, 3, 2, 20, 12, 5), (3, 2, 4, 33, 16, 9)],
    ids=["one_token", "D12_ragged", "D16"],
)
def test_kernel_matches_reference(L, B, Hkv, S, D, T, dtype):
    for seed in range(3):
        cache, src, dst = make_problem(L, B, Hkv, S, D, T, dtype, seed=seed)
        want = cache.clone()
        kv_compact_reference(want, src, dst)
        kv_compact_triton(cache, src, dst)
        assert torch.equal(cache, want)


def test_kernel_on_a_strided_view_writes_only_the_view():
    # The cache as a view ([..., :D] of a wider buffer, int32 indices): the columns past D stay as they were.
    full = torch.randn(2, 2, 3, 2, 16, 12)
    cache = full[..., :10]
    _, src, dst = make_problem(2, 3, 2, 16, 10, 6, torch.float32, seed=4)
    want = cache.clone()
    kv_compact_reference(want, src, dst)
    tail = full[..., 10:].clone()
    kv_compact_triton(cache, src.int(), dst.int())
    assert torch.equal(cache, want) and torch.equal(full[..., 10:], tail)


def test_rejects_mismatched_indices():
    cache, src, dst = make_problem(1, 2, 1, 10, 8, 3, torch.float32)
    with pytest.raises(ValueError, match="src, dst"):
        kv_compact_triton(cache, src[:1], dst[:1])
    with pytest.raises(ValueError, match="integer"):
        kv_compact_triton(cache, src.float(), dst)


def test_opcheck():
    cache, src, dst = make_problem(2, 2, 2, 12, 8, 4, torch.float32)
    result = torch.library.opcheck(torch.ops.tokenfx.kv_compact.default, (cache, src, dst))
    assert set(result.values()) == {"SUCCESS"}


def _load_emitted(tmp_path, source):
    # A real file, not exec() of a string: @triton.jit reads the kernel's source back.
    path = tmp_path / "kv_compact_kernel.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("emitted_kv_compact", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emitted_source_runs_standalone(tmp_path):
    source = emit_source(head_dim=12, dtype="bfloat16")
    compile(source, "kv_compact_kernel.py", "exec")
    assert "head_dim=12, dtype=bfloat16" in source.splitlines()[1]
    assert "import tokenfx" not in source and "from tokenfx" not in source
    assert source.count("def kv_compact_kernel(") == 1

    module = _load_emitted(tmp_path, source)
    cache, src, dst = make_problem(2, 2, 2, 14, 12, 5, torch.bfloat16, seed=1)
    want = cache.clone()
    kv_compact_reference(want, src, dst)
    module.launch(cache, src, dst)
    assert torch.equal(cache, want)
    with pytest.raises(ValueError, match="specialised to"):
        module.launch(cache.float(), src, dst)
    with pytest.raises(OpInputError, match="dtype"):
        emit_source(head_dim=12, dtype="int8")
