"""Tensor parallel on 2 gloo ranks: split-token overlap (split_overlap) vs the unsplit TP prefill, TP 2 vs one process.

Measured on this CPU (2 ranks spawned on 127.0.0.1, gloo, ``--threads`` torch threads each), on a
random-init Llamas (see MODELS: a usual block shape, and a narrow one whose all-reduces weigh; 4 blocks;
``--quick``: the narrow one, 2 blocks, 512 tokens), batch 1 prefill, a barrier before every call:

- end to end: the unsplit ``tensor_parallel`` graph vs the ``split_overlap`` graph at 512, 1024 and
  2048 tokens (the ratio unsplit / split; target >= 1.15x), and one process running the whole
  model with the same threads per process (TP 2 vs one process);
- per layer (the graph's time / blocks, so the embedding and head are spread over the blocks):
  the compute of the whole rank shard, of part A (tokens ``[0, s)``) and part B (``[s, N)``), timed
  with the graph's all-reduces on a one-rank group (a copy, no communication); part B is the
  whole minus part A (the whole's work is the two parts' work: B's queries over all N keys);
- the blocking all-reduce of one ``[1, N, C]`` fp32 tensor (two per layer);
- the communication left exposed: end to end minus the same graph's compute alone, unsplit and
  split (what the overlap hides is the difference).

A projection for 8xH100 (NVLink) follows from a stated model, labelled as a projection (nothing
is measured on a GPU here): see :func:`projection`. ``benchmarks/run_gpu.sh`` has the single-GPU
check of the fused op.

Writes benchmarks/results/tensor_parallel.json and .png.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import add_modes, benchmark_parser, quiet_libraries, save_figure, start_run  # noqa: E402

quiet_libraries()

MODELS = {  # "compute": a Llama block's usual shape; "comm": a narrow one, whose all-reduces (bytes ∝ C) weigh
    # against its compute (∝ C²) as a wide model's do on fast GPUs, so there is communication to hide
    "compute": dict(hidden=512, heads=8, kv_heads=4, intermediate=1408, vocab=2048),
    "comm": dict(hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=2048),
}
FULL = dict(layers=4, tokens=(512, 1024, 2048), repeats=5, models=("compute", "comm"))
QUICK = dict(layers=2, tokens=(512,), repeats=3, models=("comm",))


def _model(layers: int, shape: dict):
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                                      intermediate_size=shape["intermediate"], num_hidden_layers=layers,
                                      num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                                      max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _timed(fn, repeats: int, barrier) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up, both ranks released together."""
    times = []
    for i in range(repeats + 1):
        barrier()
        start = time.perf_counter()
        fn()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _on_group(graph, group: str):
    """The same rank graph with its all-reduces on ``group`` (a one-rank group: compute only)."""
    from tokenfx.passes.split_overlap import START
    from tokenfx.passes.tensor_parallel import ALL_REDUCE

    new = graph.clone()
    for n in new.gm.graph.nodes:
        if n.target is ALL_REDUCE:
            n.args = (n.args[0], n.args[1], group)
        elif n.target is START:
            n.args = (n.args[0], group)
    new.invalidate()
    return new


def _rank(rank: int, world: int, port: int, settings: dict, threads: int, results):
    import torch
    import torch.distributed as dist

    import tokenfx
    from tokenfx.passes.split_overlap import SplitOverlap, balanced_fraction, FRACTION_SCALE
    from tokenfx.passes.tensor_parallel import TensorParallel

    try:
        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
        alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank makes every group
        barrier = dist.barrier
        MODEL = MODELS[settings["model"]]
        model = _model(settings["layers"], MODEL)
        example = {"input_ids": torch.zeros(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
        graph = tokenfx.capture(model, example)
        tp = TensorParallel(world_size=world, rank=rank).run(graph).graph
        local = {"tp": _on_group(tp, alone.group_name)}
        layers, out = settings["layers"], {"by_tokens": {}}
        for n in settings["tokens"]:
            # a split graph balanced for this length (the cost model's fraction at N = n)
            split = SplitOverlap(min_tokens=min(settings["tokens"]), balance_tokens=n).run(tp).graph
            local["split"] = _on_group(split, alone.group_name)
            fraction = balanced_fraction(graph.structure, n) / FRACTION_SCALE
            ids = torch.randint(0, MODEL["vocab"], (1, n), generator=torch.Generator().manual_seed(n))
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            s = n * round(fraction * FRACTION_SCALE) // FRACTION_SCALE
            part_a = {"input_ids": ids[:, :s], "attention_mask": torch.ones_like(ids[:, :s])}
            reps = settings["repeats"]
            with torch.no_grad():
                row = {"split_at": s, "split_fraction": fraction}
                row["unsplit_s"] = _timed(lambda: tp.gm(**inputs), reps, barrier)
                row["split_s"] = _timed(lambda: split.gm(**inputs), reps, barrier)
                whole = _timed(lambda: local["tp"].gm(**inputs), reps, barrier)
                a = _timed(lambda: local["tp"].gm(**part_a), reps, barrier)
                row["split_compute_s"] = _timed(lambda: local["split"].gm(**inputs), reps, barrier)
                row["per_layer_compute_ms"] = {"whole": 1e3 * whole / layers, "part_a": 1e3 * a / layers,
                                               "part_b": 1e3 * (whole - a) / layers}
                buffer = torch.randn(1, n, MODEL["hidden"])
                row["allreduce_ms"] = 1e3 * _timed(lambda: dist.all_reduce(buffer), reps * 3, barrier)
                # one process, the whole model, the same threads: rank 0 alone while rank 1 waits
                if rank == 0:
                    row["one_process_s"] = _timed(lambda: graph.gm(**inputs), reps, lambda: None)
                barrier()
            out["by_tokens"][n] = row
        results.put(("ok", rank, out))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        import traceback

        results.put(("error", rank, traceback.format_exc()))


def _spawn(settings: dict, threads: int, progress, task) -> list:
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, 2, port, settings, threads, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    try:
        deadline = time.monotonic() + 3600
        while len(got) < 2:
            try:
                status, rank, value = results.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                    raise RuntimeError("a rank died or the run passed an hour")
                progress.advance(task, 0)
                continue
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            got[rank] = value
            progress.advance(task)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [got[0], got[1]]


# -- projection ------------------------------------------------------------------------------------------
PROJECTION_MODEL = {
    "what": "PROJECTION (a model, not measured): Llama-3-70B shapes (C 8192, MLP 28672, 64 heads / 8 kv-heads of "
            "128, 80 blocks), bf16, TP 8 on one 8xH100 NVLink node, batch 1 prefill",
    "compute": "FLOPs per rank / (989 TFLOP/s dense bf16 x 0.45 utilisation); a half-size part's GEMMs run 5% "
               "slower per FLOP, and the fused all-reduce + add + norm keeps 8 of 132 SMs (compute x 132/124)",
    "all_reduce": "alpha + bytes x 2(W-1)/W / beta: alpha 20 us, beta 450 GB/s NVLink bus bandwidth (NVLS)",
    "overlap": "per block 4 all-reduce points of half the bytes; each is exposed by max(0, comm - the other "
               "part's next segment) (attention+projections after o_proj's, MLP after down's); the last "
               "part's last all-reduce is never hidden",
}


def projection(tokens: int) -> dict:
    """Per-prefill seconds, unsplit vs split, from :data:`PROJECTION_MODEL` (a model, not a measurement)."""
    world, c, mlp, heads, kv, d, blocks = 8, 8192, 28672, 64, 8, 128, 80
    flops = 989e12 * 0.45

    def comm(n):
        return 20e-6 + n * c * 2 * 2 * (world - 1) / world / 450e9

    attn = (2 * tokens * (2 * c * heads * d + 2 * c * kv * d) + 4 * heads * d * tokens * (tokens + 1) / 2) / world / flops
    mlp_t = 2 * tokens * 3 * c * mlp / world / flops
    unsplit = blocks * (attn + mlp_t + 2 * comm(tokens))
    slow = 1.05 * 132 / 124
    half_attn, half_mlp, half_comm = attn / 2 * slow, mlp_t / 2 * slow, comm(tokens / 2)
    exposed = 2 * max(0.0, half_comm - half_attn) + 2 * max(0.0, half_comm - half_mlp)
    split = blocks * (2 * (half_attn + half_mlp) + exposed) + half_comm
    return {"tokens": tokens, "unsplit_s": unsplit, "split_s": split, "speedup": unsplit / split,
            "comm_share_unsplit": blocks * 2 * comm(tokens) / unsplit}


def plot(results: dict, path) -> None:
    from machine import pyplot

    plt = pyplot()
    names = list(results["measured"])
    fig, axes = plt.subplots(1, 2 * len(names) + 1, figsize=(6 * len(names) + 5, 4.8))
    for k, name in enumerate(names):
        left, middle = axes[2 * k], axes[2 * k + 1]
        rows = results["measured"][name]
        tokens = [int(t) for t in rows]
        x = list(range(len(tokens)))
        left.bar([i - 0.27 for i in x], [rows[t]["unsplit_s"] * 1e3 for t in rows], 0.27, label="TP 2, unsplit")
        left.bar(x, [rows[t]["split_s"] * 1e3 for t in rows], 0.27, label="TP 2, split_overlap")
        left.bar([i + 0.27 for i in x], [rows[t]["one_process_s"] * 1e3 for t in rows], 0.27, label="one process")
        for i, t in enumerate(rows):
            left.annotate(f"{rows[t]['speedup_split']:.2f}x", (i, rows[t]["split_s"] * 1e3), ha="center",
                          va="bottom")
        left.set_xticks(x, [str(t) for t in tokens])
        left.set_xlabel("prefill tokens")
        left.set_ylabel("ms per prefill (median, rank 0)")
        left.set_title(f"measured, {name} model (hidden {MODELS[name]['hidden']}): end to end", fontsize=9)
        left.legend(fontsize=7)
        for key, label in (("whole", "compute, whole"), ("part_a", "compute, part A"), ("part_b", "compute, part B")):
            middle.plot(tokens, [rows[t]["per_layer_compute_ms"][key] for t in rows], marker="o", label=label)
        middle.plot(tokens, [2 * rows[t]["allreduce_ms"] for t in rows], marker="s", label="2 all-reduces")
        middle.set_xlabel("prefill tokens")
        middle.set_ylabel("ms per layer")
        middle.set_title(f"measured, {name} model: per layer, rank 0", fontsize=9)
        middle.legend(fontsize=7)
    proj = results["projection"]["by_tokens"]
    axes[-1].plot([p["tokens"] for p in proj], [p["speedup"] for p in proj], marker="o", color="tab:gray")
    axes[-1].set_xscale("log", base=2)
    axes[-1].set_xlabel("prefill tokens")
    axes[-1].set_ylabel("unsplit / split")
    axes[-1].set_title("PROJECTION (a model, not measured):\n8xH100 NVLink, Llama-3-70B shapes", fontsize=9)
    save_figure(fig, path, results["machine"], "tensor parallel, 2 gloo ranks",
                note=f"{results['settings']['layers']} blocks")


# -- one device, world size 1: the fused op against NCCL-free references (benchmarks/run_gpu.sh) ----------
FUSED_SHAPES = ((512, 4096), (2048, 4096), (8192, 4096), (2048, 8192), (8192, 8192))


def fused_op_check(device: str, out: Path, quick: bool) -> int:
    """``allreduce_start`` + ``allreduce_add_norm`` in a one-rank group (NCCL on CUDA, gloo on CPU)
    against the NCCL-free references (the ``add_norm`` plain-torch reference and, on CUDA, its
    Triton kernel) and the unfused blocking form: max abs error and median time per call.
    Writes ``out`` (JSON); exit code 1 when an error passes the dtype's tolerance."""
    import json

    import torch
    import torch.distributed as dist

    from tokenfx.codegen import allreduce_add_norm as ops
    from tokenfx.codegen.add_norm import add_norm_reference

    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": torch.device("cuda", 0)} if device == "cuda" else {}))
    group = dist.group.WORLD.group_name
    start = torch.ops.tokenfx.allreduce_start.default
    fused = torch.ops.tokenfx.allreduce_add_norm.default
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn, repeats=20):
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rows, failed = [], False
    for tokens, hidden in FUSED_SHAPES[:2] if quick else FUSED_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator(device=device).manual_seed(tokens + hidden)
            x, r = (torch.randn(1, tokens, hidden, device=device, dtype=dtype, generator=gen) for _ in range(2))
            w = torch.randn(hidden, device=device, dtype=dtype, generator=gen)
            expected = add_norm_reference(x, r, w, None, 1e-6, "rmsnorm")  # a sum over one rank is the tensor

            def ours():
                return fused(start(x, group), x, r, w, None, 1e-6, "rmsnorm", [])

            got = ours()
            error = max(float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected))
            tol = 8 * torch.finfo(dtype).eps * max(1.0, float(expected[0].float().abs().max()))  # a rounding or two
            failed |= not error <= tol
            row = {"tokens": tokens, "hidden": hidden, "dtype": str(dtype).replace("torch.", ""), "max_abs_error": error,
                   "tolerance": tol, "fused_ms": 1e3 * timed(ours),
                   "unfused_blocking_ms": 1e3 * timed(lambda: ops.allreduce_add_norm_reference(x, r, w, None, 1e-6,
                                                                                              "rmsnorm", group)),
                   "add_norm_reference_ms": 1e3 * timed(lambda: add_norm_reference(x, r, w, None, 1e-6, "rmsnorm"))}
            if device == "cuda":
                row["add_norm_triton_ms"] = 1e3 * timed(lambda: torch.ops.tokenfx.add_norm.default(
                    x, r, w, None, 1e-6, "rmsnorm"))
            rows.append(row)
            print(json.dumps(row))
    dist.destroy_process_group()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                               "torch": torch.__version__, "world_size": 1, "rows": rows,
                               "passed": not failed}, indent=2) + "\n")
    print(f"fused op check {'passed' if not failed else 'FAILED'}; wrote {out}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__)
    add_modes(parser, default="full", quick="the comm model only, 2 blocks, 512 tokens, 3 repeats (a smoke run)")
    parser.add_argument("--fused-op", choices=("cuda", "cpu"), default=None,
                        help="instead: check tokenfx::allreduce_add_norm on one device at world size 1 against "
                             "NCCL-free references (run_gpu.sh runs it with cuda); writes "
                             "<out>/tensor_parallel_fused_op.json")
    args = parser.parse_args(argv)
    if args.fused_op:
        return fused_op_check(args.fused_op, args.out / "tensor_parallel_fused_op.json", args.mode == "quick")
    run = start_run("tensor_parallel", args, console_width=120)
    settings = dict(QUICK if args.mode == "quick" else FULL)
    measured = {}
    with run.progress(44) as progress:
        for name in settings["models"]:
            task = progress.add_task(f"{name} model: 2 gloo ranks, capture + time", total=2)
            ranks = _spawn({**settings, "model": name}, args.threads, progress, task)
            measured[name] = {}
            for n, row in ranks[0]["by_tokens"].items():
                row = dict(row)
                row["rank1_unsplit_s"] = ranks[1]["by_tokens"][n]["unsplit_s"]
                row["rank1_split_s"] = ranks[1]["by_tokens"][n]["split_s"]
                row["speedup_split"] = row["unsplit_s"] / row["split_s"]
                row["tp2_vs_one_process_unsplit"] = row["one_process_s"] / row["unsplit_s"]
                row["tp2_vs_one_process_split"] = row["one_process_s"] / row["split_s"]
                row["allreduce_share_unsplit"] = 2 * settings["layers"] * row["allreduce_ms"] / 1e3 / row["unsplit_s"]
                # communication left on the critical path: end to end minus the same graph's compute alone
                whole_s = row["per_layer_compute_ms"]["whole"] * settings["layers"] / 1e3
                row["exposed_comm_unsplit_s"] = row["unsplit_s"] - whole_s
                row["exposed_comm_split_s"] = row["split_s"] - row["split_compute_s"]
                measured[name][str(n)] = row
    results = {"settings": {**settings, "mode": args.mode, "models": {m: MODELS[m] for m in settings["models"]},
                            "threads_per_rank": args.threads},
               "measured": measured, "target_speedup": 1.15,
               "projection": {**PROJECTION_MODEL, "by_tokens": [projection(n) for n in (512, 1024, 2048, 4096, 8192)]},
               "machine": run.machine,
               "limits": ["2 ranks on a 2-core CPU that may be shared with other work: gloo's own threads compete "
                          "with the ranks' compute for the cores, so an overlap needs a core to spare",
                          "per-layer numbers are graph time / blocks (embedding and head spread over the blocks); "
                          "part B = whole - part A", "the split point comes from a FLOP cost model, not a "
                          "calibration of this CPU's attention kernel", "the projection is a model"]}
    run.save(results, plot)
    table = [f"{'model':>8} {'tokens':>7} {'unsplit ms':>11} {'split ms':>9} {'speed-up':>9} {'one proc ms':>12} "
             f"{'TP2/1':>6} {'allreduce ms':>13} {'AR share':>9} {'A ms/layer':>11} {'B ms/layer':>11}"]
    for name, rows in measured.items():
        for n, r in rows.items():
            table.append(f"{name:>8} {n:>7} {r['unsplit_s']*1e3:>11.1f} {r['split_s']*1e3:>9.1f} "
                         f"{r['speedup_split']:>8.2f}x {r['one_process_s']*1e3:>12.1f} "
                         f"{r['tp2_vs_one_process_unsplit']:>5.2f}x {r['allreduce_ms']:>13.2f} "
                         f"{r['allreduce_share_unsplit']:>9.0%} {r['per_layer_compute_ms']['part_a']:>11.1f} "
                         f"{r['per_layer_compute_ms']['part_b']:>11.1f}")
    run.console.print("\n".join(table))
    for p in results["projection"]["by_tokens"]:
        run.console.print(f"PROJECTION 8xH100 {p['tokens']:>5} tokens: unsplit/split {p['speedup']:.2f}x "
                          f"(all-reduce share unsplit {p['comm_share_unsplit']:.0%})")
    run.print_written(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
