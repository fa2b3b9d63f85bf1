"""Confidence-gated early exit (CALM) and SkipDecode over the ``early_exit`` pieces."""

from __future__ import annotations

import math

import pytest
import torch

from models import llama
from tokenfx.errors import GenerationError
from tokenfx.runtime.early_exit import ConfidenceExit, SkipDecode, confidence
from tokenfx.frontends.load import load_tokenizer
from tokenfx.runtime.generate import Generator, generator_for

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPTS = ["def f(x):\n    return", "import os\nimport sys\n", "class A:\n    def __init__(self):\n        self.",
           "for i in range(10):\n    print(i"]


@pytest.fixture(scope="module")
def tiny_code():
    return generator_for("tokenfx:tiny-code"), load_tokenizer("tokenfx:tiny-code")


@pytest.fixture(scope="module")
def small_llama():
    model = llama(layers=4)
    return model, Generator(model)


def _ids(tokenizer, prompts):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_no_exit_is_the_full_model(tiny_code):
    gen, tokenizer = tiny_code
    ids, mask = _ids(tokenizer, PROMPTS)
    ref = gen.generate(ids, attention_mask=mask, max_new_tokens=16)
    # threshold 1: no softmax is ever that sure; an exit list with only the last layer; min_layer = L
    for policy in (1.0, ConfidenceExit(0.5, layers=(6,)), ConfidenceExit(0.0, min_layer=6), SkipDecode(min_layers=6)):
        out = gen.generate(ids, attention_mask=mask, max_new_tokens=16, early_exit=policy)
        assert torch.equal(out, ref), policy
        assert gen.last_stats["mean_layers"] == 6


def test_exits_at_the_first_confident_exit(tiny_code):
    gen, tokenizer = tiny_code
    ids, mask = _ids(tokenizer, PROMPTS[:1])
    gen.generate(ids, attention_mask=mask, max_new_tokens=12, early_exit=ConfidenceExit(0.0, min_layer=2))
    assert gen.last_stats["exit_histogram"] == {"2": 11}  # threshold 0: every step exits at the first allowed exit
    gen.generate(ids, attention_mask=mask, max_new_tokens=12, early_exit=ConfidenceExit(0.0, layers=(3, 5)))
    assert gen.last_stats["exit_histogram"] == {"3": 11}
    # the 'state' measure never exits at the first exit point (no previous state to compare)
    gen.generate(ids, attention_mask=mask, max_new_tokens=12, early_exit=ConfidenceExit(0.0, measure="state"))
    assert gen.last_stats["exit_histogram"] == {"2": 11}


def test_state_propagation_fills_the_skipped_layers(small_llama):
    """One step that exits after block E: blocks < E hold the full model's K/V of that token,
    blocks >= E hold K/V computed from the exit hidden state by each block's own input norm,
    K/V projections and RoPE (CALM's definition), written out here with the HF modules."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, gen = small_llama
    exit_after = 2
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    out = gen.generate(prompt, max_new_tokens=2, early_exit=ConfidenceExit(0.0, layers=(exit_after,)))
    assert gen.last_stats["exit_histogram"] == {str(exit_after): 1}
    cache = gen.last_request.cache
    seq = out[:, :8]  # the prompt + the token fed to the early-exit step (slot 7)
    slot = 7
    with torch.no_grad():
        res = model(seq, output_hidden_states=True, use_cache=True)
        h = res.hidden_states[exit_after][:, slot:slot + 1]  # the exit hidden state (blocks < E ran in full)
        position = torch.tensor([[slot]])
        cos, sin = model.model.rotary_emb(h, position)
        for layer in range(model.config.num_hidden_layers):
            block = model.model.layers[layer]
            if layer < exit_after:  # the full model's own K/V
                k_ref = res.past_key_values.layers[layer].keys[:, :, slot]
                v_ref = res.past_key_values.layers[layer].values[:, :, slot]
            else:
                x = block.input_layernorm(h)
                shape = (1, 1, -1, model.config.head_dim)
                k = block.self_attn.k_proj(x).view(shape).transpose(1, 2)
                v = block.self_attn.v_proj(x).view(shape).transpose(1, 2)
                _, k = apply_rotary_pos_emb(k, k, cos, sin)
                k_ref, v_ref = k[:, :, 0], v[:, :, 0]
            torch.testing.assert_close(cache[layer, 0, :, :, slot], k_ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache[layer, 1, :, :, slot], v_ref, rtol=1e-4, atol=1e-5)


def test_skip_decode_schedule_is_monotone():
    policy = SkipDecode(min_layers=2, warmup=1)
    plan = policy.schedule(50, 6)
    assert plan[0] == 6 and plan[-1] == 2
    assert all(a >= b for a, b in zip(plan, plan[1:]))
    assert policy.blocks(6, 6) == (range(0, 6), range(6, 6))
    assert policy.blocks(3, 6) == (range(0, 1), range(4, 6))  # warm-up block 0, then the last two


def test_skip_decode_reads_only_written_kv(tiny_code):
    """SkipDecode's invariant on the cache itself: every block a token runs was run by every
    earlier token (its K/V slot is written), and blocks a token skips keep their slot empty."""
    gen, tokenizer = tiny_code
    ids, mask = _ids(tokenizer, PROMPTS[:2])
    total = 24
    gen.release_buffers()  # a fresh (zero) cache buffer: earlier requests leave K/V in unused slots
    gen.generate(ids, attention_mask=mask, max_new_tokens=total, early_exit=SkipDecode(min_layers=2, warmup=1))
    cache = gen.last_request.cache
    row = int(mask.sum(1).argmax())  # the row without padding: every slot is one of its tokens
    prompt = ids.shape[1]
    plan = SkipDecode(min_layers=2, warmup=1).schedule(total, 6)
    ran = [set(range(6))] * prompt  # the prompt runs every block
    for t in range(total - 1):  # the last token is never fed
        warm, top = SkipDecode(min_layers=2, warmup=1).blocks(plan[t], 6)
        ran.append(set(warm) | set(top))
    for slot, layers in enumerate(ran):
        written = {layer for layer in range(6) if bool(cache[layer, :, row, :, slot].abs().sum() > 0)}
        assert written == layers, slot
    for later in range(prompt, len(ran)):
        assert all(ran[later] <= ran[earlier] for earlier in range(later))


def test_confidence_measures():
    v = 16
    sure = torch.full((1, v), -30.0)
    sure[0, 3] = 30.0
    flat = torch.zeros(1, v)
    h = torch.randn(1, 8)
    for measure in ("softmax", "margin", "entropy"):
        assert float(confidence(measure, sure, h, None)) == pytest.approx(1.0, abs=1e-6)
    assert float(confidence("softmax", flat, h, None)) == pytest.approx(1 / v)
    assert float(confidence("margin", flat, h, None)) == pytest.approx(0.0)
    assert float(confidence("entropy", flat, h, None)) == pytest.approx(0.0, abs=1e-6)
    assert float(confidence("state", None, h, h)) == pytest.approx(1.0)
    assert float(confidence("state", None, h, None)) == 0.0


def test_threshold_decay():
    policy = ConfidenceExit(0.8, decay=4.0)
    assert policy.threshold_at(0, 100) == pytest.approx(0.8)
    assert policy.threshold_at(100, 100) == pytest.approx(0.9 * 0.8 + 0.1 * 0.8 * math.exp(-4.0))
    assert ConfidenceExit(0.8).threshold_at(50, 100) == 0.8


@pytest.mark.parametrize("policy, message", [
    (1.5, r"threshold must be in \[0, 1\]"), (-0.1, r"threshold must be in \[0, 1\]"),
    ("fast", "early_exit must be a confidence threshold"),
    (ConfidenceExit(0.5, layers=(7,)), r"exit layer\(s\) \[7\] out of range"),
    (ConfidenceExit(0.5, min_layer=9), "min_layer must be in 1 … 6"),
    (SkipDecode(min_layers=7), "min_layers"), (SkipDecode(min_layers=2, warmup=3), "warmup"),
])
def test_bad_early_exit_options(tiny_code, policy, message):
    gen, tokenizer = tiny_code
    ids, _ = _ids(tokenizer, PROMPTS[:1])
    with pytest.raises(GenerationError, match=message):
        if isinstance(policy, float) and not 0 <= policy <= 1:
            ConfidenceExit(policy)
        gen.generate(ids, max_new_tokens=4, early_exit=policy)


def test_unknown_measure_and_speculate_together(tiny_code):
    gen, tokenizer = tiny_code
    ids, _ = _ids(tokenizer, PROMPTS[:1])
    with pytest.raises(GenerationError, match="unknown confidence measure 'tea'"):
        ConfidenceExit(0.5, measure="tea")
    with pytest.raises(GenerationError, match="do not combine"):
        gen.generate(ids, max_new_tokens=4, early_exit=0.5, speculate="self:2")
