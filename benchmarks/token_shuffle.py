"""Does ``token_shuffle`` keep a small ViT's accuracy with 4× fewer grid tokens, and how much of the
loss a zero-shot shuffle costs does a short adapter-only fine-tune win back?

Data: scikit-learn's ``load_digits`` (1797 8×8 grey digits), pixels / 16 then standardised,
upsampled to 16×16 (bilinear), split 1397 train / 400 test (stratified, ``--seed``).

Model: ``transformers.ViTForImageClassification`` (image 16, patch 2 → 8×8 = 64 patches + CLS,
hidden 64, 4 layers, 4 heads, MLP 128, 10 classes, no dropout, eager attention), trained from
scratch with AdamW (lr 5e-3, weight decay 0.05, batch 64, 30 warm-up steps then cosine decay,
``--train-steps`` steps) on the training split. It is captured with ``tokenfx.capture`` and
rewritten with ``PassManager("token_shuffle(s=2)")``: the blocks see 1 + 16 tokens instead of 1 + 64.

Measured on the test split (cross-entropy in nats, accuracy):

  original     the captured graph, unshuffled
  zero-shot    the shuffled graph as the pass leaves it (window average in, copy out)
  fine-tuned   after ``tokenfx.passes.token_shuffle.finetune`` trains only the adapters
               (``--finetune-steps`` steps, AdamW lr 1e-3, batch 64, true labels, cross-entropy);
               every other weight stays frozen

recovered = (loss_zero_shot − loss_fine_tuned) / (loss_zero_shot − loss_original): the share of
the loss gap the fine-tune wins back (1 = all of it). The test split is also scored after 25, 50,
100, 150, 200, 300, 400 and 500 fine-tune steps (same run; scoring time is not fine-tune time), so
the JSON and plot show how the recovered share grows with the fine-tune's length.

Throughput: images/s of the original and the shuffled graph, eager, batch 64, under
``torch.inference_mode``; the two run interleaved (one call each in turn, ``--repeats`` rounds
after a warm-up), median seconds per call. ratio = shuffled / original images/s.

Run::

    python benchmarks/token_shuffle.py            # ~3 min on 2 cores (training the ViT: ~2 min)
    python benchmarks/token_shuffle.py --threads 1

Writes ``<out>/token_shuffle.json`` and ``<out>/token_shuffle.png`` (default out: benchmarks/results).
"""

from __future__ import annotations

from machine import benchmark_parser, pyplot, quiet_libraries, save_figure, start_run

quiet_libraries()

import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import tokenfx  # noqa: E402
from tokenfx.passes.base import PassManager  # noqa: E402
from tokenfx.passes.token_shuffle import adapter_parameters, finetune  # noqa: E402

MODEL_CONFIG = dict(image_size=16, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=128, num_labels=10,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
S = 2
BATCH = 64
TEST_SIZE = 400
TRAIN_LR, WARMUP, FINETUNE_LR = 5e-3, 30, 1e-3
CHECKPOINTS = (25, 50, 100, 150, 200, 300, 400, 500)  # fine-tune steps after which the test split is scored
ATTENTION = "eager"  # on this CPU the matmul-softmax attention trains faster than SDPA's flash kernel


def digits(seed: int):
    """``(x_train, y_train, x_test, y_test)``: [n, 1, 16, 16] standardised images, int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=TEST_SIZE, random_state=seed,
                                           stratify=data.target)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = torch.nn.functional.interpolate(((images - mean) / std)[:, None], scale_factor=2, mode="bilinear")
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def batches(x, y, steps: int, seed: int):
    """``steps`` shuffled mini-batches of BATCH, epoch after epoch."""
    g = torch.Generator().manual_seed(seed)
    out, order = [], torch.empty(0, dtype=torch.int64)
    while len(out) < steps:
        if len(order) < BATCH:
            order = torch.randperm(len(y), generator=g)
        idx, order = order[:BATCH], order[BATCH:]
        out.append(({"pixel_values": x[idx]}, y[idx]))
    return out


def train_base(model, x, y, steps: int, seed: int, progress) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    task = progress.add_task("training the ViT", total=steps)
    losses = []
    model.train()
    for inputs, target in batches(x, y, steps, seed):
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        progress.advance(task)
    model.eval()
    return losses


def evaluate(graph, x, y) -> dict:
    with torch.inference_mode():
        logits = torch.cat([graph.module()(pixel_values=x[i:i + 200]) for i in range(0, len(y), 200)])
    return {"loss": float(torch.nn.functional.cross_entropy(logits, y)),
            "accuracy": float((logits.argmax(-1) == y).float().mean())}


def throughput(graphs: dict, x, repeats: int, progress) -> dict:
    inputs = x[:BATCH]
    task = progress.add_task("timing (eager, batch 64)", total=len(graphs) * (repeats + 1))
    seconds = {name: [] for name in graphs}
    with torch.inference_mode():
        for round_ in range(repeats + 1):  # round 0 warms up
            for name, graph in graphs.items():
                start = time.perf_counter()
                graph.module()(pixel_values=inputs)
                if round_:
                    seconds[name].append(time.perf_counter() - start)
                progress.advance(task)
    return {name: {"median_s": statistics.median(t), "images_per_s": BATCH / statistics.median(t), "repeats": len(t)}
            for name, t in seconds.items()}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, (ax_curve, ax_loss, ax_speed) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    losses = result["finetune"]["train_losses"]
    window = 10
    smooth = [statistics.mean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
    ax_curve.plot(losses, color="#bbbbbb", lw=0.8, label="adapter fine-tune, batch loss")
    ax_curve.plot(smooth, color="#1f77b4", label=f"same, mean of {window}")
    ev = result["eval"]
    for name, colour in (("original", "#2ca02c"), ("zero_shot", "#d62728"), ("fine_tuned", "#1f77b4")):
        ax_curve.axhline(ev[name]["loss"], color=colour, ls="--", lw=1, label=f"test loss, {name.replace('_', '-')}")
    points = result["finetune"]["test_checkpoints"]
    ax_curve.plot([p["step"] for p in points], [p["loss"] for p in points], "o-", color="#ff7f0e", ms=4,
                  label="test loss at checkpoints")
    for p in points[1:]:
        ax_curve.annotate(f"{100 * p['recovered']:.0f}%", (p["step"], p["loss"]), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=7, color="#ff7f0e")
    ax_curve.set_xlabel("fine-tune step (test checkpoints: % of the loss gap recovered)")
    ax_curve.set_ylabel("cross-entropy (nats)")
    ax_curve.set_title("adapters only (blocks, embeddings, head frozen)")
    ax_curve.legend(fontsize=7, loc="upper right")

    names = ["original", "zero_shot", "fine_tuned"]
    bars = ax_loss.bar([n.replace("_", "-") for n in names], [ev[n]["loss"] for n in names],
                       color=["#2ca02c", "#d62728", "#1f77b4"])
    for bar, n in zip(bars, names):
        ax_loss.annotate(f"{ev[n]['loss']:.3f}\nacc {100 * ev[n]['accuracy']:.1f}%", (bar.get_x() + bar.get_width() / 2,
                         bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax_loss.set_ylabel("test cross-entropy (nats)")
    ax_loss.set_title(f"test split ({TEST_SIZE} digits); recovered {100 * result['recovered']:.0f}% of the gap")
    ax_loss.margins(y=0.25)

    tp = result["throughput"]
    stats = result["pass"]["stats"]
    labels = [f"original\n{stats['tokens']} tokens", f"token_shuffle(s={S})\n{stats['tokens_in_blocks']} tokens in blocks"]
    values = [tp["original"]["images_per_s"], tp["shuffled"]["images_per_s"]]
    bars = ax_speed.bar(labels, values, color=["#2ca02c", "#1f77b4"])
    for bar, v in zip(bars, values):
        ax_speed.annotate(f"{v:.0f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax_speed.set_ylabel("images / s (eager, batch 64)")
    ax_speed.set_title(f"throughput: {result['throughput_ratio']:.2f}x")
    ax_speed.margins(y=0.15)
    save_figure(fig, path, result["machine"], "token_shuffle on a digits ViT")


def main(argv=None) -> None:
    parser = benchmark_parser(__doc__, threads_help="torch intra-op threads (default 1: on a shared 2-core machine "
                                                    "2 threads ran ~8x slower)")
    parser.add_argument("--train-steps", type=int, default=500, help="steps training the ViT (default 500)")
    parser.add_argument("--finetune-steps", type=int, default=500, help="adapter fine-tune steps (default 500)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per graph (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("train_steps", "finetune_steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    run = start_run("token_shuffle", args)
    import transformers

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = digits(args.seed)
    config = transformers.ViTConfig(**MODEL_CONFIG)
    config._attn_implementation = ATTENTION
    model = transformers.ViTForImageClassification(config)
    with run.progress(34) as progress:
        t0 = time.perf_counter()
        train_losses = train_base(model, x_train, y_train, args.train_steps, args.seed, progress)
        train_s = time.perf_counter() - t0

        graph = tokenfx.capture(model, {"pixel_values": x_train[:2]})
        report = PassManager(f"token_shuffle(s={S})").run(graph)
        shuffled, pass_report = report.graph, report.passes[0]
        ev = {"original": evaluate(graph, x_test, y_test), "zero_shot": evaluate(shuffled, x_test, y_test)}

        t0 = time.perf_counter()
        task = progress.add_task("fine-tuning the adapters", total=args.finetune_steps)
        checkpoints = {0: ev["zero_shot"]}
        eval_s = 0.0

        def on_step(step: int, loss: float) -> None:
            nonlocal eval_s
            progress.advance(task)
            if step + 1 in CHECKPOINTS or step + 1 == args.finetune_steps:
                start = time.perf_counter()  # test-split checkpoints are not fine-tune time
                checkpoints[step + 1] = evaluate(shuffled, x_test, y_test)
                eval_s += time.perf_counter() - start

        ft_losses = finetune(shuffled, batches(x_train, y_train, args.finetune_steps, args.seed + 1),
                             steps=args.finetune_steps, lr=FINETUNE_LR, on_step=on_step)
        finetune_s = time.perf_counter() - t0 - eval_s
        ev["fine_tuned"] = checkpoints[args.finetune_steps]
        speed = throughput({"original": graph, "shuffled": shuffled}, x_test, args.repeats, progress)

    gap = ev["zero_shot"]["loss"] - ev["original"]["loss"]

    def recovered_by(point: dict) -> float:
        return (ev["zero_shot"]["loss"] - point["loss"]) / gap if gap > 0 else float("nan")

    recovered = recovered_by(ev["fine_tuned"])
    result = {
        "benchmark": "token_shuffle",
        "claim": "a short fine-tune recovers most of the loss gap",
        "model": {**MODEL_CONFIG, "attention": ATTENTION, "parameters": sum(p.numel() for p in model.parameters())},
        "pass": {"pipeline": f"token_shuffle(s={S})", "stats": pass_report.stats, "matched": pass_report.matched,
                 "adapter_parameters": sum(p.numel() for p in adapter_parameters(shuffled))},
        "data": {"dataset": "sklearn load_digits, upsampled 8x8 -> 16x16", "train": len(y_train), "test": len(y_test)},
        "train": {"steps": args.train_steps, "lr": TRAIN_LR, "warmup": WARMUP, "batch": BATCH, "seconds": train_s,
                  "final_loss_mean_of_50": statistics.mean(train_losses[-50:])},
        "finetune": {"steps": args.finetune_steps, "lr": FINETUNE_LR, "batch": BATCH, "seconds": finetune_s,
                     "train_losses": ft_losses, "loss": "cross-entropy, true labels",
                     "test_checkpoints": [{"step": s, **point, "recovered": recovered_by(point)}
                                          for s, point in sorted(checkpoints.items())]},
        "eval": ev,
        "recovered": recovered,
        "throughput": speed,
        "throughput_ratio": speed["shuffled"]["images_per_s"] / speed["original"]["images_per_s"],
        "seed": args.seed,
        "machine": run.machine,
    }
    run.save(result, plot)
    console = run.console

    console.print("| graph | test loss | test accuracy |\n|---|---|---|")
    for name in ("original", "zero_shot", "fine_tuned"):
        console.print(f"| {name.replace('_', '-')} | {ev[name]['loss']:.4f} | {100 * ev[name]['accuracy']:.1f}% |")
    for point in result["finetune"]["test_checkpoints"][1:]:
        console.print(f"after {point['step']:>4} adapter steps: test loss {point['loss']:.4f}, accuracy "
                      f"{100 * point['accuracy']:.1f}%, recovered {100 * point['recovered']:.1f}% of the loss gap")
    console.print(f"recovered {100 * recovered:.1f}% of the loss gap with {args.finetune_steps} adapter steps "
                  f"({finetune_s:.1f} s); throughput {result['throughput_ratio']:.2f}x "
                  f"({speed['original']['images_per_s']:.0f} → {speed['shuffled']['images_per_s']:.0f} images/s)")
    run.print_written(result)


if __name__ == "__main__":
    main()
