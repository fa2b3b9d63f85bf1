"""How fast are the Triton kernels of the tokenfx::* ops on a CUDA GPU, against their torch references?

Needs a CUDA device (exits with code 2 and a message without one). Three ops, each kernel
called through its launcher in ``tokenfx.codegen.triton.*``:

(a) ``tokenfx::tree_attention``: a block of T draft-tree queries over a cache of S keys plus
    the tree's own T keys. q ``[B, H, T, D]``, one layer's K/V buffer ``[B, Hkv, S + T, D]``
    holding the cached prefix (rows ``b > 0`` left-padded by up to S/16 masked slots) then
    the tree at slots ``S … S+T-1``; key_mask int64 ``[B, S + T]`` (as the runtime's
    cache_mask), tree_mask ``[B, T, T]`` the ancestor closure of a random tree per row.
    D = 128, scale = 1/sqrt(D); the grid is dtype × B × (H, Hkv) × T × S (``--quick`` prunes it):
      triton      ``tree_attention_triton`` on the buffer (the op's CUDA implementation)
      reference   ``tree_attention_reference``: dense bool ``[B, 1, T, S+T]`` mask built per
                  call, then SDPA with ``enable_gqa`` (the op's CPU implementation, run on CUDA)
      hf_sdpa     what a Hugging Face-style tree verifier does per layer: ``cat(cache, tree)``
                  K and V (``DynamicCache.update``), ``repeat_kv`` when H != Hkv (HF's SDPA path
                  does not use ``enable_gqa`` when a mask is given), SDPA with a float
                  ``[B, 1, T, S+T]`` mask (0 / finfo.min). The mask is built once per step and
                  shared by the layers, so it is built outside the timed call.
    Correctness: every variant's max abs error against ``tree_attention_reference`` in fp64.
(b) ``tokenfx::kv_compact``: cache ``[L=32, 2, B, Hkv=8, S=4096, D=128]`` bf16, the runtime's
    pattern (speculative/decode.py): a 64-node tree written at scratch slots after the longest
    row, each row's accepted path (root first, 1…A nodes, padded by repeating the last pair)
    moved to its own tail. ``kv_compact_triton`` vs ``kv_compact_reference``; bit-exact check.
(c) ``tokenfx::add_norm``: x, residual ``[rows, C]`` bf16, RMSNorm (weight) and LayerNorm
    (weight, bias):
      triton      ``add_norm_triton``
      reference   ``add_norm_reference`` (the op's CPU implementation, run on CUDA)
      torch       ``x + residual``, then ``F.rms_norm`` / ``F.layer_norm`` (the unfused graph)
    Correctness: ``summed`` bit-exact against ``x + residual``; ``normed``'s max abs error
    against the reference in fp64.

Every case also checks that ``torch.ops.tokenfx.<op>`` on CUDA gives the launcher's result
bit for bit (the op dispatches to the Triton kernel).

Timing: ``gpu_us`` is the median over ``reps`` calls of the GPU time between two CUDA events
around one call, with L2 flushed before each call (a 256 MiB write, as
``triton.testing.do_bench`` does; in a real model the next layer's weights and cache evict
this layer's); reps are sized to ~``--target-ms`` of GPU time per measurement (10 to 200).
``host_us`` is the wall time per call of ``reps`` back-to-back calls, L2 warm: it includes
Python and launch overhead, which dominates at small shapes. Speed-up = variant / triton
(> 1: the kernel is faster), on ``gpu_us``; the ``host`` ratios are given apart.
Tolerance: a kernel passes when its error is at most 2 × max(the reference's own error in
the same dtype, eps(dtype) × max |fp64 result|).

Run::

    python benchmarks/kernels_gpu.py            # full grid, ~2-3 minutes on an H200
    python benchmarks/kernels_gpu.py --quick    # a few cases per op, < 1 minute
    bash benchmarks/run_gpu.sh                  # on a GPU machine without our venv (see there)

Writes ``--out`` (default benchmarks/results/kernels_gpu.json), rewritten after every case so
a run cut short keeps what it measured, and a plot beside it (same name, ``.png``) when
matplotlib is installed. Exit code: 0 all checks passed, 1 a check failed or a case raised
(the JSON says which), 2 no CUDA device / torch / triton.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmark the working tree's tokenfx, installed or not

DEFAULT_OUT = REPO / "benchmarks" / "results" / "kernels_gpu.json"
HEAD_DIM = 128
TREE_GRID = {
    "full": dict(dtypes=("bfloat16", "float16"), batches=(1, 4, 16), heads=((32, 8), (32, 32)),
                 tree_sizes=(8, 32, 64, 81), cache_lens=(512, 2048, 8192)),
    "quick": dict(dtypes=("bfloat16",), batches=(1, 16), heads=((32, 8),), tree_sizes=(32, 81), cache_lens=(512, 8192)),
}
KV_COMPACT_GRID = {
    "full": dict(layers=32, kv_heads=8, head_dim=128, cache_len=4096, tree=64, batches=(1, 16), accepted=(4, 8)),
    "quick": dict(layers=32, kv_heads=8, head_dim=128, cache_len=4096, tree=64, batches=(1, 16), accepted=(8,)),
}
ADD_NORM_GRID = {
    "full": dict(rows=(1, 64, 4096), widths=(4096, 8192), kinds=("rmsnorm", "layernorm")),
    "quick": dict(rows=(1, 4096), widths=(4096,), kinds=("rmsnorm",)),
}
EPS = {"rmsnorm": 1e-6, "layernorm": 1e-5}
L2_FLUSH_BYTES = 256 * 2**20
DEVICE = "cuda"
ABORT_AFTER_FAILURES = 3  # consecutive raising cases: the rest of that op's grid would fail alike


def require_cuda():
    """torch and triton with a CUDA device, or exit 2 with a message (no traceback)."""
    try:
        import torch
    except ImportError as exc:
        sys.stderr.write(f"kernels_gpu: torch is not importable ({exc}); this benchmark needs torch with CUDA "
                         f"and triton. Nothing measured.\n")
        sys.exit(2)
    if not torch.cuda.is_available():
        sys.stderr.write(f"kernels_gpu: no CUDA device (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda}); the Triton kernels need an NVIDIA GPU. Nothing measured.\n")
        sys.exit(2)
    try:
        import triton
    except ImportError as exc:
        sys.stderr.write(f"kernels_gpu: triton is not importable ({exc}); nothing measured.\n")
        sys.exit(2)
    return torch, triton


# Set by main() once CUDA is known to be there: the imports below need it.
torch = F = triton = None


# -- timing ----------------------------------------------------------------------------------------------
class Timer:
    """GPU time of one call between CUDA events, L2 flushed before each (as triton.testing.do_bench),
    median over reps; plus the host wall time per call of back-to-back calls."""

    def __init__(self, target_ms: float, min_reps: int = 10, max_reps: int = 200, warmup: int = 3):
        self.target_ms, self.min_reps, self.max_reps, self.warmup = target_ms, min_reps, max_reps, warmup
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=DEVICE)

    def __call__(self, fn) -> dict:
        for _ in range(self.warmup):  # the first call compiles the kernel
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = start.elapsed_time(end) / 3
        reps = int(min(max(self.target_ms / max(estimate_ms, 1e-3), self.min_reps), self.max_reps))

        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        gpu = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))

        begin = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        host_us = (time.perf_counter() - begin) / reps * 1e6
        return {"gpu_us": statistics.median(gpu), "gpu_p20_us": gpu[len(gpu) // 5],
                "gpu_p80_us": gpu[(4 * len(gpu)) // 5], "host_us": host_us, "reps": reps}


def time_variants(timer: Timer, variants: dict) -> dict:
    return {name: timer(fn) for name, fn in variants.items()}


def speedups(timings: dict, base: str = "triton") -> dict:
    """{variant_over_triton: ratio} on GPU time, and on host time apart."""
    out = {}
    for name, t in timings.items():
        if name != base:
            out[f"{name}_over_{base}"] = t["gpu_us"] / timings[base]["gpu_us"]
            out[f"{name}_over_{base}_host"] = t["host_us"] / timings[base]["host_us"]
    return out


def max_abs_err(out, truth) -> float:
    return float((out.double() - truth).abs().max())


def tolerance(reference_err: float, truth, dtype) -> float:
    return 2 * max(reference_err, torch.finfo(dtype).eps * float(truth.abs().max()))


# -- (a) tree_attention ------------------------------------------------------------------------------------
def random_tree_masks(batch: int, tree: int, generator) -> "torch.Tensor":
    """[B, T, T] bool: the ancestor closure (self included) of a random tree per row, nodes in
    topological order (parent[i] < i), as ``ir.tree.batch_closure`` builds it."""
    masks = torch.zeros(batch, tree, tree, dtype=torch.bool)
    for b in range(batch):
        masks[b, 0, 0] = True
        parents = [int(torch.randint(0, i, (1,), generator=generator)) for i in range(1, tree)]
        for i, parent in enumerate(parents, start=1):
            masks[b, i] = masks[b, parent]
            masks[b, i, i] = True
    return masks


def hf_tree_sdpa(q, cache_k, cache_v, tree_k, tree_v, float_mask, scale: float):
    """One layer of an HF-style tree verifier: DynamicCache.update (cat), repeat_kv, SDPA with the float mask."""
    k = torch.cat([cache_k, tree_k], dim=2)
    v = torch.cat([cache_v, tree_v], dim=2)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # transformers' repeat_kv
        b, hkv, s, d = k.shape
        k = k[:, :, None].expand(b, hkv, group, s, d).reshape(b, hkv * group, s, d)
        v = v[:, :, None].expand(b, hkv, group, s, d).reshape(b, hkv * group, s, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask, scale=scale)


def tree_attention_case(timer, dtype_name: str, batch: int, heads: int, kv_heads: int, tree: int,
                        cache_len: int) -> dict:
    from tokenfx.codegen.tree_attention import tree_attention_reference
    from tokenfx.codegen.triton.tree_attention import _block_sizes, tree_attention_triton

    dtype = getattr(torch, dtype_name)
    seed = ((batch * 131 + heads) * 131 + kv_heads) * 1009 + tree * 10007 + cache_len
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    dev, d, slots_total = DEVICE, HEAD_DIM, cache_len + tree
    scale = d ** -0.5

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

    q = randn(batch, heads, tree, d)
    cache_k, cache_v = randn(batch, kv_heads, cache_len, d), randn(batch, kv_heads, cache_len, d)
    tree_k, tree_v = randn(batch, kv_heads, tree, d), randn(batch, kv_heads, tree, d)
    buf_k, buf_v = torch.cat([cache_k, tree_k], 2), torch.cat([cache_v, tree_v], 2)  # tree written at its slots
    slots = torch.arange(cache_len, slots_total, device=dev)
    key_mask = torch.zeros(batch, slots_total, dtype=torch.long, device=dev)
    pads = [0] + [int(torch.randint(0, max(cache_len // 16, 1), (1,), generator=cpu_gen)) for _ in range(batch - 1)]
    for b, pad in enumerate(pads):  # left padding; the tree's slots stay 0
        key_mask[b, pad:cache_len] = 1
    tree_mask = random_tree_masks(batch, tree, cpu_gen).to(dev)
    allowed = (key_mask != 0)[:, None, None, :].expand(batch, 1, tree, slots_total).clone()
    allowed[..., cache_len:] = tree_mask[:, None]
    float_mask = torch.zeros(batch, 1, tree, slots_total, dtype=dtype, device=dev)
    float_mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    del allowed

    variants = {
        "triton": lambda: tree_attention_triton(q, buf_k, buf_v, key_mask, tree_mask, slots, scale),
        "reference": lambda: tree_attention_reference(q, buf_k, buf_v, key_mask, tree_mask, slots, scale),
        "hf_sdpa": lambda: hf_tree_sdpa(q, cache_k, cache_v, tree_k, tree_v, float_mask, scale),
    }
    truth = tree_attention_reference(q.double(), buf_k.double(), buf_v.double(), key_mask, tree_mask, slots, scale)
    outputs = {name: fn() for name, fn in variants.items()}
    errors = {name: max_abs_err(out, truth) for name, out in outputs.items()}
    op_out = torch.ops.tokenfx.tree_attention(q, buf_k, buf_v, key_mask, tree_mask, slots, scale)
    op_matches = bool(torch.equal(op_out, outputs["triton"]))
    tol = tolerance(errors["reference"], truth, dtype)
    del truth, outputs, op_out

    timings = time_variants(timer, variants)
    kv_bytes = 2 * batch * kv_heads * slots_total * d * buf_k.element_size()
    return {
        "dtype": dtype_name, "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": d,
        "tree": tree, "cache_len": cache_len, "left_pads": pads,
        "triton_blocks": _block_sizes(tree),
        "timings": timings, "speedup": speedups(timings),
        "max_abs_err_vs_fp64": errors, "tolerance": tol,
        "within_tolerance": errors["triton"] <= tol, "op_dispatches_to_triton": op_matches,
        "ok": errors["triton"] <= tol and op_matches,
        "kv_bytes": kv_bytes, "triton_kv_read_gb_per_s": kv_bytes / (timings["triton"]["gpu_us"] * 1e3),
    }


# -- (b) kv_compact --------------------------------------------------------------------------------------
def compaction_indices(batch: int, accepted: int, cache_len: int, tree: int, generator):
    """src, dst [B, A] as speculative/decode.py builds them: rows of different lengths, the tree at
    the shared scratch W = max length, each row's accepted path (root first) moved to its tail."""
    lengths = torch.randint(cache_len // 2, cache_len - tree, (batch,), generator=generator)
    write = int(lengths.max())
    src, dst = torch.empty(batch, accepted, dtype=torch.long), torch.empty(batch, accepted, dtype=torch.long)
    for b in range(batch):
        count = int(torch.randint(1, accepted + 1, (1,), generator=generator))
        path = [0] + sorted((torch.randperm(tree - 1, generator=generator)[:count - 1] + 1).tolist())
        path += [path[-1]] * (accepted - count)  # ragged rows repeat their last pair
        src[b] = write + torch.tensor(path)
        dst[b] = torch.clamp(lengths[b] + torch.arange(accepted), max=int(lengths[b]) + count - 1)
    return src, dst


def kv_compact_case(timer, layers: int, kv_heads: int, head_dim: int, cache_len: int, tree: int, batch: int,
                    accepted: int) -> dict:
    from tokenfx.codegen.kv_compact import kv_compact_reference
    from tokenfx.codegen.triton.kv_compact import kv_compact_triton

    gen = torch.Generator(device=DEVICE).manual_seed(batch * 1000 + accepted)
    cpu_gen = torch.Generator().manual_seed(batch * 1000 + accepted)
    cache = torch.randn(layers, 2, batch, kv_heads, cache_len, head_dim, generator=gen, device=DEVICE,
                        dtype=torch.bfloat16)
    src, dst = (t.to(DEVICE) for t in compaction_indices(batch, accepted, cache_len, tree, cpu_gen))

    expected = cache.clone()
    kv_compact_reference(expected, src, dst)
    got = cache.clone()
    kv_compact_triton(got, src, dst)
    bit_exact = bool(torch.equal(got, expected))
    got.copy_(cache)
    torch.ops.tokenfx.kv_compact(got, src, dst)
    op_matches = bool(torch.equal(got, expected))
    del expected, got

    # In place on the same cache, call after call: the moves repeat the same copies (dst <= src).
    timings = time_variants(timer, {
        "triton": lambda: kv_compact_triton(cache, src, dst),
        "reference": lambda: kv_compact_reference(cache, src, dst),
    })
    return {
        "dtype": "bfloat16", "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "cache_len": cache_len,
        "tree": tree, "batch": batch, "accepted": accepted,
        "timings": timings, "speedup": speedups(timings),
        "bit_exact": bit_exact, "op_dispatches_to_triton": op_matches, "ok": bit_exact and op_matches,
        "bytes_moved": 2 * layers * 2 * batch * kv_heads * accepted * head_dim * cache.element_size(),
    }


# -- (c) add_norm ----------------------------------------------------------------------------------------
def add_norm_case(timer, rows: int, width: int, kind: str) -> dict:
    from tokenfx.codegen.add_norm import add_norm_reference
    from tokenfx.codegen.triton.add_norm import add_norm_triton

    dtype = torch.bfloat16
    gen = torch.Generator(device=DEVICE).manual_seed(rows * 100_003 + width + len(kind))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=dtype)

    x, residual = randn(rows, width), randn(rows, width)
    weight = 1 + 0.1 * randn(width)
    bias = 0.1 * randn(width) if kind == "layernorm" else None
    eps = EPS[kind]

    def unfused():
        summed = x + residual
        if kind == "rmsnorm":
            return F.rms_norm(summed, (width,), weight, eps), summed
        return F.layer_norm(summed, (width,), weight, bias, eps), summed

    variants = {
        "triton": lambda: add_norm_triton(x, residual, weight, bias, eps, kind),
        "reference": lambda: add_norm_reference(x, residual, weight, bias, eps, kind),
        "torch": unfused,
    }
    truth, _ = add_norm_reference(x.double(), residual.double(), weight.double(),
                                  bias.double() if bias is not None else None, eps, kind)
    outputs = {name: fn() for name, fn in variants.items()}
    errors = {name: max_abs_err(normed, truth) for name, (normed, _) in outputs.items()}
    summed_exact = bool(torch.equal(outputs["triton"][1], x + residual))
    op_normed, op_summed = torch.ops.tokenfx.add_norm(x, residual, weight, bias, eps, kind)
    op_matches = bool(torch.equal(op_normed, outputs["triton"][0]) and torch.equal(op_summed, outputs["triton"][1]))
    tol = tolerance(errors["reference"], truth, dtype)
    del outputs, truth

    timings = time_variants(timer, variants)
    within = errors["triton"] <= tol
    return {
        "dtype": "bfloat16", "rows": rows, "width": width, "kind": kind, "eps": eps,
        "timings": timings, "speedup": speedups(timings),
        "max_abs_err_vs_fp64": errors, "tolerance": tol, "within_tolerance": within,
        "summed_bit_exact": summed_exact, "op_dispatches_to_triton": op_matches,
        "ok": within and summed_exact and op_matches,
        "bytes": 4 * rows * width * x.element_size(),  # read x, residual; write normed, summed
    }


# -- driver ------------------------------------------------------------------------------------------------
def run_section(results: dict, name: str, cases: list[dict], case_fn, timer, save, describe, deadline=None) -> None:
    """Run ``case_fn(timer, **case)`` for each case, recording errors (and skipping the rest past
    ``deadline`` or after ABORT_AFTER_FAILURES raising cases in a row); save after each case."""
    section = results[name]
    failures_in_row = 0
    for i, case in enumerate(cases):
        label = describe(case)
        if deadline is not None and time.perf_counter() > deadline:
            section["skipped"] = {"reason": "time budget (--budget-s) spent", "cases": cases[i:]}
            print(f"[{name}] time budget spent: {len(cases) - i} case(s) skipped", flush=True)
            break
        try:
            row = case_fn(timer, **case)
            failures_in_row = 0
        except Exception as exc:  # noqa: BLE001  (recorded; one bad shape must not lose the others)
            traceback.print_exc()
            row = {**case, "error": f"{type(exc).__name__}: {exc}"[:2000], "ok": False}
            failures_in_row += 1
            torch.cuda.empty_cache()
        section["cases"].append(row)
        print(f"[{name} {i + 1}/{len(cases)}] {label}: {summarize_row(row)}", flush=True)
        save()
        if failures_in_row >= ABORT_AFTER_FAILURES:
            section["aborted"] = f"{ABORT_AFTER_FAILURES} cases in a row raised; the rest of the grid was not run"
            section["skipped"] = {"reason": section["aborted"], "cases": cases[i + 1:]}
            print(f"[{name}] aborted: {section['aborted']}", flush=True)
            break


def summarize_row(row: dict) -> str:
    if "error" in row:
        return f"ERROR {row['error'][:200]}"
    t = row["timings"]
    parts = [f"triton {t['triton']['gpu_us']:.1f} us"]
    parts += [f"{name} {t[name]['gpu_us']:.1f} ({row['speedup'][f'{name}_over_triton']:.2f}x)"
              for name in t if name != "triton"]
    if "max_abs_err_vs_fp64" in row:
        parts.append(f"err {row['max_abs_err_vs_fp64']['triton']:.2g} (tol {row['tolerance']:.2g})")
    if "bit_exact" in row:
        parts.append("bit-exact" if row["bit_exact"] else "NOT bit-exact")
    parts.append("ok" if row["ok"] else "FAILED")
    return ", ".join(parts)


def geomean(values) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(results: dict) -> dict:
    """Geometric-mean and min/max speed-ups per op (tree_attention also per dtype and head layout)."""
    summary = {}

    def stats(rows, key):
        ratios = [r["speedup"][key] for r in rows if "speedup" in r]
        return {"geomean": geomean(ratios), "min": min(ratios, default=None), "max": max(ratios, default=None),
                "cases": len(ratios)}

    for op, keys in (("tree_attention", ("reference_over_triton", "hf_sdpa_over_triton")),
                     ("kv_compact", ("reference_over_triton",)),
                     ("add_norm", ("reference_over_triton", "torch_over_triton"))):
        rows = [r for r in results[op]["cases"] if "error" not in r]
        entry = {key: stats(rows, key) for key in keys}
        if op == "tree_attention":
            groups = sorted({(r["dtype"], r["heads"], r["kv_heads"]) for r in rows})
            entry["by_dtype_heads"] = {
                f"{dt} H={h} Hkv={hkv}": {key: stats([r for r in rows if (r["dtype"], r["heads"], r["kv_heads"]) ==
                                                      (dt, h, hkv)], key) for key in keys}
                for dt, h, hkv in groups}
        entry["all_ok"] = all(r["ok"] for r in results[op]["cases"]) and "aborted" not in results[op]
        summary[op] = entry
    return summary


def describe_machine() -> dict:
    from machine import machine_info, source_fingerprint  # benchmarks/machine.py, next to this script

    try:
        info = machine_info()
    except ImportError:  # machine_info records transformers' version; a bare GPU machine may lack it
        import os
        import platform

        info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "cuda_available": True, "tokenfx_source": source_fingerprint()}
    props = torch.cuda.get_device_properties(0)
    info.update({
        "triton": triton.__version__,
        "cuda_runtime": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_sms": props.multi_processor_count,
        "gpu_l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
    })
    return info


def plot(results: dict, path: Path) -> str:
    """The speed-ups as a PNG; returns what happened (matplotlib is optional)."""
    try:
        import matplotlib
    except ImportError:
        return "skipped: matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tree_rows = [r for r in results["tree_attention"]["cases"] if "error" not in r]
    dtype0 = tree_rows[0]["dtype"] if tree_rows else None
    layouts = sorted({(r["heads"], r["kv_heads"]) for r in tree_rows if r["dtype"] == dtype0})
    batches = sorted({r["batch"] for r in tree_rows})
    cols = max(len(batches), 2)
    fig, axes = plt.subplots(len(layouts) + 1, cols, figsize=(4.6 * cols, 3.6 * (len(layouts) + 1)), squeeze=False)
    for row_i, (h, hkv) in enumerate(layouts):
        for col_i, batch in enumerate(batches):
            ax = axes[row_i][col_i]
            rows = [r for r in tree_rows
                    if (r["dtype"], r["heads"], r["kv_heads"], r["batch"]) == (dtype0, h, hkv, batch)]
            for j, tree in enumerate(sorted({r["tree"] for r in rows})):
                line = sorted((r for r in rows if r["tree"] == tree), key=lambda r: r["cache_len"])
                xs = [r["cache_len"] for r in line]
                color = f"C{j}"
                ax.plot(xs, [r["speedup"]["hf_sdpa_over_triton"] for r in line], "o-", color=color,
                        label=f"T={tree} vs HF")
                ax.plot(xs, [r["speedup"]["reference_over_triton"] for r in line], "s--", color=color, alpha=0.6,
                        label=f"T={tree} vs ref")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            lens = sorted({r["cache_len"] for r in rows})
            ax.set_xticks(lens, [str(s) for s in lens])
            ax.set_xlabel("cache length S")
            ax.set_ylabel("speed-up (variant / triton)")
            ax.set_title(f"tree_attention {dtype0} B={batch} H={h} Hkv={hkv}", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
        for col_i in range(len(batches), cols):
            axes[row_i][col_i].axis("off")

    def bars(ax, rows, label_of, title):
        names = list(rows[0]["timings"]) if rows else []
        width = 0.8 / max(len(names), 1)
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [r["timings"][name]["gpu_us"] for r in rows], width, label=name)
        ax.set_xticks(range(len(rows)), [label_of(r) for r in rows], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median GPU time (µs)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)

    last = axes[len(layouts)]
    bars(last[0], [r for r in results["kv_compact"]["cases"] if "error" not in r],
         lambda r: f"B={r['batch']}\nA={r['accepted']}",
         "kv_compact bf16 L={layers} Hkv={kv_heads} S={cache_len} D={head_dim}".format(**results["kv_compact"]["grid"]))
    bars(last[1], [r for r in results["add_norm"]["cases"] if "error" not in r],
         lambda r: f"{r['kind'][:3]}\n{r['rows']}x{r['width']}", "add_norm bf16 [rows x C]")
    for col_i in range(2, cols):
        last[col_i].axis("off")
    machine = results["machine"]
    fig.suptitle(f"tokenfx Triton kernels vs torch, {machine['gpu']}, torch {machine['torch']}, "
                 f"triton {machine['triton']} ({results['mode']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"written: {path}"


def main(argv=None) -> int:
    global torch, F, triton
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few cases per op (< 1 minute)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON path (default: {DEFAULT_OUT}); "
                        "the plot goes beside it with a .png suffix")
    parser.add_argument("--target-ms", type=float, default=None,
                        help="GPU time per measurement that sizes reps (default 20, --quick 10)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="tree_attention cases not started after this many seconds are skipped "
                             "(default 200, --quick 45)")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    target_ms = args.target_ms if args.target_ms is not None else {"quick": 10.0, "full": 20.0}[mode]
    budget_s = args.budget_s if args.budget_s is not None else {"quick": 45.0, "full": 200.0}[mode]

    torch, triton = require_cuda()
    import torch.nn.functional as F  # noqa: N812

    # Register the tokenfx::* ops (torch.ops.tokenfx.<op> is checked against each launcher).
    import tokenfx.codegen.add_norm  # noqa: F401
    import tokenfx.codegen.kv_compact  # noqa: F401
    import tokenfx.codegen.tree_attention  # noqa: F401

    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {
        "benchmark": "kernels_gpu",
        "mode": mode,
        "machine": describe_machine(),
        "timing": {
            "gpu_us": "median over reps of CUDA-event time around one call, L2 flushed (256 MiB write) before "
                      "each call; first 3 calls are warm-up (compile)",
            "host_us": "wall time per call of reps back-to-back calls, L2 warm, Python + launch overhead included",
            "target_ms_per_measurement": target_ms,
            "speedup": "variant time / triton time; > 1 means the Triton kernel is faster",
            "tolerance_rule": "triton error vs fp64 <= 2 * max(reference error vs fp64, eps(dtype) * max|fp64|)",
        },
        "tree_attention": {"grid": TREE_GRID[mode], "variants": {
            "triton": "tree_attention_triton(q, buffer K/V [B, Hkv, S+T, D], key_mask int64, tree_mask, slots)",
            "reference": "tree_attention_reference: dense bool mask per call + SDPA(enable_gqa)",
            "hf_sdpa": "cat(cache, tree) K/V + repeat_kv (if GQA) + SDPA with a precomputed float mask",
        }, "cases": []},
        "kv_compact": {"grid": KV_COMPACT_GRID[mode], "variants": {
            "triton": "kv_compact_triton", "reference": "kv_compact_reference (advanced-index gather + scatter)"},
            "cases": []},
        "add_norm": {"grid": ADD_NORM_GRID[mode], "variants": {
            "triton": "add_norm_triton", "reference": "add_norm_reference",
            "torch": "x + residual, then F.rms_norm / F.layer_norm"}, "cases": []},
    }

    def save():
        results["total_runtime_s"] = time.perf_counter() - started
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.out)

    print(f"kernels_gpu ({mode}): {results['machine']['gpu']}, torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    timer = Timer(target_ms)
    with torch.inference_mode():
        g = KV_COMPACT_GRID[mode]
        fixed = {k: g[k] for k in ("layers", "kv_heads", "head_dim", "cache_len", "tree")}
        run_section(results, "kv_compact",
                    [dict(fixed, batch=b, accepted=a) for b in g["batches"] for a in g["accepted"]],
                    kv_compact_case, timer, save, lambda c: f"B={c['batch']} A={c['accepted']}")
        g = ADD_NORM_GRID[mode]
        run_section(results, "add_norm",
                    [dict(rows=r, width=c, kind=k) for k in g["kinds"] for c in g["widths"] for r in g["rows"]],
                    add_norm_case, timer, save, lambda c: f"{c['kind']} {c['rows']}x{c['width']}")
        g = TREE_GRID[mode]
        cases = [dict(dtype_name=dt, batch=b, heads=h, kv_heads=hkv, tree=t, cache_len=s)
                 for dt in g["dtypes"] for h, hkv in g["heads"] for b in g["batches"]
                 for t in g["tree_sizes"] for s in g["cache_lens"]]
        run_section(results, "tree_attention", cases, tree_attention_case, timer, save,
                    lambda c: f"{c['dtype_name']} B={c['batch']} H={c['heads']}/{c['kv_heads']} "
                              f"T={c['tree']} S={c['cache_len']}",
                    deadline=started + budget_s)

    results["summary"] = summarize(results)
    results["all_ok"] = all(entry["all_ok"] for entry in results["summary"].values())
    png = args.out.with_suffix(".png")
    try:
        results["plot"] = plot(results, png)
    except Exception as exc:  # noqa: BLE001  (the numbers matter more than the picture)
        traceback.print_exc()
        results["plot"] = f"failed: {type(exc).__name__}: {exc}"
    save()

    for op, entry in results["summary"].items():
        ratios = ", ".join(f"{key} geomean {v['geomean']:.2f}x (min {v['min']:.2f}, max {v['max']:.2f})"
                           for key, v in entry.items() if isinstance(v, dict) and "geomean" in v and v["cases"])
        print(f"{op}: {ratios}; {'all checks passed' if entry['all_ok'] else 'SOME CHECKS FAILED'}", flush=True)
    print(f"plot {results['plot']}", flush=True)
    print(f"wrote {args.out} in {results['total_runtime_s']:.0f} s", flush=True)
    return 0 if results["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
