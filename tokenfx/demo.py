"""``tokenfx demo``: the main job end to end on the bundled models.

First the decoder (``tokenfx:smollm2``, :mod:`tokenfx.demo_decode`): KV-cached generation
against Hugging Face ``generate``. Then the encoder (pretrained MiniLM):

1. inspect — recover the transformer structure of the real pretrained MiniLM;
2. rewrite — capture with dynamic batch/tokens and run ``fuse_norm`` with verification;
3. export — write ONNX (custom op translated to standard ops) and check it with onnx.checker;
4. parity — run onnxruntime on a new, padded batch of real sentences and compare sentence
   embeddings with the unmodified Hugging Face model;
5. timings — HF eager vs the rewritten graph vs onnxruntime on the same batch.

Writes ``report.json`` and the ``.onnx`` file to the output directory.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import time
from pathlib import Path

import torch


def sentences(count: int) -> list[str]:
    """Real English text available offline: first paragraphs of standard-library docstrings."""
    import collections, functools, itertools, json as json_mod, pathlib, re, statistics as st, string, textwrap  # noqa: E401

    texts = []
    for module in (collections, functools, itertools, json_mod, pathlib, re, st, string, textwrap):
        for _, obj in sorted(vars(module).items()):
            doc = pyinspect.getdoc(obj) if (pyinspect.isfunction(obj) or pyinspect.isclass(obj) or pyinspect.isbuiltin(obj)) else None
            if doc:
                paragraph = " ".join(doc.split("\n\n")[0].split())
                if len(paragraph) > 40 and paragraph not in texts:
                    texts.append(paragraph)
    return texts[:count]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers mean pooling + L2 normalisation: [B, N, C] → [B, C]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def run_demo(spec: str, out_dir: Path, console, *, decoder: bool = True, compile: bool = True) -> int:
    from rich.table import Table
    from transformers import AutoTokenizer

    import tokenfx
    import tokenfx.assets
    from tokenfx.demo_timing import interleaved_median_ms
    from tokenfx.frontends.load import load_hf_model
    from tokenfx.frontends.onnx import export_onnx, run_onnxruntime
    from tokenfx.passes.base import PassManager
    from tokenfx.report import render_passes, render_structure

    out_dir.mkdir(parents=True, exist_ok=True)
    decoded = None
    if decoder:
        from tokenfx.demo_decode import run_decoder_demo

        decoded = run_decoder_demo(out_dir, console, compile=compile)
    directory = tokenfx.assets.path(spec.split(":", 1)[1]) if spec.startswith("tokenfx:") else Path(spec)
    console.rule(f"[bold]tokenfx demo · encoder rewrite with {spec}")
    with console.status(f"loading {spec}"):
        model = load_hf_model(directory)
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    texts = sentences(48)
    capture_batch = tokenizer(texts[:8], padding=True, truncation=True, max_length=128, return_tensors="pt")
    test_batch = tokenizer(texts[8:40], padding=True, truncation=True, max_length=128, return_tensors="pt")
    inputs = {k: capture_batch[k] for k in ("input_ids", "attention_mask")}
    test_inputs = {k: test_batch[k] for k in ("input_ids", "attention_mask")}

    console.print("\n[bold]1. inspect[/bold] — structure recovered from the captured ATen graph")
    t0 = time.perf_counter()
    with console.status("capturing with torch.export (dynamic batch and tokens)"):
        graph = tokenfx.capture(model, inputs)
    capture_s = time.perf_counter() - t0
    render_structure(console, graph.structure.to_json(), title=spec)

    console.print("\n[bold]2. rewrite[/bold] — fuse_norm, verified against the original graph")
    report = PassManager("fuse_norm", verify=True).run(graph)
    render_passes(console, report.passes)
    rewritten = report.graph

    console.print("\n[bold]3. export[/bold] — ONNX with dynamic batch/token axes, standard ops only")
    onnx_path = out_dir / "minilm_fuse_norm.onnx"
    t0 = time.perf_counter()
    with console.status("exporting to ONNX"):
        export_onnx(rewritten, onnx_path)
    export_s = time.perf_counter() - t0
    console.print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) in {export_s:.1f} s; onnx.checker passed")

    console.print(f"\n[bold]4. parity[/bold] — {test_inputs['input_ids'].shape[0]} new sentences, padded to "
                  f"{test_inputs['input_ids'].shape[1]} tokens (capture used batch {inputs['input_ids'].shape[0]})")
    with torch.inference_mode():
        hf_hidden = model(**test_inputs).last_hidden_state
        fx_hidden = rewritten.module()(**test_inputs)
    ort_hidden = torch.from_numpy(run_onnxruntime(onnx_path, test_inputs)[0])
    mask = test_inputs["attention_mask"]
    reference = mean_pool(hf_hidden, mask)
    cos_fx = float((mean_pool(fx_hidden, mask) * reference).sum(-1).min())
    cos_ort = float((mean_pool(ort_hidden, mask) * reference).sum(-1).min())
    real = mask.bool()
    err_fx = float((fx_hidden - hf_hidden)[real].abs().max())
    err_ort = float((ort_hidden - hf_hidden)[real].abs().max())
    table = Table(show_edge=False, header_style="bold")
    for col in ("vs Hugging Face eager", "max |Δ hidden| (real tokens)", "min cosine of sentence embeddings"):
        table.add_column(col)
    table.add_row("tokenfx rewritten graph", f"{err_fx:.2e}", f"{cos_fx:.6f}")
    table.add_row("onnxruntime", f"{err_ort:.2e}", f"{cos_ort:.6f}")
    console.print(table)

    console.print("\n[bold]5. timings[/bold] — same batch, CPU, median of 5, the three timed in turns")
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {i.name: test_inputs[i.name].numpy() for i in session.get_inputs()}
    with torch.inference_mode():
        ms = interleaved_median_ms({"hf": lambda: model(**test_inputs), "fx": lambda: rewritten.module()(**test_inputs),
                                    "ort": lambda: session.run(None, feeds)})
    hf_ms, fx_ms, ort_ms = ms["hf"], ms["fx"], ms["ort"]
    table = Table(show_edge=False, header_style="bold")
    for col in ("runtime", "latency", "vs HF eager"):
        table.add_column(col)
    for name, ms in (("Hugging Face eager", hf_ms), ("tokenfx graph (eager)", fx_ms), ("onnxruntime", ort_ms)):
        table.add_row(name, f"{ms:.1f} ms", f"{hf_ms / ms:.2f}×")
    console.print(table)
    console.print("[dim]fuse_norm is exact; its saving is memory traffic on a GPU (one Triton kernel instead of an add "
                  "and a norm). On a CPU the op runs its plain-torch reference, so no CPU speed-up is expected from it; "
                  "see benchmarks/fuse_norm.py.[/dim]")

    console.print("\n[bold]6. token merging[/bold] — token_merge(ratio=0.125, metric='hidden') on MiniLM with its mean "
                  "pooling captured (APPROXIMATE; each sentence merges 1/8 of its own tokens per block)")
    from tokenfx.frontends.hf import SentenceEmbedder

    embedder = SentenceEmbedder(model)
    with console.status("capturing encoder + pooling, merging"):
        pooled = tokenfx.capture(embedder, inputs)
        merged = tokenfx.optimize(pooled, "token_merge(ratio=0.125, metric='hidden')")
    with torch.inference_mode():
        full_emb, merged_emb = embedder(**test_inputs), merged.module()(**test_inputs)
        merge_ms = interleaved_median_ms({"full": lambda: pooled.module()(**test_inputs),
                                          "merged": lambda: merged.module()(**test_inputs)})
    cos_merge = (full_emb * merged_emb).sum(-1)  # both L2-normalised
    console.print(f"sentence-embedding cosine vs unmerged: mean {float(cos_merge.mean()):.4f}, min "
                  f"{float(cos_merge.min()):.4f}; {merge_ms['full']:.1f} → {merge_ms['merged']:.1f} ms "
                  f"({merge_ms['full'] / merge_ms['merged']:.2f}×) on these short sentences. Longer texts gain more: "
                  f"benchmarks/token_reduction.py measured 1.58× at cosine 0.982 at 256 tokens.")

    result = {
        "model": spec, "structure": graph.structure.to_json(), "capture_seconds": capture_s,
        "passes": [{"name": p.name, "matched": p.matched, "max_abs_error": p.max_abs_error, "tolerance": p.tolerance}
                   for p in report.passes],
        "onnx": str(onnx_path), "export_seconds": export_s,
        "parity": {"max_abs_hidden_fx": err_fx, "max_abs_hidden_onnxruntime": err_ort,
                   "min_cosine_fx": cos_fx, "min_cosine_onnxruntime": cos_ort},
        "latency_ms": {"hf_eager": hf_ms, "tokenfx_graph": fx_ms, "onnxruntime": ort_ms,
                       "batch": list(test_inputs["input_ids"].shape)},
        "token_merge": {"pipeline": "token_merge(ratio=0.125, metric='hidden')",
                        "cosine_mean": float(cos_merge.mean()), "cosine_min": float(cos_merge.min()),
                        "latency_ms": merge_ms},
        "decoder": decoded,
    }
    (out_dir / "report.json").write_text(json.dumps(result, indent=2))
    ok = cos_ort > 0.9999 and cos_fx > 0.9999 and all(p.verified for p in report.passes) and (decoded is None or decoded["ok"])
    ok = ok and float(cos_merge.mean()) > 0.95
    console.print(f"\nreport: {out_dir / 'report.json'} — " + ("[green]all checks passed[/green]" if ok else "[red]parity check failed[/red]"))
    return 0 if ok else 1

