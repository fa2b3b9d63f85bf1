"""``token_shuffle``: the blocks see s² fewer grid tokens, everything after them the original N;
untrained, the rewrite is exactly window average in / copy out (checked against a plain-torch
reference built from the Hugging Face ViT's own modules and index arithmetic); the rewritten
graph exports to ONNX and compiles through the tokenfx backend; ``finetune`` trains only the
adapters."""

from __future__ import annotations

import pytest
import torch

import tokenfx
import tokenfx.passes.token_shuffle  # noqa: F401  registers the pass
from models import CHANNELS, IMAGE, PATCH, call, captured, image_inputs, vit
from tokenfx.errors import MappingError, PassOptionError
from tokenfx.passes.base import PassManager, optimize
from tokenfx.passes.token_shuffle import TokenShuffle, adapter_parameters, finetune

aten = torch.ops.aten
GRID = IMAGE // PATCH  # 4 × 4 patches + CLS = 17 tokens
SDPA = aten.scaled_dot_product_attention.default


def tolerance(reference: torch.Tensor, ulps: float = 64) -> float:
    return ulps * torch.finfo(reference.dtype).eps * max(1.0, float(reference.abs().max()))


def window_of_patch(h: int, w: int, s: int) -> torch.Tensor:
    """``[h·w]``: the window (row-major over the (h/s) × (w/s) windows) that each patch (row-major) falls in."""
    return torch.tensor([(i // s) * (w // s) + j // s for i in range(h) for j in range(w)])


def reference(model, pixel_values, s: int, h: int = GRID, w: int = GRID) -> torch.Tensor:
    """What the untrained rewrite must compute: the ViT with its grid tokens averaged per s×s
    window before the first layer and each window's token copied back to its patches after the last."""
    with torch.no_grad():
        tokens = model.embeddings(pixel_values)  # [B, 1 + h·w, C]
        cls, patches = tokens[:, :1], tokens[:, 1:]
        where = window_of_patch(h, w, s)
        sums = torch.zeros(patches.shape[0], h * w // (s * s), patches.shape[2]).index_add_(1, where, patches)
        x = torch.cat([cls, sums / (s * s)], 1)
        for layer in model.layers:
            x = layer(x, None)
        x = torch.cat([x[:, :1], x[:, 1:][:, where]], 1)
        return model.layernorm(x)


@pytest.fixture(scope="module")
def vit2():
    """A 2-layer tiny ViT (16×16 images, patch 4) and its capture."""
    model = vit(layers=2)
    return model, tokenfx.capture(model, image_inputs(2))


@pytest.fixture(scope="module")
def shuffled2(vit2):
    """``token_shuffle(s=2)`` of ``vit2`` through a verifying PassManager (tests must not train it)."""
    _, graph = vit2
    code, nodes = graph.gm.code, len(graph.graph.nodes)
    report = PassManager([TokenShuffle(s=2)], verify=True).run(graph)
    assert graph.gm.code == code and len(graph.graph.nodes) == nodes, "the pass mutated its input graph"
    assert not hasattr(graph.gm, "token_shuffle")
    return report


def test_blocks_see_fewer_tokens(vit2, shuffled2):
    _, graph = vit2
    shuffled, (p,) = shuffled2.graph, shuffled2.passes
    assert p.contract == "approximate"
    assert p.max_abs_error > 0.1 and p.verified  # approximate: the error is reported, not bounded
    assert p.matched == ["embeddings.patch_embeddings.projection"]
    assert p.stats | {"adapter_parameters": 0} == {"s": 2, "grid": [4, 4], "prefix": 1, "tokens": 17, "tokens_in_blocks": 5,
                                                   "adapter": "token_shuffle", "adapter_parameters": 0}
    structure = shuffled.structure
    assert structure.num_blocks == 2
    for block in structure.blocks:  # the residual stream and every attention run on 1 CLS + 4 window tokens
        assert tuple(block.input.meta["val"].shape[1:]) == (5, 32)
        (attention,) = block.attention
        assert tuple(attention.q.meta["val"].shape[-2:]) == (5, 8)
        assert tuple(attention.mask.meta["val"].shape[-2:]) == (5, 5)
    # adapters: six projections, each a get_attr weight + bias feeding one aten.linear
    adapter_reads = [n for n in shuffled.graph.nodes if n.op == "get_attr" and n.target.startswith("token_shuffle.")]
    assert len(adapter_reads) == 12
    assert shuffled.count(aten.linear.default) == graph.count(aten.linear.default) + 6
    assert shuffled.count(SDPA) == graph.count(SDPA) == 2
    assert p.stats["adapter_parameters"] == sum(p.numel() for p in adapter_parameters(shuffled))
    out = call(shuffled.module(), image_inputs(3, seed=1))
    assert out.shape == (3, 17, 32)


@pytest.mark.parametrize("s", [2, 4])
def test_zero_shot_is_window_average_in_copy_out(vit2, shuffled2, s):
    model, graph = vit2
    shuffled = shuffled2.graph if s == 2 else optimize(graph, f"token_shuffle(s={s})")
    inputs = image_inputs(3, seed=5)  # a batch the capture never saw
    expected = reference(model, inputs["pixel_values"], s)
    out = call(shuffled.module(), inputs)
    torch.testing.assert_close(out, expected, atol=tolerance(expected), rtol=0)
    # and that is not the original model: the rewrite did change the function
    assert float((out - call(model, inputs)).abs().max()) > 0.1


def test_explicit_grid_reads_the_tokens_as_given(vit2, shuffled2):
    """``grid=[4, 4]`` is what detection finds; ``grid=[2, 8]`` reads the same 16 patches as 2 rows of 8."""
    model, graph = vit2
    inputs = image_inputs(2, seed=7)
    detected = call(shuffled2.graph.module(), inputs)
    torch.testing.assert_close(call(optimize(graph, "token_shuffle(grid=[4, 4])").module(), inputs), detected, atol=0, rtol=0)
    report = PassManager("token_shuffle(s=2, grid=[2, 8])").run(graph)
    assert report.passes[0].stats["grid"] == [2, 8] and report.passes[0].matched == ["grid option"]
    expected = reference(model, inputs["pixel_values"], 2, h=2, w=8)
    torch.testing.assert_close(call(report.graph.module(), inputs), expected, atol=tolerance(expected), rtol=0)


@pytest.mark.parametrize("pipeline,error,message", [
    ("token_shuffle(s=3)", PassOptionError, "the 4x4 grid is not divisible by s=3"),
    ("token_shuffle(s=1)", PassOptionError, "s must be an integer >= 2, got 1"),
    ("token_shuffle(grid=[8, 8])", PassOptionError, "17 tokens, fewer than the 8x8 grid"),
    ("token_shuffle(grid=[4])", PassOptionError, "grid must be [h, w]"),
])
def test_impossible_options(vit2, pipeline, error, message):
    _, graph = vit2
    with pytest.raises(error) as info:
        optimize(graph, pipeline)
    assert message in str(info.value)


def test_applying_twice_is_refused(shuffled2):
    with pytest.raises(PassOptionError, match="already token-shuffled"):
        optimize(shuffled2.graph, "token_shuffle(s=2)")


def test_text_model_has_no_grid():
    _, graph = captured("bert")
    with pytest.raises(MappingError, match=r"^token_shuffle needs grid tokens \(image patches\); found no patch embedding in bert$"):
        optimize(graph, "token_shuffle(s=2)")


def test_pass_object_and_pipeline_string_agree(vit2, shuffled2):
    """Both build the same seeded adapters, so the same function."""
    _, graph = vit2
    inputs = image_inputs(2, seed=3)
    by_string = optimize(graph, "token_shuffle")
    torch.testing.assert_close(call(by_string.module(), inputs), call(shuffled2.graph.module(), inputs), atol=0, rtol=0)


def _trained_looking(graph) -> None:
    """Give every adapter weight a non-zero value, so parity checks exercise the whole adapter path."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(graph):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def test_onnxruntime_matches_torch(vit2, tmp_path):
    from tokenfx.frontends.onnx import export_onnx, run_onnxruntime

    _, graph = vit2
    shuffled = optimize(graph, "token_shuffle(s=2)")
    _trained_looking(shuffled)
    path = export_onnx(shuffled, tmp_path / "vit_shuffled.onnx")
    for batch in (1, 3):  # the batch dim stays symbolic
        inputs = image_inputs(batch, seed=batch)
        reference_out = call(shuffled.module(), inputs)
        (out,) = run_onnxruntime(path, inputs)
        torch.testing.assert_close(torch.from_numpy(out), reference_out, atol=1e-4, rtol=0)


def test_torch_compile_backend_rewrites_the_same_way():
    """The AOT graph (parameters as inputs, ``convolution``, static then dynamic batch) gets the same
    rewrite as the export path: outputs equal the captured-and-shuffled graph's."""
    from tokenfx.frontends.dynamo import COMPILE_LOG

    torch._dynamo.reset()
    model = vit(layers=1)
    shuffled = optimize(tokenfx.capture(model, image_inputs(2)), "token_shuffle(s=2)")
    compiled = torch.compile(model, backend="tokenfx", options={"passes": "token_shuffle(s=2)", "inner": "eager"})
    start = len(COMPILE_LOG)
    try:
        for batch in (2, 3):  # static batch (B·N size literals), then Dynamo's dynamic batch
            inputs = image_inputs(batch, seed=batch)
            expected = call(shuffled.module(), inputs)
            torch.testing.assert_close(call(compiled, inputs), expected, atol=tolerance(expected), rtol=0)
            assert float((expected - call(model, inputs)).abs().max()) > 0.1
    finally:
        torch._dynamo.reset()
    entries = COMPILE_LOG[start:]
    assert len(entries) == 2
    for entry in entries:
        assert entry["error"] is None
        assert entry["passes"] == [{"name": "token_shuffle", "matched": ["embeddings.patch_embeddings.projection"],
                                    "refused": []}]


def test_finetune_trains_only_the_adapters():
    """A tiny problem: recover a ViT classifier's own labels after the shuffle, through its CLS
    pooler and head. The loss falls; no other weight moves."""
    import transformers

    from models import randomize_

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS, num_labels=4)
    torch.manual_seed(0)
    model = randomize_(transformers.ViTForImageClassification(cfg), seed=0)
    graph = tokenfx.capture(model, image_inputs(2))
    shuffled = optimize(graph, "token_shuffle(s=2)")
    batches = []
    for seed in range(2):
        inputs = image_inputs(16, seed=10 + seed)
        batches.append((inputs, call(model, inputs).argmax(-1)))  # the unshuffled model's labels
    frozen = {name: p.detach().clone() for name, p in shuffled.module().named_parameters()
              if not name.startswith("token_shuffle.")}
    adapters = {name: p.detach().clone() for name, p in shuffled.module().named_parameters() if name.startswith("token_shuffle.")}
    flags = {name: p.requires_grad for name, p in shuffled.module().named_parameters()}

    losses = finetune(shuffled, batches, steps=12, lr=3e-3)

    assert len(losses) == 12
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    for name, p in shuffled.module().named_parameters():
        assert p.grad is None and p.requires_grad == flags[name], name
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"{name} moved"
    assert any(not torch.equal(p, adapters[name]) for name, p in shuffled.module().named_parameters() if name in adapters)
    # the graph the user captured shares those frozen weights: its output is unchanged too
    torch.testing.assert_close(call(graph.module(), batches[0][0]), call(model, batches[0][0]), atol=1e-5, rtol=0)


def test_finetune_needs_adapters(vit2):
    _, graph = vit2
    with pytest.raises(PassOptionError, match="no token_shuffle adapters"):
        finetune(graph, [(image_inputs(2), torch.zeros(2, 17, 32))], steps=1)
