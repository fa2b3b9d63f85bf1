"""Hugging Face models as plain-tensor modules that ``torch.export`` captures at every shape.

Measured pitfall (DESIGN.md): a wrapper whose ``forward`` takes ``**kwargs`` exports, but its
module fails at a new shape; a wrapper with explicit positional tensor arguments works. So
:func:`wrap` builds a wrapper class whose ``forward`` names exactly the example's inputs.
"""

from __future__ import annotations

import keyword

import torch


def is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional
        return False
    return isinstance(model, PreTrainedModel)


def plain_output(output):
    """The tensor a user means: logits, else last hidden state, else the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a tensor output in {type(output).__name__}")


class _HFWrapperBase(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self._extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

    def _call(self, **inputs):
        inputs = {k: v for k, v in inputs.items() if v is not None}
        return plain_output(self.model(**inputs, **self._extra, return_dict=True))


def wrap(model, input_names: list[str]) -> torch.nn.Module:
    """``model`` (an HF ``PreTrainedModel``) as a module with ``forward(<input_names>)``."""
    for name in input_names:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"input name {name!r} is not a Python identifier")
    params = ", ".join(input_names)
    call = ", ".join(f"{n}={n}" for n in input_names)
    namespace: dict = {}
    exec(f"def forward(self, {params}):\n    return self._call({call})\n", namespace)  # noqa: S102
    cls = type(f"{type(model).__name__}Plain", (_HFWrapperBase,), {"forward": namespace["forward"]})
    return cls(model)


class SentenceEmbedder(torch.nn.Module):
    """A Hugging Face encoder + masked mean pooling (sentence-transformers' default), as one
    module: ``forward(input_ids, attention_mask) → [B, C]`` (L2-normalised when ``normalize``).

    Capturing the pooling with the encoder lets token-reduction passes keep it exact: a merged
    token stands for ``size`` tokens, so the pass turns the mean into a size-weighted mean.
    """

    def __init__(self, model, normalize: bool = True):
        super().__init__()
        self.model = model
        self.config = model.config
        self.normalize = normalize
        self.train(model.training)

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled
