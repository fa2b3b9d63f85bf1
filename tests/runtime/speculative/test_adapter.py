"""Kangaroo's exit adapter: distillation lowers its KL to the full model on held-out text, it
drafts losslessly, and it is refused for a model it was not trained for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from models import held_out_code_prompts, left_pad, llama
from tokenfx.errors import GenerationError
from tokenfx.passes.early_exit import train_adapter
from tokenfx.runtime.generate import generator_for, load_tokenizer
from tokenfx.runtime.speculative.adapter import AdapterDraft, ExitAdapter, _fresh, adapter_kl, draft_view

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _windows(tokenizer, seed: int, count: int, length: int = 96) -> torch.Tensor:
    """``count`` held-out windows of ``length`` tokens (stdlib files the model never saw)."""
    ids = torch.cat(held_out_code_prompts(tokenizer, 400, seed=seed))
    count = min(count, ids.numel() // length)
    return ids[:count * length].view(count, length)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    gen, tokenizer = generator_for("tokenfx:tiny-code"), load_tokenizer("tokenfx:tiny-code")
    model = gen._source
    adapter = train_adapter(model, 2, _windows(tokenizer, seed=1, count=48), steps=40, lr=2e-3, batch=8,
                            progress=False)
    path = tmp_path_factory.mktemp("adapter") / "exit2.safetensors"
    adapter.save(path)
    return gen, tokenizer, adapter, path


def test_training_lowers_held_out_kl(trained):
    gen, tokenizer, adapter, _ = trained
    model = gen._source
    held = _windows(tokenizer, seed=2, count=12)  # other windows than the training ones
    before = model.state_dict()["lm_head.weight"].clone()
    with torch.no_grad():
        kl_start = float(adapter_kl(model, draft_view(model, _fresh(model, 2)), held))
        kl_trained = float(adapter_kl(model, draft_view(model, adapter), held))
    assert kl_trained < 0.8 * kl_start, (kl_start, kl_trained)
    assert torch.equal(model.state_dict()["lm_head.weight"], before)  # the target never changes
    assert len(model.model.layers) == 6 and model.model.norm is not adapter.norm  # the view is only a view


def test_adapter_drafts_losslessly(trained):
    gen, tokenizer, _, path = trained
    prompts = held_out_code_prompts(tokenizer, 5, seed=3)
    for rows in ([prompts[0]], prompts[1:5]):
        ids, mask = left_pad(rows)
        ref = gen.generate(ids, attention_mask=mask, max_new_tokens=20)
        out = gen.generate(ids, attention_mask=mask, max_new_tokens=20, speculate=f"adapter:{path}")
        assert torch.equal(out, ref)
        assert gen.last_stats["drafter"] == "adapter:2" and gen.last_stats["accepted_per_step"] > 1.5


def test_adapter_for_another_model_is_refused(trained):
    _, _, adapter, path = trained
    other = llama(layers=4)
    with pytest.raises(GenerationError, match="was trained for another model"):
        AdapterDraft(adapter).prepare(SimpleNamespace(_source=other))  # refused before any graph is built
    with pytest.raises(GenerationError, match="was trained for another model"):
        ExitAdapter.load(path, other)


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
