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
    triton_module: str  # module with the kernel, its launcher and ``emit_source``
    onnx_translation: str  # "module:function" of the onnxscript translation


_OPS: dict[str, OpSpec] = {}
_OP_MODULES = ("tokenfx.codegen.add_norm", "tokenfx.codegen.tree_attention", "tokenfx.codegen.token_reduce",
               "tokenfx.codegen.allreduce_add_norm")


def register_op(name: str, *, op, reference: Callable, triton_module: str, onnx_translation: str) -> None:
    _OPS[name] = OpSpec(name, op, reference, triton_module, onnx_translation)


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
    table = {}
    for spec in registered_ops().values():
        module, _, function = spec.onnx_translation.partition(":")
        table[spec.op] = getattr(importlib.import_module(module), function)
    return table


def inline_references(gm, example_inputs):
    """Retrace ``gm`` with every tokenfx op replaced by its plain-torch reference.

    For Inductor on CPU: there is no Triton kernel to call, and an opaque op would cut
    Inductor's fusion, so the op's reference is inlined and Inductor fuses it into its own
    C++ kernel instead. ``example_inputs`` are the (fake, possibly symbolic) graph inputs.
    """
    from torch._guards import detect_fake_mode
    from torch.fx.experimental.proxy_tensor import make_fx

    specs = registered_ops().values()
    present = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    table = {spec.op: spec.reference for spec in specs if spec.op in present}
    if not table:
        return gm
    fake_mode = detect_fake_mode(example_inputs)
    import contextlib

    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        return make_fx(gm, decomposition_table=table)(*example_inputs)
