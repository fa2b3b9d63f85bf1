"""ModelMap recovers the exact transformer structure of every family tokenfx claims, with
SDPA and eager attention, on random-init tiny models and on the real pretrained MiniLM; an
unmappable model gets one error that names the missing piece."""

from __future__ import annotations

import json

import pytest
import torch

import tokenfx
from models import FAMILIES, captured, encoder, hidden_inputs, minilm, token_inputs
from tokenfx.errors import MappingError

# name -> what the map must say. block: path of block i; final/head: final norm kind, head path.
EXPECTED = {
    "llama": dict(family="llama", block="model.layers.{}", heads=4, kv_heads=2, head_dim=8, causal=True, norm="rmsnorm",
                  placement="pre", position="rope", final="rmsnorm", head="lm_head", embeddings=["model.embed_tokens"]),
    "gpt2": dict(family="gpt2", block="transformer.h.{}", heads=4, kv_heads=4, head_dim=8, causal=True, norm="layernorm",
                 placement="pre", position="learned", final="layernorm", head="lm_head",
                 embeddings=["transformer.wte", "transformer.wpe"]),
    "bert": dict(family="bert", block="encoder.layer.{}", heads=4, kv_heads=4, head_dim=8, causal=False, norm="layernorm",
                 placement="post", position="learned", final=None, head=None,
                 embeddings=["embeddings.word_embeddings", "embeddings.token_type_embeddings", "embeddings.position_embeddings"]),
    "vit": dict(family="vit", block="layers.{}", heads=4, kv_heads=4, head_dim=8, causal=False, norm="layernorm",
                placement="pre", position="learned", final="layernorm", head=None,
                embeddings=["embeddings.patch_embeddings.projection"]),
    "encoder_post": dict(family="TransformerEncoder", block="layers.{}", heads=4, kv_heads=4, head_dim=8, causal=False,
                         norm="layernorm", placement="post", position="none", final=None, head=None, embeddings=[]),
    "encoder_pre": dict(family="TransformerEncoder", block="layers.{}", heads=4, kv_heads=4, head_dim=8, causal=False,
                        norm="layernorm", placement="pre", position="none", final=None, head=None, embeddings=[]),
}

CASES = [(name, impl) for name in EXPECTED for impl in (("sdpa", "eager") if not name.startswith("encoder") else ("sdpa",))]


def assert_map(structure, *, num_blocks, core, **e):
    """Every field the passes and the CLI rely on, for every block."""
    assert structure.family == e["family"]
    assert structure.num_blocks == num_blocks
    assert [b.name for b in structure.blocks] == [e["block"].format(i) for i in range(num_blocks)]
    assert [b.index for b in structure.blocks] == list(range(num_blocks))
    for block in structure.blocks:
        assert len(block.attention) == 1, block.name
        attn = block.attention[0]
        got = (attn.core_kind, attn.heads, attn.kv_heads, attn.head_dim, attn.causal)
        assert got == (core, e["heads"], e["kv_heads"], e["head_dim"], e["causal"]), block.name
        assert block.norm_kind == e["norm"], block.name
        assert {n.kind for n in block.norms} == {e["norm"]}, block.name
        assert len(block.norms) == e.get("norms", 2), f"{block.name}: one norm around attention and one around the MLP"
        assert block.norm_placement == e["placement"], block.name
    assert structure.position == e["position"]
    assert structure.token_axis == 1
    assert (structure.final_norm.kind if structure.final_norm is not None else None) == e["final"]
    assert (structure.path(structure.head) if structure.head is not None else None) == e["head"]
    if "embeddings" in e:
        assert [structure.path(n) for n in structure.embeddings] == e["embeddings"]


@pytest.mark.parametrize("name,impl", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_families_map_exactly(name, impl):
    _, graph = captured(name, impl)
    s = graph.structure
    assert_map(s, num_blocks=FAMILIES[name].layers, core=impl, **EXPECTED[name])
    assert s.hidden_size == 32
    # the blocks chain: each block's residual output is the next block's residual input
    for prev, nxt in zip(s.blocks, s.blocks[1:]):
        assert nxt.input is prev.output, f"{nxt.name} does not read {prev.name}'s residual stream"


def test_transformer_encoder_final_norm():
    model = encoder(2, norm_first=True, final_norm=True)
    s = tokenfx.capture(model, hidden_inputs(2, 7)).structure
    assert_map(s, num_blocks=2, core="sdpa", **{**EXPECTED["encoder_pre"], "final": "layernorm"})
    assert s.final_norm.input is s.blocks[-1].output


def test_pretrained_minilm():
    model = minilm()
    s = tokenfx.capture(model, token_inputs(2, 9)).structure
    assert_map(s, num_blocks=6, core="sdpa", family="bert", block="encoder.layer.{}", heads=12, kv_heads=12, head_dim=32,
               causal=False, norm="layernorm", placement="post", position="learned", final=None, head=None)
    assert s.hidden_size == 384


def test_to_json_has_the_cli_contract():
    _, graph = captured("llama")
    data = json.loads(json.dumps(graph.structure.to_json()))  # plain JSON, no tensors or nodes
    assert data["family"] == "llama"
    assert data["num_blocks"] == 2
    assert data["position"] == "rope"
    assert data["token_axis"] == 1
    assert [b["name"] for b in data["blocks"]] == ["model.layers.0", "model.layers.1"]
    for block in data["blocks"]:
        assert block["norm"] == "rmsnorm"
        assert block["norm_placement"] == "pre"
        assert block["attention"] == {"heads": 4, "kv_heads": 2, "head_dim": 8, "causal": True, "core": "sdpa"}


def test_to_json_of_a_post_norm_encoder():
    _, graph = captured("bert")
    data = graph.structure.to_json()
    assert (data["family"], data["num_blocks"], data["position"], data["token_axis"]) == ("bert", 2, "learned", 1)
    assert data["final_norm"] is None and data["head"] is None
    assert {b["norm_placement"] for b in data["blocks"]} == {"post"}
    assert {b["attention"]["causal"] for b in data["blocks"]} == {False}


def test_model_without_attention_is_refused():
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32), torch.nn.LayerNorm(32)).eval()
    graph = tokenfx.capture(mlp, hidden_inputs(2, 7))
    with pytest.raises(MappingError, match="no attention core"):
        graph.structure


# -- families the code was not written for ----------------------------------------------------------
def _qwen2():
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _opt():
    import transformers

    cfg = transformers.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=64, word_embed_proj_dim=32)
    return transformers.OPTForCausalLM(cfg).eval()


def _t5_encoder():
    import transformers

    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    return transformers.T5EncoderModel(cfg).eval()


def _tiny(cls_name: str, config_name: str, **kw):
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4, **kw)
        return getattr(transformers, cls_name)(cfg).eval()

    return build


UNSEEN = {
    # Gemma: RMSNorm weight is (1 + w), computed inside the norm
    "gemma": (_tiny("GemmaForCausalLM", "GemmaConfig", num_key_value_heads=2, head_dim=8),
              dict(family="gemma", block="model.layers.{}", heads=4, kv_heads=2, head_dim=8, causal=True,
                   norm="rmsnorm", placement="pre", position="rope", final="rmsnorm", head="lm_head")),
    # Qwen3: per-head RMSNorm on q and k between the projection and RoPE
    "qwen3": (_tiny("Qwen3ForCausalLM", "Qwen3Config", num_key_value_heads=2, head_dim=8),
              dict(family="qwen3", block="model.layers.{}", heads=4, kv_heads=2, head_dim=8, causal=True,
                   norm="rmsnorm", placement="pre", position="rope", final="rmsnorm", head="lm_head", norms=4)),
    # Phi: partial RoPE (cat of rotated and pass-through halves), parallel attention + MLP
    "phi": (_tiny("PhiForCausalLM", "PhiConfig"),
            dict(family="phi", block="model.layers.{}", heads=4, kv_heads=4, head_dim=8, causal=True,
                 norm="layernorm", placement="pre", position="rope", final="layernorm", head="lm_head", norms=1)),
    # GPT-NeoX: fused QKV laid out per head ([B, N, H, 3·D]), partial RoPE
    "gpt_neox": (_tiny("GPTNeoXForCausalLM", "GPTNeoXConfig"),
                 dict(family="gpt_neox", block="gpt_neox.layers.{}", heads=4, kv_heads=4, head_dim=8, causal=True,
                      norm="layernorm", placement="pre", position="rope", final="layernorm", head="lm_head")),
    "qwen2": (_qwen2, dict(family="qwen2", block="model.layers.{}", heads=4, kv_heads=2, head_dim=8, causal=True,
                           norm="rmsnorm", placement="pre", position="rope", final="rmsnorm", head="lm_head")),
    "opt": (_opt, dict(family="opt", block="model.decoder.layers.{}", heads=4, kv_heads=4, head_dim=8, causal=True,
                       norm="layernorm", placement="pre", position="learned", final="layernorm", head="lm_head")),
    # T5's relative position bias is neither learned-absolute nor RoPE: "none" of the three
    "t5_encoder": (_t5_encoder, dict(family="t5", block="encoder.block.{}", heads=4, kv_heads=4, head_dim=8, causal=False,
                                     norm="rmsnorm", placement="pre", position="none", final="rmsnorm", head=None)),
}


@pytest.mark.parametrize("name", list(UNSEEN))
def test_unseen_families_map(name):
    build, expected = UNSEEN[name]
    torch.manual_seed(0)
    s = tokenfx.capture(build(), token_inputs(2, 7)).structure
    assert_map(s, num_blocks=2, core="sdpa", **expected)


def test_gpt2_single_head_kv_heads():
    from models import gpt2

    s = tokenfx.capture(gpt2(1, heads=1, head_dim=4), token_inputs(2, 5)).structure
    attn = s.blocks[0].attention[0]
    assert (attn.heads, attn.kv_heads, attn.head_dim) == (1, 1, 4)
