"""The masked-diffusion runtime (:mod:`tokenfx.runtime.diffusion`) on a tiny random-init
bidirectional Llama: with no cache and one token per round it is LLaDA's sampler (a plain
reference loop over the Hugging Face module, written here from the paper's steps); the cached
forward equals the full one when nothing changed since the cache was written; every policy
keeps the budget and fills every mask; a padded batch equals its rows run alone; seeded
sampling repeats; bad input gets one clear error each."""

from __future__ import annotations

import functools

import pytest
import torch

import tokenfx
from models import left_pad, llama
from tokenfx.errors import DiffusionError
from tokenfx.frontends.load import make_bidirectional
from tokenfx.runtime.diffusion import Diffuser, positions_of
from tokenfx.runtime.unmasking import RoundState, make_policy

MASK_ID = 99  # the tiny Llama's vocabulary is 100 ids: the last is the mask token
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_dllm(seed: int = 0):
    model = llama(layers=2, heads=4, kv_heads=2, head_dim=8, seed=seed)
    model.config.is_causal = False
    model.config.mask_token_id = MASK_ID
    return make_bidirectional(model)


@functools.lru_cache(maxsize=None)
def diffuser() -> Diffuser:
    return Diffuser(tiny_dllm(), compile=False)


def prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, MASK_ID, (length,), generator=torch.Generator().manual_seed(seed))


def llada_reference(model, ids: torch.Tensor, gen_length: int, block_length: int) -> torch.Tensor:
    """LLaDA's sampler with one token per round (steps = gen_length), greedy, low-confidence
    remasking, on the plain module: each round the full bidirectional forward, the argmax at
    every masked position of the current block (the mask token excluded), its softmax
    probability as confidence, and the most confident one unmasked."""
    x = torch.cat([ids, torch.full((ids.shape[0], gen_length), MASK_ID)], 1)
    for block in range(gen_length // block_length):
        start = ids.shape[1] + block * block_length
        stop = start + block_length
        for _ in range(block_length):
            with torch.no_grad():
                logits = model(input_ids=x).logits[:, start:stop].float()
            logits[..., MASK_ID] = float("-inf")
            proposal = logits.argmax(-1)
            confidence = torch.softmax(logits, -1).gather(-1, proposal[..., None])[..., 0]
            confidence = confidence.masked_fill(x[:, start:stop] != MASK_ID, float("-inf"))
            pick = confidence.argmax(-1)
            rows = torch.arange(x.shape[0])
            x[rows, start + pick] = proposal[rows, pick]
    return x


def test_no_cache_one_token_per_round_is_llada():
    model = diffuser().model
    ids = torch.stack([prompt(5, 1), prompt(5, 2)])
    result = diffuser().diffuse(ids, gen_length=8, block_length=4)
    assert torch.equal(result.sequences, llada_reference(model, ids, 8, 4))
    assert (result.rounds, result.exact_rounds, result.new_tokens, result.approximate) == (8, 8, 8, False)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_forward_equals_the_full_one_when_nothing_changed(cache):
    d = diffuser()
    ids, mask = left_pad([prompt(4, 3), prompt(7, 4)])
    x = torch.cat([ids, torch.full((2, 8), MASK_ID)], 1)
    x[:, 7:10] = torch.tensor([[11, 12, 13], [21, 22, 23]])  # part of the first block already unmasked
    valid = torch.cat([mask.bool(), torch.ones(2, 8, dtype=torch.bool)], 1)
    positions = positions_of(valid)
    logits, kv = d.full(x, valid, positions)
    start, stop = 7, 11
    window_stop = x.shape[1] if cache == "prefix" else stop
    visible = valid.clone()
    visible[:, start:window_stop] = False
    cached = d.cached(kv, x, valid, positions, start, window_stop, visible)
    torch.testing.assert_close(cached, logits[:, start:window_stop], atol=ATOL, rtol=0)


def test_cache_refreshed_every_round_is_the_exact_run_and_errors_are_measured():
    ids = torch.stack([prompt(6, 5)])
    exact = diffuser().diffuse(ids, gen_length=8, block_length=4)
    refreshed = diffuser().diffuse(ids, gen_length=8, block_length=4, cache="dual", refresh=1, measure_cache_error=True)
    assert torch.equal(refreshed.sequences, exact.sequences)
    assert refreshed.cache_errors == [0.0] * 8 and refreshed.exact_rounds == 8
    cached = diffuser().diffuse(ids, gen_length=8, block_length=4, cache="dual", measure_cache_error=True)
    assert cached.approximate and cached.exact_rounds == 2  # one full forward per block
    assert len(cached.cache_errors) == 8 and cached.cache_errors[0] == 0.0 and cached.cache_errors[4] == 0.0
    assert max(cached.cache_errors) > 0  # reused K/V of tokens that changed since: not exact, and measured so


class Recorded:
    """A policy wrapper that keeps every round's state and the runtime's final unmask set."""

    def __init__(self, policy):
        self.policy, self.name, self.states = policy, policy.name, []

    def select(self, state: RoundState):
        self.states.append(RoundState(**{**vars(state), "masked": state.masked.clone()}))
        return self.policy.select(state)


@pytest.mark.parametrize("name, options, allowed", [
    ("vanilla", {}, lambda s: -(-s.masked.sum(1) // s.rounds_left)),  # LLaDA: ceil(masks left / rounds left)
    ("topk", {"k": 2}, lambda s: torch.full((s.masked.shape[0],), 2)),
    ("threshold", {"threshold": 0.05}, lambda s: torch.maximum(((s.confidence >= 0.05) & s.masked).sum(1),
                                                               torch.ones(s.masked.shape[0], dtype=torch.long))),
])
def test_every_policy_keeps_its_budget_and_fills_every_mask(name, options, allowed):
    policy = Recorded(make_policy(name, **options))
    unmasked = []
    ids, mask = left_pad([prompt(3, 6), prompt(6, 7)])
    result = diffuser().diffuse(ids, mask, gen_length=12, block_length=6, steps=6, policy=policy,
                                on_round=lambda report: unmasked.append(report.unmasked.clone()))
    assert not bool((result.sequences[:, ids.shape[1]:] == MASK_ID).any())
    assert len(unmasked) == len(policy.states) == result.rounds <= 6
    for state, done in zip(policy.states, unmasked):
        assert not bool((done & ~state.masked).any())  # only masked positions are unmasked
        if state.rounds_left == 1:
            assert torch.equal(done, state.masked)  # the block's last round finishes it
        else:
            assert bool((done.sum(1) <= allowed(state)).all())
            assert bool((done.sum(1) >= state.masked.any(1).long()).all())  # at least one per row with masks


def test_guided_policy_one_round_per_token_is_the_guides_greedy_decoding():
    """The guide passes through to the guided policy; with block_length rounds per block it
    unmasks the AR model's greedy tokens left to right (its lossless claim, end to end)."""
    from tokenfx.runtime.generate import Generator

    guide = Generator(llama(layers=1, heads=4, kv_heads=2, head_dim=8, seed=5), compile=False)
    ids = torch.stack([prompt(5, 12), prompt(5, 13)])
    result = diffuser().diffuse(ids, gen_length=8, block_length=4, policy="guided", guide=guide)
    assert torch.equal(result.sequences, guide.generate(ids, max_new_tokens=8, stop=[]))


@pytest.mark.parametrize("cache, policy", [("none", "vanilla"), ("dual", "threshold"), ("prefix", "vanilla")])
def test_batch_equals_each_row_alone(cache, policy):
    rows = [prompt(3, 8), prompt(7, 9), prompt(5, 10)]
    ids, mask = left_pad(rows)
    options = {"gen_length": 8, "block_length": 4, "steps": 4, "cache": cache, "policy": policy}
    batch = diffuser().diffuse(ids, mask, **options).sequences
    for i, row in enumerate(rows):
        alone = diffuser().diffuse(row[None], **options).sequences[0]
        assert torch.equal(batch[i, ids.shape[1]:], alone[row.numel():]), f"row {i}"


def test_seeded_sampling_repeats():
    ids = prompt(5, 11)[None]
    options = {"gen_length": 8, "block_length": 4, "temperature": 1.0}
    first = diffuser().diffuse(ids, seed=3, **options).sequences
    assert torch.equal(first, diffuser().diffuse(ids, seed=3, **options).sequences)
    others = [diffuser().diffuse(ids, seed=s, **options).sequences for s in (4, 5)]
    assert any(not torch.equal(first, o) for o in others)  # the seed matters: it samples


def test_gen_length_must_be_a_multiple_of_block_length():
    with pytest.raises(DiffusionError, match="gen_length 10 is not a multiple of block_length 4"):
        diffuser().diffuse(prompt(3, 0)[None], gen_length=10, block_length=4)


def test_steps_must_split_evenly_over_blocks():
    with pytest.raises(DiffusionError, match="steps 5 must be a positive multiple of the number of blocks"):
        diffuser().diffuse(prompt(3, 0)[None], gen_length=8, block_length=4, steps=5)


def test_an_autoregressive_model_is_refused():
    with pytest.raises(DiffusionError, match="is an autoregressive .causal. LM, not a masked-diffusion LM"):
        Diffuser(llama(layers=1), compile=False)


def test_a_model_without_a_mask_token_is_refused():
    model = llama(layers=1)
    model.config.is_causal = False
    with pytest.raises(DiffusionError, match="has no mask token"):
        Diffuser(model, compile=False)


def test_autoregressive_decoding_of_a_diffusion_model_is_refused():
    with pytest.raises(DiffusionError, match="is a masked-diffusion LM .* not decoded left to right"):
        tokenfx.generate(tiny_dllm(), prompt(4, 0)[None], max_new_tokens=4, compile=False)


def test_a_diffusion_directory_loads_bidirectional(tmp_path):
    """config.json's is_causal: false + mask_token_id is enough: tokenfx.load maps bidirectional
    attention, and the spec diffuses as the module it was saved from."""
    model = tiny_dllm()
    model.save_pretrained(tmp_path)
    structure = tokenfx.load(str(tmp_path)).structure
    assert [a.causal for b in structure.blocks for a in b.attention] == [False, False]
    ids = torch.stack([prompt(4, 14)])
    from_dir = tokenfx.diffuse(str(tmp_path), ids, gen_length=4, block_length=4, compile=False).sequences
    assert torch.equal(from_dir, diffuser().diffuse(ids, gen_length=4, block_length=4).sequences)
