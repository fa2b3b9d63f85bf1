"""Kangaroo's exit adapter: one decoder layer + norm after block ``E``, distilled from the full
model, then the model's own LM head — a far better early exit than the bare head on a model
trained without an early-exit loss (SmolLM2's bare exits never agree often enough to draft).

::

    adapter = train_adapter(model, layer=6, data=ids, steps=300, vocab=frequent_tokens(ids, 8192, V))
    adapter.save("exit6.safetensors")
    gen.generate(ids, max_new_tokens=64, speculate="adapter:exit6.safetensors")   # or "self:adapter"

The adapter is a copy of the model's own block class (initialised from block ``E``'s
weights) and a copy of its final norm. It runs *inside* self-speculation
(:class:`~tokenfx.runtime.speculative.self_spec.SelfSpeculation`, LayerSkip's path): blocks
``< E`` are the target's own pieces writing the target's own cache, the adapter's one layer
keeps its K/V beside it (:class:`InlineAdapter`), and verification runs blocks ``>= E`` from
the residual stream drafting computed, so the output stays the target's. Its head may cover a
frequency-ranked subset of the vocabulary only (FR-Spec, :func:`frequent_tokens`): drafting
computes ``k`` logits instead of ``V``; verification keeps the full head, so it stays
lossless. Training minimises ``KL(p_full || p_adapter)`` over the head's vocabulary at every
position of the given token sequences, the target frozen (``tools/train_exit_adapter.py``
does it for a model and stores the result where ``"self:adapter"`` finds it).

An adapter records which model it was trained for (a digest of the target's config and
weights); using it with another model is refused.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from tokenfx.errors import GenerationError


class ExitAdapter(torch.nn.Module):
    """Block + norm after ``layer`` blocks of the model with ``target`` digest. ``vocab``: the
    token ids its head drafts from (FR-Spec's frequency-ranked subset; None: every token);
    ``agreement``: how often its top token matched the full model's on held-out text (a prior
    for DEL's acceptance estimate; None when not measured)."""

    def __init__(self, block: torch.nn.Module, norm: torch.nn.Module, layer: int, target: str,
                 vocab: torch.Tensor | None = None, agreement: float | None = None):
        super().__init__()
        self.block, self.norm, self.layer, self.target = block, norm, int(layer), target
        self.vocab = None if vocab is None else torch.as_tensor(vocab, dtype=torch.long)
        self.agreement = agreement

    def save(self, path, dtype: torch.dtype | None = None) -> None:
        """Write the adapter to ``path`` (safetensors; weights in ``dtype``, default their own), atomically."""
        import os

        from safetensors.torch import save_file

        tensors = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        if self.vocab is not None:
            tensors["vocab"] = self.vocab.contiguous()
        meta = {"layer": str(self.layer), "target": self.target}
        if self.agreement is not None:
            meta["agreement"] = f"{self.agreement:.4f}"
        tmp = f"{path}.tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, str(path))

    @classmethod
    def load(cls, path, model) -> "ExitAdapter":
        """The adapter stored at ``path`` for ``model`` (refused when trained for another model)."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (OSError, ValueError, SafetensorError) as exc:
            raise GenerationError(f"exit adapter {path}: cannot read it ({exc})") from exc
        if "layer" not in meta or "target" not in meta:
            raise GenerationError(f"exit adapter {path}: not an exit adapter file (no layer / target metadata)")
        adapter = _fresh(model, int(meta["layer"]))
        adapter.target = meta["target"]
        check(adapter, model, str(path))
        vocab = tensors.pop("vocab", None)
        if vocab is not None and (vocab.dim() != 1 or vocab.numel() == 0 or int(vocab.min()) < 0
                                  or int(vocab.max()) >= model.get_output_embeddings().weight.shape[0]):
            raise GenerationError(f"exit adapter {path}: its vocabulary subset is not token ids of this model")
        dtype = next(adapter.parameters()).dtype
        adapter.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
        adapter.vocab = vocab
        adapter.agreement = float(meta["agreement"]) if "agreement" in meta else None
        return adapter


def target_digest(model: torch.nn.Module) -> str:
    """What an adapter is trained for: the model's type and its weights (names, shapes and the
    first 4096 values of each) — not the config's other fields, which vary with where and by
    which transformers version the model was loaded."""
    h = hashlib.sha256()
    h.update(str(getattr(getattr(model, "config", None), "model_type", type(model).__name__)).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(p.detach().float().contiguous().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:16]


def check(adapter: ExitAdapter, model, where: str = "the adapter") -> None:
    if adapter.target != target_digest(model):
        raise GenerationError(f"exit adapter {where} was trained for another model (digest {adapter.target}, this "
                              f"model {target_digest(model)}); train one for it with train_adapter")


def train_adapter(model, layer: int, data, *, steps: int = 200, lr: float = 1e-3, batch: int = 8, seed: int = 0,
                  vocab: torch.Tensor | None = None, progress: bool = True) -> ExitAdapter:
    """Distil an exit adapter after ``layer`` blocks of ``model`` (an HF Llama-style causal LM
    whose decoder has ``layers`` and ``norm``) on ``data``: token ids ``[num, N]``. ``vocab``:
    FR-Spec's subset of token ids for the adapter's head (:func:`frequent_tokens`; None: all).
    Only the adapter's weights change; returns the trained :class:`ExitAdapter`.

    The frozen parts are computed once: the residual stream after block ``layer - 1`` (the
    adapter's input) and the full model's final hidden state (its teacher). Each step then
    runs the adapter as decoding runs it (:class:`InlineAdapter`) and minimises
    ``KL(p_full || p_adapter)`` over the head's vocabulary, at every position."""
    _, blocks = _blocks(model)
    if not isinstance(layer, int) or not 1 <= layer < len(blocks):
        raise GenerationError(f"train_adapter: layer must be in 1 … {len(blocks) - 1}, got {layer!r}")
    data = torch.as_tensor(data).long()
    if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] < 2:
        raise GenerationError(f"train_adapter: data must be token ids [num, tokens >= 2], got {tuple(data.shape)}")
    adapter = _fresh(model, layer)
    adapter.vocab = None if vocab is None else torch.as_tensor(vocab, dtype=torch.long)
    inline = InlineAdapter(adapter, model)
    hidden, final = features(model, layer, data)
    params = list(adapter.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    try:
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"training the exit adapter after block {layer - 1}", total=steps)
            for _ in range(steps):
                rows = torch.randint(0, data.shape[0], (min(batch, data.shape[0]),), generator=g)
                loss = _kl(inline, hidden[rows], final[rows])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.advance(task)
    finally:
        for p in params:
            p.requires_grad_(False)
    return adapter


@torch.no_grad()
def features(model, layer: int, ids: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h [num, N, C], final [num, N, C])``: the residual stream after block ``layer - 1`` and the
    full model's final-norm output, for token ids ``[num, N]`` (no grad, ``chunk`` rows a call)."""
    inner, _ = _blocks(model)
    seen = []
    hook = inner.norm.register_forward_hook(lambda mod, args, out: seen.append(out))
    was_training = model.training
    model.eval()
    try:
        hidden, final = [], []
        for rows in ids.split(chunk):
            seen.clear()
            out = model(rows, output_hidden_states=True)
            hidden.append(out.hidden_states[layer].float())
            final.append(seen[-1].float())
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(hidden), torch.cat(final)


def _over_sequences(inline: "InlineAdapter", hidden: torch.Tensor) -> torch.Tensor:
    """The adapter block over whole sequences ``hidden [B, N, C]`` (causal, positions 0 … N - 1)."""
    b, t, _ = hidden.shape
    mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t)
    return inline.step(hidden, torch.arange(t).expand(b, t), inline.new_cache(b, t), mask, torch.arange(t))


def _kl(inline: "InlineAdapter", hidden: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    student = inline.logits(_over_sequences(inline, hidden)).float().log_softmax(-1)
    with torch.no_grad():
        teacher = torch.nn.functional.linear(final, inline.head_weight).float().log_softmax(-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()


@torch.no_grad()
def adapter_kl(model, adapter: ExitAdapter, ids: torch.Tensor) -> float:
    """Mean ``KL(p_full || p_adapter)`` per position of ``ids [B, N]`` (over the adapter's vocabulary)."""
    hidden, final = features(model, adapter.layer, ids)
    return float(_kl(InlineAdapter(adapter, model), hidden, final))


@torch.no_grad()
def agreement(model, adapter: ExitAdapter, ids: torch.Tensor) -> float:
    """How often the adapter's top token equals the full model's, over every position of ``ids``."""
    inline = InlineAdapter(adapter, model)
    hidden, final = features(model, adapter.layer, ids)
    draft = inline.to_vocab(inline.logits(_over_sequences(inline, hidden)).argmax(-1))
    full = torch.nn.functional.linear(final, model.get_output_embeddings().weight).argmax(-1)
    return float((draft == full).float().mean())


def frequent_tokens(ids: torch.Tensor, k: int, vocab_size: int) -> torch.Tensor:
    """FR-Spec's draft vocabulary: the ``k`` most frequent token ids of ``ids`` (ties: lower id),
    sorted by id."""
    counts = torch.bincount(torch.as_tensor(ids).flatten().long(), minlength=vocab_size)[:vocab_size].float()
    counts -= torch.arange(vocab_size) * 1e-9  # a stable order among equal counts
    return counts.topk(min(k, vocab_size)).indices.sort().values


class InlineAdapter:
    """An :class:`ExitAdapter` run inside the target's self-speculation (LayerSkip path): it takes
    the residual stream after block ``layer - 1`` (what the target's own pieces computed while
    drafting), keeps its one layer's K/V in a cache of its own laid out like the target's (same
    slots, same masks), and gives logits over the adapter's vocabulary (FR-Spec: its ``vocab``
    ids only; all of them when it has none).

    The block's norms, projections and MLP are the adapter's own HF modules; only attention
    (over the cache) is written here, for Llama-style blocks (``self_attn.{q,k,v,o}_proj``,
    ``mlp``, ``input_layernorm``, ``post_attention_layernorm``)."""

    def __init__(self, adapter: ExitAdapter, model):
        inner, _ = _blocks(model)
        block, attn = adapter.block, getattr(adapter.block, "self_attn", None)
        parts = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or not all(hasattr(attn, n) for n in parts) or not all(
                hasattr(block, n) for n in ("mlp", "input_layernorm", "post_attention_layernorm")) \
                or not hasattr(inner, "rotary_emb") or getattr(model.config, "sliding_window", None):
            raise GenerationError(f"an exit adapter runs inside self-speculation for Llama-style blocks (q/k/v/o "
                                  f"projections, an MLP, two RMSNorms, rotary positions, full attention); "
                                  f"{type(block).__name__} is not one")
        import sys

        self.adapter, self.layer = adapter, adapter.layer
        self.rotary = inner.rotary_emb
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.head_dim = int(attn.head_dim)
        self.kv_heads = attn.k_proj.out_features // self.head_dim
        self.scaling = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        weight = model.get_output_embeddings().weight.detach()
        self.vocab = adapter.vocab
        self.head_weight = weight if self.vocab is None else weight[self.vocab].contiguous()

    def new_cache(self, batch: int, slots: int, dtype=torch.float32) -> torch.Tensor:
        """``[1, 2, B, Hkv, S, D]``: the adapter layer's K/V, slot for slot like the target's cache."""
        return torch.zeros(1, 2, batch, self.kv_heads, slots, self.head_dim, dtype=dtype)

    def step(self, h: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, mask: torch.Tensor,
             slots: torch.Tensor) -> torch.Tensor:
        """``h [B, T, C]`` after block ``layer - 1`` at ``positions [B, T]`` → the adapter block's
        output; writes the tokens' K/V at ``slots [T]`` of ``cache``, then attends to the slots
        ``mask [B, T, S]`` allows."""
        block, attn = self.adapter.block, self.adapter.block.self_attn
        b, t, _ = h.shape
        x = block.input_layernorm(h)
        q = attn.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(h, positions)
        q, k = self.rope(q, k, cos, sin)
        cache[0, 0].index_copy_(2, slots, k.to(cache.dtype))
        cache[0, 1].index_copy_(2, slots, v.to(cache.dtype))
        o = torch.nn.functional.scaled_dot_product_attention(q, cache[0, 0].to(q.dtype), cache[0, 1].to(q.dtype),
                                                             attn_mask=mask[:, None], scale=self.scaling,
                                                             enable_gqa=True)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        return h + block.mlp(block.post_attention_layernorm(h))

    def logits(self, a: torch.Tensor) -> torch.Tensor:
        """``[B, T, k]``: the exit head over the adapter's vocabulary (``k = len(vocab)``)."""
        return torch.nn.functional.linear(self.adapter.norm(a), self.head_weight)

    def to_vocab(self, ids: torch.Tensor) -> torch.Tensor:
        """Subset indices → token ids."""
        return ids if self.vocab is None else self.vocab[ids]


def find_adapter(model) -> "Path | None":
    """The exit adapter trained for ``model``: ``<cache>/adapters/<digest>.safetensors`` (what
    ``tools/train_exit_adapter.py`` writes), else one shipped in ``tokenfx/assets/adapters``."""
    from pathlib import Path

    from tokenfx.cache import cache_dir

    digest = target_digest(model)
    for root in (cache_dir() / "adapters", Path(__file__).resolve().parents[2] / "assets" / "adapters"):
        path = root / f"{digest}.safetensors"
        if path.exists():
            return path
    return None


def _blocks(model):
    inner = next((m for m in model.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)
                  and isinstance(getattr(m, "norm", None), torch.nn.Module)), None)
    if inner is None or not hasattr(model, "config") or not any(c is inner for c in model._modules.values()):
        raise GenerationError(f"exit adapters need an HF decoder with `layers` and `norm` one level below the model; "
                              f"{type(model).__name__} has none")
    return inner, inner.layers


def _fresh(model, layer: int) -> ExitAdapter:
    inner, blocks = _blocks(model)
    block = copy.deepcopy(blocks[layer])  # the next block's weights: a good start for what the rest would add
    if hasattr(getattr(block, "self_attn", None), "layer_idx"):
        block.self_attn.layer_idx = layer
    norm = copy.deepcopy(inner.norm)
    for p in list(block.parameters()) + list(norm.parameters()):
        p.requires_grad_(False)
    return ExitAdapter(block, norm, layer, target_digest(model))
