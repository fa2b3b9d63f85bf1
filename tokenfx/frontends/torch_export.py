"""``capture``: an ``nn.Module`` and example inputs → :class:`ModelGraph` via ``torch.export``.

Non-strict export with a dynamic batch dim ``B`` (dim 0 of every input) and a dynamic token
dim ``N`` (dim 1 of token-shaped inputs); Hugging Face models are wrapped so their outputs
are plain tensors. The exported program is unlifted (``ep.module()``): parameters appear as
``get_attr`` nodes and the module keeps the model's calling convention.
"""

from __future__ import annotations

import torch

from tokenfx.errors import CaptureError
from tokenfx.frontends import hf
from tokenfx.ir.graph import ModelGraph, max_tokens
from tokenfx.ir.rewrite import remove_identity_ops

# Image inputs have a batch dim only; everything else of rank >= 2 also has a token dim.
_BATCH_ONLY = {"pixel_values", "pixel_mask", "image", "images"}


def capture(model: torch.nn.Module, example_inputs, *, dynamic: bool = True, dynamic_shapes=None) -> ModelGraph:
    """Capture ``model`` at ATen level.

    ``example_inputs`` is a tuple of tensors (positional) or a dict of keyword tensors
    (Hugging Face style). With ``dynamic=True`` the batch and token dims are symbolic, so the
    graph runs at any batch size and length the model allows. Pass ``dynamic_shapes`` to
    override the inferred spec (``torch.export`` syntax).
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise CaptureError(f"example_inputs must be a tuple of tensors or a dict of tensors, got {type(example_inputs).__name__}")
    for name, value in list(enumerate(args)) + list(kwargs.items()):
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"example input {name!r} is a {type(value).__name__}, not a tensor")

    family, config = type(model).__name__, None
    module = model
    if hf.is_hf_model(model):
        config = model.config
        family = getattr(config, "model_type", family) or family
        if args:  # positional HF inputs: name them by the model's forward signature
            import inspect

            names = [p for p in inspect.signature(model.forward).parameters][: len(args)]
            kwargs, args = dict(zip(names, args)), ()
        module = hf.wrap(model, list(kwargs))
    elif (inner := _inner_hf_model(model)) is not None:  # a user's wrapper around one, under any attribute
        config = inner.config
        family = getattr(config, "model_type", family) or family
    was_training = model.training
    module.eval()

    inferred = dynamic_shapes is None and dynamic
    if inferred:
        dynamic_shapes = _default_dynamic_shapes(args, kwargs, max_tokens(config) if config is not None else None)
    try:
        with torch.no_grad():
            try:
                ep = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            except Exception as exc:
                if not (inferred and _constraint_violation(exc)):
                    raise
                # the model narrows a dim our spec left open (a position table, a guard on N): let
                # export derive the ranges itself (Dim.AUTO) rather than guess them
                ep = torch.export.export(module, args, kwargs, dynamic_shapes=_auto(dynamic_shapes), strict=False)
    except Exception as exc:  # torch raises many types (and the wrapper TypeError); the user needs the first line
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {_explain(exc)}") from exc
    finally:
        model.train(was_training)
    gm = ep.module()
    remove_identity_ops(gm)
    return ModelGraph(gm, args, kwargs, dynamic_shapes, family=family, config=config, source="export")


def _inner_hf_model(model: torch.nn.Module):
    """The first Hugging Face model inside ``model`` (a pooling / head wrapper), else None."""
    return next((m for m in model.modules() if m is not model and hf.is_hf_model(m)), None)


def _constraint_violation(exc: Exception) -> bool:
    return "Constraints violated" in str(exc) or type(exc).__name__ in ("ConstraintViolationError", "UserError")


def _auto(dynamic_shapes):
    """The same spec with every named dim replaced by ``Dim.AUTO`` (export infers ranges and relations)."""
    def one(spec):
        return None if spec is None else {axis: torch.export.Dim.AUTO for axis in spec}

    if isinstance(dynamic_shapes, dict):
        return {name: one(spec) for name, spec in dynamic_shapes.items()}
    return tuple(one(spec) for spec in dynamic_shapes)


def _explain(exc: Exception) -> str:
    """The first line of an export error, plus which dim broke and the fix torch suggests."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0]
    if _constraint_violation(exc):
        guards = [line for line in lines if "must be specialized" in line or "not in range" in line
                  or line.startswith("- ") or "Not all values of" in line]
        fixes = [line for line in lines if "= Dim(" in line or "Dim.AUTO" in line or "dynamic_shapes" in line.lower()]
        if guards:
            message += " — " + "; ".join(guards[:3])
        if fixes:
            message += " — suggested fix: " + "; ".join(fixes[:3])
        message += (" (the model limits a batch or token dim: pass capture(..., dynamic_shapes=...) with that range, "
                    "or dynamic=False for fixed shapes)")
    return message


def _default_dynamic_shapes(args, kwargs, max_tokens):
    batch = torch.export.Dim("batch", min=1, max=4096)
    tokens = torch.export.Dim("tokens", min=1, max=max_tokens) if max_tokens else torch.export.Dim("tokens", min=1)
    all_inputs = list(args) + list(kwargs.values())
    batch_size = all_inputs[0].shape[0] if all_inputs and all_inputs[0].dim() else None
    token_len = None
    for name, value in list(kwargs.items()) + [(None, a) for a in args]:
        if name not in _BATCH_ONLY and 2 <= value.dim() <= 3:
            token_len = value.shape[1]
            break

    def spec(name, value):
        dims = {}
        if value.dim() >= 1 and value.shape[0] == batch_size and batch_size is not None and batch_size > 1:
            dims[0] = batch
        if name not in _BATCH_ONLY and 2 <= value.dim() <= 3 and value.shape[1] == token_len and token_len > 1:
            dims[1] = tokens
        return dims or None

    if batch_size == 1 or token_len == 1:
        # torch.export specialises size-1 dims; the user must give examples of size >= 2
        raise CaptureError(
            "example inputs need batch >= 2 and tokens >= 2 for a dynamic capture "
            f"(got batch {batch_size}, tokens {token_len}); pass dynamic=False to capture fixed shapes"
        )
    if kwargs:
        return {name: spec(name, value) for name, value in kwargs.items()}
    return tuple(spec(None, value) for value in args)
