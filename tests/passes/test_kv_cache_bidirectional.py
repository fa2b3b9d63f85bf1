"""``kv_cache(causal=False)``: the bidirectional mode for masked-diffusion LMs. Checked against a
plain Hugging Face forward of a tiny Llama whose causal mask is off (config ``is_causal:
false``, every attention module ``is_causal = False``): the prefill graph equals it, with and
without padding; the decode graph run against the K/V of the same tokens equals it (the case
where nothing changed since the cache was written); the mask's structure has no causal
comparison; and the mode refuses causal models (and the causal mode refuses this one)."""

from __future__ import annotations

import functools

import pytest
import torch

import tokenfx
from models import llama
from tokenfx.errors import MappingError
from tokenfx.frontends.load import decoder_graph, make_bidirectional
from tokenfx.passes.base import PassManager
from tokenfx.passes.kv_cache import KVCache

aten = torch.ops.aten
ATOL = 1e-5  # fp32: the same arithmetic, only the reduction order may differ
MASK_ID = 99

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@functools.lru_cache(maxsize=None)
def dllm():
    """(bidirectional tiny Llama, its full-sequence graph)."""
    model = llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    model.config.is_causal = False
    model.config.mask_token_id = MASK_ID
    make_bidirectional(model)
    return model, decoder_graph(model, diffusion=True)


@functools.lru_cache(maxsize=None)
def rewritten(mode: str, cache_update: str = "output", padded: bool = True):
    _, graph = dllm()
    return tokenfx.optimize(graph, [KVCache(mode=mode, causal=False, cache_update=cache_update, padded=padded)])


def reference(ids: torch.Tensor) -> torch.Tensor:
    """The plain module's bidirectional forward ``[B, N, V]`` (unpadded rows)."""
    model, _ = dllm()
    with torch.no_grad():
        return model(input_ids=ids).logits


def ids_of(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, MASK_ID, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_reference_is_bidirectional():
    ids = ids_of(1, 9)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % MASK_ID
    assert not torch.allclose(reference(ids)[0, 0], reference(changed)[0, 0], atol=1e-4)  # the first token sees the last


@pytest.mark.parametrize("padded", [True, False])
def test_prefill_equals_the_bidirectional_forward(padded):
    graph = rewritten("prefill", padded=padded)
    ids = ids_of(2, 11)
    positions = torch.arange(11).expand(2, 11)
    args = (ids, positions, torch.ones(2, 11, dtype=torch.long)) if padded else (ids, positions)
    with torch.no_grad():
        logits, kv = graph.gm(*args)
    torch.testing.assert_close(logits, reference(ids), atol=ATOL, rtol=0)
    assert kv.shape == graph.kv.cache_shape(2, 11)


def test_left_padding_is_masked():
    graph = rewritten("prefill")
    short, long = ids_of(1, 6, seed=1)[0], ids_of(1, 9, seed=2)[0]
    ids = torch.stack([torch.cat([torch.full((3,), 5), short]), long])  # row 0: 3 pads (a real id, to be masked)
    mask = torch.tensor([[0] * 3 + [1] * 6, [1] * 9])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits, _ = graph.gm(ids, positions, mask)
    torch.testing.assert_close(logits[0, 3:], reference(short[None])[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], reference(long[None])[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("cache_update", ["output", "inplace"])
def test_pass_manager_verifies_the_decode_graph(cache_update):
    _, graph = dllm()
    report = PassManager(f"kv_cache(mode=decode,causal=False,cache_update={cache_update})", verify=True).run(graph)
    (p,) = report.passes
    assert p.max_abs_error is not None and p.max_abs_error <= p.tolerance


def test_cached_window_equals_the_full_forward_when_nothing_changed():
    """The K/V of a whole-sequence call, then a middle window recomputed against the rest of
    them (before and after it: bidirectional) — the window's logits are the full forward's."""
    step = rewritten("decode", cache_update="inplace")
    ids = ids_of(2, 12, seed=3)
    positions = torch.arange(12).expand(2, 12).contiguous()
    ones = torch.ones(2, 12, dtype=torch.long)
    cache = torch.zeros(step.kv.cache_shape(2, 12))
    with torch.no_grad():
        whole, _ = step.gm(ids, positions, cache, torch.zeros_like(ones), ones, torch.arange(12))
        visible = ones.clone()
        visible[:, 4:8] = 0  # the window's own slots are its new tokens
        window, _ = step.gm(ids[:, 4:8].contiguous(), positions[:, 4:8].contiguous(), cache, visible, ones[:, 4:8],
                            torch.arange(4, 8))
    full = reference(ids)
    torch.testing.assert_close(whole, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(window, full[:, 4:8], atol=ATOL, rtol=0)


def test_the_mask_has_no_causal_comparison():
    causal_llama = llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    causal = tokenfx.optimize(tokenfx.capture(causal_llama, (ids_of(2, 7),)), [KVCache(mode="decode")])
    bidirectional = rewritten("decode")

    def count(graph, op):
        return sum(1 for n in graph.gm.graph.nodes if n.op == "call_function" and n.target is op)

    assert count(causal, aten.le.Tensor) == 1 and count(bidirectional, aten.le.Tensor) == 0
    assert count(bidirectional, aten.scaled_dot_product_attention.default) == 2  # one per block, over cache + new


def test_causal_false_refuses_a_causal_model():
    causal_llama = llama(layers=2, heads=4, kv_heads=2, head_dim=8)
    graph = tokenfx.capture(causal_llama, (ids_of(2, 7),))
    with pytest.raises(MappingError, match=r"kv_cache\(causal=False\): block model.layers.0 attention is causal"):
        tokenfx.optimize(graph, [KVCache(mode="prefill", causal=False)])


def test_the_causal_mode_refuses_a_bidirectional_model():
    _, graph = dllm()
    with pytest.raises(MappingError, match="block model.layers.0 attention is not causal"):
        tokenfx.optimize(graph, [KVCache(mode="prefill")])
