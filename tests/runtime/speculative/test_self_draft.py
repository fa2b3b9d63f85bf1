"""``speculate="self:E"``: the target's first E blocks + its own final norm and head draft; the
output stays token-identical to plain greedy, and the target model is left whole."""

from __future__ import annotations

import pytest
import torch

from models import llama
from tokenfx.errors import GenerationError
from tokenfx.runtime.generate import generator_for, load_tokenizer
from tokenfx.runtime.speculative.drafters import truncated

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PROMPTS = ["def f(x):\n    return", "import os\nimport sys\n", "class A:\n    def __init__(self):\n        self.",
           "for i in range(10):\n    print(i", "x = [1, 2, 3]\ny = [", "with open(path) as f:\n    data = f."]


@pytest.fixture(scope="module")
def tiny_code():
    return generator_for("tokenfx:tiny-code"), load_tokenizer("tokenfx:tiny-code")


@pytest.mark.parametrize("spec", ["self:2"])
def test_self_draft_is_token_identical(tiny_code, spec):
    gen, tokenizer = tiny_code
    for batch in ([PROMPTS[0]], PROMPTS[:3], PROMPTS[3:]):
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        ref = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=20)
        out = gen.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=20, speculate=spec)
        assert torch.equal(out, ref), (spec, batch)
        assert gen.last_stats["drafter"] == spec and gen.last_stats["accepted_per_step"] > 1.0
    assert len(gen._source.model.layers) == 6  # the draft is a view: the target keeps all its blocks


def test_truncated_view_shares_weights():
    model = llama()
    view = truncated(model, 1)
    assert view.config.num_hidden_layers == 1 and model.config.num_hidden_layers == len(model.model.layers) > 1
    assert view.model.layers[0] is model.model.layers[0] and view.lm_head is model.lm_head
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the view computes the first block's exit: same as running that block by hand
        hidden = model.model(ids, output_hidden_states=True).hidden_states[1]
        expected = model.lm_head(model.model.norm(hidden))
        torch.testing.assert_close(view(ids).logits, expected)


@pytest.mark.parametrize("spec, message", [("self:0", "exit layer must be in 1..5"), ("self:6", "exit layer must be in 1..5"),
                                           ("self:auto", "not built yet"), ("self:x", "must be a number")])
def test_bad_exit_layer(tiny_code, spec, message):
    gen, tokenizer = tiny_code
    with pytest.raises(GenerationError, match=message):
        gen.generate(tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"], max_new_tokens=4, speculate=spec)
