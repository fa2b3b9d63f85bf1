"""token_merge (ToMe bipartite soft matching) on captured encoders.

The reference below is written from the algorithm's steps, one sample at a time and without
any padding (each sample alone, its own real tokens only), with the Hugging Face BERT
modules; the pass must reproduce it on padded batches, which is the padding-invariance
contract as well as the algorithm's."""

from __future__ import annotations

import fractions
import functools

import pytest
import torch
import torch.nn.functional as F

import tokenfx
from models import bert, image_inputs, llama, token_inputs, vit
from tokenfx.errors import MappingError, OpInputError, PassOptionError
from tokenfx.frontends.hf import SentenceEmbedder

tfx = torch.ops.tokenfx


@functools.lru_cache(maxsize=None)
def embedder(layers: int = 2):
    model = SentenceEmbedder(bert(layers), normalize=False)
    return model, tokenfx.capture(model, token_inputs(2, 9))


def ragged(lengths, width, seed=0):
    """Right-padded ids / mask with the given real lengths (pads hold random ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


# -- the reference: ToMe's steps on one sample -----------------------------------------------------
def merge_step(h, size, metric, r, protect=(0,)):
    """h [n, C], size [n], metric [n, D] → the sample after merging up to r tokens."""
    n = h.shape[0]
    idx = [i for i in range(n) if i not in protect]
    a, b = idx[0::2], idx[1::2]  # alternate over the tokens that take part
    k = min(r, len(a)) if b else 0
    m = F.normalize(metric.double(), dim=-1)
    best, match = (m[a] @ m[b].T).max(dim=-1)
    order = torch.sort(-best, stable=True).indices[:k].tolist()
    src = [a[i] for i in order]
    dst = [b[int(match[i])] for i in order]
    num = h.double() * size[:, None]
    den = size.clone()
    for s, d in zip(src, dst):
        num[d] += h[s].double() * size[s]
        den[d] += size[s]
    keep = [i for i in range(n) if i not in src]
    return (num[keep] / den[keep, None]).to(h.dtype), den[keep]


def tome_reference(model, ids, r_per_layer, metric="keys", proportional=True, ratio=None):
    """Size-weighted mean-pooled embedding of one unpadded sample ``ids [n]`` (with ``ratio``,
    each block merges floor(ratio · the sample's own non-CLS tokens))."""
    bert_model = model.model
    x = bert_model.embeddings(input_ids=ids[None])
    size = torch.ones(ids.numel(), dtype=torch.float64)
    for layer, r in zip(bert_model.encoder.layer, r_per_layer):
        bias = size.log().float()[None, None, None, :] if proportional else None
        attn = layer.attention.self
        keys = attn.key(x)[0].view(x.shape[1], attn.num_attention_heads, -1).mean(1)
        h = layer.attention(x, attention_mask=bias)[0]
        if ratio is not None:
            share = fractions.Fraction(ratio).limit_denominator(1000)
            r = (h.shape[1] - 1) * share.numerator // share.denominator
        if r:
            merged, size = merge_step(h[0], size, keys if metric == "keys" else h[0], r)
            h = merged[None]
        x = layer.output(layer.intermediate(h), h)
    return (x[0].double() * size[:, None]).sum(0) / size.sum()


@pytest.mark.parametrize("metric,proportional", [("keys", True), ("hidden", False)])
def test_matches_reference_on_a_padded_batch(metric, proportional):
    model, graph = embedder()
    r = [3, 2]
    merged = tokenfx.optimize(graph, f"token_merge(r={r}, metric='{metric}', proportional={proportional})")
    lengths = [13, 9, 5]  # the short rows have too few tokens for r: they drop pads instead
    inputs = ragged(lengths, 13, seed=1)
    with torch.no_grad():
        out = merged.module()(**inputs)
        for row, n in enumerate(lengths):
            expected = tome_reference(model, inputs["input_ids"][row, :n], r, metric, proportional)
            torch.testing.assert_close(out[row].double(), expected, atol=2e-5, rtol=1e-5)
        # and the merge did something: the unmerged model differs
        assert not torch.allclose(out, model(**inputs), atol=1e-3)


def test_ratio_schedule_merges_each_samples_own_share():
    model, graph = embedder()
    merged = tokenfx.optimize(graph, "token_merge(ratio=0.3, metric='hidden')")
    lengths = [16, 11, 6]  # the batch drops ⌊0.3·15⌋ = 4 per block; the short rows merge their own share
    inputs = ragged(lengths, 16, seed=2)
    with torch.no_grad():
        out = merged.module()(**inputs)
        for row, n in enumerate(lengths):
            expected = tome_reference(model, inputs["input_ids"][row, :n], [0, 0], "hidden", True, ratio=0.3)
            torch.testing.assert_close(out[row].double(), expected, atol=2e-5, rtol=1e-5)


def test_a_sample_does_not_depend_on_its_batch():
    _, graph = embedder()
    merged = tokenfx.optimize(graph, "token_merge(r=2)").module()
    alone = ragged([7], 7, seed=3)
    batch = ragged([7, 16, 11], 16, seed=4)
    batch["input_ids"][0, :7] = alone["input_ids"][0]
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch)[0], merged(**alone)[0], atol=1e-5, rtol=1e-5)


def test_deterministic_and_r0_exact():
    model, graph = embedder()
    inputs = ragged([12, 8], 12, seed=5)
    merged = tokenfx.optimize(graph, "token_merge(r=3)").module()
    with torch.no_grad():
        assert torch.equal(merged(**inputs), merged(**inputs))
        same = tokenfx.optimize(graph, "token_merge(r=0)")
        assert same.count(tfx.merge_tokens) == 0
        assert torch.equal(same.module()(**inputs), graph.module()(**inputs))


def test_structure_merge_sits_between_attention_residual_and_mlp():
    _, graph = embedder(layers=3)
    merged = tokenfx.optimize(graph, "token_merge(r=[2, 0, 1])")
    nodes = [n for n in merged.graph.nodes if n.target is tfx.merge_tokens.default]
    assert len(nodes) == 2 and merged.count(tfx.bipartite_match) == 2
    for node, layer in zip(nodes, (0, 2)):
        stream = node.args[0]  # post-norm BERT: the norm after the attention residual
        assert stream.target is torch.ops.aten.layer_norm.default
        assert f"layer.{layer}.attention.output" in str(stream.meta["nn_module_stack"])
        out = next(u for u in node.users if u.args[1] == 0)
        readers = [str(u.meta.get("nn_module_stack", "")) for u in out.users]
        assert any(f"layer.{layer}.intermediate" in p for p in readers)  # the MLP reads the merged tokens


def test_vit_unmerge_keeps_tokens_and_copies_merged_values():
    model = vit(2)
    graph = tokenfx.capture(model, image_inputs(2))
    merged = tokenfx.optimize(graph, "token_merge(r=3, unmerge=True)")
    add = next(n for n in merged.graph.nodes if n.target is tfx.merge_tokens.default).args[0]
    assert add.target is torch.ops.aten.add.Tensor  # pre-norm: the attention residual add
    with torch.no_grad():
        out = merged.module()(**image_inputs(3, seed=1))
    assert out.shape == (3, 17, 32)
    for row in out:  # 17 tokens, 6 merged away: exactly 11 distinct values remain
        assert torch.unique(row, dim=0).shape[0] == 17 - 6


def test_unmerge_then_mean_pool_equals_size_weighted_pooling():
    base = bert(2)
    inputs = ragged([11, 6], 11, seed=6)
    per_token = tokenfx.optimize(tokenfx.capture(base, token_inputs(2, 9)), "token_merge(r=2, unmerge=True)")
    _, pooled_graph = embedder()
    with torch.no_grad():
        hidden = per_token.module()(**inputs)
        pooled = tokenfx.optimize(pooled_graph, "token_merge(r=2)").module()(**inputs)
    w = inputs["attention_mask"][..., None].float()
    torch.testing.assert_close((hidden * w).sum(1) / w.sum(1), pooled, atol=1e-6, rtol=1e-5)


def test_torch_compile_one_graph_for_every_shape():
    from tokenfx.frontends.dynamo import COMPILE_LOG

    torch._dynamo.reset()
    model, graph = embedder()
    reference = tokenfx.optimize(graph, "token_merge(r=2)").module()
    compiled = torch.compile(model, backend="tokenfx", dynamic=True,
                             options={"passes": "token_merge(r=2)", "inner": "eager"})
    start = len(COMPILE_LOG)
    with torch.no_grad():
        for lengths, width in (([9, 7], 9), ([13, 4, 8], 13), ([17, 5], 17)):
            inputs = ragged(lengths, width, seed=width)
            torch.testing.assert_close(compiled(**inputs), reference(**inputs), atol=1e-5, rtol=1e-5)
    entries = COMPILE_LOG[start:]
    torch._dynamo.reset()
    assert len(entries) == 1 and entries[0]["error"] is None
    assert entries[0]["passes"][0]["matched"][:2] == ["model.encoder.layer.0: merge 2", "model.encoder.layer.1: merge 2"]


def assert_onnx_parity(graph, path, cases):
    """Export ``graph`` and compare onnxruntime with the torch graph on ragged batches ``cases``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(tokenfx.export_onnx(graph, path)))
    for lengths, width, seed in cases:
        inputs = ragged(lengths, width, seed=seed)
        (got,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), graph.module()(**inputs), atol=1e-5, rtol=1e-5)


def test_onnx_parity_dynamic_batch_and_tokens(tmp_path):
    _, graph = embedder()
    merged = tokenfx.optimize(graph, "token_merge(r=2, metric='hidden')")
    assert_onnx_parity(merged, tmp_path / "merge.onnx", [([13, 6, 9], 13, 13), ([17, 17], 17, 17)])


def test_errors_name_the_problem():
    _, graph = embedder()
    with pytest.raises(PassOptionError, match="has 3 entries; the model has 2 blocks"):
        tokenfx.optimize(graph, "token_merge(r=[1, 1, 1])")
    with pytest.raises(PassOptionError, match="r \\(with inflect\\) or ratio, not both"):
        tokenfx.optimize(graph, "token_merge(r=2, ratio=0.2)")
    with pytest.raises(PassOptionError, match=r"in \[0, 0.5\]"):
        tokenfx.optimize(graph, "token_merge(ratio=0.6)")
    with pytest.raises(PassOptionError, match="metric must be one of"):
        tokenfx.optimize(graph, "token_merge(metric='values')")
    with pytest.raises(PassOptionError, match="unmerge=True"):  # BertModel's output is per token
        tokenfx.optimize(tokenfx.capture(bert(2), token_inputs(2, 9)), "token_merge(r=2)")
    vit_graph = tokenfx.capture(vit(2), image_inputs(2))
    with pytest.raises(PassOptionError, match="r may be at most 8"):  # 17 tokens, CLS protected
        tokenfx.optimize(vit_graph, "token_merge(r=[9, 0], unmerge=True)")
    clamped = tokenfx.optimize(vit_graph, "token_merge(r=6, unmerge=True)")  # a constant r is capped, as ToMe does
    assert [n.args[3] for n in clamped.graph.nodes if n.target is tfx.merge_tokens.default] == [6, 5]
    with pytest.raises(MappingError, match="causal"):
        tokenfx.optimize(tokenfx.capture(llama(), token_inputs(2, 7)), "token_merge(r=1)")
    with pytest.raises(PassOptionError, match="capture with a longer example"):  # 9 tokens: 5 left after block 0
        tokenfx.optimize(graph, "token_merge(r=4)")
    model, _ = embedder()
    merged = tokenfx.optimize(tokenfx.capture(model, token_inputs(2, 24)), "token_merge(r=4)").module()
    with pytest.raises(OpInputError, match="too short"):  # a dynamic schedule on an input too short for it
        merged(**ragged([6, 6], 6))
