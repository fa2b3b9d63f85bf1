"""Kangaroo's exit adapter inside self-speculation: distillation lowers its KL to the full model
on held-out text, it drafts losslessly from the target's own blocks and cache (greedy and
batched, with and without an FR-Spec vocabulary subset; sampling is checked statistically in
test_verify_distribution), its in-loop block equals the HF block, and it is refused for a model
it was not trained for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models import held_out_code_prompts, left_pad, llama
from tokenfx.errors import GenerationError
from tokenfx.frontends.load import load_tokenizer
from tokenfx.runtime.generate import generator_for
from tokenfx.runtime.speculative import adapter as A
from tokenfx.runtime.speculative.adapter import ExitAdapter, InlineAdapter, _fresh, adapter_kl, train_adapter
from tokenfx.runtime.speculative.self_spec import SelfSpeculation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _windows(tokenizer, seed: int, count: int, length: int = 96) -> torch.Tensor:
    """``count`` held-out windows of ``length`` tokens (stdlib files the model never saw)."""
    ids = torch.cat(held_out_code_prompts(tokenizer, 400, seed=seed))
    count = min(count, ids.numel() // length)
    return ids[:count * length].view(count, length)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    gen, tokenizer = generator_for("tokenfx:tiny-code"), load_tokenizer("tokenfx:tiny-code")
    model = gen.model
    data = _windows(tokenizer, seed=1, count=48)
    vocab = A.frequent_tokens(data, 1024, model.config.vocab_size)
    adapter = train_adapter(model, 2, data, steps=40, lr=2e-3, batch=8, progress=False)
    subset = train_adapter(model, 2, data, steps=40, lr=2e-3, batch=8, vocab=vocab, progress=False)
    folder = tmp_path_factory.mktemp("adapter")
    adapter.save(folder / "exit2.safetensors")
    subset.save(folder / "exit2-fr.safetensors", dtype=torch.float16)
    return gen, tokenizer, adapter, folder


def test_training_lowers_held_out_kl(trained):
    gen, tokenizer, adapter, _ = trained
    model = gen.model
    held = _windows(tokenizer, seed=2, count=12)  # other windows than the training ones
    before = model.state_dict()["lm_head.weight"].clone()
    kl_start = adapter_kl(model, _fresh(model, 2), held)
    kl_trained = adapter_kl(model, adapter, held)
    assert kl_trained < 0.8 * kl_start, (kl_start, kl_trained)
    assert torch.equal(model.state_dict()["lm_head.weight"], before)  # the target never changes
    assert len(model.model.layers) == 6 and model.model.norm is not adapter.norm


def test_inline_block_equals_the_hf_block(trained):
    gen, tokenizer, adapter, _ = trained
    model = gen.model
    ids = _windows(tokenizer, seed=4, count=2, length=24)
    hidden, _ = A.features(model, 2, ids)
    inline = InlineAdapter(adapter, model)
    b, t, _ = hidden.shape
    positions = torch.arange(t).expand(b, t)
    with torch.no_grad():
        causal = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t)
        got = inline.step(hidden, positions, inline.new_cache(b, t), causal, torch.arange(t))
        cos_sin = model.model.rotary_emb(hidden, positions)
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None].expand(b, 1, t, t)
        out = adapter.block(hidden, attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        want = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["exit2.safetensors", "exit2-fr.safetensors"])
def test_adapter_drafts_losslessly(trained, name):
    gen, tokenizer, _, folder = trained
    prompts = held_out_code_prompts(tokenizer, 5, seed=3)
    for rows in ([prompts[0]], prompts[1:5]):
        ids, mask = left_pad(rows)
        ref = gen.generate(ids, attention_mask=mask, max_new_tokens=20)
        out = gen.generate(ids, attention_mask=mask, max_new_tokens=20, speculate=f"adapter:{folder / name}")
        assert torch.equal(out, ref)
        assert gen.last_stats["drafter"] == "adapter:2" and gen.last_stats["accepted_per_step"] > 1.5


def test_del_mixes_plain_rounds_and_the_adapter_losslessly(trained):
    """DEL with an adapter: plain rounds leave the adapter's cache behind, adapter rounds catch it
    up; the output stays the target's."""
    gen, tokenizer, adapter, _ = trained
    drafter = SelfSpeculation("auto", adapter=adapter)
    prompts = held_out_code_prompts(tokenizer, 3, seed=5)
    ids, mask = left_pad(prompts[:3])
    ref = gen.generate(ids, attention_mask=mask, max_new_tokens=24)
    drafter.prepare(gen)
    plans = iter([(6, 0, False), (2, 3, True)] * 40)  # alternate: a plain round, an adapter round
    drafter.plan = lambda: next(plans)
    out = gen.generate(ids, attention_mask=mask, max_new_tokens=24, speculate=drafter)
    assert torch.equal(out, ref)
    assert drafter.a_tries > 4.0  # adapter rounds ran and were counted


def test_adapter_for_another_model_is_refused(trained):
    _, _, adapter, folder = trained
    other = llama(layers=4)
    with pytest.raises(GenerationError, match="was trained for another model"):
        target = SimpleNamespace(model=other, layout=SimpleNamespace(layers=4, cache_update="inplace"))
        SelfSpeculation(adapter=adapter).prepare(target)
    with pytest.raises(GenerationError, match="was trained for another model"):
        ExitAdapter.load(folder / "exit2.safetensors", other)


def test_bad_adapter_inputs(tmp_path):
    model = llama(layers=3)
    with pytest.raises(GenerationError, match=r"layer must be in 1 … 2"):
        train_adapter(model, 3, torch.zeros(2, 8, dtype=torch.long), steps=1)
    with pytest.raises(GenerationError, match=r"data must be token ids \[num, tokens >= 2\]"):
        train_adapter(model, 1, torch.zeros(8, dtype=torch.long), steps=1)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(GenerationError, match="cannot read it"):
        ExitAdapter.load(junk, model)


def test_del_weighs_the_adapter_and_probes_it(trained):
    """DEL picks the adapter when its estimated acceptance pays for its draft steps, a plain round
    when it does not, and still probes it every ``shadow_every`` rounds (offset from the shadows)."""
    gen, _, adapter, _ = trained
    drafter = SelfSpeculation("auto", length=4, adapter=adapter)
    drafter.prepare(gen)
    ms = 1e-3
    drafter.costs = {"plain": 7.5 * ms, "draft": {2: 3.5 * ms}, "tail": {2: 2 * ms},
                     "verify": {2: {t: 4 * ms * (1 + 0.1 * t) + 1.5 * ms for t in range(2, 6)}},
                     "adapter_draft": 4.5 * ms, "adapter_tail": 3 * ms}
    drafter.hits[:] = 0.0  # the bare exit never agrees
    drafter.rounds = 1
    drafter.a_hits, drafter.a_tries = 9.0, 10.0
    exit_, d, with_adapter = drafter.plan()
    assert (exit_, with_adapter) == (2, True) and d >= 2
    drafter.a_hits = 1.0
    assert drafter.plan() == (6, 0, False)
    drafter.rounds = drafter.shadow_every // 2
    assert drafter.plan() == (2, 4, True)  # the probe
