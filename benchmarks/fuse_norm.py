"""Does ``fuse_norm`` (residual add + RMSNorm → ``tokenfx::add_norm``) make a Llama faster?

Model: a Llama-style decoder built from ``transformers.LlamaConfig`` (random init, fp32,
SDPA attention; hidden 512, 8 layers, 8 heads / 4 kv heads, MLP 1376, vocab 8000).

What is measured, in one run on one machine:

(a) eager PyTorch, batch 1 and 4 × 128 and 512 tokens:
      hf_eager            the Hugging Face model itself
      captured            ``tokenfx.capture(model, ...)`` run as it is
      captured_fuse_norm  the same graph after ``tokenfx.optimize(g, "fuse_norm")``
    ratio = baseline / rewritten (> 1: the rewrite is faster), for captured and hf_eager.
(b) torch.compile, batch 1 × 128 and 512 tokens (token dim marked dynamic, so each backend
    compiles once; ``--full`` adds batch 4):
      inductor            ``torch.compile(model, backend="inductor")``
      tokenfx_inductor    ``torch.compile(model, backend="tokenfx",
                            options={"passes": "fuse_norm", "inner": "inductor"})``
    ratio = inductor / tokenfx_inductor; the first call (compile) is reported apart.

Latency is the median of ``--repeats`` timed runs after a warm-up, under
``torch.inference_mode``; the variants of one shape run interleaved, one call each in turn,
so that other load on the machine hits them alike. Every variant's logits are compared with
the eager model's (max abs diff). Compile times are cold: Inductor's on-disk cache points at
a fresh temporary folder unless TORCHINDUCTOR_CACHE_DIR is set.

On CPU ``tokenfx::add_norm`` runs its plain-torch reference as an opaque custom op (in (b)
the backend hands Inductor that reference inlined), so no speed-up is expected here; the
fused kernel's speed needs a GPU (the Triton kernel).

Run::

    python benchmarks/fuse_norm.py            # --quick (default), a few minutes on 2 cores
    python benchmarks/fuse_norm.py --full     # compiled at batch 4 too, 10 repeats
    python benchmarks/fuse_norm.py --threads 1  # steadier on a machine shared with other work

Writes ``<out>/fuse_norm.json`` and ``<out>/fuse_norm.png`` (default out: benchmarks/results).
"""

from __future__ import annotations

import os

from machine import add_modes, benchmark_parser, pyplot, quiet_libraries, save_figure, start_run, temporary_caches

quiet_libraries()
_FRESH_INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR" not in os.environ
if _FRESH_INDUCTOR_CACHE:
    temporary_caches("TORCHINDUCTOR_CACHE_DIR")

import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import tokenfx  # noqa: E402

MODEL_CONFIG = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,  # grouped-query attention
    intermediate_size=1376,
    vocab_size=8000,
    max_position_embeddings=2048,
)
EAGER_SHAPES = [(1, 128), (1, 512), (4, 128), (4, 512)]  # (batch, tokens)
COMPILED_SHAPES = {"quick": [(1, 128), (1, 512)], "full": [(1, 128), (1, 512), (4, 128), (4, 512)]}
CAPTURE_SHAPE = (2, 16)  # a dynamic capture needs batch >= 2 and tokens >= 2
WARMUP = 1

NOTE = (
    "On CPU the tokenfx::add_norm op runs its plain-torch reference (an opaque custom op), so no "
    "speed-up is expected here: the fused graph does the same arithmetic as the unfused one. The "
    "kernel's real speed needs a GPU (the Triton kernel), which this run did not have. (In the "
    "torch.compile path without a GPU, the tokenfx backend hands Inductor that reference inlined.)"
)


def build_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**MODEL_CONFIG, attn_implementation="sdpa", torch_dtype=torch.float32)
    return LlamaForCausalLM(config).eval()


def make_inputs(batch: int, tokens: int, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 100_003 + tokens)
    input_ids = torch.randint(0, vocab, (batch, tokens), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def timed(fn, inputs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(inputs)
    return time.perf_counter() - start, out


def measure_interleaved(variants: dict, inputs, reference, repeats: int, advance) -> dict:
    """Warm up each variant (its output checked against ``reference``), then time ``repeats``
    rounds, one call per variant per round. Returns per variant: median ms, runs, max abs diff."""
    result = {name: {"runs_ms": []} for name in variants}
    for name, fn in variants.items():
        for _ in range(WARMUP):
            _, out = timed(fn, inputs)
            advance(f"warm-up {name}")
        result[name]["max_abs_diff_vs_hf_eager"] = float((out - reference).abs().max())
    for _ in range(repeats):
        for name, fn in variants.items():
            seconds, _ = timed(fn, inputs)
            result[name]["runs_ms"].append(seconds * 1e3)
            advance(f"timing {name}")
    for stats in result.values():
        stats["median_ms"] = statistics.median(stats["runs_ms"])
    return result


def hf_call(model):
    return lambda inputs: model(**inputs, use_cache=False).logits


# -- (a) eager ----------------------------------------------------------------------------------------
def measure_eager(model, repeats: int, progress, task) -> dict:
    vocab = model.config.vocab_size
    example = make_inputs(*CAPTURE_SHAPE, vocab)

    progress.update(task, description="capture")
    start = time.perf_counter()
    captured = tokenfx.capture(model, example)
    capture_s = time.perf_counter() - start
    progress.advance(task)

    progress.update(task, description="optimize fuse_norm")
    start = time.perf_counter()
    fused = tokenfx.optimize(captured, "fuse_norm")
    optimize_s = time.perf_counter() - start
    progress.advance(task)
    fused_norms = fused.count(torch.ops.tokenfx.add_norm.default)
    if fused_norms == 0:
        raise RuntimeError("fuse_norm fused no norm in the captured Llama graph; nothing to measure")

    captured_module, fused_module = captured.module(), fused.module()
    variants = {
        "hf_eager": hf_call(model),
        "captured": lambda inputs: captured_module(**inputs),
        "captured_fuse_norm": lambda inputs: fused_module(**inputs),
    }
    rows = []
    for batch, tokens in EAGER_SHAPES:
        inputs = make_inputs(batch, tokens, vocab)
        reference = variants["hf_eager"](inputs)

        def advance(what, batch=batch, tokens=tokens):
            progress.update(task, description=f"(a) eager B={batch} N={tokens}: {what}")
            progress.advance(task)

        stats = measure_interleaved(variants, inputs, reference, repeats, advance)
        fused_ms = stats["captured_fuse_norm"]["median_ms"]
        rows.append({
            "batch": batch,
            "tokens": tokens,
            "variants": stats,
            "ratio_captured_over_fuse_norm": stats["captured"]["median_ms"] / fused_ms,
            "ratio_hf_eager_over_fuse_norm": stats["hf_eager"]["median_ms"] / fused_ms,
        })
    return {
        "capture_s": capture_s,
        "optimize_s": optimize_s,
        "capture_example_shape": list(CAPTURE_SHAPE),
        "norms_fused": fused_norms,
        "measurements": rows,
    }


# -- (b) torch.compile -----------------------------------------------------------------------------------
COMPILED_VARIANTS = {
    "inductor": dict(backend="inductor"),
    "tokenfx_inductor": dict(backend="tokenfx", options={"passes": "fuse_norm", "inner": "inductor"}),
}


def measure_compiled(model, shapes, repeats: int, progress, task) -> dict:
    from tokenfx.frontends.dynamo import COMPILE_LOG

    vocab = model.config.vocab_size
    inputs = {shape: make_inputs(*shape, vocab) for shape in shapes}
    for batch_inputs in inputs.values():
        for tensor in batch_inputs.values():
            torch._dynamo.mark_dynamic(tensor, 1)  # one graph for every length, not one per length
    references = {shape: hf_call(model)(x) for shape, x in inputs.items()}

    per_variant = {}
    for name, compile_kwargs in COMPILED_VARIANTS.items():
        torch._dynamo.reset()
        log_start = len(COMPILE_LOG)
        compiled = hf_call(torch.compile(model, **compile_kwargs))
        shapes_out = []
        for batch, tokens in shapes:
            x = inputs[(batch, tokens)]

            def advance(what, batch=batch, tokens=tokens):
                progress.update(task, description=f"(b) {name} B={batch} N={tokens}: {what}")
                progress.advance(task)

            progress.update(task, description=f"(b) {name} B={batch} N={tokens}: first call (compile)")
            first_s, _ = timed(compiled, x)
            progress.advance(task)
            stats = measure_interleaved({name: compiled}, x, references[(batch, tokens)], repeats, advance)[name]
            shapes_out.append({"batch": batch, "tokens": tokens, "first_call_s": first_s, **stats})
        entry = {"compile_s": shapes_out[0]["first_call_s"], "shapes": shapes_out}
        if compile_kwargs["backend"] == "tokenfx":
            log = COMPILE_LOG[log_start:]
            matched = [m for graph in log for p in graph["passes"] for m in p["matched"]]
            if not matched:  # the pass must really have run, or the comparison means nothing
                raise RuntimeError(f"tokenfx backend compiled {len(log)} graph(s) but fused no norm: {log}")
            entry["graphs_rewritten"] = len(log)
            entry["norms_fused"] = len(matched)
        per_variant[name] = entry

    rows = []
    for i, (batch, tokens) in enumerate(shapes):
        base, rewritten = (per_variant[name]["shapes"][i] for name in COMPILED_VARIANTS)
        rows.append({
            "batch": batch,
            "tokens": tokens,
            "median_ms": {"inductor": base["median_ms"], "tokenfx_inductor": rewritten["median_ms"]},
            "ratio_inductor_over_tokenfx": base["median_ms"] / rewritten["median_ms"],
        })
    return {"variants": per_variant, "measurements": rows,
            "dynamic": "token dim marked dynamic (torch._dynamo.mark_dynamic)"}


# -- chart ---------------------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    eager = results["eager"]["measurements"]
    compiled = results["compiled"]["measurements"]
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})

    def bars(ax, rows, series, title):
        labels = [f"B={r['batch']}\nN={r['tokens']}" for r in rows]
        width = 0.8 / len(series)
        for j, (label, get) in enumerate(series):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))]
            values = [get(r) for r in rows]
            drawn = ax.bar(xs, values, width, label=label)
            ax.bar_label(drawn, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(range(len(rows)), labels)
        ax.set_ylabel("median latency (ms)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.margins(y=0.12)

    bars(ax_a, eager, [
        ("HF eager", lambda r: r["variants"]["hf_eager"]["median_ms"]),
        ("captured", lambda r: r["variants"]["captured"]["median_ms"]),
        ("captured + fuse_norm", lambda r: r["variants"]["captured_fuse_norm"]["median_ms"]),
    ], "(a) eager PyTorch")
    bars(ax_b, compiled, [
        ("inductor", lambda r: r["median_ms"]["inductor"]),
        ("tokenfx(fuse_norm) → inductor", lambda r: r["median_ms"]["tokenfx_inductor"]),
    ], "(b) torch.compile")
    save_figure(fig, path, results["machine"], "fuse_norm on a Llama (hidden 512, 8 layers), fp32",
                note="No GPU: add_norm runs its torch reference.")


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__, threads=None,
                              threads_help="torch intra-op threads (default: torch's choice, one per core); on a "
                                           "machine shared with other work, 1 avoids stalls at OpenMP barriers")
    add_modes(parser, default="quick", quick="compiled at batch 1 only, 5 repeats (default)",
              full="compiled at batch 1 and 4, 10 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per variant and shape")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else {"quick": 5, "full": 10}[args.mode]
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    run = start_run("fuse_norm", args)
    model = build_model()
    compiled_shapes = COMPILED_SHAPES[args.mode]
    steps = (2 + len(EAGER_SHAPES) * 3 * (WARMUP + repeats)
             + len(COMPILED_VARIANTS) * len(compiled_shapes) * (1 + WARMUP + repeats))
    with torch.inference_mode(), run.progress(58) as progress:
        task = progress.add_task("building", total=steps)
        section_start = time.perf_counter()
        eager = measure_eager(model, repeats, progress, task)
        eager["section_s"] = time.perf_counter() - section_start
        section_start = time.perf_counter()
        # The tokenfx backend's AOT step has the same AOTAutogradCache key as plain Inductor's, so
        # with the cache on, the tokenfx variant loads the Inductor artifact and fuse_norm never
        # runs (torch 2.13). Off for both variants, so both compile the same way.
        with torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = measure_compiled(model, compiled_shapes, repeats, progress, task)
        compiled["section_s"] = time.perf_counter() - section_start

    results = {
        "benchmark": "fuse_norm",
        "mode": args.mode,
        "repeats": repeats,
        "warmup": WARMUP,
        "threads": args.threads if args.threads is not None else "torch default",
        "statistic": "median of timed runs, torch.inference_mode, variants interleaved",
        "ratio_meaning": "baseline latency / rewritten latency; > 1 means the rewrite is faster",
        "machine": run.machine,
        "model": {"class": type(model).__name__, "dtype": "float32",
                  "attn_implementation": model.config._attn_implementation,
                  "parameters": sum(p.numel() for p in model.parameters()), **MODEL_CONFIG},
        "eager": eager,
        "compiled": compiled,
        "inductor_cache": "fresh temporary folder (cold compile)" if _FRESH_INDUCTOR_CACHE
        else f"TORCHINDUCTOR_CACHE_DIR={os.environ['TORCHINDUCTOR_CACHE_DIR']} (may be warm)",
        "note": NOTE,
    }
    run.save(results, plot)
    summarize(run.console, results)
    run.print_written(results)


def summarize(console, results: dict) -> None:
    from rich.table import Table

    table = Table(title="(a) eager: median ms, ratio = baseline / fuse_norm")
    for column in ("B", "N", "HF", "captured", "fused", "cap/fused", "HF/fused", "max|diff|"):
        table.add_column(column, justify="right")
    for r in results["eager"]["measurements"]:
        v = r["variants"]
        diff = max(s["max_abs_diff_vs_hf_eager"] for s in v.values())
        table.add_row(str(r["batch"]), str(r["tokens"]), f"{v['hf_eager']['median_ms']:.1f}",
                      f"{v['captured']['median_ms']:.1f}", f"{v['captured_fuse_norm']['median_ms']:.1f}",
                      f"{r['ratio_captured_over_fuse_norm']:.3f}", f"{r['ratio_hf_eager_over_fuse_norm']:.3f}",
                      f"{diff:.2g}")
    console.print(table)

    compiled = results["compiled"]
    table = Table(title="(b) torch.compile: median ms, ratio = inductor / tokenfx")
    for column in ("B", "N", "inductor", "tokenfx", "ratio", "max|diff|"):
        table.add_column(column, justify="right")
    for i, r in enumerate(compiled["measurements"]):
        diff = max(compiled["variants"][name]["shapes"][i]["max_abs_diff_vs_hf_eager"] for name in COMPILED_VARIANTS)
        table.add_row(str(r["batch"]), str(r["tokens"]), f"{r['median_ms']['inductor']:.1f}",
                      f"{r['median_ms']['tokenfx_inductor']:.1f}", f"{r['ratio_inductor_over_tokenfx']:.3f}",
                      f"{diff:.2g}")
    console.print(table)
    compile_s = ", ".join(f"{name} {v['compile_s']:.1f} s" for name, v in compiled["variants"].items())
    console.print(f"compile (first call): {compile_s}")


if __name__ == "__main__":
    main()
