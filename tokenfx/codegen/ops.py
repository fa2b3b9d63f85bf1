"""Registry of the ``tokenfx::*`` custom ops that passes insert.

Usage::

    from tokenfx.codegen.ops import registered_ops, onnx_translation_table
    registered_ops()["add_norm"].op          # torch.ops.tokenfx.add_norm.default
    torch.onnx.export(..., custom_translation_table=onnx_translation_table())

Each op module (``codegen/add_norm.py`` ...) defines its op with ``torch.library.custom_op``
(fake + CPU + CUDA kernels) and calls :func:`register_op` at import; the onnxscript
translation is registered beside it. Importing :mod:`tokenfx.codegen` loads them all.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    op: object  # torch OpOverload
    reference: Callable
    triton_module: str  # module with the kernel, ``add_norm_triton`` launcher and ``emit_source``


_OPS: dict[str, OpSpec] = {}
_OP_MODULES = ("tokenfx.codegen.add_norm",)


def register_op(name: str, *, op, reference: Callable, triton_module: str) -> None:
    _OPS[name] = OpSpec(name, op, reference, triton_module)


def registered_ops() -> dict[str, OpSpec]:
    for module in _OP_MODULES:
        importlib.import_module(module)
    return dict(_OPS)


def spec_for_target(target) -> OpSpec | None:
    """The OpSpec whose OpOverload is ``target`` (an FX node target), else None."""
    for spec in registered_ops().values():
        if spec.op is target:
            return spec
    return None


def onnx_translation_table() -> dict:
    """``{OpOverload: onnxscript function}`` for ``torch.onnx.export(custom_translation_table=)``."""
    registered_ops()
    from tokenfx.codegen.onnx_add_norm import translate

    import torch

    return {torch.ops.tokenfx.add_norm.default: translate}
