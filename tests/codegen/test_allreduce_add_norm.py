"""``tokenfx::allreduce_start`` / ``allreduce_wait`` / ``allreduce_add_norm`` against their
reference (the blocking all-reduce, then the ``add_norm`` reference): at world size 1 in this
process (a gloo group over a HashStore) and at world size 2 in spawned gloo ranks (bounded,
the harness of test_tensor_parallel); two all-reduces in flight at once, waited out of order;
the fake shapes; the errors (no process group, a token waited twice).
"""

from __future__ import annotations

import pytest
import torch

from passes.test_tensor_parallel import spawn_ranks  # the bounded gloo spawn harness
from tokenfx.codegen import allreduce_add_norm as ops
from tokenfx.codegen.add_norm import add_norm_reference
from tokenfx.errors import OpInputError

start = torch.ops.tokenfx.allreduce_start.default
wait = torch.ops.tokenfx.allreduce_wait.default
fused = torch.ops.tokenfx.allreduce_add_norm.default
SHAPE = (2, 5, 16)


def _tensors(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=gen), torch.randn(SHAPE[-1], generator=gen)


def _check(rank: int, world: int) -> dict:
    """Every property at this rank; the values each rank sees, by name, as max abs errors."""
    partials = [_tensors(r)[0] for r in range(world)]  # every rank's partial sum, rebuilt here by seed
    mine = partials[rank].clone()
    residual, weight = _tensors(100)
    bias = torch.randn(SHAPE[-1], generator=torch.Generator().manual_seed(7))
    total = sum(partials[1:], partials[0].clone())
    out = {}
    for kind, b in (("rmsnorm", None), ("layernorm", bias)):
        expected = add_norm_reference(total, residual, weight, b, 1e-6, kind)
        got = fused(start(mine, "0"), mine, residual, weight, b, 1e-6, kind, [])
        ref = ops.allreduce_add_norm_reference(mine, residual, weight, b, 1e-6, kind, "0")
        out[f"fused_{kind}"] = max(float((g - e).abs().max()) for g, e in zip(got, expected))
        out[f"reference_{kind}"] = max(float((g - e).abs().max()) for g, e in zip(ref, expected))
    # two in flight, waited in the other order (split_overlap's schedule has two at once)
    first, second = start(mine, "0"), start(2 * mine, "0")
    late = wait(second, 2 * mine, [first])
    early = wait(first, mine, [])
    out["out_of_order"] = max(float((late - 2 * total).abs().max()), float((early - total).abs().max()))
    out["partial_untouched"] = float((mine - partials[rank]).abs().max())
    out["in_flight"] = float(len(ops._PENDING))
    return out


def _worker(rank, world):
    return _check(rank, world)


def test_world_size_two_equals_the_reference():
    for rank, errors in enumerate(spawn_ranks(2, _worker, deadline_s=90)):
        for name, error in errors.items():
            assert error <= 1e-6, f"rank {rank}: {name} differs by {error:.3g}"


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_size_one_equals_the_reference(one_rank_group):
    for name, error in _check(0, 1).items():
        assert error == 0.0, f"{name} differs by {error:.3g}"


def test_a_token_is_waited_once(one_rank_group):
    x = torch.ones(3, 4)
    token = start(x, "0")
    assert torch.equal(wait(token, x, []), x)
    with pytest.raises(OpInputError, match=rf"token {int(token)} has no all-reduce in flight"):
        wait(token, x, [])


def test_without_a_process_group_the_error_says_how_to_run_it():
    with pytest.raises(OpInputError, match=r"no torch.distributed process group is initialised"):
        start(torch.ones(2, 3), "0")


def test_fake_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, r = torch.empty(2, 7, 16, dtype=torch.bfloat16), torch.empty(2, 7, 16, dtype=torch.bfloat16)
        token = start(x, "0")
        normed, summed = fused(token, x, r, torch.empty(16), None, 1e-6, "rmsnorm", [token])
        reduced = wait(token, x, [])
    assert token.shape == () and token.dtype == torch.int64
    assert normed.shape == summed.shape == reduced.shape == x.shape
    assert normed.dtype == summed.dtype == torch.bfloat16
