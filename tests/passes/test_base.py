"""``passes/base.py``: the pipeline parser (syntax-error positions, unknown names, option types,
``Literal`` choices listing their values), the one pass rule (a pass rewrites the clone it is
handed; calling one directly or through the PassManager never changes the caller's graph), and
``optimize`` at both levels (``passes.base`` takes a ModelGraph; ``tokenfx.optimize`` also
captures a module)."""

from __future__ import annotations

import dataclasses
import functools
import typing

import pytest
import torch

import tokenfx
from models import captured, gpt2, image_inputs, llama, token_inputs, vit
from test_token_merge import embedder
from tokenfx.errors import PassDefinitionError, PassOptionError, PipelineSyntaxError, UnknownPassError, VerificationError
from tokenfx.frontends.load import decoder_graph
from tokenfx.ir.token_reduction import ReductionOptions
from tokenfx.passes.base import (Pass, PassManager, PassResult, optimize, parse_pipeline, register, registered_passes,
                                 tolerance_for)
from tokenfx.passes.early_exit import EarlyExit
from tokenfx.passes.fuse_norm import FuseNorm
from tokenfx.passes.kv_cache import KVCache
from tokenfx.passes.split_overlap import SplitOverlap
from tokenfx.passes.tensor_parallel import TensorParallel
from tokenfx.passes.token_merge import TokenMerge
from tokenfx.passes.token_prune import TokenPrune
from tokenfx.passes.token_shuffle import TokenShuffle
from tokenfx.passes.tree_verify import TreeVerify

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
ADD_NORM = torch.ops.tokenfx.add_norm.default


# -- the pipeline parser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text,position", [
    ("fuse_norm,,x", len("fuse_norm,")),
    ("fuse_norm x", len("fuse_norm ")),
    ("fuse_norm(final_norm=true", len("fuse_norm(final_norm=true")),
    ("fuse_norm(final_norm)", len("fuse_norm(final_norm")),
    ("fuse_norm,", len("fuse_norm,")),
    ("", 0),
])
def test_syntax_error_position(text, position):
    with pytest.raises(PipelineSyntaxError) as info:
        parse_pipeline(text)
    assert info.value.position == position
    assert info.value.text == text
    # the message points at the position under the text
    assert ("\n  " + " " * position + "^") in str(info.value)


def test_unknown_pass_lists_valid_passes():
    with pytest.raises(UnknownPassError, match="fuse_nrom") as info:
        parse_pipeline("fuse_nrom")
    assert "fuse_norm" in str(info.value).split("fuse_nrom", 1)[1]


def test_unknown_option_lists_valid_options():
    with pytest.raises(UnknownPassError, match="bogus") as info:
        parse_pipeline("fuse_norm(bogus=1)")
    assert "final_norm" in str(info.value)


@pytest.mark.parametrize("value", ["3", "1.5", "'yes'", "[true]"])
def test_option_of_the_wrong_type(value):
    with pytest.raises(PassOptionError, match="final_norm"):
        parse_pipeline(f"fuse_norm(final_norm={value})")


def test_options_parse():
    (p,) = parse_pipeline(" fuse_norm ( final_norm = FALSE ) ")
    assert isinstance(p, FuseNorm) and p.options.final_norm is False
    assert [type(x) for x in parse_pipeline("fuse_norm,fuse_norm()")] == [FuseNorm, FuseNorm]


def test_options_cannot_be_smuggled_through_the_pipeline():
    with pytest.raises(UnknownPassError, match="no option 'options'"):
        parse_pipeline("fuse_norm(options=1)")


# -- choice options: Literal[...] checked by the parser, values listed -----------------------------------
@pytest.mark.parametrize("text,message", [
    ("kv_cache(mode=x)", "kv_cache: mode must be one of 'decode', 'prefill'; got 'x'"),
    ("kv_cache(logits=first)", "kv_cache: logits must be one of 'all', 'last'; got 'first'"),
    ("kv_cache(cache_update=copy)", "kv_cache: cache_update must be one of 'output', 'inplace'; got 'copy'"),
    ("kv_cache(mode=1)", "kv_cache: mode must be one of 'decode', 'prefill'; got 1"),
    ("token_merge(metric='values')", "token_merge: metric must be one of 'keys', 'hidden'; got 'values'"),
    ("early_exit(head=adapter)", "early_exit: head must be 'shared'; got 'adapter'"),
])
def test_choice_option_lists_its_values(text, message):
    with pytest.raises(PassOptionError) as info:
        parse_pipeline(text)
    assert str(info.value) == message


def test_choice_options_parse():
    (kv, merge) = parse_pipeline("kv_cache(mode=prefill, logits='last', cache_update=inplace),token_merge(metric=hidden)")
    assert (kv.options.mode, kv.options.logits, kv.options.cache_update) == ("prefill", "last", "inplace")
    assert merge.options.metric == "hidden"


def test_choices_are_checked_without_the_parser():
    with pytest.raises(PassOptionError, match="mode must be one of 'decode', 'prefill'; got 'x'"):
        KVCache(mode="x")
    with pytest.raises(PassOptionError, match="metric must be one of 'keys', 'hidden'; got 'values'"):
        TokenMerge(TokenMerge.Options(metric="values"))  # an Options object built by hand


def test_no_pass_takes_a_free_string():
    """A string option is a choice: typed Literal[...], so the parser checks it and lists the values."""
    for name, cls in registered_passes().items():
        hints = typing.get_type_hints(cls.Options)
        for field in dataclasses.fields(cls.Options):
            allowed = typing.get_args(hints[field.name]) or (hints[field.name],)
            assert str not in allowed and hints[field.name] is not str, f"{name}.{field.name} is a plain str"


def test_overrides_keep_the_other_options():
    p = KVCache(KVCache.Options(mode="prefill", logits="last"), max_positions=64)
    assert (p.options.mode, p.options.logits, p.options.max_positions) == ("prefill", "last", 64)


def test_merge_and_prune_share_the_reduction_options():
    shared = {f.name: f for f in dataclasses.fields(ReductionOptions)}
    assert set(shared) == {"proportional", "protect", "unmerge"}
    for cls in (TokenMerge, TokenPrune):
        assert issubclass(cls.Options, ReductionOptions)
        options = cls.Options()
        assert (options.proportional, options.protect, options.unmerge) == (True, [0], False)
    assert TokenMerge.Options().protect is not TokenPrune.Options().protect  # a fresh list each


def test_prune_blocks_and_exit_layers_are_different_options():
    (prune,) = parse_pipeline("token_prune(keep=0.75, blocks=[1])")
    assert prune.options.blocks == [1]
    with pytest.raises(UnknownPassError, match="no option 'layers'"):
        parse_pipeline("token_prune(keep=0.75, layers=[1])")
    assert parse_pipeline("early_exit(layers=[2])")[0].options.layers == (2,)


def test_a_pass_with_an_unknown_contract_is_refused():
    class Lossless(Pass):
        name = "lossless_test_pass"
        contract = "lossless"

    with pytest.raises(PassDefinitionError, match="contract must be one of"):
        register(Lossless)
    assert "lossless_test_pass" not in registered_passes()


# -- the one pass rule: only clones are rewritten -----------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _decoder():
    full = decoder_graph(llama(layers=2))
    return full, optimize(full, [KVCache(mode="decode", logits="all", cache_update="inplace")])


CASES = {  # every registered pass, on a small graph it applies to
    "fuse_norm": lambda: (captured("gpt2")[1], FuseNorm()),
    "token_merge": lambda: (embedder()[1], TokenMerge(r=2)),
    "token_prune": lambda: (embedder()[1], TokenPrune(r=2)),
    "token_shuffle": lambda: (tokenfx.capture(vit(2), image_inputs(2)), TokenShuffle(s=2)),
    "kv_cache": lambda: (_decoder()[0], KVCache(mode="decode", logits="all", cache_update="inplace")),
    "tree_verify": lambda: (_decoder()[1], TreeVerify()),
    "early_exit": lambda: (_decoder()[1], EarlyExit(layers=[1])),
    "tensor_parallel": lambda: (captured("llama")[1], TensorParallel(world_size=2, rank=0)),
    "split_overlap": lambda: (TensorParallel(world_size=2, rank=0).run(captured("llama")[1]).graph,
                              SplitOverlap(min_tokens=4)),
}


def _fingerprint(graph) -> tuple:
    gm = graph.gm
    return (gm.code, len(gm.graph.nodes), sorted(n for n, _ in gm.named_buffers()),
            sorted(n for n, _ in gm.named_modules()), sorted(getattr(gm, "meta", {})), graph.kv, graph.exits
            if hasattr(graph, "exits") else None)


def test_every_registered_pass_is_checked():
    assert set(CASES) == set(registered_passes())


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_pass_never_changes_the_callers_graph(name):
    graph, p = CASES[name]()
    before = _fingerprint(graph)
    direct = p.run(graph)  # Pass.run: clone, then rewrite the clone
    assert direct.graph.gm is not graph.gm
    assert _fingerprint(direct.graph) != before  # the pass did rewrite (its clone)
    assert _fingerprint(graph) == before
    managed = PassManager([p]).run(graph).graph
    assert managed.gm is not graph.gm and _fingerprint(managed) != before
    assert _fingerprint(graph) == before


# -- optimize: passes take graphs, the entry point also captures ----------------------------------------------
def test_optimize_at_the_entry_captures_a_module():
    model, inputs = gpt2(), token_inputs(2, 7)
    fused = tokenfx.optimize(model, "fuse_norm", example_inputs=inputs)
    assert fused.count(ADD_NORM) > 0
    assert fused.gm.code == optimize(tokenfx.capture(model, inputs), "fuse_norm").gm.code
    with pytest.raises(PassOptionError, match="example_inputs"):
        tokenfx.optimize(model, "fuse_norm")


def test_passes_optimize_takes_only_a_graph():
    with pytest.raises(PassOptionError, match="capture the model first"):
        optimize(gpt2(), "fuse_norm")


def test_an_exact_tolerance_grows_with_depth():
    out = torch.full((2, 3), 4.0)
    one = tolerance_for(out, "exact")
    assert one == pytest.approx(64 * torch.finfo(torch.float32).eps * 4.0)
    assert tolerance_for(out, "exact", depth=6) == pytest.approx(6 * one)


class _Skew(Pass):
    """Claims exactness but scales the first residual add by 1 + 1e-4 (a wrong rewrite)."""

    name = "skew"
    contract = "exact"

    @dataclasses.dataclass
    class Options:
        pass

    def rewrite(self, graph):
        g = graph.gm.graph
        add = next(n for n in g.nodes if n.op == "call_function" and n.target is torch.ops.aten.add.Tensor)
        with g.inserting_after(add):
            scaled = g.call_function(torch.ops.aten.mul.Tensor, (add, 1.0 + 1e-4))
        add.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        graph.invalidate()
        return PassResult(graph, ["first add"], [], {})


def test_verification_still_catches_a_small_error_in_a_deep_graph():
    _, graph = captured("llama")
    with pytest.raises(VerificationError, match="skew .exact. changed the output"):
        PassManager([_Skew()], verify=True).run(graph)
