"""``tree_verify``: a ``kv_cache(mode=decode, logits=all)`` graph becomes a graph that verifies a
draft tree per row in one call.

Ground truth is the plain full-sequence model: tree node ``i`` of row ``b`` must get the logits
the captured model gives at the last position of ``prefix_b + root-to-i path``, and the K/V the
graph produces for node ``i`` must be that sequence's last K/V (the runtime keeps the accepted
nodes' K/V). Rows have their own prefix length (left padding), their own random tree, and, for
``cache_update="inplace"``, the tree is written after a gap of garbage slots (as the runtime's
shared scratch range is). Both llama (GQA, RoPE) and gpt2 (learned positions); the structure
of the rewritten graph; the refusals; and the ONNX export of the output-mode graph (llama) in
onnxruntime.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tokenfx
from models import gpt2, llama
from tokenfx.errors import PassOptionError
from tokenfx.passes.base import PassManager, tolerance_for
from tokenfx.passes.tree_verify import TreeVerify
from tokenfx.ir.tree import Tree, batch_closure

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

aten = torch.ops.aten
VOCAB = 100
ATOL = 1e-5  # fp32: the same arithmetic as the full-sequence model, only the reduction order differs
FACTORIES = {
    "llama": lambda: llama(layers=2, heads=4, kv_heads=2, head_dim=8),
    "gpt2": lambda: gpt2(layers=2, heads=4, head_dim=8),
}
LAYERS = {"llama": 2, "gpt2": 2}
KV_HEADS = {"llama": 2, "gpt2": 4}


@functools.lru_cache(maxsize=None)
def source(name: str):
    model = FACTORIES[name]()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    return model, tokenfx.capture(model, (ids,))


@functools.lru_cache(maxsize=None)
def decode(name: str, cache_update: str):
    _, graph = source(name)
    return tokenfx.optimize(graph, f"kv_cache(mode=decode,logits=all,cache_update={cache_update})")


@functools.lru_cache(maxsize=None)
def prefill(name: str):
    _, graph = source(name)
    return tokenfx.optimize(graph, "kv_cache(mode=prefill,logits=all)")


@functools.lru_cache(maxsize=None)
def report(name: str, cache_update: str):
    """PassManager(verify=True) on the decode graph."""
    return PassManager([TreeVerify()], verify=True).run(decode(name, cache_update))


def placeholders(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def calls(gm, target) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


# -- verification and structure -------------------------------------------------------------------
@pytest.mark.parametrize("cache_update", ["inplace", "output"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_verify_and_structure(name, cache_update):
    rep = report(name, cache_update)
    (entry,) = rep.passes
    assert entry.verified and entry.max_abs_error <= entry.tolerance <= 1e-3
    assert entry.matched == [f"{b.name}: tree attention" for b in decode(name, cache_update).structure.blocks]
    assert entry.stats == {"layers": LAYERS[name]}
    gm = rep.graph.gm
    expected = ["tokens", "positions", "kv_cache", "cache_mask", "tree_mask"]
    assert placeholders(gm) == expected + (["slots"] if cache_update == "inplace" else [])
    assert rep.graph.kv.inputs == tuple(expected + (["slots"] if cache_update == "inplace" else []))
    assert (rep.graph.kv.mode, rep.graph.kv.logits, rep.graph.kv.cache_update) == ("decode", "all", cache_update)
    cores = calls(gm, torch.ops.tokenfx.tree_attention.default)
    assert len(cores) == LAYERS[name]  # one per layer, no SDPA left
    assert not calls(gm, aten.scaled_dot_product_attention.default)
    tree_mask = next(n for n in gm.graph.nodes if n.name == "tree_mask")
    assert all(core.args[4] is tree_mask for core in cores)
    writes = calls(gm, torch.ops.tokenfx.kv_write.default)
    assert len(writes) == (LAYERS[name] if cache_update == "inplace" else 0)
    # the rewritten graph still maps, heads and all
    att = rep.graph.structure.blocks[0].attention[0]
    assert (att.heads, att.kv_heads, att.head_dim) == (4, KV_HEADS[name], 8)


# -- ground truth: the full-sequence model on prefix + root-to-node path ------------------------------
def random_trees(batch: int, nodes: int, seed: int) -> torch.Tensor:
    """``[B, T]`` parent arrays: a random tree per row, row 1 cut to fewer nodes (padding: parent -1)."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.full((batch, nodes), -1, dtype=torch.long)
    for b in range(batch):
        n = nodes if b != 1 else nodes // 2
        for i in range(1, n):
            parents[b, i] = int(torch.randint(0, i, (), generator=g))
    return parents


def full_sequence(name: str, ids: torch.Tensor):
    """Logits and per-layer K/V of the plain model at every position (prefill graph, no padding)."""
    graph = prefill(name)
    n = ids.shape[0]
    with torch.no_grad():
        return graph.gm(ids[None], torch.arange(n)[None], torch.ones(1, n, dtype=torch.long))


def tree_case(name: str, cache_update: str, lengths=(9, 4, 13), nodes: int = 10, gap: int = 3, seed: int = 0):
    """Run the tree graph on left-padded prefixes and a random tree per row; return its outputs,
    the node tokens, parents, the prefixes and the buffer it wrote."""
    pre = prefill(name)
    graph = report(name, cache_update).graph
    b, width = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, width), generator=g)  # padding columns hold real-looking ids
    mask = torch.zeros(b, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        _, prefix_kv = pre.gm(ids, positions, mask)
    parents = random_trees(b, nodes, seed)
    depth, tree_mask = batch_closure(parents)
    tokens = torch.randint(0, VOCAB, (b, nodes), generator=g)
    node_positions = torch.tensor(lengths)[:, None] + depth
    if cache_update == "inplace":  # the buffer: prefix, a gap of masked garbage, then the tree's slots
        size = width + gap + nodes
        cache = torch.randn(graph.kv.cache_shape(b, size), generator=g)
        cache[:, :, :, :, :width] = prefix_kv
        cache_mask = torch.zeros(b, size, dtype=torch.long)
        cache_mask[:, :width] = mask
        slots = torch.arange(width + gap, size)
        args = (tokens, node_positions, cache, cache_mask, tree_mask, slots)
    else:
        args = (tokens, node_positions, prefix_kv, mask, tree_mask)
    with torch.no_grad():
        logits, new_kv = graph.gm(*args)
    if cache_update == "inplace":
        new_kv = args[2][:, :, :, :, slots]  # what the graph wrote into its buffer
    prefixes = [ids[r, width - n:] for r, n in enumerate(lengths)]
    return logits, new_kv, tokens, parents, prefixes


@pytest.mark.parametrize("cache_update", ["inplace", "output"])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_tree_logits_equal_the_full_model_on_each_path(name, cache_update):
    logits, new_kv, tokens, parents, prefixes = tree_case(name, cache_update)
    _, graph = source(name)
    assert logits.shape == (3, 10, VOCAB)
    assert new_kv.shape == (LAYERS[name], 2, 3, KV_HEADS[name], 10, 8)
    checked = 0
    for b, prefix in enumerate(prefixes):
        n = int((parents[b] >= 0).sum()) + 1  # the row's real nodes (the rest pad the batch)
        tree = Tree(parents[b, :n])
        for i in range(n):
            path = torch.nonzero(tree.mask[i]).flatten()  # root ... i
            ids = torch.cat([prefix, tokens[b, path]])
            ref_logits, ref_kv = full_sequence(name, ids)
            with torch.no_grad():  # the captured full-sequence graph itself: the real ground truth
                full = graph.gm(input_ids=ids[None])
            full = full[0] if isinstance(full, (tuple, list)) else full
            torch.testing.assert_close(ref_logits[0, -1], full[0, -1], atol=ATOL, rtol=0)
            torch.testing.assert_close(logits[b, i], full[0, -1], atol=ATOL, rtol=0,
                                       msg=lambda m: f"row {b} node {i} path {path.tolist()}: {m}")
            torch.testing.assert_close(new_kv[:, :, b, :, i], ref_kv[:, :, 0, :, -1], atol=ATOL, rtol=0,
                                       msg=lambda m: f"K/V of row {b} node {i}: {m}")
            checked += 1
    assert checked == 10 + 5 + 10


def test_causal_tree_mask_is_a_decode_step():
    """A chain's ancestor mask is causal attention: the tree graph gives the decode graph's output."""
    graph = report("llama", "output").graph
    step = decode("llama", "output")
    g = torch.Generator().manual_seed(4)
    b, past, t = 2, 6, 5
    tokens = torch.randint(0, VOCAB, (b, t), generator=g)
    positions = (torch.arange(t) + past).expand(b, t)
    cache = torch.randn(step.kv.cache_shape(b, past), generator=g)
    cache_mask = torch.ones(b, past, dtype=torch.long)
    cache_mask[1, :2] = 0
    with torch.no_grad():
        ref = step.gm(tokens, positions, cache, cache_mask, torch.ones(b, t, dtype=torch.long))
        got = graph.gm(tokens, positions, cache, cache_mask, Tree.chain(t - 1).mask.expand(b, t, t).contiguous())
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, atol=ATOL, rtol=0)


# -- refusals -----------------------------------------------------------------------------------------
def test_prefill_graph_is_refused():
    with pytest.raises(PassOptionError, match="decode"):
        tokenfx.optimize(prefill("llama"), [TreeVerify()])


def test_last_logits_decode_graph_is_refused():
    _, graph = source("gpt2")
    last = tokenfx.optimize(graph, "kv_cache(mode=decode,logits=last)")
    with pytest.raises(PassOptionError, match="logits=all"):
        tokenfx.optimize(last, "tree_verify")


def test_full_sequence_graph_and_a_second_run_are_refused():
    _, graph = source("llama")
    with pytest.raises(PassOptionError, match="kv_cache"):
        tokenfx.optimize(graph, "tree_verify")
    with pytest.raises(PassOptionError, match="already verifies trees"):
        tokenfx.optimize(report("llama", "output").graph, "tree_verify")


# -- ONNX -----------------------------------------------------------------------------------------------
def test_onnx_export_matches_torch(tmp_path):
    """llama (GQA: the translation must map query heads to their kv head); one family keeps it fast."""
    import onnx

    from tokenfx.frontends.onnx import run_onnxruntime

    graph = report("llama", "output").graph
    path = tokenfx.export_onnx(graph, tmp_path / "tree.onnx")
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["tokens", "positions", "kv_cache", "cache_mask", "tree_mask"]
    assert [o.name for o in proto.graph.output] == ["logits", "new_kv"]
    assert {node.domain for node in proto.graph.node} <= {"", "ai.onnx"}
    # a batch, tree size and cache length the export never saw; row 0 left-padded, row 2 a smaller tree
    g = torch.Generator().manual_seed(5)
    b, past, t = 3, 8, 7
    parents = random_trees(b, t, seed=5)
    depth, tree_mask = batch_closure(parents)
    cache_mask = torch.ones(b, past, dtype=torch.long)
    cache_mask[0, :3] = 0
    args = {"tokens": torch.randint(0, VOCAB, (b, t), generator=g),
            "positions": cache_mask.sum(-1, keepdim=True) + depth,
            "kv_cache": torch.randn(graph.kv.cache_shape(b, past), generator=g),
            "cache_mask": cache_mask, "tree_mask": tree_mask}
    with torch.no_grad():
        ref = graph.gm(*args.values())
    outs = run_onnxruntime(path, args)
    assert len(outs) == 2
    for r, o in zip(ref, outs):
        o = torch.as_tensor(o)
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, atol=tolerance_for(r, "bounded"), rtol=0)
