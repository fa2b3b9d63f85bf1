"""Unmasking policies: the budget contract on synthetic rounds, each policy's own rule, the guided
policy's losslessness against its AR model's greedy decoding, the shipped learned policy."""

from __future__ import annotations

import pytest
import torch

from tests.models import llama, left_pad
from tokenfx.errors import GenerationError
from tokenfx.runtime.generate import Generator
from tokenfx.runtime.unmasking import (
    POLICIES, SHIPPED_POLICY, Decision, Learned, RoundState, UnmaskNet, enforce_budget, load_unmask_net, make_policy,
    token_entropy,
)

MASK = 100  # outside the tiny AR model's 100 ids, as tiny-code-dllm's <|mask|> is outside tiny-code's 4096


def synthetic_round(seed: int, *, batch: int = 4, k: int = 8, vocab: int = 20, round_: int = 1, rounds_left: int = 3,
                    sharp: float = 3.0) -> RoundState:
    """A round with random logits; row 0 fully masked, row 1 without masks, the rest half masked."""
    g = torch.Generator().manual_seed(seed)
    prompt = 5
    logits = sharp * torch.randn(batch, k, vocab, generator=g)
    probs = logits.softmax(-1)
    confidence, candidates = probs.max(-1)
    masked = torch.rand(batch, k, generator=g) < 0.5
    masked[0], masked[1] = True, False
    tokens = torch.randint(0, vocab, (batch, prompt + k), generator=g)
    tokens[:, prompt:] = torch.where(masked, MASK, tokens[:, prompt:])
    valid = torch.ones_like(tokens, dtype=torch.bool)
    return RoundState(tokens, valid, prompt, masked, candidates, torch.where(masked, confidence, 0.0), logits, round_,
                      rounds_left)


def local_policies() -> dict:
    """Every policy that needs no AR model, with its default options."""
    net = UnmaskNet()
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return {"vanilla": make_policy("vanilla"), "topk": make_policy("topk", k=2),
            "threshold": make_policy("threshold", threshold=0.5), "ete": make_policy("ete"),
            "learned": Learned(net=net.eval())}


@pytest.mark.parametrize("name", ["vanilla", "topk", "threshold", "ete", "learned"])
@pytest.mark.parametrize("rounds_left", [1, 2, 5])
def test_every_policy_respects_the_budget(name, rounds_left):
    policy = local_policies()[name]
    for seed in range(4):
        state = synthetic_round(seed, rounds_left=rounds_left, sharp=0.5 + seed)
        decision = policy.select(state)
        assert decision.unmask.shape == state.masked.shape and decision.unmask.dtype == torch.bool
        assert not bool((decision.unmask & ~state.masked).any()), "a policy unmasked a decided position"
        unmask = enforce_budget(state, decision.unmask)
        assert not bool((unmask & ~state.masked).any())
        has_masks = state.masked.any(1)
        assert bool((unmask.any(1) == has_masks).all()), "every row with masks unmasks >= 1, others none"
        if rounds_left == 1:
            assert torch.equal(unmask, state.masked), "the block's last round fills every mask"
        again = policy.select(state)
        assert torch.equal(again.unmask, decision.unmask), "policies are deterministic"


def test_vanilla_follows_the_linear_schedule():
    state = synthetic_round(3, rounds_left=3)
    unmask = make_policy("vanilla").select(state).unmask
    left = state.masked.sum(1)
    assert torch.equal(unmask.sum(1), (left + 2) // 3)  # ceil(m / r): LLaDA's schedule
    conf = state.confidence.masked_fill(~state.masked, -1)
    for row in range(state.masked.shape[0]):  # the kept ones are the most confident
        rest = conf[row][state.masked[row] & ~unmask[row]]
        if unmask[row].any() and rest.numel():
            assert conf[row][unmask[row]].min() >= rest.max()


def test_threshold_and_topk_rules():
    state = synthetic_round(5)
    assert torch.equal(make_policy("threshold", threshold=0.6).select(state).unmask,
                       (state.confidence >= 0.6) & state.masked)
    topk = make_policy("topk", k=3).select(state).unmask
    assert torch.equal(topk.sum(1), state.masked.sum(1).clamp(max=3))


def test_ete_exploits_confident_rows_and_explores_the_others():
    state = synthetic_round(7, batch=6, sharp=2.0)
    policy = make_policy("ete", threshold=0.7, explore=2)
    unmask = policy.select(state).unmask
    confident = (state.confidence >= 0.7) & state.masked
    entropy = token_entropy(state.logits).masked_fill(~state.masked, float("-inf"))
    explored_any = False
    for row in range(state.masked.shape[0]):
        if not state.masked[row].any():
            assert not unmask[row].any()
        elif confident[row].any():  # exploit: exactly the confident proposals
            assert torch.equal(unmask[row], confident[row])
        else:  # explore: the most confident one plus the two highest-entropy ones
            explored_any = True
            top = state.confidence[row].masked_fill(~state.masked[row], -1).argmax()
            expected = torch.zeros_like(unmask[row])
            expected[top] = True
            expected[entropy[row].topk(min(2, int(state.masked[row].sum()))).indices] = True
            assert torch.equal(unmask[row], expected)
    assert explored_any and bool(confident.any()), "the synthetic round should exercise both branches"


def test_bad_options_are_generation_errors():
    bad = [("nope", {}), ("threshold", {"threshold": 1.5}), ("topk", {"k": 0}), ("ete", {"explore": -1}),
           ("ete", {"threshold": 0.0}), ("guided", {}), ("vanilla", {"k": 2}), ("learned", {"threshold": 1.0}),
           ("learned", {"path": "/nonexistent/policy"})]
    for name, options in bad:
        with pytest.raises(GenerationError, match="diffusion policy|unknown diffusion policy"):
            make_policy(name, **options)
    assert set(POLICIES) == {"vanilla", "topk", "threshold", "ete", "guided", "learned"}


def test_learned_loads_the_shipped_policy_and_runs():
    policy = make_policy("learned")
    assert (SHIPPED_POLICY / "README.md").exists() and (SHIPPED_POLICY / "training.json").exists()
    state = synthetic_round(11)
    probs = policy.probabilities(state)
    assert bool(((probs >= 0) & (probs <= 1)).all()) and not bool(probs[~state.masked].any())
    assert torch.equal(policy.select(state).unmask, (probs >= 0.5) & state.masked)
    # the shipped weights are the ones on disk, not a fresh init
    fresh = load_unmask_net()
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), policy.net.state_dict().values()))


# -- guided diffusion: lossless with respect to the AR model's greedy decoding ----------------------
def diffuse_blocks(prompt: torch.Tensor, valid: torch.Tensor, gen_length: int, k: int, policy, proposer):
    """A plain semi-autoregressive dLLM loop (``k`` rounds per block) around ``policy``: returns the
    generated tokens ``[B, gen_length]`` and the rounds run."""
    batch, p = prompt.shape
    tokens = torch.cat([prompt, torch.full((batch, gen_length), MASK)], 1)
    valid = torch.cat([valid, torch.ones(batch, gen_length, dtype=torch.bool)], 1)
    rounds = 0
    for start in range(p, p + gen_length, k):
        block = slice(start, start + k)
        for r in range(k):
            masked = tokens[:, block] == MASK
            if not bool(masked.any()):
                break
            logits = proposer(tokens, start, k)
            confidence, candidates = logits.softmax(-1).max(-1)
            state = RoundState(tokens, valid, start, masked, candidates, torch.where(masked, confidence, 0.0), logits,
                               r, k - r)
            decision: Decision = policy.select(state)
            unmask = enforce_budget(state, decision.unmask)
            new = decision.tokens if decision.tokens is not None else candidates
            tokens[:, block] = torch.where(unmask, new, tokens[:, block])
            rounds += 1
    return tokens[:, p:], rounds


def noisy_oracle(reference: torch.Tensor, prompt_len: int, wrong: float, seed: int):
    """A proposer that proposes the AR greedy continuation except at a ``wrong`` share of positions
    (a random other token), with random confidences: it makes the verifier accept long prefixes
    and reject at random places."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(*reference.shape, 100, generator=g)
    corrupt = torch.rand(reference.shape, generator=g) < wrong
    proposal = torch.where(corrupt, (reference + 1 + torch.randint(0, 98, reference.shape, generator=g)) % 100,
                           reference)
    logits = noise.scatter_add(-1, proposal[..., None], torch.full((*reference.shape, 1), 10.0))

    def propose(tokens, start, k):
        return logits[:, start - prompt_len:start - prompt_len + k]

    return propose


@pytest.fixture(scope="module")
def ar_generator():
    return Generator(llama(seed=3), compile=False)


@pytest.mark.parametrize("wrong", [0.0, 0.3, 1.0])
def test_guided_is_lossless_against_ar_greedy(ar_generator, wrong):
    rows = [torch.tensor([5, 17, 33, 2, 9, 41, 8]), torch.tensor([60, 4]), torch.tensor([11, 12, 13, 14, 15])]
    ids, mask = left_pad(rows, seed=1)
    gen_length, k = 16, 8
    reference = ar_generator.generate(ids, attention_mask=mask, max_new_tokens=gen_length, stop=[])[:, ids.shape[1]:]
    policy = make_policy("guided", guide=ar_generator)
    proposer = noisy_oracle(reference, ids.shape[1], wrong, seed=4)
    out, rounds = diffuse_blocks(ids, mask.bool(), gen_length, k, policy, proposer)
    assert torch.equal(out, reference), "guided diffusion must equal the AR model's greedy decoding"
    assert policy.verify_calls == rounds
    if wrong == 0.0:  # every proposal right: one round per block, every proposal accepted
        assert rounds == gen_length // k and policy.accepted == len(rows) * gen_length
    if wrong == 1.0:  # every proposal wrong: the AR model's own token, one per round
        assert rounds == gen_length and policy.accepted == 0


def test_guided_with_a_dllm_proposer_equals_ar_greedy(ar_generator):
    """The same with a real (random-init, bidirectional) dLLM as the proposer, several prompts."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(7)
    dllm = transformers.LlamaForCausalLM(cfg).eval()
    for layer in dllm.model.layers:
        layer.self_attn.is_causal = False

    def propose(tokens, start, k):
        with torch.no_grad():
            return dllm(tokens).logits[:, start:start + k, :100].float()  # never propose the mask

    gen_length, k = 12, 4
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 100, (2, 6 + seed), generator=g)
        mask = torch.ones_like(ids)
        reference = ar_generator.generate(ids, attention_mask=mask, max_new_tokens=gen_length, stop=[])[:, ids.shape[1]:]
        out, _ = diffuse_blocks(ids, mask.bool(), gen_length, k, make_policy("guided", guide=ar_generator), propose)
        assert torch.equal(out, reference)


def test_guided_through_diffuse_equals_ar_greedy(ar_generator):
    """End to end: ``tokenfx.diffuse(..., policy="guided")`` with a random-init tiny dLLM sharing the
    AR model's ids (plus a mask id) gives the AR model's greedy tokens, with and without the cache."""
    import transformers

    from tokenfx.runtime.diffusion import diffuse

    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    cfg.is_causal, cfg.mask_token_id = False, MASK
    torch.manual_seed(11)
    dllm = transformers.LlamaForCausalLM(cfg).eval()
    rows = [torch.tensor([5, 17, 33, 2, 9, 41]), torch.tensor([60, 4, 7])]
    ids, mask = left_pad(rows, seed=2)
    reference = ar_generator.generate(ids, attention_mask=mask, max_new_tokens=16, stop=[])[:, ids.shape[1]:]
    for cache in ("none", "dual"):
        result = diffuse(dllm, ids, mask, gen_length=16, block_length=8, policy="guided", guide=ar_generator,
                         cache=cache, compile=False)
        assert torch.equal(result.sequences[:, ids.shape[1]:], reference)
