"""The ``tokenfx`` torch.compile backend: found by name through its entry point, rewrites the
AOT graph with the same structure the export path sees (same matched module paths), keeps
the model's output, and compiles at most twice across sequence lengths."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from models import call, encoder, hidden_inputs, llama, bert, token_inputs
from tokenfx.frontends.dynamo import COMPILE_LOG


def tolerance(reference: torch.Tensor, ulps: float = 32) -> float:
    return ulps * torch.finfo(reference.dtype).eps * max(1.0, float(reference.abs().max()))


LLAMA_NORMS = ["model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm",
               "model.layers.1.post_attention_layernorm", "model.norm"]
BERT_NORMS = [f"encoder.layer.{i}.{part}.LayerNorm" for i in range(2) for part in ("attention.output", "output")]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_backend_is_found_by_name():
    assert "tokenfx" in torch._dynamo.list_backends()
    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert points.get("tokenfx") == "tokenfx.frontends.dynamo:tokenfx_backend"
    from tokenfx.frontends.dynamo import tokenfx_backend

    assert torch._dynamo.lookup_backend("tokenfx") is tokenfx_backend


@pytest.mark.parametrize("build,expected", [(llama, LLAMA_NORMS), (bert, BERT_NORMS)], ids=["llama", "bert"])
def test_eager_inner_parity_and_recompiles(build, expected, fresh_dynamo):
    model = build()
    compiled = torch.compile(model, backend="tokenfx", options={"passes": "fuse_norm", "inner": "eager"})
    start = len(COMPILE_LOG)
    for tokens in (5, 9, 13, 17):
        inputs = token_inputs(2, tokens, seed=tokens)  # last row padded
        reference = call(model, inputs)
        out = call(compiled, inputs)
        assert out.shape == reference.shape
        torch.testing.assert_close(out, reference, atol=tolerance(reference), rtol=0)
    entries = COMPILE_LOG[start:]
    # the first length compiles a static graph, the second marks the token dim dynamic
    assert len(entries) in (1, 2), f"{len(entries)} compiles for 4 lengths"
    for entry in entries:
        assert entry["error"] is None
        (report,) = entry["passes"]
        assert report["name"] == "fuse_norm"
        # the AOT graph's L['self']... paths are normalised to the export path's names
        assert report["matched"] == expected
        assert report["refused"] == []


def test_inductor_inner_parity(fresh_dynamo):
    model = llama(layers=1)
    compiled = torch.compile(model, backend="tokenfx", options={"passes": "fuse_norm", "inner": "inductor"})
    start = len(COMPILE_LOG)
    inputs = token_inputs(2, 9, seed=1)
    reference = call(model, inputs)
    torch.testing.assert_close(call(compiled, inputs), reference, atol=tolerance(reference), rtol=0)
    (entry,) = COMPILE_LOG[start:]
    assert entry["passes"][0]["matched"] == ["model.layers.0.post_attention_layernorm", "model.norm"]


@pytest.mark.parametrize("options,words", [
    ({"inner": "bogus"}, ["inner", "bogus", "inductor", "eager"]),
    ({"bogus": 1}, ["bogus", "valid options", "passes"]),
])
def test_bad_backend_options(options, words, fresh_dynamo):
    model = encoder(1)
    compiled = torch.compile(model, backend="tokenfx", options=options)
    with pytest.raises(Exception) as info:  # torch wraps backend errors (BackendCompilerFailed)
        call(compiled, hidden_inputs(2, 5))
    message = str(info.value)
    for word in words:
        assert word in message


def test_bad_pipeline_raises_or_falls_back(fresh_dynamo):
    model = encoder(1)
    inputs = hidden_inputs(2, 5)
    reference = call(model, inputs)
    strict = torch.compile(model, backend="tokenfx", options={"passes": "fuse_nrom", "inner": "eager"})
    with pytest.raises(Exception, match="fuse_nrom"):
        call(strict, inputs)
    torch._dynamo.reset()
    lenient = torch.compile(model, backend="tokenfx", options={"passes": "fuse_nrom", "inner": "eager", "on_error": "fallback"})
    start = len(COMPILE_LOG)
    torch.testing.assert_close(call(lenient, inputs), reference, atol=tolerance(reference), rtol=0)
    (entry,) = COMPILE_LOG[start:]
    assert "UnknownPassError" in entry["error"] and "fuse_nrom" in entry["error"]
    assert entry["passes"] == []


def test_backward_graph_is_left_alone():
    """Training through the backend: the forward is rewritten, the backward graph is not mapped."""
    import models

    torch._dynamo.reset()
    model = models.llama(1)
    ids = torch.randint(0, models.VOCAB, (2, 6))
    compiled = torch.compile(model, backend="tokenfx", options={"passes": "fuse_norm", "inner": "eager"})
    compiled(input_ids=ids, use_cache=False).logits.sum().backward()
    reference = models.llama(1)
    reference(input_ids=ids, use_cache=False).logits.sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
