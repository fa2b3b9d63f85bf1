"""Is ``tokenfx.Generator`` faster than Hugging Face ``generate`` on a real pretrained LM?

Model (``--model``): ``tokenfx:smollm2`` by default (SmolLM2-135M-Instruct, Llama, 30 layers,
hidden 576, 9 heads / 3 kv heads, vocab 49 152), or ``tokenfx:tiny-code`` (6 layers, 5.3 M params,
vocab 4096), loaded once with ``AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)``;
the *same* model object goes to HF ``generate`` and to every ``tokenfx.Generator``. Prompts are
real held-out code: the ``held_out`` files of ``tiny-code/split.json`` (Python stdlib files the
model was not trained on), each tokenized and followed by EOS as in training, concatenated, and
cut into windows at different offsets. Greedy decoding everywhere.

What is measured, in one run on one machine:

(a) decode throughput, prompt length 128 / 512 / 1024 × batch 1 / 4 (batch 4 = four different
    prompts of the same length, no padding), ``--max-new`` new tokens (64 quick, 128 full):
      hf                ``model.generate(ids, attention_mask=…, max_new_tokens=N, do_sample=False,
                          eos_token_id=[], pad_token_id=1)`` (``eos_token_id=[]``: never stops
                          early; ``None`` would be replaced by the model's generation config)
      tokenfx_eager     ``Generator(model, compile=False).generate(…, stop=[])``
      tokenfx_compiled  ``Generator(model)``: the default ``compile="auto"`` (AOTInductor, block by block)
    tokens/s = batch · N / wall seconds of the whole generate call; time to first token (TTFT)
    is ``last_stats["first_token_seconds"]`` for tokenfx and, for HF, the time from the call to
    the streamer receiving the first new token. ratio = tokenfx tokens/s / HF tokens/s (target of
    the issue: compiled >= 1.5). Every output is compared with HF's: ``identical`` per variant
    and case, and when not identical, how many new tokens match and where each row diverges.
(b) TTFT with a shared 512-token prefix: requests are prefix + a 32-token suffix.
      hf                    ``model.generate(…, max_new_tokens=1)``
      tokenfx_compiled      the compiled Generator of (a), no prefix cache
      tokenfx_prefix_cache  ``Generator(model, compile=True, prefix_cache_bytes=256 MiB)``, warmed
                            with prefix + suffix A before timing
    Each timed round uses a fresh suffix B_i (its first token unlike any earlier suffix's), so
    the cached Generator can reuse exactly the 512 prefix tokens and must compute the 32 new
    ones; ``reused_tokens`` is recorded per run. TTFT = wall seconds of the max_new_tokens=1
    call (``first_token_seconds`` of tokenfx is reported too). ratio = TTFT without prefix
    cache / TTFT with it (target: >= 5). A final check request generates ``--max-new`` tokens
    with all three and compares them.
(c) Generator construction, apart: capture + kv_cache passes (eager), the same plus AOTInductor
    compile or load (compiled; "cold" when the package was not yet in $TOKENFX_CACHE), the
    prefix-cache Generator (loads the packages compiled for the first), and the bare package
    load ``tokenfx.runtime.executor.compiled`` from the disk cache.

Timing: median of ``--repeats`` timed calls after one warm-up call per variant, under
``torch.inference_mode``; the variants of one case run interleaved, one call each in turn, so
that other load on the machine hits them alike.

Run::

    python benchmarks/generate.py            # --quick (default): 64 new tokens, 3 repeats
    python benchmarks/generate.py --full     # 128 new tokens, 5 repeats
    python benchmarks/generate.py --cold     # fresh $TOKENFX_CACHE / Inductor cache: time a cold compile
    python benchmarks/generate.py --threads 2  # default 1: steadier on a machine shared with other work

The first run on a machine compiles two graphs with AOTInductor (1-3 minutes each on a small
CPU), later runs load them from ``$TOKENFX_CACHE`` (default ~/.cache/tokenfx).
Writes ``<out>/generate.json`` and ``<out>/generate.png`` (default out: benchmarks/results).
"""

from __future__ import annotations

import sys

from machine import add_modes, benchmark_parser, pyplot, quiet_libraries, save_figure, start_run, temporary_caches

quiet_libraries()
_COLD = "--cold" in sys.argv[1:]
if _COLD:  # before torch / tokenfx are imported
    temporary_caches("TOKENFX_CACHE", "TORCHINDUCTOR_CACHE_DIR")

import json  # noqa: E402
import statistics  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

import tokenfx  # noqa: E402
from tokenfx.runtime import executor  # noqa: E402

MODEL = "smollm2"
SPLIT = "tiny-code"  # the held-out stdlib files the prompts come from (tokenized with the model's tokenizer)
PROMPT_LENGTHS = (128, 512, 1024)
BATCHES = (1, 4)
PREFIX_TOKENS = 512
SUFFIX_TOKENS = 32
PREFIX_CACHE_BYTES = 256 * 2**20
MODES = {"quick": dict(max_new=64, repeats=3), "full": dict(max_new=128, repeats=5)}
WARMUP = 1
DECODE_VARIANTS = ("hf", "tokenfx_eager", "tokenfx_compiled")
PREFIX_VARIANTS = ("hf", "tokenfx_compiled", "tokenfx_prefix_cache")


# -- data -----------------------------------------------------------------------------------------------
def held_out_tokens(model_dir: Path, tokenizer) -> tuple[list[int], dict]:
    """Held-out files' tokens, each file followed by EOS (as the training corpus was built)."""
    split = json.loads((model_dir / "split.json").read_text())
    root = Path(split["root"])
    if not root.is_dir():
        root = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    used, missing = [], []
    for rel in split["held_out"]:
        path = root / rel
        if not path.is_file():
            missing.append(rel)
            continue
        ids.extend(tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        used.append(rel)
    return ids, {"root": str(root), "files": len(used), "missing": missing, "tokens": len(ids)}


class Windows:
    """Consecutive, non-overlapping windows of the token stream."""

    def __init__(self, ids: list[int]):
        self.ids, self.offset = ids, 0

    def take(self, n: int) -> tuple[list[int], int]:
        if self.offset + n > len(self.ids):
            raise RuntimeError(f"held-out text too short: need {self.offset + n} tokens, have {len(self.ids)}")
        start = self.offset
        self.offset += n
        return self.ids[start:start + n], start

    def take_suffix(self, n: int, first_tokens: set) -> tuple[list[int], int]:
        """A window whose first token starts no earlier suffix (so a radix match stops at the prefix)."""
        while True:
            window, start = self.take(n)
            if window[0] not in first_tokens:
                first_tokens.add(window[0])
                return window, start
            self.offset = start + 1


# -- machine --------------------------------------------------------------------------------------------
# -- variants -------------------------------------------------------------------------------------------
class _FirstToken(BaseStreamer):
    """HF streamer that notes when the first generated token arrives (the first put is the prompt)."""

    def __init__(self):
        self.calls, self.at = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.at is None:
            self.at = time.perf_counter()

    def end(self):
        pass


def hf_generate(model, ids: torch.Tensor, max_new: int) -> tuple[torch.Tensor, dict]:
    streamer = _FirstToken()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=[], pad_token_id=1, streamer=streamer)
    seconds = time.perf_counter() - start
    ttft = (streamer.at - start) if streamer.at is not None else seconds
    return out, {"seconds": seconds, "first_token_seconds": ttft}


def tokenfx_generate(gen, ids: torch.Tensor, max_new: int) -> tuple[torch.Tensor, dict]:
    start = time.perf_counter()
    out = gen.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, stop=[])
    seconds = time.perf_counter() - start
    stats = gen.last_stats
    return out, {"seconds": seconds, "first_token_seconds": stats["first_token_seconds"],
                 "reused_tokens": stats["reused_tokens"], "new_tokens": stats["new_tokens"]}


def compare(out: torch.Tensor, reference: torch.Tensor, prompt: int) -> dict:
    """Token equality of two [B, prompt + new] outputs; on a mismatch, where each row diverges."""
    result = {"identical": bool(out.shape == reference.shape and torch.equal(out, reference)),
              "shape": list(out.shape), "reference_shape": list(reference.shape)}
    if result["identical"]:
        return result
    new = min(out.shape[1], reference.shape[1]) - prompt
    a, b = out[:, prompt:prompt + new], reference[:, prompt:prompt + new]
    equal = a == b
    result["matching_new_tokens"] = int(equal.sum())
    result["compared_new_tokens"] = int(equal.numel())
    result["prompt_identical"] = bool(torch.equal(out[:, :prompt], reference[:, :prompt]))
    first = []
    for row in equal:
        bad = (~row).nonzero()
        first.append(int(bad[0]) if bad.numel() else None)
    result["first_divergence_per_row"] = first  # index into the new tokens; None: that row matches
    return result


# -- construction ------------------------------------------------------------------------------------------
def aoti_files() -> set[str]:
    folder = executor.cache_dir() / "aoti"
    return {p.name for p in folder.glob("*.pt2")} if folder.is_dir() else set()


def build_generators(model, progress, task) -> tuple[dict, dict]:
    gens, info = {}, {}

    progress.update(task, description="(c) Generator(compile=False): capture + passes")
    start = time.perf_counter()
    gens["tokenfx_eager"] = tokenfx.Generator(model, compile=False)
    info["eager_s"] = time.perf_counter() - start
    progress.advance(task)

    before = aoti_files()
    progress.update(task, description="(c) Generator(model), the default: capture + passes + AOTInductor")
    start = time.perf_counter()
    gens["tokenfx_compiled"] = tokenfx.Generator(model)  # the default path: compile="auto"
    info["compiled_s"] = time.perf_counter() - start
    new = sorted(aoti_files() - before)
    info["compiled_packages_created"] = new
    info["compiled_cache_state"] = "cold (compiled now)" if new else "warm (loaded from disk)"
    progress.advance(task)

    progress.update(task, description="(c) Generator(compile=True, prefix cache)")
    start = time.perf_counter()
    gens["tokenfx_prefix_cache"] = tokenfx.Generator(model, prefix_cache_bytes=PREFIX_CACHE_BYTES)
    info["prefix_cache_compiled_s"] = time.perf_counter() - start
    info["prefix_cache_packages_created"] = sorted(aoti_files() - before - set(new))
    progress.advance(task)

    progress.update(task, description="(c) package load from the disk cache")
    compiled = gens["tokenfx_compiled"]
    load = {}
    for label, graph in (("prefill", compiled.prefill_graph), ("decode", compiled.decode_graph)):
        start = time.perf_counter()
        executor.compiled(graph, label, progress=False)
        load[label] = time.perf_counter() - start
    info["package_load_s"] = load  # includes hashing the graph and its weights (the cache key)
    info["cache_dir"] = str(executor.cache_dir())
    progress.advance(task)
    return gens, info


# -- (a) decode -------------------------------------------------------------------------------------------
def measure_decode(model, gens, prompts, max_new, repeats, progress, task) -> list[dict]:
    calls = {
        "hf": lambda ids: hf_generate(model, ids, max_new),
        "tokenfx_eager": lambda ids: tokenfx_generate(gens["tokenfx_eager"], ids, max_new),
        "tokenfx_compiled": lambda ids: tokenfx_generate(gens["tokenfx_compiled"], ids, max_new),
    }
    rows = []
    for length in PROMPT_LENGTHS:
        for batch in BATCHES:
            ids = torch.tensor([p for p, _ in prompts[length][:batch]])
            label = f"(a) P={length} B={batch}"
            variants = {name: {"runs": []} for name in DECODE_VARIANTS}
            reference = None
            for name in DECODE_VARIANTS:  # warm-up; the outputs are the ones compared
                progress.update(task, description=f"{label}: warm-up {name}")
                out, _ = calls[name](ids)
                if name == "hf":
                    reference = out
                    variants[name]["output_shape"] = list(out.shape)
                    if out.shape[1] != length + max_new:
                        raise RuntimeError(f"HF generate stopped early: {tuple(out.shape)} for {length} + {max_new}")
                else:
                    variants[name]["vs_hf"] = compare(out, reference, length)
                progress.advance(task)
            for _ in range(repeats):
                for name in DECODE_VARIANTS:
                    progress.update(task, description=f"{label}: timing {name}")
                    _, stats = calls[name](ids)
                    variants[name]["runs"].append(stats)
                    progress.advance(task)
            for stats in variants.values():
                runs = stats["runs"]
                stats["median_seconds"] = statistics.median(r["seconds"] for r in runs)
                stats["median_first_token_seconds"] = statistics.median(r["first_token_seconds"] for r in runs)
                stats["tokens_per_s"] = batch * max_new / stats["median_seconds"]
            hf_tps = variants["hf"]["tokens_per_s"]
            rows.append({
                "prompt_tokens": length, "batch": batch, "new_tokens": max_new,
                "prompt_offsets": [off for _, off in prompts[length][:batch]],
                "variants": variants,
                "ratio_tokenfx_compiled_over_hf": variants["tokenfx_compiled"]["tokens_per_s"] / hf_tps,
                "ratio_tokenfx_eager_over_hf": variants["tokenfx_eager"]["tokens_per_s"] / hf_tps,
                "identical": {name: variants[name]["vs_hf"]["identical"] for name in DECODE_VARIANTS[1:]},
            })
    return rows


# -- (b) shared prefix ----------------------------------------------------------------------------------------
def measure_prefix(model, gens, windows: Windows, repeats, max_new, progress, task) -> dict:
    prefix, prefix_offset = windows.take(PREFIX_TOKENS)
    firsts: set = set()
    cached = gens["tokenfx_prefix_cache"]
    calls = {
        "hf": lambda ids, n=1: hf_generate(model, ids, n),
        "tokenfx_compiled": lambda ids, n=1: tokenfx_generate(gens["tokenfx_compiled"], ids, n),
        "tokenfx_prefix_cache": lambda ids, n=1: tokenfx_generate(cached, ids, n),
    }

    def request():
        suffix, offset = windows.take_suffix(SUFFIX_TOKENS, firsts)
        return torch.tensor([prefix + suffix]), offset

    # warm the prefix cache with prefix + suffix A (this request computes everything)
    progress.update(task, description="(b) warm the prefix cache: prefix + suffix A")
    ids, offset_a = request()
    _, warm = calls["tokenfx_prefix_cache"](ids)
    progress.advance(task)

    rounds = []
    for i in range(WARMUP + repeats):  # the first round is a warm-up, not counted
        ids, offset = request()
        outs, stats = {}, {}
        for name in PREFIX_VARIANTS:
            what = "warm-up" if i < WARMUP else "timing"
            progress.update(task, description=f"(b) shared prefix: {what} {name}")
            outs[name], stats[name] = calls[name](ids)
            progress.advance(task)
        rounds.append({
            "suffix_offset": offset, "warmup": i < WARMUP, "stats": stats,
            "reused_tokens": stats["tokenfx_prefix_cache"]["reused_tokens"],
            "next_token_identical": {name: bool(torch.equal(outs[name], outs["hf"])) for name in PREFIX_VARIANTS[1:]},
        })
    timed = [r for r in rounds if not r["warmup"]]
    variants = {}
    for name in PREFIX_VARIANTS:
        variants[name] = {
            "median_ttft_seconds": statistics.median(r["stats"][name]["seconds"] for r in timed),
            "median_first_token_seconds": statistics.median(r["stats"][name]["first_token_seconds"] for r in timed),
            "runs_seconds": [r["stats"][name]["seconds"] for r in timed],
        }

    # correctness: a longer generation with reuse vs without, and vs HF
    progress.update(task, description=f"(b) check: {max_new} tokens with and without reuse")
    ids, offset = request()
    outs, check_stats = {}, {}
    for name in PREFIX_VARIANTS:
        outs[name], check_stats[name] = calls[name](ids, max_new)
    prompt = ids.shape[1]
    check = {
        "suffix_offset": offset, "new_tokens": max_new,
        "reused_tokens": check_stats["tokenfx_prefix_cache"]["reused_tokens"],
        "prefix_cache_vs_no_cache": compare(outs["tokenfx_prefix_cache"], outs["tokenfx_compiled"], prompt),
        "prefix_cache_vs_hf": compare(outs["tokenfx_prefix_cache"], outs["hf"], prompt),
        "no_cache_vs_hf": compare(outs["tokenfx_compiled"], outs["hf"], prompt),
    }
    progress.advance(task)

    reused = [r["reused_tokens"] for r in timed]
    no_cache = variants["tokenfx_compiled"]["median_ttft_seconds"]
    with_cache = variants["tokenfx_prefix_cache"]["median_ttft_seconds"]
    return {
        "prefix_tokens": PREFIX_TOKENS, "suffix_tokens": SUFFIX_TOKENS, "prefix_offset": prefix_offset,
        "prefix_cache_bytes": PREFIX_CACHE_BYTES,
        "warm_request": {"suffix_offset": offset_a, **warm},
        "variants": variants,
        "rounds": rounds,
        "reused_tokens_min": min(reused), "reused_tokens_max": max(reused),
        "ratio_ttft_no_cache_over_prefix_cache": no_cache / with_cache,
        "ratio_ttft_hf_over_prefix_cache": variants["hf"]["median_ttft_seconds"] / with_cache,
        "next_token_identical_all_rounds": all(all(r["next_token_identical"].values()) for r in rounds),
        "check": check,
        "prefix_cache_stats": {"entries_bytes": cached.prefix_cache.nbytes, "hits": cached.prefix_cache.hits,
                               "lookups": cached.prefix_cache.lookups},
    }


# -- chart ---------------------------------------------------------------------------------------------
def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    rows = results["decode"]
    prefix = results["prefix"]
    fig, (ax_a, ax_t, ax_b) = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [2.2, 2.2, 1.25]})
    labels = [f"P={r['prompt_tokens']}\nB={r['batch']}" for r in rows]
    names = {"hf": "HF generate", "tokenfx_eager": "tokenfx eager", "tokenfx_compiled": "tokenfx compiled"}
    width = 0.8 / len(names)
    for j, (name, label) in enumerate(names.items()):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
        drawn = ax_a.bar(xs, [r["variants"][name]["tokens_per_s"] for r in rows], width, label=label)
        ax_a.bar_label(drawn, fmt="%.0f", fontsize=7, padding=1)
        drawn = ax_t.bar(xs, [r["variants"][name]["median_first_token_seconds"] * 1e3 for r in rows], width, label=label)
        ax_t.bar_label(drawn, fmt="%.0f", fontsize=7, padding=1)
    ratio_labels = [f"{label}\n×{r['ratio_tokenfx_compiled_over_hf']:.2f}"
                    + ("" if all(r["identical"].values()) else " ≠HF!") for label, r in zip(labels, rows)]
    ax_a.set_xticks(range(len(rows)), ratio_labels)
    ax_a.set_ylabel("tokens / s (batch · new / wall s)")
    ax_a.set_title(f"(a) greedy decode, {results['max_new_tokens']} new tokens "
                   "(×: compiled / HF; target ≥ 1.5)", fontsize=10)
    ax_a.legend(fontsize=8)
    ax_a.margins(y=0.12)
    ax_t.set_xticks(range(len(rows)), labels)
    ax_t.set_ylabel("time to first token (ms)")
    ax_t.set_title("(a) time to first token in those calls", fontsize=10)
    ax_t.legend(fontsize=8)
    ax_t.margins(y=0.12)

    pnames = {"hf": "HF", "tokenfx_compiled": "tokenfx\ncompiled", "tokenfx_prefix_cache": "tokenfx compiled\n+ prefix cache"}
    values = [prefix["variants"][n]["median_ttft_seconds"] * 1e3 for n in pnames]
    drawn = ax_b.bar(range(len(pnames)), values, 0.6, color=["C0", "C2", "C3"])
    ax_b.bar_label(drawn, fmt="%.1f", fontsize=8, padding=1)
    ax_b.set_xticks(range(len(pnames)), list(pnames.values()), fontsize=8)
    ax_b.set_ylabel("TTFT (ms), max_new_tokens=1 call")
    ax_b.set_title(f"(b) {prefix['prefix_tokens']}-token shared prefix + {prefix['suffix_tokens']}\n"
                   f"×{prefix['ratio_ttft_no_cache_over_prefix_cache']:.1f} vs no cache (target ≥ 5), "
                   f"reused {prefix['reused_tokens_min']}–{prefix['reused_tokens_max']}", fontsize=10)
    ax_b.margins(y=0.12)
    save_figure(fig, path, results["machine"], f"tokenfx.Generator vs HF generate, {results['model']['name']}, fp32")


def summarize(console, results: dict) -> None:
    from rich.table import Table

    table = Table(title=f"(a) greedy decode, {results['max_new_tokens']} new tokens: tokens/s (median), TTFT ms")
    for column in ("P", "B", "HF tok/s", "eager tok/s", "compiled tok/s", "compiled/HF", "eager/HF",
                   "TTFT HF", "TTFT eager", "TTFT comp", "= HF (eager, comp)"):
        table.add_column(column, justify="right")
    for r in results["decode"]:
        v = r["variants"]

        def same(name):
            c = v[name]["vs_hf"]
            return "yes" if c["identical"] else f"NO {c['matching_new_tokens']}/{c['compared_new_tokens']}"

        table.add_row(str(r["prompt_tokens"]), str(r["batch"]),
                      *(f"{v[n]['tokens_per_s']:.0f}" for n in DECODE_VARIANTS),
                      f"{r['ratio_tokenfx_compiled_over_hf']:.2f}", f"{r['ratio_tokenfx_eager_over_hf']:.2f}",
                      *(f"{v[n]['median_first_token_seconds'] * 1e3:.1f}" for n in DECODE_VARIANTS),
                      f"{same('tokenfx_eager')}, {same('tokenfx_compiled')}")
    console.print(table)

    p = results["prefix"]
    table = Table(title=f"(b) TTFT, {p['prefix_tokens']}-token shared prefix + {p['suffix_tokens']}-token suffix (ms, median)")
    for column in ("variant", "TTFT (call)", "first_token_seconds"):
        table.add_column(column, justify="right")
    for name in PREFIX_VARIANTS:
        v = p["variants"][name]
        table.add_row(name, f"{v['median_ttft_seconds'] * 1e3:.1f}", f"{v['median_first_token_seconds'] * 1e3:.1f}")
    console.print(table)
    check = p["check"]
    console.print(f"no cache / prefix cache: ×{p['ratio_ttft_no_cache_over_prefix_cache']:.2f}, "
                  f"HF / prefix cache: ×{p['ratio_ttft_hf_over_prefix_cache']:.2f}; reused "
                  f"{p['reused_tokens_min']}–{p['reused_tokens_max']} tokens; next token identical in all rounds: "
                  f"{p['next_token_identical_all_rounds']}; {check['new_tokens']}-token check (reused "
                  f"{check['reused_tokens']}): cache = no cache {check['prefix_cache_vs_no_cache']['identical']}, "
                  f"cache = HF {check['prefix_cache_vs_hf']['identical']}")
    c = results["construction"]
    console.print(f"construction: eager {c['eager_s']:.1f} s, compiled {c['compiled_s']:.1f} s "
                  f"({c['compiled_cache_state']}), prefix-cache compiled {c['prefix_cache_compiled_s']:.1f} s, "
                  f"package load prefill {c['package_load_s']['prefill']:.2f} s / decode "
                  f"{c['package_load_s']['decode']:.2f} s")


def main(argv=None) -> None:
    global PROMPT_LENGTHS
    parser = benchmark_parser(__doc__)
    add_modes(parser, default="quick", quick="64 new tokens, 3 repeats (default)", full="128 new tokens, 5 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant and case")
    parser.add_argument("--max-new", type=int, default=None, help="new tokens per decode call")
    parser.add_argument("--model", default=MODEL, help="bundled model name (default smollm2)")
    parser.add_argument("--lengths", default=",".join(map(str, PROMPT_LENGTHS)), help="prompt lengths, comma-separated")
    parser.add_argument("--cold", action="store_true",
                        help="fresh temporary $TOKENFX_CACHE and Inductor cache, so the compile is timed cold")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else MODES[args.mode]["repeats"]
    max_new = args.max_new if args.max_new is not None else MODES[args.mode]["max_new"]
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    if max_new < 2:
        parser.error("--max-new must be at least 2")
    run = start_run("generate", args, console_width=150)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    PROMPT_LENGTHS = tuple(int(x) for x in args.lengths.split(","))
    model_dir = Path(tokenfx.assets.path(args.model))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids, data = held_out_tokens(Path(tokenfx.assets.path(SPLIT)), tokenizer)
    windows = Windows(ids)
    prompts = {length: [windows.take(length) for _ in range(max(BATCHES))] for length in PROMPT_LENGTHS}

    cases = len(PROMPT_LENGTHS) * len(BATCHES)
    steps = (4 + cases * len(DECODE_VARIANTS) * (WARMUP + repeats)
             + 1 + len(PREFIX_VARIANTS) * (WARMUP + repeats) + 1)
    with run.progress(64) as progress:
        task = progress.add_task("building", total=steps)
        gens, construction = build_generators(model, progress, task)
        with torch.inference_mode():
            section = time.perf_counter()
            decode = measure_decode(model, gens, prompts, max_new, repeats, progress, task)
            decode_s = time.perf_counter() - section
            section = time.perf_counter()
            prefix = measure_prefix(model, gens, windows, repeats, max_new, progress, task)
            prefix["section_s"] = time.perf_counter() - section

    results = {
        "benchmark": "generate",
        "mode": args.mode,
        "repeats": repeats,
        "warmup": WARMUP,
        "max_new_tokens": max_new,
        "threads": args.threads,
        "statistic": "median of timed calls, torch.inference_mode, variants interleaved",
        "ratio_meaning": "(a) tokenfx tokens/s / HF tokens/s, > 1: tokenfx faster (target >= 1.5 compiled); "
                         "(b) TTFT without prefix cache / TTFT with it (target >= 5)",
        "machine": run.machine,
        "model": {"name": f"tokenfx:{args.model}", "class": type(model).__name__, "dtype": "float32",
                  "attn_implementation": model.config._attn_implementation,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "layers": model.config.num_hidden_layers, "vocab_size": model.config.vocab_size},
        "prompts": {"source": "held_out files of tiny-code/split.json, each + EOS, concatenated", **data,
                    "tokens_used": windows.offset},
        "hf_call": "model.generate(ids, attention_mask=ones, max_new_tokens=N, do_sample=False, eos_token_id=[], "
                   "pad_token_id=1, streamer=<notes first-token time>)",
        "tokenfx_call": "Generator.generate(ids, attention_mask=ones, max_new_tokens=N, stop=[])",
        "construction": construction,
        "decode": decode,
        "decode_section_s": decode_s,
        "prefix": prefix,
        "cache": "fresh temporary $TOKENFX_CACHE and TORCHINDUCTOR_CACHE_DIR (cold)" if _COLD
        else f"$TOKENFX_CACHE={executor.cache_dir()} (as found)",
        "targets_met": {
            "decode_compiled_ge_1_5x_hf_all_cases": all(r["ratio_tokenfx_compiled_over_hf"] >= 1.5 for r in decode),
            "prefix_ttft_ge_5x_lower": prefix["ratio_ttft_no_cache_over_prefix_cache"] >= 5,
            "all_outputs_identical_to_hf": all(all(r["identical"].values()) for r in decode)
            and prefix["next_token_identical_all_rounds"] and prefix["check"]["prefix_cache_vs_hf"]["identical"],
        },
    }
    run.save(results, plot)
    summarize(run.console, results)
    run.print_written(results)


if __name__ == "__main__":
    main()
