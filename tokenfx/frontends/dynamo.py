"""The ``tokenfx`` torch.compile backend.

    torch.compile(model, backend="tokenfx", options={"passes": "fuse_norm", "inner": "inductor"})

Stages, in order:

1. Dynamo hands over the model's FX graph (registered via the ``torch_dynamo_backends``
   entry point, so the name works after ``pip install``);
2. AOTAutograd lowers it to an ATen forward graph (parameters become inputs; LayerNorm is
   kept whole so norms and SDPA stay recognisable; backward graphs are left alone);
3. the graph is wrapped as a :class:`ModelGraph` (``source="aot"``) and the pipeline runs,
   the ModelMap normalising ``L['self'].model.layers.0`` style module paths;
4. the rewritten graph goes to Inductor (``inner="inductor"``, the default) or runs as it
   is (``inner="eager"``). Inductor calls each tokenfx op's Triton kernel on CUDA; on CPU
   the ops' plain-torch references are inlined so Inductor fuses them into its own kernels.

Dynamo's automatic dynamic shapes mark the token dim dynamic at the first new length, so
a model compiles at most twice, not once per sequence length.
"""

from __future__ import annotations

import dataclasses

import torch

from tokenfx.errors import PassOptionError

INNERS = ("inductor", "eager")


@dataclasses.dataclass
class BackendOptions:
    passes: object = "fuse_norm"  # pipeline string or list of Pass objects
    inner: str = "inductor"
    on_error: str = "raise"  # "raise" | "fallback" (run the graph unrewritten, keep going)


# compile statistics, for users and tests: how many graphs the backend compiled, what matched
COMPILE_LOG: list[dict] = []


def _options(options: dict | None) -> BackendOptions:
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(BackendOptions)}
    unknown = set(options) - known
    if unknown:
        raise PassOptionError(f"tokenfx backend: unknown option(s) {sorted(unknown)}; valid options: {sorted(known)}")
    opts = BackendOptions(**options)
    if opts.inner not in INNERS:
        raise PassOptionError(f"tokenfx backend: inner must be one of {INNERS}, got {opts.inner!r}")
    if opts.on_error not in ("raise", "fallback"):
        raise PassOptionError(f"tokenfx backend: on_error must be 'raise' or 'fallback', got {opts.on_error!r}")
    return opts


def tokenfx_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    opts = _options({**(options or {}), **kwargs})
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from tokenfx.ir.graph import ModelGraph
    from tokenfx.passes.base import PassManager

    def rewrite(fx_gm: torch.fx.GraphModule, inputs) -> torch.fx.GraphModule:
        graph = ModelGraph(fx_gm, tuple(inputs), source="aot", family=type(gm).__name__)
        entry = {"inputs": len(inputs), "passes": [], "error": None}
        COMPILE_LOG.append(entry)
        try:
            report = PassManager(opts.passes).run(graph)
        except Exception as exc:
            if opts.on_error != "fallback":
                raise
            entry["error"] = f"{type(exc).__name__}: {exc}"
            return fx_gm
        entry["passes"] = [{"name": p.name, "matched": p.matched, "refused": p.refused} for p in report.passes]
        return report.graph.gm

    if opts.inner == "eager":
        def forward_compiler(fx_gm, inputs):
            return make_boxed_func(rewrite(fx_gm, inputs).forward)

        def backward_compiler(fx_gm, inputs):  # gradients: no transformer structure to rewrite
            return make_boxed_func(fx_gm.forward)

        return aot_autograd(fw_compiler=forward_compiler, inference_compiler=forward_compiler,
                            bw_compiler=backward_compiler)(gm, example_inputs)

    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    from tokenfx.codegen.ops import inline_references

    # Inductor's own AOT step, minus the decompositions that would hide the patterns passes
    # match (a decomposed LayerNorm is a dozen pointwise ops); norms that no pass rewrote
    # then run as ATen kernels.
    table = {op: fn for op, fn in select_decomp_table().items() if op not in _KEEP_FOR_PASSES}

    def inner_compile(fx_gm, inputs, **kwargs):
        if kwargs.get("is_backward"):  # gradients: no transformer structure to rewrite
            return compile_fx_inner(fx_gm, inputs, **kwargs)
        rewritten = rewrite(fx_gm, inputs)
        if not any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in inputs):
            # no Triton on this device: let Inductor fuse the ops' references itself
            rewritten = inline_references(rewritten, inputs)
        return compile_fx_inner(rewritten, inputs, **kwargs)

    # AOTAutograd's cache keys on the Dynamo graph, not on inner_compile: a plain-Inductor
    # entry for the same model would be returned and the passes silently skipped.
    import torch._functorch.config as functorch_config

    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, inner_compile=inner_compile, decompositions=table)


_KEEP_FOR_PASSES = {torch.ops.aten.native_layer_norm.default}
