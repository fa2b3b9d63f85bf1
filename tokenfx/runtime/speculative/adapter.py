"""Kangaroo's exit adapter: one decoder layer + norm after block ``E``, distilled from the full
model, then the model's own LM head — a better early exit than the bare head (higher
acceptance at the same depth).

::

    adapter = train_adapter(model, layer=2, data=ids, steps=300)        # only the adapter learns
    adapter.save("tiny-code-exit2.safetensors")
    gen.generate(ids, max_new_tokens=64, speculate=AdapterDraft(adapter))   # or "adapter:<file>"

The adapter is a copy of the model's own block class (initialised from block ``E``'s
weights) and a copy of its final norm; the draft model is a *view* of the target: blocks
``< E`` and the head are the target's own tensors (nothing copied), block ``E`` is the
adapter's. Training minimises ``KL(p_full || p_draft)`` over every position of the given
token sequences, the target frozen. The draft runs as a draft model
(:class:`~tokenfx.runtime.speculative.drafters.DraftModel`: its own graphs and cache, a chain
by default) and is verified by the target, so the output stays the target's.

An adapter records which model it was trained for (a digest of the target's config and
weights); using it with another model is refused.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from tokenfx.errors import GenerationError
from tokenfx.runtime.speculative.drafters import DraftModel


class ExitAdapter(torch.nn.Module):
    """Block + norm after ``layer`` blocks of the model with ``target`` digest."""

    def __init__(self, block: torch.nn.Module, norm: torch.nn.Module, layer: int, target: str):
        super().__init__()
        self.block, self.norm, self.layer, self.target = block, norm, int(layer), target

    def save(self, path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"layer": str(self.layer), "target": self.target})

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
        adapter.load_state_dict(tensors)
        return adapter


def target_digest(model: torch.nn.Module) -> str:
    """What an adapter is trained for: the model's config and weights."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update((config.to_json_string() if hasattr(config, "to_json_string") else repr(config)).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:16]


def check(adapter: ExitAdapter, model, where: str = "the adapter") -> None:
    if adapter.target != target_digest(model):
        raise GenerationError(f"exit adapter {where} was trained for another model (digest {adapter.target}, this "
                              f"model {target_digest(model)}); train one for it with train_adapter")


def draft_view(model, adapter: ExitAdapter):
    """The draft model: the target's blocks ``< layer`` and head, the adapter's block and norm."""
    inner, blocks = _blocks(model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = adapter.layer + 1
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:adapter.layer + 1]
    owner = copy.copy(inner)
    owner._modules = dict(inner._modules)  # the view's own module table: the target keeps its blocks and norm
    owner.layers = torch.nn.ModuleList(list(blocks)[:adapter.layer] + [adapter.block])
    owner.norm = adapter.norm
    owner.config = config
    view = copy.copy(model)
    view._modules = {name: (owner if child is inner else child) for name, child in model._modules.items()}
    view.config = config
    return view


def train_adapter(model, layer: int, data, *, steps: int = 200, lr: float = 1e-3, batch: int = 8,
                  seed: int = 0, progress: bool = True) -> ExitAdapter:
    """Distil an exit adapter after ``layer`` blocks of ``model`` (an HF Llama-style causal LM
    whose decoder has ``layers`` and ``norm``) on ``data``: token ids ``[num, N]``. Only the
    adapter's weights change; returns the trained :class:`ExitAdapter`."""
    _, blocks = _blocks(model)
    if not isinstance(layer, int) or not 1 <= layer < len(blocks):
        raise GenerationError(f"train_adapter: layer must be in 1 … {len(blocks) - 1}, got {layer!r}")
    data = torch.as_tensor(data).long()
    if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] < 2:
        raise GenerationError(f"train_adapter: data must be token ids [num, tokens >= 2], got {tuple(data.shape)}")
    adapter = _fresh(model, layer)
    view = draft_view(model, adapter)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(adapter.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task(f"training the exit adapter after block {layer - 1}", total=steps)
            for _ in range(steps):
                ids = data[torch.randint(0, data.shape[0], (min(batch, data.shape[0]),), generator=g)]
                loss = adapter_kl(model, view, ids)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.advance(task)
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
        for p in params:
            p.requires_grad_(False)
        model.train(was_training)
    return adapter


def adapter_kl(model, view, ids: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(p_full || p_draft)`` per position of ``ids [B, N]``."""
    with torch.no_grad():
        teacher = model(ids).logits.float().log_softmax(-1)
    student = view(ids).logits.float().log_softmax(-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none").sum(-1).mean()


class AdapterDraft(DraftModel):
    """Drafts with the target's first blocks + a trained :class:`ExitAdapter` (Kangaroo), as a
    draft model (chain of ``length`` by default, or ``mode="tree"`` / ``"dynamic"``)."""

    def __init__(self, adapter, **options):
        super().__init__(None, **options)
        self.adapter = adapter
        self.name = "adapter"

    def prepare(self, generator) -> None:
        if self.gen is None:
            source = generator._source
            if not isinstance(source, torch.nn.Module):
                raise GenerationError("an exit adapter drafts from the target's own blocks: the Generator needs the "
                                      "model object, not a captured graph")
            if not isinstance(self.adapter, ExitAdapter):
                self.adapter = ExitAdapter.load(self.adapter, source)
            check(self.adapter, source)
            self.model = draft_view(source, self.adapter)
            self.name = f"adapter:{self.adapter.layer}"
        super().prepare(generator)


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
