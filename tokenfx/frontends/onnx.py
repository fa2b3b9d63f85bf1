"""ONNX export of a (rewritten) ModelGraph, runnable in plain onnxruntime.

``export_onnx(graph, path)`` re-exports the graph with ``torch.export`` (same dynamic batch
and token dims as the capture), translates every ``tokenfx::*`` op into standard ONNX ops
through the onnxscript table in :mod:`tokenfx.codegen.ops`, checks the model with
``onnx.checker`` and writes the file atomically (a failed export leaves no file behind).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch

from tokenfx.errors import ExportError
from tokenfx.ir.graph import ModelGraph


def reexport(graph: ModelGraph) -> torch.export.ExportedProgram:
    """The graph as an ExportedProgram with the capture's dynamic dims."""
    if graph.source != "export":
        raise ExportError("only graphs captured with tokenfx.capture can be exported (this one came from torch.compile)")
    try:
        with torch.no_grad():
            return torch.export.export(graph.gm, graph.example_args, graph.example_kwargs,
                                       dynamic_shapes=graph.dynamic_shapes, strict=False)
    except Exception as exc:
        raise ExportError(f"re-exporting the rewritten graph failed: {str(exc).strip().splitlines()[0]}") from exc


def export_onnx(graph: ModelGraph, path, *, opset: int | None = None, check: bool = True) -> Path:
    """Write ``graph`` to ``path`` as ONNX with dynamic batch/token axes. Returns the path."""
    import onnx

    from tokenfx.codegen.ops import onnx_translation_table

    path = _checked_output(path, ".onnx", "ONNX output")
    from tokenfx.codegen.allreduce_add_norm import refuse_collectives

    refuse_collectives(graph.gm)  # a tensor-parallel graph: ONNX has no collectives, refused with that reason
    ep = reexport(graph)
    with _atomic(path) as tmp:
        kwargs = {"opset_version": opset} if opset else {}
        if graph.kv is not None:  # a kv_cache graph: name the outputs the runtime reads
            kwargs["output_names"] = ["logits", "new_kv"]
        try:
            with _quiet_exporter():
                program = torch.onnx.export(ep, dynamo=True, custom_translation_table=onnx_translation_table(),
                                            external_data=False, verbose=False, **kwargs)
        except Exception as exc:
            raise ExportError(f"ONNX export failed: {str(exc).strip().splitlines()[0]}") from exc
        program.save(tmp)
        _store_config(tmp, graph)
        if check:
            model = onnx.load(tmp)
            try:
                onnx.checker.check_model(model, full_check=True)
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"onnx.checker rejected the exported model: {str(exc).splitlines()[0]}") from exc
            custom = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
            if custom:
                raise ExportError(f"exported model still has non-standard ops: {custom}")
    return path


def _store_config(path: str, graph: ModelGraph) -> None:
    """Write what decoding needs to know (vocabulary, positions, stop tokens) into the file's
    metadata, so importing it again (:mod:`tokenfx.frontends.onnx_config`) recovers it."""
    import onnx

    from tokenfx.frontends.onnx_config import METADATA_KEY, config_metadata

    value = config_metadata(graph.config)
    if value is None:
        return
    model = onnx.load(path)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != METADATA_KEY]
    onnx.helper.set_model_props(model, {**dict(kept), METADATA_KEY: value})
    onnx.save(model, path)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs warnings about optional packages (torchvision ops) on every call."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def save_pt2(graph: ModelGraph, path) -> Path:
    """Write ``graph`` as a ``.pt2`` ExportedProgram, atomically."""
    path = _checked_output(path, ".pt2", "program output")
    ep = reexport(graph)
    with _atomic(path) as tmp:
        torch.export.save(ep, tmp)
    return path


def _checked_output(path, suffix: str, what: str) -> Path:
    path = Path(path)
    if path.suffix != suffix:
        raise ExportError(f"{what} must end in {suffix}, got {path}")
    if not path.parent.exists():
        raise ExportError(f"output directory {path.parent} does not exist")
    return path


@contextlib.contextmanager
def _atomic(path: Path):
    """A temporary file beside ``path``, renamed onto it only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent, prefix=f".{path.stem}.")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_onnxruntime(path, inputs: dict) -> list:
    """Run an exported model in onnxruntime (CPU) on named tensor inputs; returns numpy outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: inputs[name].detach().cpu().numpy() for name in names}
    return session.run(None, feeds)
