"""Greedy speculative decoding is token-identical to plain greedy decoding, for every drafter.

``Generator.generate(..., speculate=...)`` against the same Generator without ``speculate``:
Token Recycling (the default 81-node template and a small ``Tree.from_paths`` template),
prompt lookup, and the draft model as a chain, a top-k tree and DySpec's dynamic tree. On the
bundled ``tokenfx:tiny-code`` (draft ``tokenfx:tiny-code-draft``) at batch 1 and as left-padded
batches of 4 over 52 prompts (held-out code and snippets that repeat themselves, so lookup has
something to find), with stop tokens that end rows at different steps; and on random-init
llama (GQA, RoPE; with a 1-layer llama as the draft model) and gpt2 (learned positions). Each
drafter must also have been *used*: more than one token per verify step on average, so the
identity is not the trivial one of a verifier that accepts nothing. Then the refusals.
"""

from __future__ import annotations

import collections

import pytest
import torch

from models import gpt2, held_out_code_prompts, left_pad, llama
from tokenfx.errors import GenerationError
from tokenfx.frontends.load import load_tokenizer
from tokenfx.runtime.generate import Generator, generator_for
from tokenfx.runtime.speculative.draft_model import DraftModel
from tokenfx.ir.tree import Tree

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NEW = 20  # max_new_tokens on tiny-code
SMALL_TREE = Tree.from_paths([(0, 0, 0), (0, 1), (1, 0), (2,)])  # 8 nodes, depth 3
DRAFTERS = {
    "recycling": dict(speculate="recycling"),
    "recycling-small-tree": dict(speculate="recycling", tree=SMALL_TREE),
    "lookup": dict(speculate="lookup"),
    "draft": dict(speculate="draft"),
    "draft-tree": dict(speculate="draft-tree"),
    "dynamic": dict(speculate="dynamic"),
}
FEWER = {"recycling-small-tree", "draft", "draft-tree", "dynamic"}  # a quarter of the prompts (time)

# snippets whose continuation repeats what came before (prompt lookup's case)
REPEATING = [
    "    def test_add(self):\n        self.assertEqual(add(1, 2), 3)\n\n    def test_sub(self):\n"
    "        self.assertEqual(sub(1, 2), -1)\n\n    def test_mul(self):\n",
    "import os\nimport sys\nimport re\nimport json\nimport",
    "parser.add_argument('--input', type=str, default=None)\nparser.add_argument('--output', type=str, default=None)\n"
    "parser.add_argument('--",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n    print(j)\nfor k in range(10):\n",
    "class A:\n    def __init__(self, x):\n        self.x = x\n\n\nclass B:\n    def __init__(self, x):\n",
    "        if key == 'a':\n            return self.a\n        if key == 'b':\n            return self.b\n"
    "        if key == 'c':\n",
    "x = self.get('x')\ny = self.get('y')\nz = self.get('z')\n",
    "def __repr__(self):\n    return '%s(%r)' % (self.__class__.__name__, self.name)\n\ndef __str__(self):\n",
]


# -- tiny-code ------------------------------------------------------------------------------------




Code = collections.namedtuple("Code", "gen single batches")


@pytest.fixture(scope="module")
def code():
    """tiny-code, 16 prompts at batch 1 and 36 more as 9 left-padded batches of 4 (lengths mixed)."""
    gen = generator_for("tokenfx:tiny-code")  # the one tokenfx.generate("tokenfx:tiny-code", ...) uses
    tokenizer = load_tokenizer("tokenfx:tiny-code")
    repeating = [torch.tensor(tokenizer(s)["input_ids"]) for s in REPEATING]
    held_out = held_out_code_prompts(tokenizer, 52 - len(repeating), seed=13)
    single = repeating[:4] + held_out[:12]
    rest = repeating[4:] + held_out[12:]
    order = sorted(range(len(rest)), key=lambda i: rest[i].numel())
    batches = [left_pad([rest[i] for i in order[k::9]], seed=k) for k in range(9)]
    assert len(single) + 4 * len(batches) == 52
    assert all(len({int(m.sum()) for m in mask}) > 1 for _, mask in batches)
    return Code(gen, single, batches)


@pytest.fixture(scope="module")
def plain(code):
    """Plain greedy output per (batch-1 prompt | batch) index, computed once."""
    cache = {}

    def get(kind: str, i: int, **kw):
        key = (kind, i, tuple(sorted(kw.items())))
        if key not in cache:
            ids, mask = (code.single[i][None], None) if kind == "single" else code.batches[i]
            cache[key] = code.gen.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kw)
        return cache[key]

    return get


def subset(drafter: str, items: list) -> list:
    """Every prompt for the default recycling template and lookup; a quarter of them (12 prompts)
    for the small template (the same drafter) and the draft models (slower per call)."""
    return items[:len(items) // 4] if drafter in FEWER else items


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_tiny_code_batch_1(code, plain, drafter):
    gen = code.gen
    rates = []
    for i, prompt in enumerate(subset(drafter, code.single)):
        ref = plain("single", i)
        got = gen.generate(prompt[None], max_new_tokens=NEW, **DRAFTERS[drafter])
        n = prompt.numel()
        assert torch.equal(got, ref), f"prompt {i} ({n} tokens): {drafter} {got[0, n:].tolist()} plain {ref[0, n:].tolist()}"
        assert gen.last_stats["drafter"] == DRAFTERS[drafter]["speculate"]
        rates.append(gen.last_stats["accepted_per_step"])
    assert sum(rates) / len(rates) > 1.1, rates  # drafts were accepted: fewer verify steps than tokens


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_tiny_code_left_padded_batches(code, plain, drafter):
    gen = code.gen
    rates = []
    for k, (ids, mask) in enumerate(subset(drafter, code.batches)):
        ref = plain("batch", k)
        got = gen.generate(ids, attention_mask=mask, max_new_tokens=NEW, **DRAFTERS[drafter])
        p = ids.shape[1]
        assert torch.equal(got, ref), f"batch {k}: {drafter} {got[:, p:].tolist()} plain {ref[:, p:].tolist()}"
        rates.append(gen.last_stats["accepted_per_step"])
    assert sum(rates) / len(rates) > 1.1, rates


def apply_stop(free: torch.Tensor, prompt: int, stop: list[int], pad: int) -> torch.Tensor:
    """What a run with ``stop`` must give, from a run without: each row keeps its tokens up to and
    including its first stop token, then pad; the output ends when every row has stopped."""
    out = free.clone()
    ends = []
    for row in range(free.shape[0]):
        hits = [i for i, t in enumerate(free[row, prompt:].tolist()) if t in stop]
        end = hits[0] + 1 if hits else free.shape[1] - prompt
        out[row, prompt + end:] = pad
        ends.append(end)
    return out[:, :prompt + max(ends)]


def stop_tokens(free: torch.Tensor, prompt: int) -> list[list[int]]:
    """Two stop sets: one that ends row 0 early while others run on, one that ends every row early."""
    one = [int(free[0, prompt + 3])]
    every = sorted({int(free[r, prompt + 2 + r]) for r in range(free.shape[0])})
    return [one, every]


@pytest.mark.parametrize("drafter", [d for d in DRAFTERS if d != "recycling-small-tree"])
def test_rows_that_stop_early(code, plain, drafter):
    """Stop tokens end rows at different steps (mid-tree, too): identical to plain greedy, padded."""
    gen = code.gen
    ids, mask = code.batches[6]
    p = ids.shape[1]
    free = plain("batch", 6, stop=())
    for stop in stop_tokens(free, p):
        expected = apply_stop(free, p, stop, gen.pad_id)
        assert torch.equal(plain("batch", 6, stop=tuple(stop)), expected)  # plain greedy agrees with the rule
        got = gen.generate(ids, attention_mask=mask, max_new_tokens=NEW, stop=stop, **DRAFTERS[drafter])
        assert torch.equal(got, expected), f"stop {stop}: {got[:, p:].tolist()} expected {expected[:, p:].tolist()}"
        assert (got[:, p:] == gen.pad_id).any()  # some row was padded after its stop token


# -- random-init llama (GQA) and gpt2, with a 1-layer draft of the same family ----------------------------
RANDOM_NEW = 16  # 64 positions: prompt (<= 12) + 16 + a tree of <= 31 nodes
Random = collections.namedtuple("Random", "family gen drafters cases plain")


def random_case(family: str) -> Random:
    """The target, its drafters, 3 prompts of 1-12 tokens at batch 1 and 8 more as 2 left-padded
    batches, with their plain greedy outputs. A 1-layer draft model for llama only: each model
    costs a Generator (capture, three kv_cache graphs, the tree graph) and this file has to stay fast."""
    if family == "llama":
        target = llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    else:
        target = gpt2(layers=3, heads=4, head_dim=8)
    gen = Generator(target)
    drafters = {"recycling": dict(speculate="recycling", tree_budget=20),
                "recycling-small-tree": dict(speculate="recycling", tree=SMALL_TREE),
                "lookup": dict(speculate="lookup")}
    if family == "llama":
        draft = llama(layers=1, heads=4, kv_heads=2, head_dim=8, seed=1)
        drafters.update({"draft": dict(speculate=DraftModel(draft, mode="chain")),
                         "dynamic": dict(speculate=DraftModel(draft, mode="dynamic", budget=12))})
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 100, (int(torch.randint(1, 13, (1,), generator=g)),), generator=g) for _ in range(11)]
    cases = [(p[None], None) for p in prompts[:3]] + [left_pad(prompts[3 + 4 * k:7 + 4 * k], seed=k) for k in range(2)]
    plain = [gen.generate(ids, attention_mask=mask, max_new_tokens=RANDOM_NEW) for ids, mask in cases]
    return Random(family, gen, drafters, cases, plain)


@pytest.fixture(scope="module")
def llama_case():
    return random_case("llama")


@pytest.fixture(scope="module")
def gpt2_case():
    return random_case("gpt2")


RANDOM_CASES = [("llama", d) for d in ("recycling", "recycling-small-tree", "lookup", "draft", "dynamic")] + \
               [("gpt2", d) for d in ("recycling", "recycling-small-tree", "lookup")]


@pytest.mark.parametrize("family, drafter", RANDOM_CASES, ids=[f"{f}-{d}" for f, d in RANDOM_CASES])
def test_random_models(family, drafter, request):
    case = request.getfixturevalue(f"{family}_case")
    gen = case.gen
    rates = []
    for k, ((ids, mask), ref) in enumerate(zip(case.cases, case.plain)):
        got = gen.generate(ids, attention_mask=mask, max_new_tokens=RANDOM_NEW, **case.drafters[drafter])
        p = ids.shape[1]
        assert torch.equal(got, ref), f"case {k}: {got[:, p:].tolist()} plain {ref[:, p:].tolist()}"
        rates.append(gen.last_stats["accepted_per_step"])
    assert max(rates) > 1.0, rates  # some draft token was accepted


# -- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tree_that_does_not_fit_the_positions(family, request):
    gen = request.getfixturevalue(f"{family}_case").gen
    ids = torch.randint(0, 100, (1, 20), generator=torch.Generator().manual_seed(3))
    assert gen.generate(ids, max_new_tokens=24).shape == (1, 44)  # without a tree it fits
    with pytest.raises(GenerationError, match=r"prompt \(20\) \+ max_new_tokens \(24\) \+ a 30-node draft tree exceeds "
                                              r"the model's 64 positions.*tree_budget"):
        gen.generate(ids, max_new_tokens=24, speculate="recycling", tree_budget=30)
    with pytest.raises(GenerationError, match="31-node draft tree exceeds the model's 64 positions"):
        gen.generate(ids, max_new_tokens=24, speculate="lookup")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_default_recycling_tree_does_not_fit_the_positions(family, request):
    """The default template (81 nodes, budget 'auto') can never fit 64 positions: the same error."""
    gen = request.getfixturevalue(f"{family}_case").gen
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(3))
    with pytest.raises(GenerationError, match="exceeds the model's 64 positions"):
        gen.generate(ids, max_new_tokens=8, speculate="recycling")


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_tree_budget_caps_every_drafter(code, plain, drafter):
    """tree_budget is 'the most nodes per tree' for every drafter, not only Token Recycling."""
    got = code.gen.generate(code.single[0][None], max_new_tokens=NEW, tree_budget=3, **DRAFTERS[drafter])
    assert torch.equal(got, plain("single", 0))


def test_bad_tree_budget(code):
    ids = code.single[0][None]
    for budget in (0, -2, "big", 2.5):
        with pytest.raises(GenerationError, match="tree_budget must be a positive number of nodes or 'auto'"):
            code.gen.generate(ids, max_new_tokens=4, speculate="recycling", tree_budget=budget)


def test_draft_model_with_another_vocabulary(code, llama_case):
    """A 100-token draft for the 4096-token tiny-code (and the other way round) is refused by name.
    The draft's Generator is built on first use; handing it one already built keeps this fast."""
    ids = code.single[0][None]
    small = DraftModel("random draft")
    small.gen = llama_case.gen
    with pytest.raises(GenerationError, match=r"vocabulary of 100 tokens, the target 4096: the drafter must share "
                                              r"the target's tokenizer"):
        code.gen.generate(ids, max_new_tokens=4, speculate=small)
    big = DraftModel("tokenfx:tiny-code")
    big.gen = code.gen
    with pytest.raises(GenerationError, match="vocabulary of 4096 tokens, the target 100.*tokenizer"):
        llama_case.gen.generate(llama_case.cases[0][0], max_new_tokens=4, speculate=big)


def test_unknown_speculate(code):
    ids = code.single[0][None]
    with pytest.raises(GenerationError, match=r"unknown speculate='medusa'; choose recycling, lookup, draft\[:MODEL\], "
                                              r"draft-tree\[:MODEL\], dynamic\[:MODEL\], self\[:LAYER\|auto\|adapter\], adapter:FILE "
                                              r"or pass a Drafter"):
        code.gen.generate(ids, max_new_tokens=4, speculate="medusa")
    with pytest.raises(GenerationError, match="speculate must be a string or a Drafter, got int"):
        code.gen.generate(ids, max_new_tokens=4, speculate=3)
    with pytest.raises(GenerationError, match="mode must be chain, tree or dynamic, got 'wide'"):
        DraftModel(mode="wide")



def test_recycling_judges_untried_nodes_by_their_rank():
    """The budget's acceptance model: a node never drafted (outside the current subtree) is
    estimated from the nodes of its rank that were drafted, not from the rank prior alone."""
    from tokenfx.runtime.speculative.recycling import TokenRecycling

    drafter = TokenRecycling()
    ranks = drafter.template.ranks
    before = drafter.acceptance().clone()
    tried = [i for i in range(1, len(ranks)) if int(ranks[i]) == 1][:3]
    untried = [i for i in range(1, len(ranks)) if int(ranks[i]) == 1][3:]
    assert tried and untried
    drafter.tries[tried] = 50.0  # rank-1 nodes were drafted often and rarely accepted
    drafter.hits[tried] = 1.0
    after = drafter.acceptance()
    conditional = after / after[drafter.template.parents.clamp(min=0)]
    prior_conditional = before / before[drafter.template.parents.clamp(min=0)]
    assert bool((conditional[untried] < 0.5 * prior_conditional[untried]).all())
    rank0 = [i for i in range(1, len(ranks)) if int(ranks[i]) == 0 and int(drafter.template.parents[i]) == 0]
    assert torch.allclose(after[rank0], before[rank0])  # other ranks keep their estimate
