"""Self-speculation (``speculate="self:E"`` / ``"self:auto"``): drafting with the first E blocks
in the target's own cache, verifying with the rest from the drafted hidden states, is lossless."""

from __future__ import annotations

import pytest
import torch

from models import gpt2, held_out_code_prompts, left_pad, llama
from test_verify_distribution import chi_square_p_value
from tokenfx.errors import GenerationError
from tokenfx.frontends.load import load_tokenizer
from tokenfx.runtime.generate import Generator, generator_for
from tokenfx.runtime.speculative import verify as V
from tokenfx.runtime.speculative.self_spec import SelfSpeculation

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_code():
    return generator_for("tokenfx:tiny-code"), load_tokenizer("tokenfx:tiny-code")


@pytest.mark.parametrize("spec", ["self:1", "self:auto"])
def test_greedy_is_token_identical(tiny_code, spec):
    gen, tokenizer = tiny_code
    prompts = held_out_code_prompts(tokenizer, 10, seed=5)
    for rows in ([prompts[0]], [prompts[1]], prompts[2:6]):
        ids, mask = left_pad(rows)
        ref = gen.generate(ids, attention_mask=mask, max_new_tokens=24)
        out = gen.generate(ids, attention_mask=mask, max_new_tokens=24, speculate=spec)
        assert torch.equal(out, ref), (spec, [r.tolist() for r in rows])
        assert gen.last_stats["drafter"] == spec and gen.last_stats["accepted_per_step"] > 1.0
    for budget in (1, 2):  # a tree budget caps the chain (1: plain rounds through the same graphs)
        out = gen.generate(ids, attention_mask=mask, max_new_tokens=24, speculate=spec, tree_budget=budget)
        assert torch.equal(out, ref) and gen.last_stats["accepted_per_step"] <= budget


@pytest.mark.parametrize("make", [lambda: llama(layers=4), lambda: gpt2(layers=4)], ids=["llama", "gpt2"])
def test_greedy_on_random_models(make):
    gen = Generator(make())
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(2, 100, (n,), generator=g) for n in (5, 9, 3, 7)]
    for batch in (rows[:1], rows):
        ids, mask = left_pad(batch)
        ref = gen.generate(ids, attention_mask=mask, max_new_tokens=12)
        for spec in (SelfSpeculation(2, length=3, stop=0.0), SelfSpeculation("auto", shadow_every=2)):
            assert torch.equal(gen.generate(ids, attention_mask=mask, max_new_tokens=12, speculate=spec), ref), spec


def test_del_plan_maximises_tokens_per_second(tiny_code):
    """DEL's choice is the (E, d) with the most expected tokens per second of its calls, d = 0
    (a plain round) included; written out here by brute force from the same tables."""
    gen, _ = tiny_code
    drafter = SelfSpeculation("auto", length=4)
    drafter.prepare(gen)
    drafter.hits = torch.tensor([1.0, 2.0, 8.0, 9.0, 9.5, 1.0])
    drafter.tries = torch.full((6,), 10.0)
    layer = 1e-3  # seconds per block, and the head costs one and a half
    drafter.costs = {"plain": 7.5 * layer, "draft": {e: (e + 1.5) * layer for e in range(1, 6)},
                     "tail": {e: e * layer for e in range(1, 6)},
                     "verify": {e: {t: (6 - e) * layer * (1 + 0.1 * t) + 1.5 * layer for t in range(2, 6)}
                                for e in range(1, 6)}}
    drafter.overhead = 0.5 * layer

    def rate(e, d):
        if d == 0:
            return 1 / (drafter.costs["plain"] + drafter.overhead)
        a = float(drafter.hits[e - 1] / 10)
        cost = d * drafter.costs["draft"][e] + drafter.costs["tail"][e] + drafter.costs["verify"][e][d + 1]
        return (1 - a ** (d + 1)) / (1 - a) / (cost + drafter.overhead)

    best = max([(6, 0)] + [(e, d) for e in range(1, 6) for d in range(1, 5)], key=lambda ed: rate(*ed))
    assert drafter.plan() == (*best, False) and best[0] >= 3 and best[1] >= 1  # the shallow exits are unreliable here
    drafter.hits[:] = 0.5  # every exit a coin flip: drafting does not pay, a plain round wins
    assert drafter.plan() == (6, 0, False)


def test_del_learns_acceptance_from_shadow_tokens(tiny_code):
    gen, tokenizer = tiny_code
    drafter = SelfSpeculation("auto", shadow_every=1)
    prompts = held_out_code_prompts(tokenizer, 4, seed=9)
    ids, mask = left_pad(prompts)
    ref = gen.generate(ids, attention_mask=mask, max_new_tokens=32)
    assert torch.equal(gen.generate(ids, attention_mask=mask, max_new_tokens=32, speculate=drafter), ref)
    alpha = drafter.alpha()
    assert bool((drafter.tries[:-1] > 2.0).all())  # every exit was measured, not just the prior
    assert float(alpha[4]) > float(alpha[0])  # a model trained with the early-exit loss: deeper exits agree more


def _two_token_law(model, prompt, setting):
    """The exact law of (x1, x2) after ``prompt`` under the warped target: ``[V, V]``."""
    with torch.no_grad():
        first = V.warp(model(prompt).logits[:, -1], **setting)[0].double()
        support = first.nonzero().flatten()
        seqs = torch.cat([prompt.expand(support.numel(), -1), support[:, None]], 1)
        second = V.warp(model(seqs).logits[:, -1], **setting).double()
    joint = torch.zeros(first.numel(), first.numel(), dtype=torch.float64)
    joint[support] = first[support, None] * second
    return joint


def _sampled_pairs(gen, prompt, setting, rows, seeds, speculate):
    pairs = []
    for seed in seeds:
        out = gen.generate(prompt.expand(rows, -1).contiguous(), max_new_tokens=2, seed=seed, speculate=speculate,
                           **setting)
        pairs.append(out[:, -2:])
    return torch.cat(pairs)


def test_sampling_is_distributed_as_the_target():
    """Self-speculative sampling of (x1, x2): x2 comes from the first speculative round (the
    exit head's draft accepted with probability min(1, p/q), else the residual), compared with
    the model's exact law by Pearson's test. A drafter that reports a wrong q must fail."""
    model = llama(layers=4)
    gen = Generator(model)
    prompt = torch.randint(2, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    setting = dict(temperature=1.0, top_k=4)
    joint = _two_token_law(model, prompt, setting)
    rows, seeds = 1500, range(4)
    samples = _sampled_pairs(gen, prompt, setting, rows, seeds, SelfSpeculation(2, length=2, stop=0.0))
    counts = torch.bincount(samples[:, 0] * 100 + samples[:, 1], minlength=100 * 100).view(100, 100)
    assert chi_square_p_value(counts, joint) > 1e-4

    class WrongQ(SelfSpeculation):  # the draft samples from its exit head but reports a uniform q
        def propose(self, state):
            draft = super().propose(state)
            draft.q = torch.full_like(draft.q, 1.0 / draft.q.shape[-1])
            return draft

    wrong = _sampled_pairs(gen, prompt, setting, rows, seeds, WrongQ(2, length=2, stop=0.0))
    counts = torch.bincount(wrong[:, 0] * 100 + wrong[:, 1], minlength=100 * 100).view(100, 100)
    assert chi_square_p_value(counts, joint) < 1e-4


@pytest.mark.parametrize("spec, message", [("self:0", r"exit layer must be in 1 … 5"), ("self:6", r"in 1 … 5"),
                                           ("self:x", "must be a number or 'auto'")])
def test_bad_exit_layer(tiny_code, spec, message):
    gen, tokenizer = tiny_code
    with pytest.raises(GenerationError, match=message):
        gen.generate(tokenizer("def f(x):", return_tensors="pt")["input_ids"], max_new_tokens=4, speculate=spec)
    with pytest.raises(GenerationError, match=r"stop must be a probability in \[0, 1\]"):
        SelfSpeculation(2, stop=1.5)
