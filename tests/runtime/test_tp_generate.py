"""``Generator(model, tp=2)`` in two gloo ranks started by tokenfx's launcher
(:func:`tokenfx.runtime.tensor_parallel.launch`): greedy output token-identical to one process
over 20 held-out prompts at batch 1 and a left-padded batch of 4, plain and speculative
(Token Recycling, prompt lookup); each rank's prefill / decode graphs give the one-process
logits for the same inputs (its cache holding its kv-head); sampling with no seed draws the same on both ranks; a rank
that raises stops the other with an error naming it; and what cannot run tensor-parallel is
refused with one error.
"""

from __future__ import annotations

import functools

import pytest
import torch

from models import held_out_code_prompts, left_pad
from tokenfx.errors import TensorParallelError
from tokenfx.runtime import tensor_parallel
from tokenfx.runtime.generate import Generator, generator_for

NEW = 5  # new tokens per request: enough to pass through decode steps and verify rounds
MODEL = "tokenfx:tiny-code"


@functools.lru_cache(maxsize=None)
def _prompts():
    from tokenfx.frontends.load import load_tokenizer

    rows = [p[:24] for p in held_out_code_prompts(load_tokenizer(MODEL), 20, seed=7)]  # short: 2 busy cores
    batch_ids, batch_mask = left_pad(rows[:4], seed=1)
    return rows, batch_ids, batch_mask


def _decode_all(gen, rows, batch_ids, batch_mask) -> dict:
    """What each rank (and the one-process reference) decodes."""
    out = {"plain": [gen.generate(r[None], max_new_tokens=NEW) for r in rows],
           "plain_batch": gen.generate(batch_ids, attention_mask=batch_mask, max_new_tokens=NEW)}
    if gen.tp.world_size > 1:
        out["recycling"] = [gen.generate(r[None], max_new_tokens=NEW, speculate="recycling", tree_budget=16)
                            for r in rows]
        out["lookup_batch"] = gen.generate(batch_ids, attention_mask=batch_mask, max_new_tokens=NEW,
                                           speculate="lookup")  # tree_budget "auto" → fixed under tp
        out["sampled"] = gen.generate(batch_ids, attention_mask=batch_mask, max_new_tokens=NEW, temperature=1.0)
    return out


def _probe_logits(gen, probe: dict, kv_heads: slice | None = None) -> dict:
    """Logits of the Generator's prefill and decode graphs (fx, as built) on ``probe``'s inputs;
    the decode graph gets the cache's ``kv_heads`` (a rank's) or all of them."""
    decode = list(probe["decode"])
    if kv_heads is not None:
        decode[2] = decode[2][:, :, :, kv_heads].contiguous()
    with torch.no_grad():
        return {"prefill": gen.graph("prefill").gm(*probe["prefill"])[0],
                "decode": gen.graph("decode", cache_update="inplace").gm(*decode)[0],
                "cache_shape": tuple(decode[2].shape)}


def _tp_worker(rows, batch_ids, batch_mask, probe):
    import torch.distributed as dist

    torch.set_num_threads(1)
    gen = Generator(MODEL, compile=False, tp=2)
    out = _decode_all(gen, rows, batch_ids, batch_mask)
    out["layout"] = (gen.layout.heads, gen.layout.kv_heads)
    rank = dist.get_rank()  # tiny-code: 2 kv-heads, one per rank
    out["probe"] = _probe_logits(gen, probe, slice(rank, rank + 1))
    return out


def _probe(gen) -> dict:
    """Inputs for the kv graphs: a random (seeded) cache holding 5 past tokens, 4 new tokens."""
    from tokenfx.ir.kv_layout import example_inputs

    decode = list(example_inputs(gen.graph("decode", cache_update="inplace").kv, batch=2, tokens=4, past=5,
                                 vocab=gen.vocab_size))
    decode[2] = torch.randn(decode[2].shape, generator=torch.Generator().manual_seed(3))
    return {"prefill": example_inputs(gen.graph("prefill").kv, batch=2, tokens=9, past=0, vocab=gen.vocab_size),
            "decode": tuple(decode)}


@pytest.fixture(scope="module")
def decoded():
    """(tp=2 results by rank, one-process reference, the probe's one-process logits)."""
    rows, batch_ids, batch_mask = _prompts()
    single = generator_for(MODEL, compile=False)
    probe = _probe(single)
    ranks = tensor_parallel.launch(_tp_worker, 2, rows, batch_ids, batch_mask, probe, timeout=120)
    reference = _decode_all(single, rows, batch_ids, batch_mask)
    return ranks, reference, _probe_logits(single, probe)


def test_each_rank_holds_half_the_heads_and_kv_heads(decoded):
    ranks, _, whole = decoded
    assert [r["layout"] for r in ranks] == [(4, 1), (4, 1)]  # tiny-code: 8 heads, 2 kv-heads
    for r in ranks:
        assert r["probe"]["cache_shape"] == whole["cache_shape"][:3] + (1,) + whole["cache_shape"][4:]


@pytest.mark.parametrize("graph", ["prefill", "decode"])
def test_the_ranks_kv_graphs_give_the_one_process_logits(decoded, graph):
    from tokenfx.passes.base import tolerance_for

    ranks, _, whole = decoded
    tol = tolerance_for(whole[graph], "exact")
    for rank, r in enumerate(ranks):
        error = float((r["probe"][graph] - whole[graph]).abs().max())
        assert error <= tol, f"rank {rank} {graph}: |tp - single| = {error:.3g} > {tol:.3g}"


@pytest.mark.parametrize("kind, reference_kind", [("plain", "plain"), ("recycling", "plain")])
def test_greedy_batch_1_is_token_identical_to_one_process(decoded, kind, reference_kind):
    ranks, reference, _ = decoded
    assert len(reference[reference_kind]) == 20
    for rank, by_kind in enumerate(ranks):
        for i, (got, want) in enumerate(zip(by_kind[kind], reference[reference_kind])):
            assert torch.equal(got, want), f"rank {rank} {kind} prompt {i}: {got.tolist()} != {want.tolist()}"


@pytest.mark.parametrize("kind", ["plain_batch", "lookup_batch"])
def test_greedy_left_padded_batch_of_4_is_token_identical_to_one_process(decoded, kind):
    ranks, reference, _ = decoded
    want = reference["plain_batch"]
    assert want.shape[0] == 4
    for rank, by_kind in enumerate(ranks):
        assert torch.equal(by_kind[kind], want), f"rank {rank} {kind}"


def test_sampling_without_a_seed_draws_the_same_on_every_rank(decoded):
    ranks, _, _ = decoded
    assert ranks[0]["sampled"].shape == (4, _prompts()[1].shape[1] + NEW)
    assert torch.equal(ranks[0]["sampled"], ranks[1]["sampled"])


# -- failures ------------------------------------------------------------------------------------------
def _raise_on_rank_1():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank 1 failed on purpose")
    dist.all_reduce(torch.ones(1))  # rank 0 waits for a peer that never comes


def test_a_rank_that_raises_stops_the_other_with_its_error():
    """Bounded by construction: the launcher stops rank 0 when rank 1 fails, and rank 0's
    collective would time out after 30 s if it did not."""
    with pytest.raises(TensorParallelError, match=r"rank 1 of 2 failed \(ValueError: rank 1 failed on purpose\); "
                                                  r"the other ranks were stopped"):
        tensor_parallel.launch(_raise_on_rank_1, 2, timeout=30)


def test_tp_needs_a_process_group_of_that_size():
    with pytest.raises(TensorParallelError, match=r"Generator\(tp=2\) runs inside a process group of 2 ranks, and "
                                                  r"none is initialised"):
        Generator(MODEL, compile=False, tp=2)


def test_tp_larger_than_the_cores_is_refused():
    cores = tensor_parallel.usable_cores()
    with pytest.raises(TensorParallelError, match=rf"--tp {cores + 1} on CPU needs at least {cores + 1} cores"):
        tensor_parallel.launch(_raise_on_rank_1, cores + 1)


@pytest.mark.parametrize("speculate, early_exit, message", [
    ("self:2", None, r"speculate='self:2' does not run tensor-parallel"),
    ("draft", None, r"speculate='draft' does not run tensor-parallel"),
    (None, 0.9, r"early_exit does not run tensor-parallel"),
])
def test_decoding_that_is_not_lockstep_is_refused(speculate, early_exit, message):
    with pytest.raises(TensorParallelError, match=message):
        tensor_parallel.check_lockstep(speculate, early_exit)
