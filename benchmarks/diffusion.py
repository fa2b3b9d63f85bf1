"""Masked-diffusion decoding: how fast, at what quality, per unmasking policy and K/V cache?

Model: ``tokenfx:tiny-code-dllm`` (LLaDA-style masked diffusion, the same data and tokenizer as
``tiny-code``) through ``tokenfx.diffuse`` (default path, ``compile="auto"``); the AR model
``tokenfx:tiny-code`` guides it (``guided``), judges it (perplexity) and is the speed reference
(``tokenfx.Generator(...).generate``, greedy, ``stop=[]``).

Prompts: held-out files of ``tiny-code/split.json`` (stdlib files neither model was trained
on), files sorted, drawn with ``random.Random(--seed)``, one window per file while files last.
A prompt is the ``--prompt-tokens`` tokens before the start of a line whose text is not blank;
the reference is the file from there on. Every method generates ``--gen-length`` tokens (128)
in blocks of ``--block-length`` (32), batch 1, greedy.

Methods (``steps`` = ``gen_length``, so every block may use ``block_length`` rounds; the
policies that unmask several tokens a round finish a block early):

  vanilla             LLaDA low-confidence remasking, one token per round, cache="none": the baseline
  vanilla+prefix/dual the same over Fast-dLLM's prefix cache / DualCache (APPROXIMATE)
  threshold           Fast-dLLM confidence threshold 0.9
  ete                 Explore-Then-Exploit (threshold 0.9, explore 1 highest-entropy token when none is confident)
  guided              FreeCache's guided diffusion with tiny-code (lossless vs its greedy decoding)
  learned             the shipped learned policy (tokenfx/assets/unmask-policy)
  each of the four    without cache and with DualCache (``+dual``)
  ar_greedy           tiny-code's own greedy decoding (tokenfx.Generator)

Measured per method over all prompts: tokens/s (sum of new tokens / sum of the runtime's
``seconds``), rounds per sequence (forwards of the dLLM), quality two ways — exact match of the
completion's first line with the reference's (``rstrip``-ed), and the perplexity of the
generated tokens under tiny-code (teacher-forced after the prompt: lower is more fluent) — and,
for cached methods, the cached-vs-exact logit error per round (max |Δlogit| over the masked
positions, ``measure_cache_error=True``, measured in the untimed warm-up run). Each method
is warmed up once on a separate held-out prompt first (graph capture / compile).

Targets (issue 17): cache + best policy >= 10x the vanilla baseline's tokens/s with quality no
more than 5 % worse on both measures (exact match >= 0.95x, perplexity <= 1.05x the
baseline's); the best dLLM configuration >= tiny-code's AR greedy tokens/s.

Run::

    python benchmarks/diffusion.py --quick       # 3 prompts
    python benchmarks/diffusion.py               # 16 prompts

Writes ``<out>/diffusion.json`` and ``<out>/diffusion.png`` (Pareto: tokens/s vs quality).
"""

from __future__ import annotations

from machine import add_modes, benchmark_parser, pyplot, quiet_libraries, save_figure, start_run

quiet_libraries()

import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import sysconfig  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import tokenfx  # noqa: E402
from tokenfx.frontends.load import load_tokenizer  # noqa: E402
from tokenfx.runtime.diffusion import diffuser_for  # noqa: E402
from tokenfx.runtime.generate import generator_for  # noqa: E402

DLLM, AR = "tokenfx:tiny-code-dllm", "tokenfx:tiny-code"
MODES = {"quick": 3, "full": 16}
# variant -> (policy, options): two operating points for the confidence rules (a speed / quality curve)
VARIANTS = {"vanilla": ("vanilla", {}), "threshold": ("threshold", {"threshold": 0.9}),
            "threshold@0.7": ("threshold", {"threshold": 0.7}), "ete": ("ete", {"threshold": 0.9, "explore": 1}),
            "ete@0.7": ("ete", {"threshold": 0.7, "explore": 1}), "guided": ("guided", {}), "learned": ("learned", {})}
BASELINE = "vanilla"


def methods(caches: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (variant, cache)."""
    table = {"vanilla": ("vanilla", "none"), "vanilla+prefix": ("vanilla", "prefix"), "vanilla+dual": ("vanilla", "dual")}
    for variant in VARIANTS:
        if variant != "vanilla":
            table[variant] = (variant, "none")
            table.update({f"{variant}+{c}": (variant, c) for c in caches})
    return table


# -- prompts ---------------------------------------------------------------------------------------------
def held_out_prompts(tokenizer, count: int, prompt_tokens: int, seed: int) -> list[dict]:
    """``count`` (+1 for the warm-up) windows: the ``prompt_tokens`` tokens before a non-blank line."""
    split = json.loads((tokenfx.assets.path("tiny-code") / "split.json").read_text())
    root = Path(split["root"])
    if not root.is_dir():
        root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(split["held_out"]) if (root / f).is_file()]
    rng = random.Random(seed)
    rng.shuffle(files)
    prompts: list[dict] = []
    depth = 0
    while len(prompts) < count + 1 and depth < 50:
        for rel in files:
            text = (root / rel).read_text(encoding="utf-8", errors="replace")
            starts = [i + 1 for i, ch in enumerate(text) if ch == "\n" and text[i + 1:].split("\n", 1)[0].strip()]
            starts = [s for s in starts if s > 4 * prompt_tokens]  # room for a full prompt before it
            if not starts:
                continue
            cut = rng.choice(starts)
            ids = tokenizer(text[max(0, cut - 8 * prompt_tokens):cut], add_special_tokens=False)["input_ids"]
            if len(ids) < prompt_tokens:
                continue
            prompts.append({"file": rel, "offset": cut, "ids": ids[-prompt_tokens:],
                            "reference": text[cut:cut + 2000]})
            if len(prompts) == count + 1:
                break
        depth += 1
    return prompts


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


@torch.inference_mode()
def perplexity(judge, prompt: list[int], generated: list[int]) -> float:
    """exp(mean NLL) of ``generated`` after ``prompt`` under the AR model ``judge`` (HF module)."""
    ids = torch.tensor([prompt + generated])
    logits = judge(ids).logits[0, len(prompt) - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(generated))
    return math.exp(float(nll))


# -- one method ------------------------------------------------------------------------------------------
def run_dllm(diffuser, ids: list[int], variant: str, cache: str, args, guide, measure: bool = False):
    policy, options = VARIANTS[variant]
    return diffuser.diffuse(torch.tensor([ids]), gen_length=args.gen_length, block_length=args.block_length,
                            steps=args.gen_length, policy=policy, policy_options=dict(options),
                            cache=cache, guide=guide if policy == "guided" else None, measure_cache_error=measure)


def summarize(rows: list[dict]) -> dict:
    tokens = sum(r["new_tokens"] for r in rows)
    seconds = sum(r["seconds"] for r in rows)
    return {"prompts": len(rows), "tokens_per_s": tokens / seconds if seconds else 0.0,
            "rounds": sum(r["rounds"] for r in rows) / len(rows),
            "exact_match": sum(r["exact_match"] for r in rows) / len(rows),
            "perplexity": math.exp(sum(math.log(r["perplexity"]) for r in rows) / len(rows))}  # geometric mean


def check_targets(summary: dict, table: dict) -> dict:
    base = summary[BASELINE]
    ok_quality = {name: s["exact_match"] >= 0.95 * base["exact_match"] and s["perplexity"] <= 1.05 * base["perplexity"]
                  for name, s in summary.items() if name in table}
    cached = [n for n in ok_quality if table[n][1] != "none" and ok_quality[n]]
    best_cached = max(cached, key=lambda n: summary[n]["tokens_per_s"], default=None)
    dllm = [n for n in table if n in summary]
    best_dllm = max(dllm, key=lambda n: summary[n]["tokens_per_s"])
    best_dllm_ok = max([n for n in dllm if ok_quality[n]], key=lambda n: summary[n]["tokens_per_s"], default=None)
    ar = summary["ar_greedy"]["tokens_per_s"]
    speedup = summary[best_cached]["tokens_per_s"] / base["tokens_per_s"] if best_cached else None
    return {
        "quality_within_5pct": ok_quality,
        "cache_best_policy": best_cached, "cache_best_policy_speedup_over_vanilla": speedup,
        "target_10x_at_5pct_quality_met": bool(speedup is not None and speedup >= 10),
        "best_dllm": best_dllm, "best_dllm_tokens_per_s": summary[best_dllm]["tokens_per_s"],
        "best_dllm_within_5pct_quality": best_dllm_ok,
        "ar_greedy_tokens_per_s": ar,
        "target_dllm_at_or_above_ar_met": summary[best_dllm]["tokens_per_s"] >= ar,
        "target_dllm_at_or_above_ar_with_quality_met": bool(best_dllm_ok and summary[best_dllm_ok]["tokens_per_s"] >= ar),
    }


def markdown_table(results: dict) -> str:
    lines = ["| method | cache | tokens/s | x vanilla | rounds | first-line EM | ppl (tiny-code) | max cache err |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = results["methods"][BASELINE]["tokens_per_s"]
    for name, s in results["methods"].items():
        err = s.get("cache_error_max")
        lines.append(f"| {name} | {s.get('cache', '-')} | {s['tokens_per_s']:.1f} | {s['tokens_per_s'] / base:.2f} | "
                     f"{s['rounds']:.1f} | {s['exact_match']:.2f} | {s['perplexity']:.2f} | "
                     f"{'' if err is None else f'{err:.3g}'} |")
    return "\n".join(lines)


def pareto(points: list[tuple[str, float, float]], higher_is_better: bool) -> list[str]:
    """Names not dominated in (tokens/s up, quality up or down)."""
    sign = 1 if higher_is_better else -1
    return [n for n, x, y in points
            if not any(x2 >= x and sign * y2 >= sign * y and (x2, y2) != (x, y) for _, x2, y2 in points)]


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    summary = results["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.6))
    for ax, key, label, higher in ((axes[0], "exact_match", "first-line exact match (higher is better)", True),
                                   (axes[1], "perplexity", "perplexity under tiny-code (lower is better)", False)):
        points = [(n, s["tokens_per_s"], s[key]) for n, s in summary.items()]
        front = pareto(points, higher)
        for name, x, y in points:
            marker = "*" if name == "ar_greedy" else ("s" if "+" in name else "o")
            ax.scatter(x, y, marker=marker, s=90 if marker == "*" else 40, color="C3" if name in front else "C0")
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front_pts = sorted((x, y) for n, x, y in points if n in front)
        ax.plot([p[0] for p in front_pts], [p[1] for p in front_pts], color="C3", lw=0.8, ls="--", label="Pareto front")
        ax.set_xscale("log")
        if not higher:
            ax.set_yscale("log")
        ax.set_xlabel("tokens/s (batch 1, log scale)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title(f"{results['prompts']} held-out prompts, {results['gen_length']} tokens, block "
                      f"{results['block_length']}; o no cache, ■ cached, ★ AR greedy", fontsize=9)
    targets = results["targets"]
    note = (f"cache+best policy {targets['cache_best_policy']}: "
            f"{targets['cache_best_policy_speedup_over_vanilla'] or 0:.1f}x vanilla; best dLLM "
            f"{targets['best_dllm_tokens_per_s']:.0f} vs AR {targets['ar_greedy_tokens_per_s']:.0f} tok/s")
    save_figure(fig, path, results["machine"], "masked diffusion, tiny-code-dllm", note)


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__)
    add_modes(parser, default="full", quick=f"{MODES['quick']} prompts (default: {MODES['full']})")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--caches", default="dual", help="comma-separated caches for the policies (prefix, dual); "
                                                         "vanilla always runs with prefix and dual too")
    parser.add_argument("--model", default=DLLM, help="the dLLM (spec or HF directory)")
    parser.add_argument("--seed", type=int, default=0, help="prompt selection")
    args = parser.parse_args(argv)
    count = args.prompts if args.prompts is not None else MODES[args.mode]
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    table = methods(caches)
    run = start_run("diffusion", args, console_width=150)
    console = run.console

    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(AR)
    judge = AutoModelForCausalLM.from_pretrained(tokenfx.assets.path("tiny-code"), dtype=torch.float32).eval()
    diffuser = diffuser_for(args.model)
    guide = generator_for(AR)
    prompts = held_out_prompts(tokenizer, count, args.prompt_tokens, args.seed)
    warmup, prompts = prompts[-1], prompts[:-1]
    rows: dict[str, list[dict]] = {name: [] for name in (*table, "ar_greedy")}
    errors: dict[str, list[float]] = {}
    with run.progress(60) as progress:
        task = progress.add_task("warm-up", total=(len(table) + 1) * (len(prompts) + 1))
        for name, (policy, cache) in table.items():  # graphs built / compiled, policies loaded; untimed, so the
            progress.update(task, description=f"warm-up {name}")  # cached methods measure their logit error here
            result = run_dllm(diffuser, warmup["ids"], policy, cache, args, guide, measure=cache != "none")
            if cache != "none":
                errors[name] = result.cache_errors or []
            progress.advance(task)
        guide.generate(torch.tensor([warmup["ids"]]), max_new_tokens=args.gen_length, stop=[])
        progress.advance(task)
        for i, prompt in enumerate(prompts):
            for name, (policy, cache) in table.items():
                progress.update(task, description=f"prompt {i + 1}: {name}")
                result = run_dllm(diffuser, prompt["ids"], policy, cache, args, guide)
                generated = result.sequences[0, len(prompt["ids"]):].tolist()
                rows[name].append({"new_tokens": result.new_tokens, "seconds": result.seconds, "rounds": result.rounds,
                                   "generated": generated})
                progress.advance(task)
            progress.update(task, description=f"prompt {i + 1}: ar_greedy")
            ids = torch.tensor([prompt["ids"]])
            out = guide.generate(ids, max_new_tokens=args.gen_length, stop=[])
            rows["ar_greedy"].append({"new_tokens": out.shape[1] - ids.shape[1], "rounds": out.shape[1] - ids.shape[1],
                                      "seconds": guide.last_stats["seconds"], "generated": out[0, ids.shape[1]:].tolist()})
            progress.advance(task)
    for name, name_rows in rows.items():
        for prompt, row in zip(prompts, name_rows):
            text = tokenizer.decode(row["generated"])
            row["exact_match"] = first_line(text) == first_line(prompt["reference"])
            row["perplexity"] = perplexity(judge, prompt["ids"], row["generated"])
            row["first_line"] = first_line(text)
    summary = {}
    for name, name_rows in rows.items():
        summary[name] = summarize(name_rows)
        if name in table:
            summary[name].update(policy=VARIANTS[table[name][0]][0], cache=table[name][1],
                                 options=VARIANTS[table[name][0]][1])
        if name in errors:
            cached_rounds = [e for e in errors[name] if e > 0]
            summary[name].update(cache_error_max=max(errors[name], default=0.0),
                                 cache_error_mean=sum(cached_rounds) / len(cached_rounds) if cached_rounds else 0.0,
                                 cache_error_per_round=errors[name])
    guided_identical = [a["generated"] == b["generated"] for a, b in zip(rows["guided"], rows["ar_greedy"])]
    results = {"model": args.model, "guide": AR, "prompts": len(prompts), "gen_length": args.gen_length,
               "block_length": args.block_length, "prompt_tokens": args.prompt_tokens, "seed": args.seed,
               "mode": args.mode, "machine": run.machine, "methods": summary,
               "guided_identical_to_ar_greedy": f"{sum(guided_identical)}/{len(guided_identical)}",
               "targets": check_targets(summary, table),
               "samples": {name: [{"file": p["file"], "reference": first_line(p["reference"]),
                                   "first_line": r["first_line"]} for p, r in zip(prompts, name_rows)][:3]
                           for name, name_rows in rows.items()},
               "per_prompt": {name: [{k: v for k, v in r.items() if k != "generated"} for r in name_rows]
                              for name, name_rows in rows.items()}}
    run.save(results, plot)
    console.print(markdown_table(results))
    console.print(json.dumps(results["targets"], indent=1))
    console.print(f"guided == AR greedy: {results['guided_identical_to_ar_greedy']}")
    run.print_written(results)


if __name__ == "__main__":
    main()
