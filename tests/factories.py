"""``package.module:factory`` targets for the load / CLI tests (``factories:...``)."""

from __future__ import annotations

import torch

import models


def tiny_bert():
    return models.bert()


def tiny_llama():
    return models.llama()


def encoder_with_inputs():
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return model, (torch.randn(2, 6, 32),)


def mlp_only():
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval(), (torch.randn(2, 3, 8),)


def not_a_model():
    return 42


def encoder_with_tensor_input():
    model, (x,) = encoder_with_inputs()
    return model, x
