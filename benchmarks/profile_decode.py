"""Where a decoding round's time goes, per method, on the default code path.

For each method (plain greedy and the speculative drafters) the same prompts run through
``tokenfx.Generator(MODEL)`` — the default ``compile="auto"`` — warm (each method runs once
before it is timed), batch 1, greedy, ``--new-tokens`` each, no stop token; what is reported
is ``Generator.last_stats["stages"]`` (:mod:`tokenfx.runtime.timing`: prefill, draft, forward,
verdict, kv_compact, update, bookkeeping) as milliseconds per generated token, beside
Hugging Face greedy ``generate`` on the same model and prompts. Every output is checked
token-identical to HF greedy.

The physical limit printed beside it: at batch 1 a decode step streams every weight once, so
``weight bytes / measured memory bandwidth`` is the fastest a greedy step can be on this
machine; the fraction of that ceiling each method reaches is in the JSON. The bandwidth is
measured by summing a buffer larger than the last-level cache (``--bandwidth-mib``).

Also recorded: the tree-verify graph's cost per node count (``Generator.verify_cost``), the
curve ``tree_budget="auto"`` sizes trees from.

Run::

    python benchmarks/profile_decode.py                                   # tokenfx:smollm2, 64 tokens
    python benchmarks/profile_decode.py --model tokenfx:tiny-code --new-tokens 128

Writes ``<out>/profile_decode.json`` and ``<out>/profile_decode.png``.
"""

from __future__ import annotations

from machine import benchmark_parser, pyplot, quiet_libraries, save_figure, start_run

quiet_libraries()

import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from tokenfx.frontends.load import load_tokenizer  # noqa: E402
from tokenfx.runtime.generate import Generator  # noqa: E402
from tokenfx.runtime.speculative.adapter import find_adapter  # noqa: E402
from tokenfx.runtime.timing import STAGES  # noqa: E402

PROMPTS = (  # (kind, text): chat prompts go through the chat template when the tokenizer has one
    ("chat", "What is the capital of France? Answer in two sentences."),
    ("chat", "Explain in a short paragraph what a hash table is."),
    ("code", "def parse_header(line):\n    \"\"\"Split an HTTP header line into its name and value.\"\"\"\n"),
    ("code", "import os\n\n\ndef walk_python_files(root):\n    \"\"\"Yield every .py file under root.\"\"\"\n"),
)
METHODS = {"greedy": None, "recycling": "recycling", "lookup": "lookup", "self_auto": "self:auto",
           "adapter": "self:adapter"}  # adapter: the exit adapter tools/train_exit_adapter.py trained for the model


def bandwidth_gb_s(mib: int) -> float:
    """Read bandwidth of one thread: the fastest of 5 sums over a ``mib``-MiB buffer."""
    buf = torch.ones(mib << 18, dtype=torch.float32)
    buf.sum()
    best = min(_timed(buf.sum) for _ in range(5))
    return buf.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct weight storages (a tied embedding / head counts once: the head reads it)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def encode(tokenizer, kind: str, text: str) -> torch.Tensor:
    if kind == "chat" and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--model", default="tokenfx:smollm2")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--bandwidth-mib", type=int, default=1024)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    run = start_run("profile_decode", args)

    tokenizer = load_tokenizer(args.model)
    build = time.perf_counter()
    gen = Generator(args.model)  # the default path: compile="auto"
    build_s = time.perf_counter() - build
    model = gen.model
    if "adapter" in methods and find_adapter(model) is None:
        print("no exit adapter is trained for this model (tools/train_exit_adapter.py): the adapter row is left out")
        methods.remove("adapter")
    prompts = [(kind, text, encode(tokenizer, kind, text)) for kind, text in PROMPTS]
    n = args.new_tokens
    kinds = sorted({kind for kind, _ in PROMPTS})
    names = ["hf_greedy", "hf_lookup", *methods]
    results = {kind: {m: {"seconds": 0.0, "tokens": 0, "steps": 0, "stages": dict.fromkeys(STAGES, 0.0), "identical": 0,
                          "prompts": 0} for m in names} for kind in kinds}
    with torch.inference_mode():
        for kind, text, ids in prompts:
            def hf(**extra):
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                      eos_token_id=[], pad_token_id=gen.pad_id, **extra)

            reference = hf()  # warm-up and the reference
            for name, call in (("hf_greedy", hf), ("hf_lookup", lambda: hf(prompt_lookup_num_tokens=10))):
                out = call()
                seconds = min(_timed(call) for _ in range(2))
                r = results[kind][name]
                r["seconds"] += seconds
                r["tokens"] += n
                r["prompts"] += 1
                r["identical"] += int(torch.equal(out, reference))
            for method in methods:
                speculate = METHODS[method]

                def ours():
                    return gen.generate(ids, max_new_tokens=n, stop=[], speculate=speculate)

                ours()  # warm: graphs built / loaded, drafter prepared
                start = time.perf_counter()
                out = ours()
                seconds = time.perf_counter() - start
                stats = gen.last_stats
                r = results[kind][method]
                r["seconds"] += seconds
                r["tokens"] += n
                r["steps"] += stats["steps"]
                r["prompts"] += 1
                r["identical"] += int(torch.equal(out, reference))
                for stage, value in stats["stages"].items():
                    r["stages"][stage] += value
                print(f"{kind:5} {method:10} {n / seconds:6.1f} tok/s  {stats['accepted_per_step']:.2f} tok/step  "
                      + " ".join(f"{k} {v * 1e3 / n:.1f}" for k, v in stats["stages"].items() if v > 0), flush=True)
    bw = bandwidth_gb_s(args.bandwidth_mib)
    weights = weight_bytes(model)
    ceiling = bw * 1e9 / weights  # greedy tokens/s if a step only streamed its weights
    summary = {}
    for kind in kinds:
        hf_tps = results[kind]["hf_greedy"]["tokens"] / results[kind]["hf_greedy"]["seconds"]
        greedy = results[kind].get("greedy")
        fx_tps = greedy["tokens"] / greedy["seconds"] if greedy else None
        summary[kind] = {}
        for method, r in results[kind].items():
            tps = r["tokens"] / r["seconds"]
            summary[kind][method] = {
                "tokens_per_s": tps, "x_hf_greedy": tps / hf_tps, "x_tokenfx_greedy": tps / fx_tps if fx_tps else None,
                "identical": f"{r['identical']}/{r['prompts']}",
                "tokens_per_step": r["tokens"] / r["steps"] if r["steps"] else None,
                "ms_per_token": {k: v * 1e3 / r["tokens"] for k, v in r["stages"].items()},
                "fraction_of_ceiling": tps / ceiling,
            }
    costs = {str(k): v * 1e3 for k, v in gen.verify_cost(1).items()} if any(METHODS[m] for m in methods) else {}
    record = {
        "model": args.model, "new_tokens": n, "threads": args.threads, "batch": 1, "prompts": [list(p) for p in PROMPTS],
        "generator_build_seconds": build_s, "bandwidth_gb_s": bw, "weight_bytes": weights,
        "greedy_ceiling_tokens_per_s": ceiling, "tree_verify_ms_by_nodes": costs, "methods": summary,
        "hf_lookup_call": "model.generate(..., prompt_lookup_num_tokens=10)",
        "machine": run.machine,
    }
    run.save(record, _plot)
    print(f"\nweights {weights / 1e6:.0f} MB, bandwidth {bw:.1f} GB/s → greedy ceiling {ceiling:.1f} tok/s; "
          f"tree verify ms by nodes {({k: round(v, 1) for k, v in costs.items()})}")
    print("| prompts | method | tok/s | × HF greedy | × tokenfx greedy | tokens / step | % of ceiling | "
          + " | ".join(STAGES) + " (ms / token) | identical |")
    print("| --- " * (8 + len(STAGES)) + "|")
    for kind in kinds:
        for method, s in summary[kind].items():
            steps = f"{s['tokens_per_step']:.2f}" if s["tokens_per_step"] else "–"
            xfx = f"{s['x_tokenfx_greedy']:.2f}" if s["x_tokenfx_greedy"] else "–"
            print(f"| {kind} | {method} | {s['tokens_per_s']:.1f} | {s['x_hf_greedy']:.2f} | {xfx} | {steps} | "
                  f"{100 * s['fraction_of_ceiling']:.0f} | " + " | ".join(f"{s['ms_per_token'][k]:.1f}" for k in STAGES)
                  + f" | {s['identical']} |")
    run.print_written(record)
    return 0


def _plot(record: dict, path: Path) -> None:
    plt = pyplot()

    kinds = list(record["methods"])
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        methods = record["methods"][kind]
        names = [m for m in methods if not m.startswith("hf_")]
        bottom = [0.0] * len(names)
        for stage in STAGES:
            values = [methods[m]["ms_per_token"][stage] for m in names]
            ax.bar(names, values, bottom=bottom, label=stage)
            bottom = [b + v for b, v in zip(bottom, values)]
        for name, style in (("hf_greedy", "--"), ("hf_lookup", "-.")):
            ms = 1e3 / methods[name]["tokens_per_s"]
            ax.axhline(ms, color="k", linestyle=style, label=f"{name} ({ms:.1f} ms)")
        ax.axhline(1e3 / record["greedy_ceiling_tokens_per_s"], color="grey", linestyle=":", label="bandwidth ceiling")
        ax.set_title(f"{kind} prompts")
        ax.set_ylabel("ms per generated token")
        ax.legend(fontsize=7)
    save_figure(fig, path, record["machine"], f"{record['model']}: where decoding time goes (batch 1)")


if __name__ == "__main__":
    raise SystemExit(main())
