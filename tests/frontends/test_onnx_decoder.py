"""Decoding an imported ONNX decoder: ``tokenfx.generate("model.onnx", ...)``.

The bundled ``tokenfx:tiny-code`` (Llama: GQA 8/2, RoPE, tied head) is exported by the tests
themselves as ``input_ids -> logits`` — with HF's ``config.json`` / ``generation_config.json``
beside the file, optimum's layout — and imported. Properties: greedy decoding of the file is
token-identical to HF ``generate`` on the PyTorch model (batch 1 and a left-padded batch);
speculative decoding (Token Recycling, prompt lookup) equals plain greedy; the ``kv_cache``
graphs of the imported and the captured model compute the same logits and K/V at every step
and have the same layout. A file that does not state its positions is refused naming the fix."""

from __future__ import annotations

import shutil

import pytest
import torch

import onnx
import tokenfx
from models import export_onnx_file, held_out_code_prompts, left_pad
from tokenfx import assets
from tokenfx.errors import PassOptionError
from tokenfx.frontends.load import decoder_graph, load_decoder, load_tokenizer
from tokenfx.frontends.onnx_config import METADATA_KEY, ImportedConfig, config_metadata, imported_config
from tokenfx.frontends.onnx_import import import_onnx
from tokenfx.passes.base import optimize
from tokenfx.runtime.generate import generator_for

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NEW = 16  # max_new_tokens
FP32_ATOL = 1e-4  # fp32 rounding through 6 layers: imported and captured graphs order a few ops differently


class _Logits(torch.nn.Module):
    """``input_ids -> logits``: the forward an ONNX-only user's decoder file holds."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        # an all-ones mask, so HF does not look for packed sequences (torch.diff: no ONNX translation)
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


def _export(model, exporter: str, opset: int, path):
    ids = torch.randint(2, 4000, (2, 7), generator=torch.Generator().manual_seed(0))
    return export_onnx_file(_Logits(model).eval(), {"input_ids": ids}, path, exporter, opset, outputs=("logits",),
                            max_tokens=2048)


@pytest.fixture(scope="module")
def hf_model():
    return load_decoder("tokenfx:tiny-code")  # the HF module, float32


@pytest.fixture(scope="module")
def onnx_file(hf_model, tmp_path_factory):
    """tiny-code as an ONNX file (TorchScript exporter, opset 17) with the HF config files beside it."""
    directory = tmp_path_factory.mktemp("tiny_code_onnx")
    path = _export(hf_model, "torchscript", 17, directory / "model.onnx")
    for name in ("config.json", "generation_config.json"):
        shutil.copy(assets.path("tiny-code") / name, directory / name)
    return path


@pytest.fixture(scope="module")
def prompts():
    return held_out_code_prompts(load_tokenizer("tokenfx:tiny-code"), 4, seed=3)


def _hf_greedy(model, ids, mask):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)


def test_greedy_decoding_of_the_file_equals_hf(hf_model, onnx_file, prompts):
    gen = generator_for(str(onnx_file), compile=False)  # the Generator tokenfx.generate(path, ...) uses
    assert gen.vocab_size == 4096 and gen.eos_ids == [0] and gen.pad_id == 1  # from the graph and the sidecar files
    assert gen.layout.max_positions == 2048 and (gen.layout.layers, gen.layout.kv_heads) == (6, 2)
    for p in prompts[:2]:
        ids = p[None]
        got = tokenfx.generate(str(onnx_file), ids, max_new_tokens=NEW, compile=False)
        assert torch.equal(got, _hf_greedy(hf_model, ids, torch.ones_like(ids)))
    ids, mask = left_pad(prompts[1:], seed=1)
    got = tokenfx.generate(str(onnx_file), ids, attention_mask=mask, max_new_tokens=NEW, compile=False)
    assert torch.equal(got, _hf_greedy(hf_model, ids, mask))


@pytest.mark.parametrize("speculate", ["recycling", "lookup"])
def test_speculative_decoding_of_the_file_equals_greedy(onnx_file, prompts, speculate):
    gen = generator_for(str(onnx_file), compile=False)
    ids, mask = left_pad(prompts, seed=2)
    plain = gen.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    fast = gen.generate(ids, attention_mask=mask, max_new_tokens=NEW, speculate=speculate)
    assert torch.equal(fast, plain)
    if speculate == "recycling":  # the drafter was used, not merely refused: some steps accept drafts
        assert gen.last_stats["accepted_per_step"] > 1.0


def test_early_exit_on_the_file_self_speculation_equals_greedy(onnx_file, prompts):
    """The early_exit pass on the imported graph, used by lossless self-speculation (draft with the
    first 2 blocks through the shared exit head, verify with the rest): token-identical to greedy."""
    gen = generator_for(str(onnx_file), compile=False)
    ids, mask = left_pad(prompts[:2], seed=4)
    plain = gen.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    fast = gen.generate(ids, attention_mask=mask, max_new_tokens=NEW, speculate="self:2")
    assert torch.equal(fast, plain)
    assert "draft" in gen.last_stats["stages"]  # the exit at block 2 drafted: the early-exit pieces ran


def _decode_twice(graph, ids):
    """Logits and new K/V of a ``kv_cache(mode=decode)`` graph over ``ids`` in two chunks (the
    second attends to the first's K/V), with the first row left-padded by one token."""
    layout = graph.kv
    b, n = ids.shape
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, 0] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    split = n // 2
    empty = torch.zeros(layout.cache_shape(b, 0), dtype=layout.dtype)
    with torch.no_grad():
        first, kv = graph.gm(ids[:, :split], positions[:, :split], empty, mask[:, :0], mask[:, :split])
        second, kv2 = graph.gm(ids[:, split:], positions[:, split:], kv, mask[:, :split], mask[:, split:])
    return [first, kv, second, kv2]


@pytest.fixture(scope="module")
def captured(hf_model):
    return decoder_graph(hf_model)


@pytest.fixture(scope="module")
def captured_kv(captured):
    return optimize(captured, "kv_cache(mode=decode)")


@pytest.mark.parametrize("exporter", ["torchscript-17", "dynamo-18", "tokenfx"])
def test_kv_cache_graph_of_the_import_equals_the_captured_ones(hf_model, onnx_file, captured, captured_kv, exporter,
                                                               tmp_path):
    if exporter == "torchscript-17":  # the graph the Generator of the file built: kv_cache(mode=decode)
        imported = generator_for(str(onnx_file), compile=False).graph("decode", logits="all")
    elif exporter == "dynamo-18":  # the dynamo exporter's file: scopes from metadata, its own SDPA decomposition
        path = _export(hf_model, "dynamo", 18, tmp_path / "model.onnx")
        (tmp_path / "config.json").write_text((assets.path("tiny-code") / "config.json").read_text())
        imported = optimize(tokenfx.load(str(path)), "kv_cache(mode=decode)")
    else:  # tokenfx.export_onnx stores the config in the file: no files beside it needed
        path = tokenfx.export_onnx(captured, tmp_path / "model.onnx")
        graph = tokenfx.load(str(path))
        assert (graph.config.max_position_embeddings, graph.config.eos_token_id) == (2048, 0)
        imported = optimize(graph, "kv_cache(mode=decode)")
    assert imported.kv == captured_kv.kv  # layers, heads, kv-heads, head dim, positions, inputs
    assert imported.structure.to_json()["position"] == captured_kv.structure.to_json()["position"]
    ids = torch.randint(2, 4096, (2, 9), generator=torch.Generator().manual_seed(4))
    for got, want in zip(_decode_twice(imported, ids), _decode_twice(captured_kv, ids)):
        torch.testing.assert_close(got, want, atol=FP32_ATOL, rtol=0)


def test_a_file_without_positions_is_refused_naming_the_option(onnx_file):
    graph = import_onnx(onnx.load(str(onnx_file)))  # no path: no config files beside it
    assert graph.config == ImportedConfig(vocab_size=4096, sources=("graph",))  # the embedding table's rows
    with pytest.raises(PassOptionError, match=r"max_positions=N"):
        optimize(graph, "kv_cache(mode=decode)")


def test_config_from_metadata_overrides_the_sidecar(tmp_path, hf_model):
    """``tokenfx.config`` metadata (what export_onnx writes) wins over config.json beside the file;
    the embedding table's rows win over both (they are the logits' width)."""
    from onnx import TensorProto, helper

    table = helper.make_tensor("embed.weight", TensorProto.FLOAT, [10, 4], [0.0] * 40)
    graph = helper.make_graph([helper.make_node("Gather", ["embed.weight", "input_ids"], ["h"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "tokens", 4])],
                              initializer=[table])
    proto = helper.make_model(graph)
    (tmp_path / "config.json").write_text('{"vocab_size": 99, "max_position_embeddings": 128, "eos_token_id": 5}')
    stored = config_metadata(hf_model.config)
    helper.set_model_props(proto, {METADATA_KEY: stored})
    config = imported_config(proto, tmp_path / "model.onnx")
    assert config.vocab_size == 10 and config.max_position_embeddings == 2048 and config.eos_token_id == 0
    assert config.pad_token_id == 1 and config.sources == ("graph", "config.json", "metadata")
