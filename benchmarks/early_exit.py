"""Early exit on ``tokenfx.Generator``: how much faster than the full model, and at what cost?

Target: ``tokenfx:tiny-code`` (Llama, 6 layers, 5.3 M params, BPE 4096, trained with a
LayerSkip-style early-exit loss so that every layer can exit through the shared head), loaded with
``AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)`` and run by one
``tokenfx.Generator(model, compile=True)`` (the early-exit pieces are compiled with AOTInductor
too, on first use, then cached in $TOKENFX_CACHE).

Prompts: completion prompts from the held-out files of ``tiny-code/split.json``, built as in
``benchmarks/speculative.py`` (a window that starts at a ``def`` / ``class`` line and ends at a
line end after 100-300 tokens, seeded with ``--seed``); one more of them is the warm-up prompt.

Methods, batch 1, greedy, exactly ``--max-new-tokens`` new tokens each (``stop=[]``), all through
``gen.generate(ids, max_new_tokens=N, stop=[], ...)``:

  greedy              no extra argument: the full model, the reference every output is compared with
  (a) confidence      ``early_exit=ConfidenceExit(λ)`` (CALM, softmax confidence, an exit after every
                      block, K/V of skipped blocks by state propagation) for each λ of the sweep;
                      with fewer exit points (the head costs ~1.5 blocks here, so a check after every
                      block doubles the work): ``ConfidenceExit(λ, layers=(2, 4))`` for λ = 0.5, 0.8
                      and ``ConfidenceExit(0.5, layers=(3,))``; ``ConfidenceExit(λ, measure="state")``
                      (cosine of consecutive residual streams, no head until the exit) for λ = 0.95,
                      0.98, 0.99; ``ConfidenceExit(0.9, decay=4)`` (threshold falling to 0.9 λ over
                      the request)
  (b) SkipDecode      ``early_exit=SkipDecode(min_layers=m)`` (warm-up 1 block; blocks per token fall
                      linearly from 6 to m over the request) for m = 1 … 5
  (c) self-spec       lossless drafters, ``speculate=``: ``"self:E"`` for E = 1 … 5 (draft with blocks
                      < E + the exit head, verify with the rest; chains of up to 6, cut when the
                      draft's top probability falls below 0.3, Kangaroo) and ``"self:auto"`` (DEL:
                      picks E and the draft length each round from online acceptance estimates);
                      ``SelfSpeculation(3, length=4, stop=0.0)`` ("self:3 no stop") and
                      ``SelfSpeculation("auto", stop=0.0)`` ("self:auto no stop"): no confidence cut;
                      ``SelfSpeculation(adapter=adapter, length=4)`` ("adapter:E", E = 1, 2): Kangaroo's
                      trained exit adapter (below) drafts chains of 4 inside self-speculation (blocks
                      < E are the target's own pieces and cache, the adapter's one layer keeps its
                      cache beside it), blocks >= E verify. Each drafter object is made once and reused, so DEL's estimates persist.

Kangaroo exit adapters: ``train_adapter(model, E, windows, steps=--adapter-steps, lr=2e-3,
batch=8, seed=--seed)`` (one decoder layer + norm after block E, initialised from block E,
distilled from the frozen full model with KL(full || draft)) on non-overlapping 128-token
windows of the first 120 training files of tiny-code (the stdlib .py files, test packages and
site-packages excluded as in training, minus ``split.json["held_out"]``, sorted; each file
followed by EOS). Trained adapters are cached in ``$TOKENFX_CACHE/adapters/`` (default
``~/.cache/tokenfx/adapters/``, never in the repository), keyed by E and steps, with a JSON
sidecar holding the recipe and the training seconds; a cached one is reused when its recipe
matches. Quality: mean KL(full || draft) per position, in nats, over 16 held-out windows of 128
tokens (drawn with the seed), for the bare exit head after E blocks (the model's final norm + LM
head on ``hidden_states[E]`` of ``model(ids, output_hidden_states=True)``; recorded for every exit),
the freshly initialised adapter (``_fresh``: a copy of block E and of the final norm, so the bare
head after E + 1 blocks, the adapter draft's own compute) and the trained one.

tokens/s = new tokens / wall seconds of the whole call (prefill included), per method over all
prompts (sum of tokens / sum of seconds); ``× greedy`` is the ratio to greedy's. Against greedy's
output: ``agreement`` = share of the generated positions holding the same token (mean over
prompts), ``prefix`` = mean length of the identical start of the continuation, ``identical`` =
prompts whose whole output is token-equal (the lossless drafters must be; mismatches are
recorded, never dropped). ``layers/token`` = ``last_stats["mean_layers"]`` (blocks run per
generated token; greedy 6). ``accepted/step`` = a drafter's tokens per verify step incl. the bonus.

Held-out perplexity under a policy: ``teacher_forced_nll(gen, window, early_exit=policy,
prefix=16)`` over ``--windows`` windows of ``--window-tokens`` tokens, batch 1 (a batch exits
together, which would mix the rows), drawn with the seed from the non-overlapping windows of the
held-out files' tokens (each file followed by EOS, as in training); perplexity = exp(sum of NLL /
scored tokens). The drafters are lossless: their perplexity is greedy's.

Timing: each method is warmed up once on the warm-up prompt (this compiles the early-exit pieces
and the adapters' draft models the first time, ~40 s each, and trains the DEL drafters' acceptance
estimates, which persist in the drafter objects, as they would in a server); then, per prompt,
every method runs in turn (``--repeats`` calls each, order reversed every other repeat, median),
under ``torch.inference_mode``.

Run::

    python benchmarks/early_exit.py --quick     # 4 prompts, 64 new tokens, 1 repeat, 3 windows of 128, 60 adapter steps
    python benchmarks/early_exit.py             # 12 prompts, 128 new tokens, 3 repeats, 8 windows of 256, 300 steps

Writes ``<out>/early_exit.json`` and ``<out>/early_exit.png`` (default out: benchmarks/results)
and prints markdown tables for the README (the methods; the adapters' KL).
"""

from __future__ import annotations

from machine import add_modes, benchmark_parser, pyplot, quiet_libraries, save_figure, start_run

quiet_libraries()

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import tokenfx  # noqa: E402
from tokenfx.errors import GenerationError  # noqa: E402
from tokenfx.runtime import executor  # noqa: E402
from tokenfx.runtime.early_exit import ConfidenceExit, SkipDecode, teacher_forced_nll  # noqa: E402
from tokenfx.frontends.load import load_tokenizer  # noqa: E402
from tokenfx.runtime.generate import Generator  # noqa: E402
from tokenfx.runtime.speculative.adapter import (ExitAdapter, _fresh, adapter_kl, target_digest,  # noqa: E402
                                                 train_adapter)
from tokenfx.runtime.speculative.decode import Drafter  # noqa: E402
from tokenfx.runtime.speculative.self_spec import SelfSpeculation  # noqa: E402
from generate import aoti_files, held_out_tokens  # noqa: E402  (benchmarks/, next to this script)
from speculative import completion_prompts, held_out_files  # noqa: E402

MODEL = "tiny-code"
MODES = {
    "quick": dict(prompts=4, max_new=64, repeats=1, windows=3, window_tokens=128, thresholds=(0.5, 0.8, 0.95),
                  adapter_steps=60),
    "full": dict(prompts=12, max_new=128, repeats=3, windows=8, window_tokens=256,
                 thresholds=(0.3, 0.5, 0.7, 0.8, 0.9, 0.95), adapter_steps=300),
}
FEWER_EXITS = (((2, 4), 0.5), ((2, 4), 0.8), ((3,), 0.5))  # (exit points, λ): softmax, a check at fewer blocks
STATE_THRESHOLDS = (0.95, 0.98, 0.99)  # cosine of consecutive residual streams
DECAY = (0.9, 4.0)  # (λ, τ): λ falls to 0.9 λ over the request
SKIP_MIN_LAYERS = (1, 2, 3, 4, 5)
SELF_SPEC = ("self:1", "self:2", "self:3", "self:4", "self:5", "self:auto")
ADAPTER_LAYERS = (1, 2)  # Kangaroo exit adapters after this many blocks
ADAPTER_LR, ADAPTER_BATCH, ADAPTER_DRAFT_LENGTH = 2e-3, 8, 4
ADAPTER_TRAIN_FILES, ADAPTER_WINDOW = 120, 128  # training data: the first files, cut into windows of this many tokens
KL_WINDOWS = 16  # held-out windows of ADAPTER_WINDOW tokens for the adapters' KL
NLL_PREFIX = 16
WARMUP = 1
REFERENCE = "greedy"


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    family: str  # greedy, confidence, skip, self
    label: str  # the point's label in the plot (self family: the bar's tick)
    early_exit: ConfidenceExit | SkipDecode | None = None
    speculate: str | Drafter | None = None  # a Drafter object is made once here and reused by every call


def methods_for(thresholds, adapters: dict[int, ExitAdapter]) -> list[Method]:
    methods = [Method(REFERENCE, "greedy", "greedy")]
    methods += [Method(f"softmax@{lam}", "confidence", f"{lam}", early_exit=ConfidenceExit(lam)) for lam in thresholds]
    methods += [Method(f"softmax@{lam} exit{'s' * (len(at) > 1)} {','.join(map(str, at))}", "confidence",
                       f"{lam} @{','.join(map(str, at))}" if len(at) == 1 else f"{lam}",
                       early_exit=ConfidenceExit(lam, layers=at)) for at, lam in FEWER_EXITS]
    methods += [Method(f"state@{lam}", "confidence", f"{lam}", early_exit=ConfidenceExit(lam, measure="state"))
                for lam in STATE_THRESHOLDS]
    lam, tau = DECAY
    methods.append(Method(f"softmax@{lam}+decay{tau:g}", "confidence", f"{lam}, τ={tau:g}",
                          early_exit=ConfidenceExit(lam, decay=tau)))
    methods += [Method(f"skip:min{m}", "skip", f"{m}", early_exit=SkipDecode(min_layers=m)) for m in SKIP_MIN_LAYERS]
    methods += [Method(s, "self", "E=" + s.split(":")[1] if s != "self:auto" else "auto", speculate=s)
                for s in SELF_SPEC]
    methods += [Method("self:3 no stop", "self", "E=3\nno stop", speculate=SelfSpeculation(3, length=4, stop=0.0)),
                Method("self:auto no stop", "self", "auto\nno stop", speculate=SelfSpeculation("auto", stop=0.0))]
    methods += [Method(f"adapter:{e}", "self", f"adapter\nE={e}",
                       speculate=SelfSpeculation(adapter=adapters[e], length=ADAPTER_DRAFT_LENGTH))
                for e in ADAPTER_LAYERS]
    return methods


def speculate_text(speculate) -> str | None:
    """``speculate=`` as the JSON records it."""
    if speculate is None or isinstance(speculate, str):
        return speculate
    if isinstance(speculate.adapter, ExitAdapter):
        return f"SelfSpeculation(adapter=<exit adapter after {speculate.adapter.layer} blocks>, length={speculate.length})"
    return f"SelfSpeculation({speculate.layer!r}, length={speculate.length}, stop={speculate.stop})"


# -- Kangaroo exit adapters ------------------------------------------------------------------------------------
def training_windows(root: Path, held_out: list[str], tokenizer, files: int, size: int) -> tuple[torch.Tensor, dict]:
    """``[n, size]`` non-overlapping windows of the first ``files`` training files of tiny-code (sorted; the
    training script's rule: stdlib .py files, no test packages or site-packages, not held out), each + EOS."""
    held, chosen = set(held_out), []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if ("site-packages" in rel.parts or any(p in ("test", "tests", "idle_test") for p in rel.parts)
                or rel.as_posix() in held):
            continue
        chosen.append(rel.as_posix())
        if len(chosen) == files:
            break
    ids: list[int] = []
    for rel in chosen:
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // size
    info = {"root": str(root), "files": len(chosen), "first": chosen[0], "last": chosen[-1], "tokens": len(ids),
            "windows": n, "window_tokens": size}
    return torch.tensor(ids[:n * size]).view(n, size), info


def exit_adapter(model, layer: int, data: torch.Tensor, recipe: dict, cache: Path) -> tuple[ExitAdapter, dict]:
    """The adapter after ``layer`` blocks: the cached one when its sidecar's recipe matches, else trained now."""
    path = cache / f"{MODEL}-exit{layer}-steps{recipe['steps']}.safetensors"
    sidecar = path.with_suffix(".json")
    recipe = {**recipe, "layer": layer}
    if path.is_file() and sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        if meta["recipe"] == recipe:
            try:
                return ExitAdapter.load(path, model), {**meta, "path": str(path), "trained_this_run": False}
            except GenerationError:  # an adapter of an older format or target digest: train again
                pass
    start = time.perf_counter()
    adapter = train_adapter(model, layer, data, steps=recipe["steps"], lr=recipe["lr"], batch=recipe["batch"],
                            seed=recipe["seed"], progress=True)
    meta = {"recipe": recipe, "train_seconds": time.perf_counter() - start}
    cache.mkdir(parents=True, exist_ok=True)
    adapter.save(path)
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    return adapter, {**meta, "path": str(path), "trained_this_run": True}


def kl(full: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean ``KL(full || softmax(logits))`` per position; ``full``: the full model's log-probabilities."""
    draft = logits.float().log_softmax(-1)
    return float(torch.nn.functional.kl_div(draft, full, log_target=True, reduction="none").sum(-1).mean())


@torch.no_grad()
def adapter_quality(model, adapters: dict[int, ExitAdapter], ids: torch.Tensor) -> dict:
    """Held-out KL(full || draft) of each bare exit head, and of each adapter before and after training."""
    out = model(ids, output_hidden_states=True)
    full = out.logits.float().log_softmax(-1)
    bare = {e: kl(full, model.lm_head(model.model.norm(out.hidden_states[e])))
            for e in range(1, model.config.num_hidden_layers)}
    return {"bare_head": bare,
            "adapters": {e: {"fresh": adapter_kl(model, _fresh(model, e), ids), "trained": adapter_kl(model, a, ids)}
                         for e, a in adapters.items()}}


# -- measurement -------------------------------------------------------------------------------------------
def call(gen: Generator, method: Method, ids: torch.Tensor, max_new: int) -> tuple[torch.Tensor, dict]:
    start = time.perf_counter()
    out = gen.generate(ids, max_new_tokens=max_new, stop=[], early_exit=method.early_exit, speculate=method.speculate)
    seconds = time.perf_counter() - start
    stats = gen.last_stats
    result = {"seconds": seconds, "new_tokens": stats["new_tokens"]}
    if method.speculate is not None:
        result.update(steps=stats["steps"], accepted_per_step=stats["accepted_per_step"])
    else:
        result["mean_layers"] = stats.get("mean_layers", float(gen.layout.layers))
        if "exit_histogram" in stats:
            result["exit_histogram"] = stats["exit_histogram"]
    return out, result


def agreement(out: torch.Tensor, reference: torch.Tensor, prompt: int) -> dict:
    """How far a batch-1 output follows the reference's continuation."""
    a, b = out[0, prompt:], reference[0, prompt:]
    n = min(len(a), len(b))
    equal = (a[:n] == b[:n]).tolist()
    prefix = equal.index(False) if False in equal else n
    return {"identical": bool(torch.equal(out, reference)), "agreement": sum(equal) / max(len(b), 1),
            "identical_prefix": prefix}


def warm_up(gen, methods, ids, max_new, progress, task) -> dict:
    seconds = {}
    for m in methods:
        progress.update(task, description=f"warm-up {m.name} (first time: compiles its pieces, ~40 s each)")
        start = time.perf_counter()
        call(gen, m, ids, max_new)
        seconds[m.name] = time.perf_counter() - start
        progress.advance(task)
    return seconds


def measure(gen, methods, prompts, max_new, repeats, progress, task) -> list[dict]:
    rows = []
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt["ids"]])
        runs = {m.name: [] for m in methods}
        outs = {}
        for r in range(repeats):
            for m in methods if r % 2 == 0 else methods[::-1]:  # alternate, so a drift hits all alike
                progress.update(task, description=f"prompt {i + 1}: {m.name}")
                outs[m.name], stats = call(gen, m, ids, max_new)
                runs[m.name].append(stats)
                progress.advance(task)
        result = {}
        for m in methods:
            seconds = statistics.median(s["seconds"] for s in runs[m.name])
            last = runs[m.name][-1]
            result[m.name] = {**last, "seconds": seconds, "tokens_per_s": last["new_tokens"] / seconds,
                              "runs_seconds": [s["seconds"] for s in runs[m.name]],
                              **agreement(outs[m.name], outs[REFERENCE], ids.shape[1])}
        rows.append({"file": prompt["file"], "line": prompt["line"], "prompt_tokens": ids.shape[1], "methods": result})
    return rows


def nll_windows(tokens: list[int], count: int, size: int, rng: random.Random) -> list[list[int]]:
    """``count`` of the non-overlapping ``size``-token windows of ``tokens``, drawn with ``rng``, in order."""
    starts = sorted(rng.sample(range(len(tokens) // size), count))
    return [tokens[s * size:(s + 1) * size] for s in starts]


def perplexities(gen, methods, windows, progress, task) -> dict:
    """Per method (the lossless drafters excluded), NLL over all windows, scored one at a time."""
    result = {}
    for m in methods:
        if m.family == "self":
            continue
        nll = tokens = layers = 0.0
        for j, window in enumerate(windows):
            progress.update(task, description=f"held-out perplexity {m.name}: window {j + 1}")
            r = teacher_forced_nll(gen, torch.tensor([window]), early_exit=m.early_exit, prefix=NLL_PREFIX)
            nll += r["nll"] * r["tokens"]
            tokens += r["tokens"]
            layers += r["mean_layers"] * r["tokens"]
            progress.advance(task)
        result[m.name] = {"nll": nll / tokens, "perplexity": math.exp(nll / tokens), "tokens": int(tokens),
                          "mean_layers": layers / tokens}
    return result


def summarize(rows: list[dict], methods, ppl: dict) -> dict:
    summary = {}
    for m in methods:
        mine = [r["methods"][m.name] for r in rows]
        tokens, seconds = sum(x["new_tokens"] for x in mine), sum(x["seconds"] for x in mine)
        entry = {"family": m.family, "label": m.label,
                 "policy": None if m.early_exit is None else {"kind": type(m.early_exit).__name__,
                                                              **dataclasses.asdict(m.early_exit)},
                 "speculate": speculate_text(m.speculate), "prompts": len(mine), "new_tokens": tokens,
                 "seconds": seconds,
                 "tokens_per_s": tokens / seconds,
                 "agreement": statistics.mean(x["agreement"] for x in mine),
                 "identical_prefix": statistics.mean(x["identical_prefix"] for x in mine),
                 "identical": sum(x["identical"] for x in mine),
                 "not_identical": [{"file": r["file"], "line": r["line"],
                                    "identical_prefix": r["methods"][m.name]["identical_prefix"],
                                    "agreement": r["methods"][m.name]["agreement"]}
                                   for r in rows if not r["methods"][m.name]["identical"]]}
        if m.family == "self":
            entry["accepted_per_step"] = statistics.mean(x["accepted_per_step"] for x in mine)
            entry["steps"] = sum(x["steps"] for x in mine)
        else:
            entry["mean_layers"] = statistics.mean(x["mean_layers"] for x in mine)
            entry["held_out"] = ppl[m.name]
        if "exit_histogram" in mine[0]:
            histogram = {}
            for x in mine:
                for k, v in x["exit_histogram"].items():
                    histogram[k] = histogram.get(k, 0) + v
            entry["exit_histogram"] = dict(sorted(histogram.items(), key=lambda kv: int(kv[0])))
        summary[m.name] = entry
    for entry in summary.values():
        entry["speedup"] = entry["tokens_per_s"] / summary[REFERENCE]["tokens_per_s"]
    return summary


# -- output --------------------------------------------------------------------------------------------------
def markdown_table(summary: dict) -> str:
    lines = ["| method | tok/s | × greedy | agreement | identical prefix | identical | layers/token | held-out ppl "
             "| accepted/step |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    full_ppl = summary[REFERENCE]["held_out"]["perplexity"]
    for name, s in summary.items():
        layers = f"{s['mean_layers']:.2f}" if "mean_layers" in s else "–"
        ppl = f"{s['held_out']['perplexity']:.1f}" if "held_out" in s else f"{full_ppl:.1f} (lossless)"
        accepted = f"{s['accepted_per_step']:.2f}" if "accepted_per_step" in s else "–"
        lines.append(f"| {name} | {s['tokens_per_s']:.0f} | {s['speedup']:.2f} | {s['agreement']:.1%} | "
                     f"{s['identical_prefix']:.1f} | {s['identical']}/{s['prompts']} | {layers} | {ppl} | {accepted} |")
    return "\n".join(lines)


def adapter_table(adapters: dict) -> str:
    lines = ["| adapter | steps | training s | KL bare head after E | KL fresh (= bare head after E + 1) "
             "| KL trained |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, a in adapters.items():
        cached = "" if a["trained_this_run"] else " (cached)"
        lines.append(f"| {name} | {a['recipe']['steps']} | {a['train_seconds']:.0f}{cached} | "
                     f"{a['kl_bare_head']:.3f} | {a['kl_fresh']:.3f} | {a['kl_trained']:.3f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    summary = results["methods"]
    fig, (ax_a, ax_p, ax_s) = plt.subplots(1, 3, figsize=(20, 5.6), gridspec_kw={"width_ratios": [2, 2, 1.8]})
    fewer = FEWER_EXITS[0][0]
    curves = (("confidence: softmax λ, exit after every block", "o-", "C0"),
              (f"confidence: softmax λ, exits after {', '.join(map(str, fewer))} blocks", "o--", "C4"),
              ("confidence: state (cosine) λ", "^-", "C5"),
              ("SkipDecode (min layers)", "s-", "C1"),
              ("confidence, other", "D", "C2"))

    def curve(s) -> str | None:
        if s["family"] == "skip":
            return curves[3][0]
        if s["family"] != "confidence":
            return None
        p = s["policy"]
        layers = None if p["layers"] is None else tuple(p["layers"])
        if p["decay"] is None and p["measure"] == "softmax" and layers in (None, fewer):
            return curves[0][0] if layers is None else curves[1][0]
        if p["decay"] is None and p["measure"] == "state" and layers is None:
            return curves[2][0]
        return curves[4][0]

    for ax, x_of, xlabel in ((ax_a, lambda s: s["agreement"], "agreement with full greedy (share of positions)"),
                             (ax_p, lambda s: s["held_out"]["perplexity"], "held-out perplexity under the policy")):
        for label, style, color in curves:
            points = sorted((x_of(s), s["speedup"], s["label"]) for s in summary.values() if curve(s) == label)
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], style, color=color, label=label, ms=5)
            for i, (x, y, text) in enumerate(points):  # staggered: points of a sweep may nearly coincide
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, (4, -10, 14)[i % 3]), fontsize=7,
                            color=color)
        greedy = summary[REFERENCE]
        ax.plot([x_of(greedy)], [1.0], "k*", ms=11, label="full greedy")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speed-up over full greedy (tokens/s ratio)")
        ax.legend(fontsize=8)
    ax_a.set_title(f"batch 1, greedy, {results['max_new_tokens']} new tokens, {results['prompts']} held-out prompts",
                   fontsize=10)
    ax_p.set_title(f"perplexity: {results['windows']['count']} windows × {results['windows']['tokens']} tokens, "
                   f"prefix {NLL_PREFIX}, teacher forced", fontsize=10)

    spec = [s for s in summary.values() if s["family"] == "self"]
    colors = ["C4" if "adapter=" in s["speculate"] else "C9" if "stop=0.0" in s["speculate"] else "C3"
              for s in spec]
    drawn = ax_s.bar(range(len(spec)), [s["speedup"] for s in spec], color=colors)
    ax_s.bar_label(drawn, labels=[f"{s['speedup']:.2f}\n{s['accepted_per_step']:.2f}/step" for s in spec],
                   fontsize=7, padding=1)
    ax_s.set_xticks(range(len(spec)), [s["label"] + ("" if s["identical"] == s["prompts"] else
                                                     f"\n≠greedy {s['prompts'] - s['identical']}!")
                                       for s in spec], fontsize=7.5)
    ax_s.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_s.set_ylabel("speed-up over full greedy (tokens/s ratio)")
    ax_s.set_title("lossless drafters: self-speculation (stop 0.3 / no stop), Kangaroo adapters;\n"
                   "speed-up, accepted/step", fontsize=10)
    ax_s.margins(y=0.15)
    save_figure(fig, path, results["machine"], "early exit, tiny-code (Llama 5.3 M, 6 layers, LayerSkip-trained), fp32, compiled")


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__)
    add_modes(parser, default="full", quick="4 prompts, 64 new tokens, 1 repeat, 3 windows of 128, λ in 0.5, 0.8, "
                                            "0.95, 60 adapter steps (default: 12, 128, 3, 8 of 256, λ in 0.3 … 0.95, 300)")
    parser.add_argument("--prompts", type=int, default=None, help="completion prompts")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per call")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method and prompt (median)")
    parser.add_argument("--windows", type=int, default=None, help="held-out windows for the perplexity")
    parser.add_argument("--window-tokens", type=int, default=None, help="tokens per held-out window")
    parser.add_argument("--adapter-steps", type=int, default=None, help="training steps of each exit adapter")
    parser.add_argument("--seed", type=int, default=0, help="prompt and window selection, adapter training")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    count = args.prompts if args.prompts is not None else mode["prompts"]
    max_new = args.max_new_tokens if args.max_new_tokens is not None else mode["max_new"]
    repeats = args.repeats if args.repeats is not None else mode["repeats"]
    n_windows = args.windows if args.windows is not None else mode["windows"]
    window_tokens = args.window_tokens if args.window_tokens is not None else mode["window_tokens"]
    adapter_steps = args.adapter_steps if args.adapter_steps is not None else mode["adapter_steps"]
    if min(count, repeats, n_windows, adapter_steps) < 1 or max_new < 2 or window_tokens <= NLL_PREFIX + 1:
        parser.error(f"--prompts, --repeats, --windows and --adapter-steps must be at least 1, "
                     f"--max-new-tokens at least 2, --window-tokens more than {NLL_PREFIX + 1}")
    run = start_run("early_exit", args, console_width=150)
    console = run.console

    from transformers import AutoModelForCausalLM

    model_dir = Path(tokenfx.assets.path(MODEL))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(f"tokenfx:{MODEL}")
    root, files, missing = held_out_files(model_dir)
    rng = random.Random(args.seed)
    prompts = completion_prompts(root, files, tokenizer, count + WARMUP, rng)
    if len(prompts) < count + WARMUP:
        raise SystemExit(f"only {len(prompts)} completion prompts found in {root}")
    warmup_prompt, prompts = prompts[-1], prompts[:-1]
    for p in (*prompts, warmup_prompt):
        p["ids"] = tokenizer(p["text"], add_special_tokens=False)["input_ids"]
    held_out, held_out_info = held_out_tokens(model_dir, tokenizer)
    windows = nll_windows(held_out, n_windows, window_tokens, rng)

    data, data_info = training_windows(root, files + missing, tokenizer, ADAPTER_TRAIN_FILES, ADAPTER_WINDOW)
    recipe = {"model": target_digest(model), "steps": adapter_steps, "lr": ADAPTER_LR, "batch": ADAPTER_BATCH,
              "seed": args.seed, "data": data_info}
    adapter_cache = executor.cache_dir() / "adapters"
    adapters, adapter_info = {}, {}
    for e in ADAPTER_LAYERS:
        console.print(f"exit adapter after {e} blocks: {adapter_steps} steps on {data_info['windows']} training "
                      f"windows (or cached in {adapter_cache})")
        adapters[e], adapter_info[f"adapter:{e}"] = exit_adapter(model, e, data, recipe, adapter_cache)
    kl_ids = torch.tensor(nll_windows(held_out, KL_WINDOWS, ADAPTER_WINDOW, random.Random(args.seed)))
    quality = adapter_quality(model, adapters, kl_ids)
    for e in ADAPTER_LAYERS:
        adapter_info[f"adapter:{e}"].update(kl_fresh=quality["adapters"][e]["fresh"],
                                            kl_trained=quality["adapters"][e]["trained"],
                                            kl_bare_head=quality["bare_head"][e])
    methods = methods_for(mode["thresholds"], adapters)

    scored = [m for m in methods if m.family != "self"]
    steps = 1 + len(methods) * WARMUP + len(prompts) * len(methods) * repeats + len(scored) * len(windows)
    with run.progress(72) as progress:
        task = progress.add_task("Generator(compile=True)", total=steps)
        before = aoti_files()
        start = time.perf_counter()
        gen = Generator(model, compile=True)
        construction = {"compiled_s": time.perf_counter() - start, "packages_created": sorted(aoti_files() - before)}
        progress.advance(task)
        with torch.inference_mode():
            before = aoti_files()
            warmup_s = warm_up(gen, methods, torch.tensor([warmup_prompt["ids"]]), max_new, progress, task)
            construction["packages_created_in_warmup"] = sorted(aoti_files() - before)
            section = time.perf_counter()
            rows = measure(gen, methods, prompts, max_new, repeats, progress, task)
            measure_s = time.perf_counter() - section
            section = time.perf_counter()
            ppl = perplexities(gen, scored, windows, progress, task)
            perplexity_s = time.perf_counter() - section
    drafters = {m.name: gen.drafter(m.speculate) for m in methods if m.family == "self"}
    dels = {name: d for name, d in drafters.items() if isinstance(d, SelfSpeculation) and d.auto}

    summary = summarize(rows, methods, ppl)
    results = {
        "benchmark": "early_exit",
        "mode": args.mode,
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "repeats": repeats,
        "warmup": WARMUP,
        "threads": args.threads,
        "seed": args.seed,
        "statistic": "sum of new tokens / sum of per-prompt wall seconds (median of --repeats calls); methods "
                     "interleaved per prompt, torch.inference_mode",
        "speedup_meaning": "tokens/s of the method / tokens/s of greedy (the same Generator, no early_exit); "
                           "> 1: faster",
        "agreement_meaning": "share of generated positions whose token equals greedy's at that position (mean over "
                             "prompts); identical_prefix: mean count of new tokens before the first difference; "
                             "identical: prompts with a token-equal output",
        "mean_layers_meaning": "blocks run per generated token (last_stats['mean_layers']; greedy: all 6)",
        "accepted_per_step_meaning": "lossless drafters (self-speculation, adapters): tokens emitted per verify "
                                     "step incl. the bonus (last_stats['accepted_per_step'])",
        "machine": run.machine,
        "model": {"name": f"tokenfx:{MODEL}", "class": type(model).__name__, "dtype": "float32",
                  "parameters": sum(p.numel() for p in model.parameters()), "layers": model.config.num_hidden_layers,
                  "training_held_out_perplexity_per_exit": json.loads((model_dir / "training.json").read_text())
                  ["held_out_perplexity"]},
        "generate_call": "Generator(model, compile=True).generate(ids, max_new_tokens=N, stop=[], early_exit=P | "
                         "speculate=S)",
        "prompts_info": {"source": "held_out files of tiny-code/split.json, completion prompts as in "
                                   "benchmarks/speculative.py", "root": str(root), "files": len(files),
                         "missing": missing,
                         "warmup": {k: v for k, v in warmup_prompt.items() if k != "ids"}
                         | {"tokens": len(warmup_prompt["ids"])},
                         "texts": [{"file": p["file"], "line": p["line"], "text": p["text"]} for p in prompts]},
        "windows": {"count": len(windows), "tokens": window_tokens, "prefix": NLL_PREFIX,
                    "source": "non-overlapping windows of the held-out files' tokens (each file + EOS), drawn with "
                              "the seed", "held_out": held_out_info,
                    "call": "teacher_forced_nll(gen, window[1, tokens], early_exit=P, prefix=16), batch 1"},
        "construction": construction,
        "warmup_seconds": warmup_s,
        "measure_section_s": measure_s,
        "perplexity_section_s": perplexity_s,
        "cache_dir": str(executor.cache_dir()),
        "self_auto": {name: {"alpha": d.alpha().tolist(), "plan_after": list(d.plan()), "rounds": d.rounds}
                      for name, d in dels.items()},
        "self_auto_meaning": "per DEL drafter: its alpha() after the run (estimated acceptance rate of the exit "
                             "after block E, index E - 1; the last entry is the prior, never measured); plan_after: "
                             "the (E, draft length) its next round would use; rounds: verify rounds it ran",
        "adapters": {"per_adapter": adapter_info,
                     "bare_head_kl_per_exit": quality["bare_head"],
                     "kl_meaning": "mean KL(full model || draft) per position, nats, over the held-out windows: "
                                   "kl_fresh / kl_trained: the adapter's draft (blocks < E + adapter block + norm + "
                                   "head) freshly initialised (_fresh: a copy of block E and the final norm, i.e. the "
                                   "bare head after E + 1 blocks) / trained; kl_bare_head and bare_head_kl_per_exit: "
                                   "the model's final norm + head on hidden_states[E]; train_seconds: train_adapter's "
                                   "wall time when it was trained (cached adapters: read from the sidecar)",
                     "kl_windows": {"count": len(kl_ids), "tokens": ADAPTER_WINDOW,
                                    "source": "non-overlapping windows of the held-out files' tokens, drawn with "
                                              "random.Random(seed)"},
                     "cache": str(adapter_cache)},
        "methods": summary,
        "lossless_all_identical": {n: s["identical"] == s["prompts"] for n, s in summary.items()
                                   if s["family"] == "self"},
        "per_prompt": rows,
    }
    results["markdown_table"] = markdown_table(summary)
    results["adapter_table"] = adapter_table(adapter_info)
    run.save(results, plot)
    console.print(results["markdown_table"], markup=False, highlight=False, soft_wrap=True)  # one line per row
    console.print()
    console.print(results["adapter_table"], markup=False, highlight=False, soft_wrap=True)
    for name, s in summary.items():
        if s["family"] == "self":
            for bad in s["not_identical"]:
                console.print(f"[red]not identical to greedy[/red]: {name} on {bad['file']}:{bad['line']} "
                              f"(first difference at new token {bad['identical_prefix']})")
    for name, d in results["self_auto"].items():
        console.print(f"{name} acceptance estimates per exit: "
                      + ", ".join(f"E={e + 1} {a:.2f}" for e, a in enumerate(d["alpha"][:-1]))
                      + f"; next round: E={d['plan_after'][0]}, {d['plan_after'][1]} draft tokens")
    run.print_written(results)


if __name__ == "__main__":
    main()
