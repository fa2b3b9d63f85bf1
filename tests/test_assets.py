"""The bundled code LMs: standard Hugging Face directories that predict Python code."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

import tokenfx
from tokenfx import assets


def test_bundled_names():
    assert {"tiny-code", "tiny-code-draft", "minilm"} <= set(assets.names())


@pytest.fixture(scope="module")
def tiny_code():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.path("tiny-code")
    return AutoModelForCausalLM.from_pretrained(path).float().eval(), AutoTokenizer.from_pretrained(path)


def held_out_source(limit: int = 1500) -> str:
    split = json.loads((assets.path("tiny-code") / "split.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / rel).read_text(encoding="utf-8", errors="replace") for rel in split["held_out"][:6]
             if (root / rel).exists()]
    return "\n".join(texts)[:limit]


def test_tokenizer_round_trips_code(tiny_code):
    _, tokenizer = tiny_code
    text = 'def f(x):\n    """Doc."""\n    return {k: v ** 2 for k, v in x.items()}  # ünïcode\n'
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # BPE merges, not bytes


def test_draft_shares_the_tokenizer():
    a = json.loads((assets.path("tiny-code") / "tokenizer.json").read_text())
    b = json.loads((assets.path("tiny-code-draft") / "tokenizer.json").read_text())
    assert a["model"]["vocab"] == b["model"]["vocab"]


def test_structure_is_the_documented_llama():
    s = tokenfx.load("tokenfx:tiny-code").structure
    assert s.num_blocks == 6 and s.position == "rope"
    a = s.blocks[0].attention[0]
    assert (a.heads, a.kv_heads, a.head_dim, a.causal) == (8, 2, 32, True)
    assert (s.blocks[0].norm_kind, s.blocks[0].norm_placement) == ("rmsnorm", "pre")


def test_predicts_held_out_code_at_every_exit(tiny_code):
    """Trained with the early-exit loss: the full model and the shallow exits beat chance by far."""
    model, tokenizer = tiny_code
    ids = torch.tensor([tokenizer(held_out_source())["input_ids"][:256]])
    chance = torch.log(torch.tensor(float(model.config.vocab_size)))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    losses = []
    for h in hidden[1:-1] + (None,):
        logits = model(ids, use_cache=False).logits if h is None else model.lm_head(model.model.norm(h))
        losses.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    assert losses[-1] < 0.7 * chance  # the full model (held-out perplexity ~100 vs 4096)
    assert losses[2] < 0.8 * chance  # exit after layer 3
    assert losses[-1] <= min(losses[:-1]) + 0.05  # deeper is better, up to noise
