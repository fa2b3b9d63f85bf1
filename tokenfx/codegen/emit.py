"""``tokenfx rewrite --emit-kernels DIR``: write the Triton source each op of a graph runs.

One standalone, readable file per distinct specialisation (op, hidden size, dtype, flags),
named after it, e.g. ``add_norm_rmsnorm_C512_float32_w_eps1e-06.py``.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import torch

from tokenfx.codegen.ops import spec_for_target
from tokenfx.errors import ExportError


def kernel_specialisations(gm: torch.fx.GraphModule) -> dict[str, tuple[str, dict]]:
    """``{file name: (triton module, emit_source kwargs)}`` for every tokenfx op node."""
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        spec = spec_for_target(node.target)
        if spec is None:
            continue
        if spec.name == "add_norm":
            x, _, weight, bias, eps, kind = node.args
            val = x.meta["val"]
            dtype = str(val.dtype).replace("torch.", "")
            kwargs = dict(C=int(val.shape[-1]), kind=kind, has_weight=weight is not None, has_bias=bias is not None,
                          dtype=dtype, eps=float(eps))
            flags = ("w" if weight is not None else "") + ("b" if bias is not None else "")
            name = f"add_norm_{kind}_C{kwargs['C']}_{dtype}{'_' + flags if flags else ''}_eps{eps:g}.py"
            out[name] = (spec.triton_module, kwargs)
        elif spec.name == "tree_attention":
            q, k = node.args[0].meta["val"], node.args[1].meta["val"]
            dtype = str(q.dtype).replace("torch.", "")
            tokens = q.shape[2]
            tree_size = int(tokens) if isinstance(tokens, int) else None  # a symbolic T gets the default blocks
            kwargs = dict(head_dim=int(q.shape[-1]), dtype=dtype, group=int(q.shape[1]) // int(k.shape[1]),
                          tree_size=tree_size)
            tree = f"_T{tree_size}" if tree_size is not None else ""
            name = f"tree_attention_D{kwargs['head_dim']}_G{kwargs['group']}{tree}_{dtype}.py"
            out[name] = (spec.triton_module, kwargs)
        elif spec.name in ("bipartite_match", "merge_tokens"):
            val = node.args[0].meta["val"]
            dtype = str(val.dtype).replace("torch.", "")
            kwargs = dict(op=spec.name, dtype=dtype, channels=int(val.shape[-1]))
            out[f"{spec.name}_C{kwargs['channels']}_{dtype}.py"] = (spec.triton_module, kwargs)
        elif spec.name == "attention_pagerank":
            dtype = str(node.args[0].meta["val"].dtype).replace("torch.", "")
            iterations, cls_weight = int(node.args[2]), bool(node.args[3])
            kwargs = dict(op=spec.name, dtype=dtype, iterations=iterations, cls_weight=cls_weight)
            out[f"attention_pagerank_it{iterations}{'_cls' if cls_weight else ''}_{dtype}.py"] = (spec.triton_module, kwargs)
    return out


def kernel_sources(gm: torch.fx.GraphModule) -> dict[str, str]:
    """``{file name: standalone Triton source}`` for every tokenfx op node of ``gm``."""
    return {name: importlib.import_module(module).emit_source(**kwargs)
            for name, (module, kwargs) in sorted(kernel_specialisations(gm).items())}


def write_kernels(sources: dict[str, str], directory) -> list[Path]:
    """Write ``sources`` into ``directory`` (created if missing), each file atomically."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"--emit-kernels: {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, source in sources.items():
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        with os.fdopen(fd, "w") as handle:
            handle.write(source)
        os.replace(tmp, directory / name)
        written.append(directory / name)
    return written


def emit_kernels(gm: torch.fx.GraphModule, directory) -> list[Path]:
    return write_kernels(kernel_sources(gm), directory)
