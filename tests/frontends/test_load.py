"""tokenfx.load: every spec kind, and a clear error for each bad one."""

from __future__ import annotations

import pytest
import torch

import models
import tokenfx
from tokenfx.errors import ModelLoadError


def test_bundled_minilm_is_the_pretrained_sentence_embedder():
    """Pretrained weights, not a random init of the same shapes: the captured graph's mean-pooled
    embeddings put paraphrases together and unrelated sentences apart. A random init maps every
    sentence to nearly the same direction (cosine ~0.93 for all pairs)."""
    from transformers import AutoTokenizer

    graph = tokenfx.load("tokenfx:minilm")
    s = graph.structure
    assert (graph.family, s.num_blocks, s.hidden_size) == ("bert", 6, 384)
    weight = next(v for k, v in graph.gm.state_dict().items() if "word_embeddings" in k)
    assert weight.shape == (30522, 384)

    tokenizer = AutoTokenizer.from_pretrained(tokenfx.assets.path("minilm"))
    music = ["A man is playing a guitar.", "Someone is playing an instrument."]
    money = ["The stock market fell sharply today.", "Quarterly profits of the bank dropped."]
    batch = tokenizer(music + money, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = graph.module()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    embedding = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # [4, 384]
    cosine = embedding @ embedding.T
    related = torch.stack([cosine[0, 1], cosine[2, 3]])
    unrelated = cosine[:2, 2:].flatten()
    assert related.min() > unrelated.max() + 0.3, cosine  # pretrained: 0.42 / 0.68 against < 0


def test_unknown_bundled_name_lists_the_known_ones():
    with pytest.raises(ModelLoadError, match="unknown bundled model 'nope'.*minilm"):
        tokenfx.load("tokenfx:nope")


def test_hf_directory_round_trip(tmp_path):
    model = models.llama()
    model.save_pretrained(tmp_path)
    graph = tokenfx.load(tmp_path)
    ids = torch.randint(0, models.VOCAB, (3, 11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = graph.module()(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert graph.structure.position == "rope"


def test_factory_with_example_inputs():
    graph = tokenfx.load("factories:encoder_with_inputs")
    assert graph.structure.num_blocks == 2
    assert graph.structure.position == "none"


def test_pt2_of_a_decoder_maps_like_its_capture(tmp_path):
    """A saved program carries dtype asserts the capture had removed; loading removes them too, so
    the final norm and the LM head are found (tensor_parallel's vocab_parallel needs the head)."""
    from tokenfx.frontends.onnx import save_pt2

    _, graph = models.captured("llama")
    loaded = tokenfx.load(save_pt2(graph, tmp_path / "llama.pt2"))
    assert not loaded.count(torch.ops.aten._assert_tensor_metadata)
    got, want = loaded.structure.to_json(), graph.structure.to_json()
    assert (got["head"], got["final_norm"], got["num_blocks"]) == (want["head"], want["final_norm"], want["num_blocks"])
    assert want["head"] is not None


def test_pt2_round_trip_keeps_rewritten_ops(tmp_path):
    from tokenfx.frontends.onnx import save_pt2

    graph = tokenfx.optimize(tokenfx.load("factories:tiny_bert"), "fuse_norm")
    path = save_pt2(graph, tmp_path / "bert.pt2")
    loaded = tokenfx.load(path)
    assert loaded.count(torch.ops.tokenfx.add_norm.default) == graph.count(torch.ops.tokenfx.add_norm.default) == 4
    ids = torch.randint(0, models.VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(input_ids=ids, attention_mask=torch.ones_like(ids)),
                                   graph.module()(input_ids=ids, attention_mask=torch.ones_like(ids)))
    # the ModelMap recognises fused norms in a loaded, rewritten graph
    assert loaded.structure.num_blocks == 2 and loaded.structure.blocks[0].norm_placement == "post"
    # the capture wrapper's ``.model`` stays hidden without the HF config
    assert [b.name for b in loaded.structure.blocks] == ["encoder.layer.0", "encoder.layer.1"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/definitely/missing", "no such model file or directory"),
        ("missing.pt2", "no such model file"),
        ("factories:not_a_model", "returned int"),
        ("factories:nothing_here", "has no callable 'nothing_here'"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        tokenfx.load(spec)


@pytest.mark.parametrize("name, message", [
    ("bad.pt2", "not a valid .pt2 file"),
    ("m.onnx", "not a valid ONNX file"),
])
def test_bad_model_files(tmp_path, name, message):
    path = tmp_path / name
    path.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=message):
        tokenfx.load(path)


def test_corrupt_hf_directory(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        tokenfx.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="has no weights"):
        tokenfx.load(tmp_path)


def test_factory_returning_a_bare_tensor_input():
    graph = tokenfx.load("factories:encoder_with_tensor_input")
    assert graph.structure.num_blocks == 2
