"""Does lossless speculative decoding make ``tokenfx.Generator`` faster, and than what?

Target: ``tokenfx:tiny-code`` (Llama, 6 layers, 5.3 M params, BPE 4096), loaded once with
``AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)`` (attention: sdpa); the *same*
object goes to HF ``generate`` and to ``tokenfx.Generator(model)`` (the default path, ``compile="auto"``). Draft:
``tokenfx:tiny-code-draft`` (2 layers, same tokenizer), loaded the same way for HF assisted
generation; tokenfx's draft drafters load it themselves from the spec (compiled too).

Prompts come from the held-out files of ``tiny-code/split.json`` (Python stdlib files the model
was not trained on; ``root`` there, or this interpreter's stdlib when that folder is missing),
files sorted, choices drawn with ``random.Random(--seed)``, one file per prompt while files last:

  completion  a window that starts at a ``def`` / ``class`` line and ends at a line end after
              100-300 tokens (length drawn per prompt): the model continues the code.
  edit        a function's source (100-260 tokens, dedented), a line
              ``# the same function, with the argument `a` renamed to `new_a`:`` and the function's
              ``def`` header with that argument renamed: the continuation largely copies the
              earlier body, the case prompt lookup and Token Recycling are made for.

Methods, batch 1, greedy, exactly ``--max-new-tokens`` new tokens each (no stop token):

  hf_greedy          ``model.generate(ids, attention_mask=1, max_new_tokens=N, do_sample=False,
                     eos_token_id=[], pad_token_id=1)`` — the reference every output is compared with
  hf_assisted        the same + ``assistant_model=<draft>`` (HF defaults: 20 assistant tokens,
                     constant schedule, confidence threshold 0.4, adapted when scikit-learn is there)
  hf_lookup          the same + ``prompt_lookup_num_tokens=10`` (``max_matching_ngram_size`` default 2)
  tokenfx_greedy     ``Generator(model).generate(ids, max_new_tokens=N, stop=[])`` (default path)
  tokenfx_<drafter>  the same Generator + ``speculate=`` ``recycling`` (80-node template,
                     ``tree_budget="auto"``), ``lookup``, ``draft`` (chain of 4), ``draft-tree``,
                     ``dynamic`` (DySpec)

tokens/s = new tokens / wall seconds of the whole call (prefill included), per kind over all its
prompts (sum of tokens / sum of seconds); ratios are of those. ``accepted/step`` = tokens emitted
per verify step incl. the bonus: tokenfx's ``last_stats["accepted_per_step"]`` (the prefill's
first token not counted); for HF, new tokens / forward calls of the target (a forward-pre hook;
the first call is the prefill and verifies candidates too). ``identical``: output token-equal to
hf_greedy's; mismatches are recorded with where they diverge, never dropped.

Timing: each method is warmed up once on a separate prompt (the first tokenfx speculative call
compiles the tree graph, minutes on a small CPU the first time, then cached in $TOKENFX_CACHE,
and measures the verify-cost curve); then, per prompt, every method runs in turn (``--repeats``
calls each, median), under ``torch.inference_mode``. Token Recycling's matrix lives in the
Generator and stays hot across requests, as in the paper: the warm-up and the earlier prompts
have trained it by the time a prompt is timed.

Run::

    python benchmarks/speculative.py --quick     # 4 prompts of each kind, 64 new tokens
    python benchmarks/speculative.py             # 12 of each, 128 new tokens
    python benchmarks/speculative.py --methods hf_greedy,tokenfx_greedy,tokenfx_recycling --threads 2

Writes ``<out>/speculative.json`` and ``<out>/speculative.png`` (default out: benchmarks/results)
and prints a markdown table for the README.
"""

from __future__ import annotations

from machine import add_modes, benchmark_parser, pyplot, quiet_libraries, save_figure, start_run

quiet_libraries()

import ast  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sysconfig  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import tokenfx  # noqa: E402
from tokenfx.runtime import executor  # noqa: E402
from tokenfx.frontends.load import load_tokenizer  # noqa: E402
from tokenfx.runtime.generate import Generator  # noqa: E402
from generate import aoti_files, compare  # noqa: E402  (benchmarks/generate.py, next to this script)

MODEL, DRAFT = "tiny-code", "tiny-code-draft"
KINDS = ("completion", "edit")
MODES = {"quick": dict(prompts=4, max_new=64), "full": dict(prompts=12, max_new=128)}
COMPLETION_TOKENS = (100, 300)  # a completion prompt's length is drawn from this range
EDIT_FUNCTION_TOKENS = (100, 260)  # the copied function's length
HF_LOOKUP_TOKENS = 10
WARMUP = 1
# method → what the tokenfx Generator gets as speculate= (None: plain greedy); hf_* are HF generate
SPECULATE = {"tokenfx_greedy": None, "tokenfx_recycling": "recycling", "tokenfx_lookup": "lookup",
             "tokenfx_draft": "draft", "tokenfx_draft_tree": "draft-tree", "tokenfx_dynamic": "dynamic"}
METHODS = ("hf_greedy", "hf_assisted", "hf_lookup", *SPECULATE)
REFERENCE = "hf_greedy"


# -- prompts ---------------------------------------------------------------------------------------------
def held_out_files(model_dir: Path) -> tuple[Path, list[str], list[str]]:
    """The stdlib folder and the held-out files found there (sorted), and those missing."""
    split = json.loads((model_dir / "split.json").read_text())
    root = Path(split["root"])
    if not root.is_dir():
        root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(split["held_out"])
    return root, [f for f in files if (root / f).is_file()], [f for f in files if not (root / f).is_file()]


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _one_per_file(candidates: dict[str, list], count: int, rng: random.Random) -> list:
    """``count`` candidates, one per file while files last (files and candidates in seeded order)."""
    files = sorted(f for f in candidates if candidates[f])
    rng.shuffle(files)
    for f in files:
        rng.shuffle(candidates[f])
    chosen, depth = [], 0
    while len(chosen) < count and any(len(candidates[f]) > depth for f in files):
        chosen.extend(candidates[f][depth] for f in files if len(candidates[f]) > depth)
        depth += 1
    return chosen[:count]


_HEADER = re.compile(r"\s*(async\s+def|def|class)\s")


def completion_prompts(root: Path, files: list[str], tokenizer, count: int, rng: random.Random) -> list[dict]:
    """Windows starting at a def/class line, cut at a line end after a drawn 100-300 tokens."""
    candidates = {}
    for rel in files:
        lines = (root / rel).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        candidates[rel] = [(rel, i) for i, line in enumerate(lines) if _HEADER.match(line)]
    prompts = []
    for rel, start in _one_per_file(candidates, 4 * count, rng):  # spares: a window may run out of file
        lines = (root / rel).read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        want = rng.randint(*COMPLETION_TOKENS)
        text, end = "", start
        while end < len(lines) and _count(tokenizer, text) < want:
            text += lines[end]
            end += 1
        n = _count(tokenizer, text)
        if n < COMPLETION_TOKENS[0]:
            continue
        if n > COMPLETION_TOKENS[1] + 60:  # one very long last line: drop it
            text = "".join(lines[start:end - 1])
        text = text.rstrip("\n")  # BPE merges a newline with the next indent: let the model write that token
        prompts.append({"kind": "completion", "file": rel, "line": start + 1, "text": text})
        if len(prompts) == count:
            break
    return prompts


def edit_prompts(root: Path, files: list[str], tokenizer, count: int, rng: random.Random) -> list[dict]:
    """A function, a comment asking for it again with one argument renamed, and its renamed header."""
    candidates = {}
    for rel in files:
        source = (root / rel).read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines(keepends=True)
        found = []
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.body[0].lineno <= node.lineno:
                continue
            function = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
            header_lines = node.body[0].lineno - node.lineno
            header = "".join(function.splitlines(keepends=True)[:header_lines])
            body = function[len(header):]
            arguments = [a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)
                         if a.arg not in ("self", "cls")]
            used = [a for a in arguments if re.search(rf"\b{re.escape(a)}\b", body)]
            if used:
                found.append((rel, node.lineno, node.name, function, header, used[0]))
        candidates[rel] = found
    prompts = []
    for rel, line, name, function, header, old in _one_per_file(candidates, 10 * count, rng):
        n = _count(tokenizer, function)
        if not EDIT_FUNCTION_TOKENS[0] <= n <= EDIT_FUNCTION_TOKENS[1]:
            continue
        new = f"new_{old}"
        renamed = re.sub(rf"\b{re.escape(old)}\b", new, header)
        text = (function.rstrip("\n") + "\n\n" + f"# the same function, with the argument `{old}` renamed to `{new}`:\n"
                + renamed).rstrip("\n")  # as in completion_prompts: the model writes the newline + indent
        prompts.append({"kind": "edit", "file": rel, "line": line, "function": name, "renamed": [old, new],
                        "function_tokens": n, "text": text})
        if len(prompts) == count:
            break
    return prompts


# -- methods ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def counting_calls(model):
    """Counts ``model``'s forward calls while open (HF: one per verify step, the prefill included)."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def hf_call(model, ids: torch.Tensor, max_new: int, **extra) -> tuple[torch.Tensor, dict]:
    with counting_calls(model) as calls:
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=[], pad_token_id=1, **extra)
        seconds = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    return out, {"seconds": seconds, "new_tokens": new, "target_calls": calls[0],
                 "accepted_per_step": new / max(calls[0], 1)}


def tokenfx_call(gen: Generator, ids: torch.Tensor, max_new: int, speculate) -> tuple[torch.Tensor, dict]:
    start = time.perf_counter()
    out = gen.generate(ids, max_new_tokens=max_new, stop=[], speculate=speculate)
    seconds = time.perf_counter() - start
    stats = gen.last_stats
    result = {"seconds": seconds, "new_tokens": stats["new_tokens"], "first_token_seconds": stats["first_token_seconds"]}
    if speculate is None:
        result.update(target_calls=stats["new_tokens"], accepted_per_step=1.0)
    else:  # one prefill call, then one tree-verify call per step
        result.update(target_calls=stats["steps"] + 1, steps=stats["steps"],
                      accepted_per_step=stats["accepted_per_step"], tree_nodes=stats["tree_nodes"])
    return out, result


def method_calls(model, draft, gen, max_new: int) -> dict:
    calls = {
        "hf_greedy": lambda ids: hf_call(model, ids, max_new),
        "hf_assisted": lambda ids: hf_call(model, ids, max_new, assistant_model=draft),
        "hf_lookup": lambda ids: hf_call(model, ids, max_new, prompt_lookup_num_tokens=HF_LOOKUP_TOKENS),
    }
    for name, speculate in SPECULATE.items():
        calls[name] = lambda ids, s=speculate: tokenfx_call(gen, ids, max_new, s)
    return calls


# -- measurement -----------------------------------------------------------------------------------------
def warm_up(calls, methods, ids, progress, task) -> dict:
    seconds = {}
    for name in methods:
        note = " (first time: compiles the tree graph, minutes)" if name in SPECULATE and SPECULATE[name] else ""
        progress.update(task, description=f"warm-up {name}{note}")
        start = time.perf_counter()
        calls[name](ids)
        seconds[name] = time.perf_counter() - start
        progress.advance(task)
    return seconds


def measure(calls, methods, prompts, repeats, progress, task) -> list[dict]:
    rows = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt["ids"]])
        runs = {name: [] for name in methods}
        outs = {}
        for r in range(repeats):
            order = methods if r % 2 == 0 else methods[::-1]  # alternate, so a drift hits all alike
            for name in order:
                progress.update(task, description=f"{prompt['kind']} {i + 1}: {name}")
                outs[name], stats = calls[name](ids)
                runs[name].append(stats)
                progress.advance(task)
        result = {}
        for name in methods:
            seconds = statistics.median(s["seconds"] for s in runs[name])
            last = runs[name][-1]
            entry = {**last, "seconds": seconds, "tokens_per_s": last["new_tokens"] / seconds,
                     "runs_seconds": [s["seconds"] for s in runs[name]]}
            entry.update(compare(outs[name], outs[REFERENCE], ids.shape[1]))
            result[name] = entry
        rows.append({**{k: v for k, v in prompt.items() if k not in ("text", "ids")},
                     "prompt_tokens": ids.shape[1],
                     "copied_fraction": copied_fraction(outs[REFERENCE][0].tolist(), ids.shape[1]),
                     "methods": result})
    return rows


def copied_fraction(tokens: list[int], prompt: int, n: int = 3) -> float:
    """Share of the new tokens that complete an ``n``-gram already seen earlier in the text: how much
    of the continuation repeats its context (what lookup-style drafters can guess)."""
    seen = {tuple(tokens[i:i + n]) for i in range(prompt - n + 1)}
    hits = 0
    for i in range(prompt, len(tokens)):
        gram = tuple(tokens[i - n + 1:i + 1])
        hits += gram in seen
        seen.add(gram)
    return hits / max(len(tokens) - prompt, 1)


def summarize_methods(rows: list[dict], methods) -> dict:
    """Per method and prompt kind: tokens/s over all prompts of the kind, ratios, accepted length, identity."""
    summary = {}
    for name in methods:
        per_kind = {}
        for kind in (*KINDS, "all"):
            mine = [r["methods"][name] for r in rows if kind == "all" or r["kind"] == kind]
            if not mine:
                continue
            tokens, seconds = sum(m["new_tokens"] for m in mine), sum(m["seconds"] for m in mine)
            entry = {"prompts": len(mine), "new_tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "median_prompt_tokens_per_s": statistics.median(m["tokens_per_s"] for m in mine),
                     "accepted_per_step": statistics.mean(m["accepted_per_step"] for m in mine),
                     "identical": sum(m["identical"] for m in mine),
                     "not_identical": [{"kind": r["kind"], "file": r["file"], "line": r["line"],
                                        "matching_new_tokens": r["methods"][name].get("matching_new_tokens"),
                                        "first_divergence": r["methods"][name].get("first_divergence_per_row", [None])[0]}
                                       for r in rows if (kind == "all" or r["kind"] == kind)
                                       and not r["methods"][name]["identical"]]}
            if "tree_nodes" in mine[0]:
                entry["tree_nodes"] = sorted({m["tree_nodes"] for m in mine})
            per_kind[kind] = entry
        summary[name] = per_kind
    for name in methods:
        for kind, entry in summary[name].items():
            for base in ("hf_greedy", "tokenfx_greedy"):
                if base in summary:
                    entry[f"ratio_over_{base}"] = entry["tokens_per_s"] / summary[base][kind]["tokens_per_s"]
    return summary


# -- output ----------------------------------------------------------------------------------------------
def markdown_table(results: dict) -> str:
    summary = results["methods"]
    lines = ["| method | completion tok/s | edit tok/s | × HF greedy (compl / edit) | × tokenfx greedy (compl / edit) "
             "| accepted/step (compl / edit) | identical to HF greedy |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def pair(name, key, fmt):
        values = [summary[name][k].get(key) for k in KINDS if k in summary[name]]
        return " / ".join("–" if v is None else fmt.format(v) for v in values)

    for name in summary:
        s = summary[name]
        lines.append(f"| {name} | {s['completion']['tokens_per_s']:.0f} | {s['edit']['tokens_per_s']:.0f} | "
                     f"{pair(name, 'ratio_over_hf_greedy', '{:.2f}')} | {pair(name, 'ratio_over_tokenfx_greedy', '{:.2f}')} | "
                     f"{pair(name, 'accepted_per_step', '{:.2f}')} | {s['all']['identical']}/{s['all']['prompts']} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    summary = results["methods"]
    names = list(summary)
    fig, (ax_s, ax_a, ax_c) = plt.subplots(1, 3, figsize=(18, 5.2), gridspec_kw={"width_ratios": [2.4, 2.4, 1.2]})
    width = 0.38
    for j, kind in enumerate(KINDS):
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        drawn = ax_s.bar(xs, [summary[n][kind]["ratio_over_hf_greedy"] for n in names], width, label=f"{kind} prompts")
        ax_s.bar_label(drawn, fmt="%.2f", fontsize=7, padding=1)
        drawn = ax_a.bar(xs, [summary[n][kind]["accepted_per_step"] for n in names], width, label=f"{kind} prompts")
        ax_a.bar_label(drawn, fmt="%.2f", fontsize=7, padding=1)
    labels = [n.replace("_", "\n", 1) + ("" if summary[n]["all"]["identical"] == summary[n]["all"]["prompts"]
                                         else f"\n≠HF {summary[n]['all']['prompts'] - summary[n]['all']['identical']}!")
              for n in names]
    ax_s.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_s.set_xticks(range(len(names)), labels, fontsize=8)
    ax_s.set_ylabel("speed-up over HF greedy (tokens/s ratio)")
    ax_s.set_title(f"batch 1, greedy, {results['max_new_tokens']} new tokens, {results['prompts_per_kind']} prompts "
                   "per kind", fontsize=10)
    ax_s.legend(fontsize=8)
    ax_s.margins(y=0.12)
    ax_a.set_xticks(range(len(names)), labels, fontsize=8)
    ax_a.set_ylabel("tokens per target call / verify step (incl. bonus)")
    ax_a.set_title("accepted length (greedy: 1 by definition)", fontsize=10)
    ax_a.legend(fontsize=8)
    ax_a.margins(y=0.12)
    cost = results.get("verify_cost_seconds")
    if cost:
        sizes = sorted(int(t) for t in cost)
        ax_c.plot(sizes, [cost[str(t)] * 1e3 for t in sizes], marker="o")
        ax_c.set_xlabel("tree nodes T")
        ax_c.set_ylabel("ms per tree-verify call")
        ax_c.set_title(f"verify cost (batch 1, {results['verify_cost_context']} cached tokens)", fontsize=10)
        ax_c.set_ylim(bottom=0)
    else:
        ax_c.axis("off")
    save_figure(fig, path, results["machine"], "speculative decoding, tiny-code (Llama 5.3 M) + tiny-code-draft, fp32")


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__)
    add_modes(parser, default="full", quick="4 prompts of each kind, 64 new tokens (default: 12 of each, 128)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts of each kind")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per call")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per method and prompt (median)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)} ({REFERENCE} always runs: the reference)")
    parser.add_argument("--seed", type=int, default=0, help="prompt selection")
    args = parser.parse_args(argv)
    count = args.prompts if args.prompts is not None else MODES[args.mode]["prompts"]
    max_new = args.max_new_tokens if args.max_new_tokens is not None else MODES[args.mode]["max_new"]
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in chosen or m == REFERENCE]
    if count < 1 or max_new < 2 or args.repeats < 1:
        parser.error("--prompts and --repeats must be at least 1, --max-new-tokens at least 2")
    run = start_run("speculative", args, console_width=150)
    console = run.console

    from transformers import AutoModelForCausalLM
    from transformers.utils import is_sklearn_available

    model_dir = Path(tokenfx.assets.path(MODEL))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    draft = (AutoModelForCausalLM.from_pretrained(tokenfx.assets.path(DRAFT), dtype=torch.float32).eval()
             if "hf_assisted" in methods else None)
    tokenizer = load_tokenizer(f"tokenfx:{MODEL}")
    root, files, missing = held_out_files(model_dir)
    rng = random.Random(args.seed)
    completion = completion_prompts(root, files, tokenizer, count + WARMUP, rng)
    warmup_prompt, completion = completion[-1], completion[:-1]
    prompts = completion + edit_prompts(root, files, tokenizer, count, rng)
    for p in (*prompts, warmup_prompt):
        p["ids"] = tokenizer(p["text"], add_special_tokens=False)["input_ids"]
    for kind in KINDS:
        if not any(p["kind"] == kind for p in prompts):
            raise SystemExit(f"no {kind} prompts found in {root}")

    uses_tokenfx = any(m in SPECULATE for m in methods)
    steps = 1 + len(methods) * WARMUP + len(prompts) * len(methods) * args.repeats + 1
    construction = {}
    with run.progress(72) as progress:
        task = progress.add_task("Generator(model)", total=steps)
        gen = None
        if uses_tokenfx:
            before = aoti_files()
            start = time.perf_counter()
            gen = Generator(model)
            construction = {"compiled_s": time.perf_counter() - start,
                            "packages_created": sorted(aoti_files() - before)}
        progress.advance(task)
        calls = method_calls(model, draft, gen, max_new)
        with torch.inference_mode():
            before = aoti_files()
            warmup_s = warm_up(calls, methods, torch.tensor([warmup_prompt["ids"]]), progress, task)
            construction["packages_created_in_warmup"] = sorted(aoti_files() - before)
            section = time.perf_counter()
            rows = measure(calls, methods, prompts, args.repeats, progress, task)
            measure_s = time.perf_counter() - section
        progress.update(task, description="verify-cost curve (tree graph, batch 1)")
        cost, context = None, 256
        if any(SPECULATE.get(m) for m in methods):
            cost = {str(t): s for t, s in gen.verify_cost(1, context=context).items()}
        progress.advance(task)

    summary = summarize_methods(rows, methods)
    copied = {kind: statistics.mean(r["copied_fraction"] for r in rows if r["kind"] == kind) for kind in KINDS}
    results = {
        "benchmark": "speculative",
        "mode": args.mode,
        "prompts_per_kind": count,
        "max_new_tokens": max_new,
        "repeats": args.repeats,
        "warmup": WARMUP,
        "threads": args.threads,
        "seed": args.seed,
        "statistic": "per kind: sum of new tokens / sum of per-prompt wall seconds (median of --repeats calls); "
                     "methods interleaved per prompt, torch.inference_mode",
        "ratio_meaning": "tokens/s of the method / tokens/s of hf_greedy (or tokenfx_greedy), per prompt kind; > 1: faster",
        "accepted_per_step_meaning": "tokens emitted per verify step incl. the bonus; tokenfx: last_stats['accepted_per_step'] "
                                     "(prefill's token not counted); HF: new tokens / target forward calls (prefill call "
                                     "included); greedy: 1",
        "machine": run.machine,
        "model": {"name": f"tokenfx:{MODEL}", "class": type(model).__name__, "dtype": "float32",
                  "attn_implementation": model.config._attn_implementation,
                  "parameters": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers},
        "draft_model": {"name": f"tokenfx:{DRAFT}",
                        "parameters": sum(p.numel() for p in draft.parameters()) if draft is not None else None},
        "prompts": {"source": "held_out files of tiny-code/split.json", "root": str(root), "files": len(files),
                    "missing": missing, "completion_tokens_range": list(COMPLETION_TOKENS),
                    "edit_function_tokens_range": list(EDIT_FUNCTION_TOKENS),
                    "warmup": {k: v for k, v in warmup_prompt.items() if k != "ids"} | {"tokens": len(warmup_prompt["ids"])},
                    "texts": [{"kind": p["kind"], "file": p["file"], "line": p["line"], "text": p["text"]} for p in prompts]},
        "hf_calls": {
            "hf_greedy": "model.generate(ids, attention_mask=ones, max_new_tokens=N, do_sample=False, eos_token_id=[], "
                         "pad_token_id=1)",
            "hf_assisted": "the same + assistant_model=<tiny-code-draft> (HF defaults: num_assistant_tokens=20, "
                           "schedule constant, assistant_confidence_threshold=0.4)",
            "hf_lookup": f"the same + prompt_lookup_num_tokens={HF_LOOKUP_TOKENS}",
            "sklearn_available (adaptive assistant confidence threshold)": is_sklearn_available(),
        },
        "tokenfx_call": "Generator(model).generate(ids, max_new_tokens=N, stop=[], speculate=S) "
                        "(tree_budget default 'auto')",
        "construction": construction,
        "warmup_seconds": warmup_s,
        "measure_section_s": measure_s,
        "verify_cost_seconds": cost,
        "verify_cost_context": context,
        "verify_cost_meaning": "gen.verify_cost(1): seconds per tree-verify call by node count, measured once per "
                               "process at the first speculative call; the curve tree_budget='auto' sized trees with",
        "cache_dir": str(executor.cache_dir()),
        "copied_fraction_per_kind": copied,
        "copied_fraction_meaning": "share of hf_greedy's new tokens completing a 3-gram seen earlier in prompt + output",
        "methods": summary,
        "all_identical": {name: s["all"]["identical"] == s["all"]["prompts"] for name, s in summary.items()},
        "per_prompt": rows,
    }
    results["markdown_table"] = markdown_table(results)
    run.save(results, plot)
    console.print(results["markdown_table"], markup=False, highlight=False, soft_wrap=True)  # one line per row: copy-pastable
    for name, s in summary.items():
        for bad in s["all"]["not_identical"]:
            console.print(f"[red]not identical to HF greedy[/red]: {name} on {bad['kind']} {bad['file']}:{bad['line']} "
                          f"({bad['matching_new_tokens']} new tokens match, first divergence at new token "
                          f"{bad['first_divergence']})")
    console.print("new tokens that repeat a 3-gram of their context (HF greedy): "
                  + ", ".join(f"{kind} {copied[kind]:.0%}" for kind in KINDS))
    run.print_written(results)


if __name__ == "__main__":
    main()
