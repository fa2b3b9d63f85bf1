"""``kv_cache``: a captured causal decoder becomes a prefill graph or a decode-step graph with
an explicit KV cache. Checked against the original full-sequence graph: PassManager's own
verification, token-by-token decoding from an empty cache, chunked decoding, and left-padded
batches against the same rows run alone (each row's positions counted over its real tokens)."""

from __future__ import annotations

import functools

import pytest
import torch

import tokenfx
from models import bert, gpt2, llama
from tokenfx.errors import MappingError, PassOptionError
from tokenfx.passes.base import PassManager

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
VOCAB, MAX_POSITIONS = 100, 64
ATOL = 1e-5  # fp32: the same arithmetic, only the reduction order may differ

# llama: GQA (4 query heads over 2 KV heads) + RoPE; gpt2: MHA + learned absolute positions
FACTORIES = {
    "llama": lambda: llama(layers=2, heads=4, kv_heads=2, head_dim=8),
    "gpt2": lambda: gpt2(layers=3, heads=4, head_dim=8),
}
EXPECTED = {  # (layers, heads, kv_heads, head_dim), from the factories' configs
    "llama": (2, 4, 2, 8),
    "gpt2": (3, 4, 4, 8),
}
FAMILIES = sorted(FACTORIES)
INPUTS = {"decode": ["tokens", "positions", "kv_cache", "cache_mask", "token_mask"],
          "prefill": ["tokens", "positions", "token_mask"]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=None)
def source(name: str):
    """(model, full-sequence graph captured from input_ids only)."""
    model = FACTORIES[name]()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    return model, tokenfx.capture(model, (ids,))


@functools.lru_cache(maxsize=None)
def rewritten(name: str, mode: str, logits: str):
    """PassManager(verify=True) report for kv_cache(mode, logits) on ``source(name)``."""
    _, graph = source(name)
    return PassManager(f"kv_cache(mode={mode},logits={logits})", verify=True).run(graph)


def full_logits(name: str, ids: torch.Tensor) -> torch.Tensor:
    _, graph = source(name)
    with torch.no_grad():
        out = graph.gm(input_ids=ids)
    return out[0] if isinstance(out, (tuple, list)) else out


def random_ids(batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def empty_cache(layout, batch: int) -> torch.Tensor:
    return torch.zeros(layout.cache_shape(batch, 0), dtype=layout.dtype)


def bound(node) -> dict:
    """A call's arguments by schema name, wherever they were passed."""
    names = [a.name for a in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


def placeholders(gm) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


# -- verification and layout --------------------------------------------------------------------------
@pytest.mark.parametrize("logits", ["all", "last"])
@pytest.mark.parametrize("mode", ["prefill", "decode"])
@pytest.mark.parametrize("name", FAMILIES)
def test_verify_passes(name, mode, logits):
    report = rewritten(name, mode, logits)
    (entry,) = report.passes
    assert entry.max_abs_error is not None and entry.tolerance is not None
    assert entry.max_abs_error <= entry.tolerance
    assert entry.tolerance <= 1e-3  # an "exact" contract: a tolerance this loose would hide real errors
    layers, heads, kv_heads, head_dim = EXPECTED[name]
    kv = report.graph.kv
    assert (kv.mode, kv.logits) == (mode, logits)
    assert (kv.layers, kv.heads, kv.kv_heads, kv.head_dim) == (layers, heads, kv_heads, head_dim)
    assert kv.max_positions == MAX_POSITIONS
    assert kv.dtype == torch.float32
    assert kv.cache_shape(3, 5) == (layers, 2, 3, kv_heads, 5, head_dim)
    assert placeholders(report.graph.gm) == INPUTS[mode]


@pytest.mark.parametrize("name", FAMILIES)
def test_decode_graph_structure(name):
    graph = rewritten(name, "decode", "all").graph
    layers, _, kv_heads, head_dim = EXPECTED[name]
    cores = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target == SDPA]
    assert len(cores) == layers  # one attention core per layer, no leftover full-sequence core
    for core in cores:
        args = bound(core)
        assert not args.get("is_causal", False)  # the causal mask now comes from the cache mask
        assert isinstance(args.get("attn_mask"), torch.fx.Node)
    assert placeholders(graph.gm) == INPUTS["decode"]

    b, t, s = 3, 4, 5
    ids = random_ids(b, t, seed=1)
    positions = (torch.arange(t) + s).expand(b, t)
    cache = torch.randn(graph.kv.cache_shape(b, s), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, new_kv = graph.gm(ids, positions, cache, torch.ones(b, s, dtype=torch.long), torch.ones(b, t, dtype=torch.long))
    assert logits.shape == (b, t, VOCAB)
    assert new_kv.shape == (layers, 2, b, kv_heads, t, head_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(new_kv).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_new_kv_is_what_decode_consumes(name):
    """The prefill graph's new_kv, fed to the decode graph, gives the same next-token logits as
    one prefill over the longer sequence; logits=last is the last row of logits=all."""
    prefill_all = rewritten(name, "prefill", "all").graph
    prefill_last = rewritten(name, "prefill", "last").graph
    decode = rewritten(name, "decode", "last").graph
    b, n = 2, 9
    ids = random_ids(b, n + 1, seed=3)
    pos = torch.arange(n + 1).expand(b, n + 1)
    ones = torch.ones(b, n + 1, dtype=torch.long)
    with torch.no_grad():
        everything, kv_all = prefill_all.gm(ids, pos, ones)
        last, kv_last = prefill_last.gm(ids[:, :n], pos[:, :n], ones[:, :n])
        step, step_kv = decode.gm(ids[:, n:], pos[:, n:], kv_last, ones[:, :n], ones[:, n:])
    assert last.shape == (b, 1, VOCAB) and step.shape == (b, 1, VOCAB)
    full = full_logits(name, ids)
    torch.testing.assert_close(everything, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(last[:, 0], full[:, n - 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(step[:, 0], full[:, n], atol=ATOL, rtol=0)
    torch.testing.assert_close(kv_last, kv_all[:, :, :, :, :n], atol=ATOL, rtol=0)
    torch.testing.assert_close(step_kv, kv_all[:, :, :, :, n:], atol=ATOL, rtol=0)


# -- decoding through the cache ----------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_token_by_token_decode_reproduces_full_sequence(name):
    """From an empty cache (S = 0), one token per step, at a batch / length the capture never saw."""
    graph = rewritten(name, "decode", "all").graph
    b, n = 3, 13
    ids = random_ids(b, n, seed=4)
    full = full_logits(name, ids)
    kv = empty_cache(graph.kv, b)
    cache_mask = torch.ones(b, 0, dtype=torch.long)
    one = torch.ones(b, 1, dtype=torch.long)
    with torch.no_grad():
        for t in range(n):
            logits, new_kv = graph.gm(ids[:, t:t + 1], torch.full((b, 1), t), kv, cache_mask, one)
            assert logits.shape == (b, 1, VOCAB)
            assert new_kv.shape == graph.kv.cache_shape(b, 1)
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=ATOL, rtol=0, msg=lambda m: f"position {t}: {m}")
            kv = torch.cat([kv, new_kv], dim=4)
            cache_mask = torch.cat([cache_mask, one], dim=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_chunked_decode_reproduces_full_sequence(name):
    """Chunks of several tokens (T > 1) on top of a non-empty cache: the causal mask inside the chunk."""
    graph = rewritten(name, "decode", "all").graph
    b, chunks = 2, [4, 1, 3, 5, 2]
    n = sum(chunks)
    ids = random_ids(b, n, seed=5)
    full = full_logits(name, ids)
    kv, done = empty_cache(graph.kv, b), 0
    with torch.no_grad():
        for size in chunks:
            part = slice(done, done + size)
            logits, new_kv = graph.gm(ids[:, part], torch.arange(done, done + size).expand(b, size), kv,
                                      torch.ones(b, done, dtype=torch.long), torch.ones(b, size, dtype=torch.long))
            torch.testing.assert_close(logits, full[:, part], atol=ATOL, rtol=0)
            kv = torch.cat([kv, new_kv], dim=4)
            done += size


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_batch_matches_rows_alone(name):
    """Left padding: prefill a padded batch, then decode two tokens; each row's logits at its real
    tokens equal the row run alone without padding. Padding must not leak in, and must not make
    NaNs (a fully-masked pad query row)."""
    prefill = rewritten(name, "prefill", "all").graph
    decode = rewritten(name, "decode", "all").graph
    lengths = [11, 6, 1, 8]
    b, width, extra = len(lengths), max(lengths), 2
    ids = random_ids(b, width + extra, seed=6)  # padding slots hold arbitrary (non-pad) ids on purpose
    mask = torch.zeros(b, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, kv = prefill.gm(ids[:, :width], positions, mask)
        assert torch.isfinite(logits).all() and torch.isfinite(kv).all()
        steps = []
        cache_mask, nxt = mask, positions[:, -1:] + 1
        for t in range(extra):
            step, new_kv = decode.gm(ids[:, width + t:width + t + 1], nxt, kv, cache_mask, torch.ones(b, 1, dtype=torch.long))
            steps.append(step)
            kv = torch.cat([kv, new_kv], dim=4)
            cache_mask = torch.cat([cache_mask, torch.ones(b, 1, dtype=torch.long)], dim=1)
            nxt = nxt + 1
    for r, n in enumerate(lengths):
        alone = torch.cat([ids[r:r + 1, width - n:width], ids[r:r + 1, width:]], dim=1)  # [1, n + extra]
        ref = full_logits(name, alone)[0]
        torch.testing.assert_close(logits[r, width - n:], ref[:n], atol=ATOL, rtol=0, msg=lambda m: f"row {r}: {m}")
        for t, step in enumerate(steps):
            torch.testing.assert_close(step[r, 0], ref[n + t], atol=ATOL, rtol=0, msg=lambda m: f"row {r} step {t}: {m}")


@pytest.mark.parametrize("name", FAMILIES)
def test_positions_input_drives_position_information(name):
    """The explicit positions input is what the position tables read: arange gives the original
    graph's logits, spreading the positions apart (RoPE: other relative distances; learned: other
    embeddings) changes them, so the input is not silently ignored."""
    graph = rewritten(name, "prefill", "all").graph
    ids = random_ids(1, 6, seed=7)
    ones = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        dense, _ = graph.gm(ids, torch.arange(6)[None], ones)
        spread, _ = graph.gm(ids, (3 * torch.arange(6))[None], ones)
    torch.testing.assert_close(dense, full_logits(name, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(spread[:, 0], dense[:, 0], atol=ATOL, rtol=0)  # the first token sees only itself
    assert (dense[:, 1:] - spread[:, 1:]).abs().max() > 1e-2


# -- errors ------------------------------------------------------------------------------------------
def test_encoder_is_refused():
    model = bert()
    graph = tokenfx.capture(model, (random_ids(2, 7, seed=0),))
    with pytest.raises(MappingError, match="not causal"):
        tokenfx.optimize(graph, "kv_cache(mode=decode,logits=all)")


def test_eager_attention_core_is_refused():
    model = llama(layers=1, impl="eager")
    graph = tokenfx.capture(model, (random_ids(2, 7, seed=0),))
    with pytest.raises(MappingError, match="eager"):
        tokenfx.optimize(graph, "kv_cache(mode=decode,logits=all)")


@pytest.mark.parametrize("options", ["mode=bogus", "logits=bogus", "cache_update=bogus"])
def test_bad_options(options):
    _, graph = source("llama")
    with pytest.raises(PassOptionError, match=options.split("=")[0]):
        tokenfx.optimize(graph, f"kv_cache({options})")


# -- cache_update=inplace: the graph writes new K/V into the buffer it attends over ----------------------
@functools.lru_cache(maxsize=None)
def inplace(name: str):
    _, graph = source(name)
    return PassManager("kv_cache(mode=decode,logits=all,cache_update=inplace)", verify=True).run(graph)


@pytest.mark.parametrize("name", FAMILIES)
def test_inplace_verifies_and_takes_slots(name):
    report = inplace(name)
    assert report.passes[0].verified
    gm = report.graph.gm
    assert placeholders(gm) == INPUTS["decode"] + ["slots"]
    writes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.tokenfx.kv_write.default]
    assert len(writes) == EXPECTED[name][0]  # one in-place write per layer, no cat of the cache
    cats = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.cat.default
            and any(a.name == "kv_cache" for a in n.all_input_nodes)]
    assert not cats


@pytest.mark.parametrize("name", FAMILIES)
def test_inplace_token_by_token_fills_the_buffer_like_output_mode(name):
    """One preallocated buffer, unwritten slots masked; logits match the full sequence and the
    buffer ends up holding exactly the K/V the output-mode graph returns."""
    graph = inplace(name).graph
    reference = rewritten(name, "decode", "all").graph
    b, n, size = 2, 9, 12
    ids = random_ids(b, n, seed=7)
    full = full_logits(name, ids)
    cache = torch.zeros(graph.kv.cache_shape(b, size))
    cache_mask = torch.zeros(b, size, dtype=torch.long)
    one = torch.ones(b, 1, dtype=torch.long)
    with torch.no_grad():
        for t in range(n):
            logits, _ = graph.gm(ids[:, t:t + 1], torch.full((b, 1), t), cache, cache_mask, one, torch.tensor([t]))
            torch.testing.assert_close(logits[:, 0], full[:, t], atol=ATOL, rtol=0, msg=lambda m: f"position {t}: {m}")
            cache_mask[:, t] = 1
        _, expected = reference.gm(ids, torch.arange(n).expand(b, n), empty_cache(reference.kv, b),
                                   torch.ones(b, 0, dtype=torch.long), torch.ones(b, n, dtype=torch.long))
    torch.testing.assert_close(cache[:, :, :, :, :n], expected, atol=ATOL, rtol=0)
    assert not cache[:, :, :, :, n:].any()  # nothing written past the last token


@pytest.mark.parametrize("name", FAMILIES)
def test_unpadded_prefill_is_causal_without_a_mask(name):
    """padded=False: no token_mask input, every SDPA runs is_causal with no mask tensor, same logits."""
    _, graph = source(name)
    report = PassManager("kv_cache(mode=prefill,padded=false)", verify=True).run(graph)
    assert report.passes[0].verified
    gm = report.graph.gm
    assert placeholders(gm) == ["tokens", "positions"]
    cores = [bound(n) for n in gm.graph.nodes if n.op == "call_function"
             and n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(cores) == EXPECTED[name][0]
    assert all(c.get("is_causal") is True and c.get("attn_mask") is None for c in cores)
    ids = random_ids(3, 11, seed=9)
    with torch.no_grad():
        logits, new_kv = gm(ids, torch.arange(11).expand(3, 11))
        padded_logits, padded_kv = rewritten(name, "prefill", "all").graph.gm(ids, torch.arange(11).expand(3, 11),
                                                                              torch.ones(3, 11, dtype=torch.long))
    torch.testing.assert_close(logits, padded_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(new_kv, padded_kv, atol=ATOL, rtol=0)
