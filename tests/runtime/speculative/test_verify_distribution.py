"""``verify.sample`` is lossless: the tokens speculative sampling emits are distributed exactly as
plain sampling from the target.

The target is a bigram chain over a 6-token vocabulary (``P[prev]``: softmaxes of random
logits), warped like real decoding (temperature, top-k, top-p); the draft ``Q`` is another
bigram table, the target's logits plus noise (acceptance is partial). 100,000 independent rows run in one batch, round after round, each
round drafting a tree from the row's last emitted token and verifying it:

- deterministic children (``q=None``): a fixed rank template, node ``i``'s rank-``r`` child
  is ``Q[token_i]``'s ``r``-th most likely token;
- sampled children: node ``i``'s children are draws without replacement from
  ``Q[token_i]`` in node order, and ``q[b, i] = Q[token_i]``.

The first three emitted tokens of every row are compared with the chain's exact law: the joint
of ``(x1, x2)`` and the marginal of ``x3`` (which mixes over ``x2``, so tokens emitted in a
later round, after a partly accepted tree, are covered), by Pearson's chi-square test and by
total variation against a bound from the sample size. Then the same check, run on verifiers
that are wrong in realistic ways (a residual that forgets the rejection or removes only half
the draft's mass; the temperature applied twice), must reject: the test has power.
"""

from __future__ import annotations

import math

import pytest
import torch

from tokenfx.runtime.speculative import verify as V
from tokenfx.ir.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB = 6
ROWS = 100_000
ROOT = 2  # every row starts after this token
EMIT = 3  # tokens compared per row
ALPHA = 1e-4  # a correct verifier fails a check with probability 1e-4 per seed; the seeds are fixed
NOISE = 1.0  # how far the draft's logits are from the target's
DELTA = 1e-6  # total variation: exceeded by an exact sampler with probability < 1e-6 (McDiarmid)

# root, three children (ranks 0, 1, 2), two grandchildren under the first child, one under the
# second, one great-grandchild: 8 nodes, depth 3, 1 to 4 tokens per round
TEMPLATE = Tree.from_paths([(0, 0, 0), (0, 1), (1, 0), (2,)])


def bigram(seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(VOCAB, VOCAB, generator=g, dtype=torch.float64)).softmax(-1)


P = bigram(0, 1.5)  # the target: P[prev] is the distribution of the next token
Q = (P.log() + NOISE * bigram(1, 1.0).log()).softmax(-1)  # the draft: the target's logits plus noise
LOG_P = P.log().float()


def exact_next(temperature: float, top_k=None, top_p=None) -> torch.Tensor:
    """``[V, V]`` in fp64: row ``a`` is the warped target after ``a``, written out from the
    definition (HF order: logits / T, keep the k largest, keep the most likely tokens while the
    mass strictly above each is < top_p)."""
    out = torch.zeros(VOCAB, VOCAB, dtype=torch.float64)
    for a in range(VOCAB):
        z = P[a].log() / temperature
        order = torch.argsort(z, descending=True)
        zs = z[order]
        keep = torch.ones(VOCAB, dtype=torch.bool)
        if top_k is not None:
            keep[top_k:] = False
        if top_p is not None:
            p = torch.where(keep, zs, -math.inf).softmax(0)
            above = p.cumsum(0) - p
            assert bool(((above - top_p).abs() > 1e-3).all()), "the top-p cut must not be a near tie"
            keep &= above < top_p
        out[a, order] = torch.where(keep, zs, -math.inf).softmax(0)
    return out


def exact_law(nxt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain started after ROOT: ``joint[x1, x2]`` and the marginal of ``x3``."""
    joint = nxt[ROOT][:, None] * nxt  # p(x1 | root) p(x2 | x1)
    third = joint.sum(0) @ nxt
    return joint, third


# -- draft trees -----------------------------------------------------------------------------------
def deterministic_tree(roots: torch.Tensor, generator) -> tuple[torch.Tensor, None]:
    """Template children: rank r under a token = the draft's r-th most likely next token."""
    ranked = torch.argsort(Q, dim=-1, descending=True)
    tokens = torch.empty(roots.numel(), len(TEMPLATE), dtype=torch.long)
    tokens[:, 0] = roots
    for i in range(1, len(TEMPLATE)):
        tokens[:, i] = ranked[tokens[:, TEMPLATE.parents[i]], TEMPLATE.ranks[i]]
    return tokens, None


def sampled_tree(roots: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The template's shape, node i's children drawn without replacement from Q[token_i] in
    node order (Gumbel top-k: the order of ``log Q + Gumbel`` is a sequential draw without
    replacement)."""
    b = roots.numel()
    tokens = torch.empty(b, len(TEMPLATE), dtype=torch.long)
    tokens[:, 0] = roots
    draws = {}
    for i in range(1, len(TEMPLATE)):
        parent = int(TEMPLATE.parents[i])
        if parent not in draws:
            u = torch.rand(b, VOCAB, generator=generator, dtype=torch.float64).clamp(1e-300, 1 - 1e-16)
            keys = Q[tokens[:, parent]].log() - (-u.log()).log()
            draws[parent] = torch.argsort(keys, dim=-1, descending=True)
        tokens[:, i] = draws[parent][:, TEMPLATE.ranks[i]]
    q = Q[tokens].float()  # [B, T, V]: the distribution each node's children came from
    return tokens, q


# FR-Spec: the draft head covers a subset of the vocabulary (here 4 of the 6 tokens); its q is
# zero outside it, so the other tokens only ever come from the residual
SUBSET = torch.tensor([0, 1, 3, 4])
Q_SUBSET = torch.zeros_like(Q)
Q_SUBSET[:, SUBSET] = Q[:, SUBSET] / Q[:, SUBSET].sum(-1, keepdim=True)


def subset_tree(roots: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A sampled chain of depth 3 from the subset draft (a chain: a subset draw without
    replacement runs out of tokens on wide trees)."""
    b = roots.numel()
    tokens = torch.empty(b, len(CHAIN), dtype=torch.long)
    tokens[:, 0] = roots
    for i in range(1, len(CHAIN)):
        tokens[:, i] = torch.multinomial(Q_SUBSET[tokens[:, i - 1]], 1, generator=generator).squeeze(1)
    return tokens, Q_SUBSET[tokens].float()


CHAIN = Tree.chain(3)
TREES = {"deterministic": deterministic_tree, "sampled": sampled_tree}
SHAPES = {"deterministic": TEMPLATE, "sampled": TEMPLATE, "subset": CHAIN}


# -- speculative sampling of the chain ----------------------------------------------------------------
def speculate(tree: str, setting: dict, seed: int, warp=V.warp) -> tuple[torch.Tensor, dict]:
    """The first EMIT tokens of every row, ``[ROWS, EMIT]``, and what the first round accepted."""
    g = torch.Generator().manual_seed(seed)
    shape = SHAPES[tree]
    t = len(shape)
    parents = shape.parents.expand(ROWS, t)
    valid = torch.ones(ROWS, t, dtype=torch.bool)
    mask = shape.mask.expand(ROWS, t, t)
    depth = shape.depth.expand(ROWS, t)
    out = torch.zeros(ROWS, EMIT + t, dtype=torch.long)
    count = torch.zeros(ROWS, dtype=torch.long)
    roots = torch.full((ROWS,), ROOT, dtype=torch.long)
    rows = torch.arange(ROWS)
    first = None
    while bool((count < EMIT).any()):
        tokens, q = (subset_tree if tree == "subset" else TREES[tree])(roots, g)
        probs = warp(LOG_P[tokens], **setting)  # [B, T, V]: the target after every node
        verdict = V.sample(tokens, parents, valid, mask, depth, probs, g, q)
        # the accepted path is the last accepted node's ancestors, root first
        last = verdict.path.gather(1, (verdict.length - 1)[:, None]).squeeze(1)
        on_path = torch.zeros(ROWS, t, dtype=torch.bool).scatter_(1, verdict.path, True)
        assert torch.equal(on_path, mask[rows, last])
        assert bool((verdict.path.diff(dim=1) >= 0).all())
        steps = verdict.path.shape[1]
        accepted = torch.cat([tokens.gather(1, verdict.path[:, 1:]), verdict.bonus[:, None]], 1)  # [B, steps]
        col = torch.arange(steps)[None, :].expand(ROWS, steps)
        emitted = torch.where(col < (verdict.length - 1)[:, None], accepted, verdict.bonus[:, None])
        need = count < EMIT  # rows that are done keep drafting (one batch) but record nothing
        write = (col < verdict.length[:, None]) & need[:, None]
        out[rows[:, None].expand(ROWS, steps)[write], (count[:, None] + col)[write]] = emitted[write]
        count += torch.where(need, verdict.length, 0)
        roots = verdict.bonus
        if first is None:
            first = {"accepted": (verdict.length - 1).double()}
    return out[:, :EMIT], first


# -- statistics ---------------------------------------------------------------------------------------
def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs`` (flattened); a sample in a zero-probability
    cell rejects outright (p = 0); cells with expected count < 5 are pooled."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    if bool((counts[probs == 0] > 0).any()):
        return 0.0
    n = float(counts.sum())
    expected = probs * n
    big = expected >= 5
    small = ~big & (probs > 0)
    obs, exp = counts[big], expected[big]
    if bool(small.any()):
        obs = torch.cat([obs, counts[small].sum()[None]])
        exp = torch.cat([exp, expected[small].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = exp.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def tv_bound(probs: torch.Tensor, n: int) -> float:
    """E[TV(empirical, probs)] <= ½ Σ sqrt(p (1 - p) / n); TV moves by at most 1/n per sample,
    so (McDiarmid) it exceeds its mean by sqrt(log(1/δ) / 2n) with probability < δ."""
    p = probs.flatten()
    return 0.5 * float((p * (1 - p) / n).sqrt().sum()) + math.sqrt(math.log(1 / DELTA) / (2 * n))


def check(samples: torch.Tensor, setting: dict) -> dict:
    """p-values and total variations of (x1, x2) and x3 against the chain's exact law."""
    joint, third = exact_law(exact_next(**setting))
    pairs = torch.bincount(samples[:, 0] * VOCAB + samples[:, 1], minlength=VOCAB * VOCAB).view(VOCAB, VOCAB)
    thirds = torch.bincount(samples[:, 2], minlength=VOCAB)
    result = {}
    for name, counts, probs in (("x1,x2", pairs, joint), ("x3", thirds, third)):
        empirical = counts.double() / ROWS
        result[name] = dict(p=chi_square_p_value(counts, probs), tv=0.5 * float((empirical - probs).abs().sum()),
                            bound=tv_bound(probs, ROWS), outside=int(counts[probs == 0].sum()))
    return result


SETTINGS = {
    "T=0.7": dict(temperature=0.7),
    "T=1": dict(temperature=1.0),
    "T=1,top_k=3": dict(temperature=1.0, top_k=3),
    "T=0.8,top_k=5,top_p=0.9": dict(temperature=0.8, top_k=5, top_p=0.9),
}


def test_the_setup_is_not_trivial():
    """The settings truncate where they should, the draft differs from the target, and every
    cell of the untruncated law but a few is expected often enough to be tested on its own."""
    tv = 0.5 * (P - Q).abs().sum(-1)
    assert float(tv.min()) > 0.03 and float(tv.mean()) > 0.1  # a draft, not the target
    full = exact_next(1.0)
    assert torch.allclose(full, P)
    assert int((exact_next(1.0, top_k=3) > 0).sum(-1).max()) == 3
    support = (exact_next(0.8, top_k=5, top_p=0.9) > 0).sum(-1)
    assert int(support.min()) >= 2 and int(support.max()) < 5  # top-p cuts below top-k, leaving a choice
    joint, _ = exact_law(full)
    assert int((joint * ROWS >= 5).sum()) >= 30  # the chi-square test has many cells to work with


@pytest.mark.parametrize("setting", SETTINGS, ids=list(SETTINGS))
@pytest.mark.parametrize("tree", TREES)
def test_speculative_sampling_is_lossless(tree, setting):
    kw = SETTINGS[setting]
    samples, first = speculate(tree, kw, seed=10 * list(TREES).index(tree) + list(SETTINGS).index(setting))
    # the drafts matter: rows accept 0, 1, 2 and 3 draft tokens, each often
    accepted = first["accepted"]
    for k in range(4):
        assert float((accepted == k).double().mean()) > 0.01, (k, accepted.mean())
    result = check(samples, kw)
    for name, r in result.items():
        assert r["outside"] == 0, (name, r)  # nothing the warped target cannot produce
        assert r["p"] > ALPHA, (name, r)
        assert r["tv"] < r["bound"], (name, r)


@pytest.mark.parametrize("setting", ["T=1", "T=0.8,top_k=5,top_p=0.9"])
def test_a_draft_over_a_vocabulary_subset_is_lossless(setting):
    """FR-Spec's draft head: q is zero outside its subset; the output is still the target's law
    (tokens outside the subset come from the residual)."""
    kw = SETTINGS[setting]
    samples, first = speculate("subset", kw, seed=40 + list(SETTINGS).index(setting))
    assert float((first["accepted"] > 0).double().mean()) > 0.1  # the subset draft is accepted often
    assert bool(torch.isin(samples, torch.tensor([2, 5])).any())  # and tokens outside it are still emitted
    result = check(samples, kw)
    for name, r in result.items():
        assert r["outside"] == 0, (name, r)
        assert r["p"] > ALPHA, (name, r)
        assert r["tv"] < r["bound"], (name, r)


# -- power: the same check rejects verifiers that are slightly wrong -------------------------------------
def forgets_the_rejection(p, q):
    """After a rejection, sample the next sibling against p itself, not norm((p - q)+)."""
    return p


def half_the_residual(p, q):
    """Subtract only half the draft's mass: norm((p - q / 2)+)."""
    return V._normalise((p - q / 2).clamp(min=0))


@pytest.mark.parametrize("residual", [forgets_the_rejection, half_the_residual])
@pytest.mark.parametrize("setting", ["T=0.7", "T=1"])
def test_a_wrong_residual_is_caught(monkeypatch, residual, setting):
    kw = SETTINGS[setting]
    monkeypatch.setattr(V, "_residual", residual)
    samples, _ = speculate("sampled", kw, seed=5)
    result = check(samples, kw)
    assert result["x1,x2"]["p"] < 1e-12, result
    assert result["x1,x2"]["tv"] > result["x1,x2"]["bound"], result


def test_a_twice_warped_target_is_caught():
    """Deterministic children: a verifier that applies the temperature to already warped
    probabilities (a sharper target) must fail the check."""
    kw = SETTINGS["T=0.7"]

    def twice(logits, **setting):
        return V.warp(V.warp(logits, **setting).log(), **setting)

    samples, _ = speculate("deterministic", kw, seed=6, warp=twice)
    result = check(samples, kw)
    assert result["x1,x2"]["p"] < 1e-12 and result["x3"]["p"] < 1e-12, result
    # and the check accepts what that verifier actually samples from: the test is about the law
    sharper = dict(temperature=0.7 * 0.7)
    assert check(samples, sharper)["x1,x2"]["p"] > ALPHA
