"""Verify a rewritten ONNX file against the ONNX file it was imported from, both in onnxruntime.

``tokenfx rewrite model.onnx --passes … -o out.onnx --verify`` ends here: the user's reference
is the *input* file as onnxruntime runs it, not the imported graph, so a translation slip in the
importer shows up as well as a pass's error. Both files run on the same :func:`sample_inputs`
(random ids inside each embedding table, a ragged attention mask, the shapes the graph was
imported and rewritten at) and :func:`compare` reports the largest absolute error and the
mean per-row cosine of every output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tokenfx.errors import VerificationError
from tokenfx.ir.graph import ModelGraph

aten = torch.ops.aten


@dataclasses.dataclass
class Comparison:
    """Rewritten vs original outputs in onnxruntime: ``max_abs_error`` over every output,
    ``cosine`` the mean over rows (batch entries) of the least similar output."""

    max_abs_error: float
    cosine: float
    tolerance: float

    @property
    def verified(self) -> bool:
        return self.max_abs_error <= self.tolerance  # NaN never verifies


def _embedding_rows(graph: ModelGraph) -> dict[str, int]:
    """Placeholder name → rows of the embedding table its values index (through casts / views)."""
    rows: dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target is not aten.embedding.default:
            continue
        weight, index = node.args[0], node.args[1]
        table = weight.meta.get("val")
        frontier, seen = [index], set()
        while frontier:
            cur = frontier.pop()
            if not isinstance(cur, torch.fx.Node) or cur in seen:
                continue
            seen.add(cur)
            if cur.op == "placeholder" and table is not None:
                rows[cur.name] = min(rows.get(cur.name, 1 << 62), int(table.shape[0]))
            elif cur.op == "call_function" and len(seen) < 16:
                frontier.extend(a for a in cur.all_input_nodes)
    return rows


def sample_inputs(graph: ModelGraph, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of the shapes of ``graph``'s example: floats ~ N(0, 1); an integer input that
    indexes an embedding table holds ids inside it; ``*mask*`` inputs are right-padded
    (row i keeps ``N - i·N/4`` tokens, at least 1), others keep the example's values."""
    gen = torch.Generator().manual_seed(seed)
    rows = _embedding_rows(graph)
    placeholders = {n.target: n.name for n in graph.graph.nodes if n.op == "placeholder"}
    out = {}
    for key, example in graph.example_kwargs.items():
        if example.is_floating_point():
            out[key] = torch.randn(example.shape, generator=gen).to(example.dtype)
        elif "mask" in key and example.dim() == 2:
            batch, tokens = example.shape
            mask = torch.zeros_like(example)
            for i in range(batch):
                mask[i, : max(1, tokens - i * tokens // 4)] = 1
            out[key] = mask
        elif placeholders.get(key, key) in rows:
            out[key] = torch.randint(0, rows[placeholders.get(key, key)], example.shape, generator=gen).to(example.dtype)
        else:
            out[key] = example.clone()
    return out


def compare(reference: Path, candidate: Path, inputs: dict[str, torch.Tensor], exact: bool) -> Comparison:
    """Run both ONNX files in onnxruntime (CPU) on ``inputs``; raise :class:`VerificationError`
    naming the output when their outputs differ in number or shape. ``exact``: the pipeline only
    reorders arithmetic, so the tolerance is ``4096·eps·max(|ref|, 1)`` (the two files also fuse
    differently in onnxruntime); otherwise the error is reported, not bounded (only a
    non-finite error fails)."""
    want = _run(reference, inputs, by_position=True)  # the import sanitised names; it kept the order
    got = _run(candidate, inputs, by_position=False)
    if len(want) != len(got):
        raise VerificationError(f"--verify: {candidate} returns {len(got)} outputs, {reference} returns {len(want)}")
    worst, cosines, tolerance = 0.0, [], float("inf")
    for i, (a, b) in enumerate(zip(want, got)):
        a, b = torch.from_numpy(a), torch.from_numpy(b)
        if a.shape != b.shape:
            raise VerificationError(f"--verify: output {i} has shape {tuple(b.shape)} in {candidate}, "
                                    f"{tuple(a.shape)} in {reference}")
        if not a.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        error = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        worst = error if error != error else max(worst, error)  # keep a NaN
        if exact:
            eps = torch.finfo(a.dtype).eps
            tolerance = min(tolerance, 4096 * eps * max(float(a.abs().max()) if a.numel() else 1.0, 1.0))
        rows_a, rows_b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
        if a.dim() and a.numel():
            cosines.append(float(torch.nn.functional.cosine_similarity(rows_a, rows_b, dim=-1).mean()))
    return Comparison(worst, min(cosines) if cosines else 1.0, tolerance)


def _run(path: Path, inputs: dict[str, torch.Tensor], by_position: bool) -> list:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    values = list(inputs.values()) if by_position else [inputs[n] for n in names]
    return session.run(None, {n: v.detach().cpu().numpy() for n, v in zip(names, values)})
