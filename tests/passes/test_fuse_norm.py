"""``fuse_norm``: every norm that reads a same-shape residual add becomes one
``tokenfx::add_norm``; nothing else changes. Structure (how many fused, none left over,
which model parts) is checked against an expectation computed independently from the
original graph, and numerics at a shape the capture never saw."""

from __future__ import annotations

import operator

import pytest
import torch

import tokenfx
from models import EXAMPLE, FAMILIES, call, captured, llama, token_inputs
from tokenfx.passes.base import PassManager, optimize
from tokenfx.passes.fuse_norm import FuseNorm

aten = torch.ops.aten
ADD_NORM = torch.ops.tokenfx.add_norm.default
CASTS = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default}
NEW_SHAPE = (3, 11)  # capture example is (2, 7)


# -- an independent view of the graph: norms and what they read ---------------------------------------
def _skip_casts(node):
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in CASTS:
        node = node.args[0]
    return node


def norms_and_inputs(gm) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """``(norm node, tensor it normalises)`` for every LayerNorm and RMSNorm, fused op or written
    out as ``rsqrt(mean(h ** 2, -1) + eps)`` (the Hugging Face RMSNorm)."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in (aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default):
            out.append((n, n.args[0]))
        elif n.target is aten.rsqrt.default:
            plus_eps = n.args[0]
            if plus_eps.target is not aten.add.Tensor or plus_eps.args[0].target is not aten.mean.dim:
                continue
            square = plus_eps.args[0].args[0]
            if square.target is aten.pow.Tensor_Scalar and square.args[1] == 2:
                out.append((n, _skip_casts(square.args[0])))
    return out


def is_residual_add(node) -> bool:
    """An elementwise ``aten.add.Tensor`` of two tensors of the same shape (no broadcasting)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is aten.add.Tensor):
        return False
    a, b = node.args[:2]
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)):
        return False
    shapes = {str(tuple(x.meta["val"].shape)) for x in (a, b, node)}  # SymInts are not hashable
    return len(shapes) == 1


def unfused(gm) -> list[torch.fx.Node]:
    """Norms that still read a residual add: what fuse_norm should have fused."""
    return [norm for norm, x in norms_and_inputs(gm) if is_residual_add(x)]


def tolerance(reference: torch.Tensor, ulps: float) -> float:
    """``ulps`` units of the dtype's epsilon at the output's magnitude (rounding order only)."""
    return ulps * torch.finfo(reference.dtype).eps * max(1.0, float(reference.abs().max()))


# per family, as the model's source says: L blocks, two norms each, minus the first block's
# first norm when it reads the embeddings (pre-norm), plus the final norm when there is one
EXPECTED_FUSED = {
    "llama": lambda L: 2 * L,  # 2L - 1 block norms + final norm
    "gpt2": lambda L: 2 * L,  # ln_1 of block 0 reads wte + wpe (a broadcasting add): not fused
    "bert": lambda L: 2 * L,  # embeddings.LayerNorm reads a broadcast position add: not fused
    "vit": lambda L: 2 * L,
    "encoder_post": lambda L: 2 * L,
    "encoder_pre": lambda L: 2 * L - 1,  # no final norm
}


# how many fused ops pass their residual sum on: in pre-norm blocks every one but the final
# norm's; in post-norm blocks none (the stream goes on from the norm's output)
SUMMED_USED = {
    "llama": lambda L: 2 * L - 1,
    "gpt2": lambda L: 2 * L - 1,
    "bert": lambda L: 0,
    "vit": lambda L: 2 * L - 1,
    "encoder_post": lambda L: 0,
    "encoder_pre": lambda L: 2 * L - 1,
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_fused(request):
    name = request.param
    model, graph = captured(name)
    return name, model, graph, optimize(graph, "fuse_norm")


def test_fuses_every_residual_norm(family_fused):
    name, _, graph, fused = family_fused
    expected = len(unfused(graph.gm))
    assert expected == EXPECTED_FUSED[name](FAMILIES[name].layers)
    assert fused.count(ADD_NORM) == expected
    assert unfused(fused.gm) == [], "a norm still reads a residual add"
    # every other norm is untouched: the fused ones are gone, the rest remain
    assert len(norms_and_inputs(fused.gm)) == len(norms_and_inputs(graph.gm)) - expected
    # each fused op's normalised output is used; its summed output only where the residual
    # stream goes on past the norm (pre-norm), never in post-norm blocks or after the final norm
    for node in fused.graph.nodes:
        if node.target is ADD_NORM:
            assert {u.target for u in node.users} == {operator.getitem}, node.name
            assert 0 in {u.args[1] for u in node.users}, node.name
    summed_used = sum(1 for n in fused.graph.nodes if n.target is operator.getitem and n.args[0].target is ADD_NORM
                      and n.args[1] == 1)
    assert summed_used == SUMMED_USED[name](FAMILIES[name].layers)


def test_parity_at_a_new_shape(family_fused):
    name, model, graph, fused = family_fused
    inputs = FAMILIES[name].inputs(*NEW_SHAPE, seed=11)
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        assert not bool(inputs["attention_mask"].all()), "the new shape must include padding"
    reference = call(model, inputs)
    out = call(fused.module(), inputs)
    assert out.shape == reference.shape
    assert out.shape[0] == NEW_SHAPE[0] and (name == "vit" or out.shape[1] == NEW_SHAPE[1])
    torch.testing.assert_close(out, reference, atol=tolerance(reference, 32), rtol=0)
    torch.testing.assert_close(out, call(graph.module(), inputs), atol=tolerance(reference, 32), rtol=0)


def test_bf16_llama_parity():
    model = llama(dtype=torch.bfloat16)
    graph = tokenfx.capture(model, token_inputs(*EXAMPLE))
    fused = optimize(graph, "fuse_norm")
    assert fused.count(ADD_NORM) == 4
    inputs = token_inputs(*NEW_SHAPE, seed=3)
    reference = call(model, inputs)
    out = call(fused.module(), inputs)
    assert out.dtype == torch.bfloat16
    # the fused op applies the norm weight in fp32 before the bf16 cast; the model after it:
    # one bf16 rounding per norm, a few ulps at the output's scale
    torch.testing.assert_close(out.float(), reference.float(), atol=tolerance(reference, 4), rtol=0)


def test_verify_report():
    _, graph = captured("llama")
    report = PassManager("fuse_norm", verify=True).run(graph)
    (p,) = report.passes
    assert p.name == "fuse_norm" and p.contract == "exact"
    assert p.matched == ["model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm",
                         "model.layers.1.post_attention_layernorm", "model.norm"]
    assert p.refused == []
    assert p.stats["fused"] == 4
    # per fused norm: one add_norm and two getitems in; the add and the norm's nodes out
    assert p.nodes_removed > 0
    assert p.nodes_added <= 3 * 4
    assert p.nodes_removed - p.nodes_added == len(graph.graph.nodes) - len(report.graph.graph.nodes)
    assert p.max_abs_error is not None and p.tolerance is not None
    assert p.max_abs_error <= p.tolerance
    reference = graph.run_example()
    blocks = len(graph.structure.blocks)  # the bound carries a reordering through every later block
    assert p.tolerance <= tolerance(reference, 64 * blocks) * 1.0001  # exact contract: a few ulps per block, not more
    assert p.verified is True


def test_matched_names_of_a_post_norm_encoder():
    _, graph = captured("bert")
    report = PassManager("fuse_norm", verify=True).run(graph)
    assert report.passes[0].matched == [f"encoder.layer.{i}.{part}.LayerNorm" for i in range(2) for part in ("attention.output", "output")]


def test_final_norm_false_leaves_the_final_norm():
    _, graph = captured("llama")
    all_fused = optimize(graph, "fuse_norm")
    report = PassManager("fuse_norm(final_norm=false)").run(graph)
    kept = report.graph
    assert kept.count(ADD_NORM) == all_fused.count(ADD_NORM) - 1
    assert "model.norm" not in report.passes[0].matched
    # the one norm left reading a residual add is the final norm
    (left,) = unfused(kept.gm)
    assert left in kept.structure.final_norm.nodes
    assert kept.structure.path(kept.structure.final_norm.output) == "model.norm"
    inputs = token_inputs(*NEW_SHAPE, seed=5)
    reference = call(graph.module(), inputs)
    torch.testing.assert_close(call(kept.module(), inputs), reference, atol=tolerance(reference, 32), rtol=0)


def test_pass_objects_and_strings_agree():
    _, graph = captured("gpt2")
    by_name = optimize(graph, "fuse_norm(final_norm=False)")
    by_object = optimize(graph, [FuseNorm(final_norm=False)])
    assert by_name.count(ADD_NORM) == by_object.count(ADD_NORM) == 2 * 3 - 1


def test_optimize_does_not_mutate_the_original():
    model, graph = captured("gpt2")
    nodes, code = len(graph.graph.nodes), graph.gm.code
    inputs = token_inputs(*NEW_SHAPE, seed=2)
    before = call(graph.module(), inputs)
    fused = optimize(graph, "fuse_norm")
    assert fused.gm is not graph.gm
    assert len(graph.graph.nodes) == nodes
    assert graph.gm.code == code
    assert graph.count(ADD_NORM) == 0
    assert torch.equal(call(graph.module(), inputs), before)


def test_float64_model_stays_exact():
    """The fused op computes in the input's precision when that is wider than fp32 (LayerNorm
    in fp64 does; HF's RMSNorm casts to fp32 itself, so it is not the case to test)."""
    from models import bert

    graph = tokenfx.capture(bert().double(), token_inputs(2, 7))
    report = PassManager("fuse_norm", verify=True).run(graph)
    assert report.passes[0].max_abs_error < 1e-12


def test_fuses_through_a_reshape_before_the_norm():
    """OPT flattens the residual stream to [B·N, C] before its final norm: the add is still fused."""
    import transformers

    cfg = transformers.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(cfg).eval()
    graph = tokenfx.capture(model, token_inputs(2, 7))
    fused = tokenfx.optimize(graph, "fuse_norm")
    assert fused.count(torch.ops.tokenfx.add_norm.default) == 5  # 2 per layer + the final norm
    assert fused.count(torch.ops.aten.layer_norm.default) == 0
    inputs = token_inputs(3, 11, seed=5)
    torch.testing.assert_close(call(fused.module(), inputs), call(graph.module(), inputs), atol=1e-5, rtol=1e-5)
