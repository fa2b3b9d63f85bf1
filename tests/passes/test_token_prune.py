"""token_prune (Zero-TPrune) on captured encoders: a reference written from the paper's steps
(one unpadded sample at a time, with the Hugging Face BERT modules), composition with
token_merge, keep ratios, SDPA kept where nothing prunes, ONNX parity and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokenfx
from test_token_merge import assert_onnx_parity, embedder, merge_step, ragged
from tokenfx.errors import PassOptionError

tfx = torch.ops.tokenfx
aten = torch.ops.aten


def prune_step(h, size, probs, keys, r, iterations, cls_weight, protect=(0,)):
    """Zero-TPrune on one sample: h [n, C], probs [H, n, n], keys [n, D]."""
    H, n, _ = probs.shape
    s = torch.full((H, n), 1.0 / n, dtype=torch.float64)
    if cls_weight:
        s[:, 0] *= math.sqrt(n)
    for _ in range(iterations):
        s = torch.einsum("hij,hi->hj", probs.double(), s)  # s ← Aᵀ s
    importance = s.pow(2).mean(0).sqrt()  # heads combined by root-mean-square
    idx = [i for i in range(n) if i not in protect]
    ranked = [idx[i] for i in torch.sort(importance[idx], stable=True).indices.tolist()]
    half = (len(idx) + 1) // 2
    a, b = ranked[:half], ranked[half:]  # the less important half may go
    k = min(r, len(a)) if b else 0
    m = F.normalize(keys.double(), dim=-1)
    best, match = (m[a] @ m[b].T).max(dim=-1)
    order = torch.sort(-best, stable=True).indices[:k].tolist()
    gone = [a[i] for i in order]
    size = size.clone()
    for i in order:
        size[b[int(match[i])]] += size[a[i]]
    keep = [i for i in range(n) if i not in gone]
    return h[keep], size[keep]


def zero_tprune_reference(model, ids, r_per_layer, iterations, cls_weight=False, merge_per_layer=None):
    bert_model = model.model
    x = bert_model.embeddings(input_ids=ids[None])
    size = torch.ones(ids.numel(), dtype=torch.float64)
    merge_per_layer = merge_per_layer or [0] * len(r_per_layer)
    for layer, r, steps, rm in zip(bert_model.encoder.layer, r_per_layer, iterations, merge_per_layer):
        bias = size.log().float()[None, None, None, :]
        attn = layer.attention.self
        n, heads = x.shape[1], attn.num_attention_heads
        q = attn.query(x).view(1, n, heads, -1).transpose(1, 2)
        k = attn.key(x).view(1, n, heads, -1).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scaling + bias, dim=-1)[0]
        h = layer.attention(x, attention_mask=bias)[0][0]
        if r:
            h, size = prune_step(h, size, probs, k[0].mean(0), r, steps, cls_weight)
        if rm:  # merging on the hidden states
            h, size = merge_step(h, size, h, rm)
        h = h[None]
        x = layer.output(layer.intermediate(h), h)
    return (x[0].double() * size[:, None]).sum(0) / size.sum()


@pytest.mark.parametrize("cls_weight", [False, True])
def test_matches_reference_on_a_padded_batch(cls_weight):
    model, graph = embedder()
    pruned = tokenfx.optimize(graph, f"token_prune(r=[3, 2], iterations=[4, 1], cls_weight={cls_weight})")
    lengths = [13, 10, 5]
    inputs = ragged(lengths, 13, seed=11)
    with torch.no_grad():
        out = pruned.module()(**inputs)
        for row, n in enumerate(lengths):
            expected = zero_tprune_reference(model, inputs["input_ids"][row, :n], [3, 2], [4, 1], cls_weight)
            torch.testing.assert_close(out[row].double(), expected, atol=2e-5, rtol=1e-5)


def test_prune_then_merge_in_either_order_is_one_chain():
    model, graph = embedder(layers=3)  # a block after the merge: it must read the merge's own bias
    inputs = ragged([13, 8], 13, seed=12)
    prune, merge = "token_prune(r=[2, 0, 0], iterations=3)", "token_merge(r=[0, 2, 0], metric='hidden')"
    first = tokenfx.optimize(graph, f"{prune},{merge}")
    second = tokenfx.optimize(graph, f"{merge},{prune}")
    with torch.no_grad():
        a, b = first.module()(**inputs), second.module()(**inputs)
        assert torch.equal(a, b)
        for row, n in enumerate([13, 8]):
            expected = zero_tprune_reference(model, inputs["input_ids"][row, :n], [2, 0, 0], [3, 3, 3],
                                             merge_per_layer=[0, 2, 0])
            torch.testing.assert_close(a[row].double(), expected, atol=2e-5, rtol=1e-5)


def test_sdpa_stays_where_nothing_prunes_and_keep_ratio_follows_the_length():
    _, graph = embedder()
    pruned = tokenfx.optimize(graph, "token_prune(keep=0.75, blocks=[1])")
    assert pruned.count(aten.scaled_dot_product_attention) == 1  # block 0 keeps SDPA
    assert pruned.count(tfx.attention_pagerank) == 1
    (plan,) = [n for n in pruned.graph.nodes if n.target is tfx.reduction_plan.default]

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n is plan:
                kept.append(value[1].shape[1])
            return value

    kept = []
    with torch.no_grad():
        for width in (8, 16):
            inputs = ragged([width, width - 3], width, seed=width)
            Recorder(pruned.module()).run(inputs["input_ids"], inputs["attention_mask"])
    assert kept == [6, 12]  # floor(0.75 · N) tokens stay


def test_a_second_pass_keeps_the_first_ones_unmerge():
    from models import bert, token_inputs

    graph = tokenfx.capture(bert(2), token_inputs(2, 16))
    both = tokenfx.optimize(graph, "token_merge(r=[0, 2], unmerge=True),token_prune(r=[2, 0], unmerge=True)")
    inputs = ragged([14, 9], 14, seed=13)
    with torch.no_grad():
        out = both.module()(**inputs)
    assert out.shape == (2, 14, 32)
    for row in out[:1]:  # 4 of 14 tokens reduced: 10 distinct per-token values (pruned ones copy their partner)
        assert torch.unique(row, dim=0).shape[0] == 10


def test_onnx_parity(tmp_path):
    _, graph = embedder()
    pruned = tokenfx.optimize(graph, "token_prune(r=2, iterations=2)")
    assert_onnx_parity(pruned, tmp_path / "prune.onnx", [([12, 7, 9], 12, 13), ([16, 16], 16, 17)])


def test_errors_name_the_problem():
    _, graph = embedder()
    with pytest.raises(PassOptionError, match=r"keep=0.3 must be in \[0.5, 1\]"):
        tokenfx.optimize(graph, "token_prune(keep=0.3)")
    with pytest.raises(PassOptionError, match="block 5 does not exist"):
        tokenfx.optimize(graph, "token_prune(keep=0.8, blocks=[5])")
    with pytest.raises(PassOptionError, match="r or keep, not both"):
        tokenfx.optimize(graph, "token_prune(r=2, keep=0.8)")
    with pytest.raises(PassOptionError, match="iterations"):
        tokenfx.optimize(graph, "token_prune(r=2, iterations=[1, 1, 1])")
    with pytest.raises(PassOptionError, match="already has a reduction step"):  # same block, attention-derived
        tokenfx.optimize(graph, "token_prune(r=[0, 2]),token_merge(r=[0, 2])")
    with pytest.raises(PassOptionError, match="protect"):
        tokenfx.optimize(graph, "token_prune(r=[1, 0]),token_merge(r=[0, 1], protect=[0, 1])")
