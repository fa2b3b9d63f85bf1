"""The one check of a token batch every runtime entry point takes: ``input_ids [B, N]`` and a
left-padding ``attention_mask`` (ones where absent)."""

from __future__ import annotations

import torch

from tokenfx.errors import GenerationError


def left_padded(input_ids, attention_mask, *, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, N], mask [B, N] long)``; a 1-D input is one row. ``caller`` names the entry point in
    the error a right-padded mask gets (``tokenfx.generate``, ``diffusion``)."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
        raise GenerationError(f"input_ids must be a non-empty [batch, tokens] integer tensor, got shape {tuple(ids.shape)}")
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to(ids.device).long()
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise GenerationError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    if not bool((mask.sum(-1) > 0).all()):
        raise GenerationError("attention_mask: every row needs at least one real token")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise GenerationError(f"attention_mask has padding on the right; {caller} expects left padding "
                              "(tokenizer.padding_side = 'left')")
    return ids, mask
