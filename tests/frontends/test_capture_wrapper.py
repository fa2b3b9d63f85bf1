"""A user's own module around a Hugging Face model captures, whatever attribute holds it."""

from __future__ import annotations

import torch

import models
import tokenfx


class Pooled(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.m = encoder  # not ``model``: the config is found anywhere in the module tree

    def forward(self, input_ids, attention_mask):
        hidden = self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weight = attention_mask[..., None].to(hidden.dtype)
        return (hidden * weight).sum(1) / weight.sum(1)


def test_wrapper_under_any_attribute_captures_and_runs_at_new_shapes():
    encoder = models.bert(layers=2)
    wrapper = Pooled(encoder).eval()
    ids = torch.randint(0, models.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    graph = tokenfx.capture(wrapper, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert graph.family == "bert" and len(graph.structure.blocks) == 2
    longer = torch.randint(0, models.VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(longer)
    mask[0, 30:] = 0
    with torch.no_grad():
        torch.testing.assert_close(graph.module()(input_ids=longer, attention_mask=mask), wrapper(longer, mask))
