"""tokenfx: compile transformers for fewer FLOPs per token.

Public API::

    g  = tokenfx.capture(model, example_inputs)      # tuple of tensors, or dict of keyword tensors
    g2 = tokenfx.optimize(g, "fuse_norm")            # pipeline string or list of Pass objects
    y  = g2.module()(**example_inputs)               # the captured calling convention
    tokenfx.export_onnx(g2, "m.onnx")
    g.structure                                      # the recovered ModelMap
    tokenfx.load("tokenfx:minilm")                   # HF dir, .pt2, .onnx, bundled name, module:factory
    tokenfx.generate("tokenfx:smollm2", ids, max_new_tokens=32)     # KV-cached decoding, HF semantics, compiled
    tokenfx.load_tokenizer("tokenfx:smollm2")                      # its tokenizer (left padding, chat template)
    tokenfx.diffuse("tokenfx:tiny-code-dllm", ids, gen_length=64, block_length=32)  # masked-diffusion LMs
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["capture", "optimize", "export_onnx", "load", "load_tokenizer", "generate", "Generator", "diffuse", "assets",
           "ModelGraph", "__version__"]


def optimize(model_or_graph, pipeline, *, example_inputs=None, verify: bool = False):
    """Run ``pipeline`` on a ModelGraph, or on an ``nn.Module`` captured first with
    ``example_inputs``; returns the rewritten ModelGraph (the input is never changed). The
    capture lives here, at the entry, so ``passes`` never imports ``frontends``."""
    from tokenfx.ir.graph import ModelGraph
    from tokenfx.passes.base import optimize as run_pipeline

    graph = model_or_graph
    if not isinstance(graph, ModelGraph):
        if example_inputs is None:
            from tokenfx.errors import PassOptionError

            raise PassOptionError("optimize(model, ...) needs example_inputs= to capture the model first")
        from tokenfx.frontends.torch_export import capture

        graph = capture(model_or_graph, example_inputs)
    return run_pipeline(graph, pipeline, verify=verify)


def __getattr__(name):  # keep ``import tokenfx`` fast: torch-heavy modules load on first use
    if name == "capture":
        from tokenfx.frontends.torch_export import capture

        return capture
    if name == "export_onnx":
        from tokenfx.frontends.onnx import export_onnx

        return export_onnx
    if name == "load":
        from tokenfx.frontends.load import load

        return load
    if name == "load_tokenizer":
        from tokenfx.frontends.load import load_tokenizer

        return load_tokenizer
    if name in ("generate", "Generator"):
        from tokenfx.runtime import generate as _generate

        return getattr(_generate, name)
    if name == "diffuse":
        from tokenfx.runtime.diffusion import diffuse

        return diffuse
    if name == "assets":
        import tokenfx.assets as assets

        return assets
    if name == "ModelGraph":
        from tokenfx.ir.graph import ModelGraph

        return ModelGraph
    raise AttributeError(f"module 'tokenfx' has no attribute {name!r}")
