"""Train the bundled code LMs ``tokenfx:tiny-code`` and ``tokenfx:tiny-code-draft``.

    python tools/train_tiny_lm.py                            # both models (~55 min on one CPU thread)
    python tools/train_tiny_lm.py --steps 20 --draft-steps 10 --out /tmp/lm   # a quick smoke run

Data: the Python source of the standard library of the interpreter that runs this script
(test packages excluded). Files are split deterministically by a hash of their path
(``sha1(relative path) % 100 < 5`` → held out); the split is written to ``split.json``.

Tokenizer: byte-level BPE (``tokenizers``), 4096 ids, trained on the train split.

Models: Llama architecture (RMSNorm, RoPE, SwiGLU, GQA), tied embeddings.
- ``tiny-code``: 6 layers, hidden 256, 8 heads / 2 kv-heads, ~5.3 M parameters, trained
  with a LayerSkip-style early-exit loss: the shared final norm + LM head applied after
  every layer, weighted toward deep layers, plus layer dropout rising with depth, so that
  intermediate layers already predict tokens (the early-exit work relies on it).
- ``tiny-code-draft``: 2 layers, same tokenizer and widths, plain next-token loss, for
  draft-model speculation.

Each model is written as a standard Hugging Face directory (config.json, model.safetensors
in fp16, tokenizer files) with a model card (README.md) giving data, split, parameters,
training time and held-out perplexity of the full model and of every exit layer.
Everything is seeded: the same command on the same Python gives the same model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import torch.nn.functional as F

VOCAB = 4096
EOS = "<|endoftext|>"
PAD = "<|pad|>"
HELD_OUT_PERCENT = 5


# -- data -------------------------------------------------------------------------------------------
def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "site-packages" in rel.parts or any(p in ("test", "tests", "idle_test") for p in rel.parts):
            continue
        files.append(path)
    return root, files


def split_files(root: Path, files: list[Path]) -> tuple[list[Path], list[Path]]:
    train, held = [], []
    for path in files:
        bucket = int(hashlib.sha1(str(path.relative_to(root)).encode()).hexdigest(), 16) % 100
        (held if bucket < HELD_OUT_PERCENT else train).append(path)
    return train, held


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS, PAD], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None)
    fast.save_pretrained(out)
    return fast


def encode_corpus(tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# -- model ------------------------------------------------------------------------------------------
def make_model(layers: int, seed: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=pad_id, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def exit_logits(model, input_ids: torch.Tensor, layer_dropout: float = 0.0, generator=None) -> list[torch.Tensor]:
    """Logits after every layer through the shared final norm + head: ``[L] x [B, N, V]``.

    With ``layer_dropout`` > 0, layer ``l`` is skipped with probability ``p·l/(L-1)``
    (LayerSkip: deeper layers dropped more often).
    """
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    rope = inner.rotary_emb(hidden, position_ids=positions)
    layers = inner.layers
    outs = []
    for index, layer in enumerate(layers):
        p = layer_dropout * index / max(1, len(layers) - 1)
        if not (p > 0 and torch.rand((), generator=generator).item() < p):
            hidden = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=positions)
        outs.append(model.lm_head(inner.norm(hidden)))
    return outs


def exit_weights(layers: int, early_scale: float) -> list[float]:
    """Final layer weight 1; layer l < L weight early_scale · (l+1)/L (toward deep layers)."""
    return [early_scale * (i + 1) / layers for i in range(layers - 1)] + [1.0]


@torch.no_grad()
def held_out_perplexity(model, data: torch.Tensor, seq: int, max_windows: int = 64) -> list[float]:
    """Per-exit-layer perplexity over non-overlapping windows of the held-out split."""
    model.eval()
    windows = data[: (len(data) // (seq + 1)) * (seq + 1)].view(-1, seq + 1)[:max_windows].long()
    totals = None
    for start in range(0, len(windows), 8):
        batch = windows[start:start + 8]
        outs = exit_logits(model, batch[:, :-1])
        losses = [F.cross_entropy(o.reshape(-1, o.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum").item()
                  for o in outs]
        totals = losses if totals is None else [a + b for a, b in zip(totals, losses)]
    count = windows[:, 1:].numel()
    return [math.exp(t / count) for t in totals]


def train(model, data: torch.Tensor, *, steps: int, minutes: float, seq: int, batch: int, lr: float,
          early_scale: float, layer_dropout: float, seed: int, label: str) -> dict:
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    weights = exit_weights(len(model.model.layers), early_scale)
    warmup = max(1, steps // 50)
    model.train()
    start = time.time()
    done = 0
    bar = tqdm(range(steps), desc=label, mininterval=5)
    for step in bar:
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        offsets = [rng.randrange(0, len(data) - seq - 1) for _ in range(batch)]
        chunk = torch.stack([data[o:o + seq + 1] for o in offsets]).long()
        outs = exit_logits(model, chunk[:, :-1], layer_dropout, generator)
        target = chunk[:, 1:].reshape(-1)
        losses = [F.cross_entropy(o.reshape(-1, o.shape[-1]), target) for o in outs]
        loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if step % 20 == 0:
            bar.set_postfix(final=f"{losses[-1].item():.3f}", first=f"{losses[0].item():.3f}")
        if (time.time() - start) / 60 > minutes:  # a safety cap; the card records the steps actually run
            print(f"{label}: stopped at the {minutes}-minute cap after {done} of {steps} steps")
            break
    model.eval()
    return {"steps": done, "seconds": round(time.time() - start, 1), "tokens_seen": done * batch * seq,
            "final_train_loss": round(losses[-1].item(), 4)}


def save(model, tokenizer, out: Path, card: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(card, indent=2))
    lines = [f"# {card['name']}", "", card["summary"], "",
             f"- architecture: Llama ({card['layers']} layers, hidden 256, 8 heads / 2 kv-heads, head dim 32, "
             f"SwiGLU 704, RoPE, tied embeddings), {card['parameters']:,} parameters, stored fp16",
             f"- tokenizer: byte-level BPE, {VOCAB} ids, trained on the train split",
             f"- data: Python {card['python']} standard library source, test packages excluded; "
             f"{card['train_files']} train files / {card['held_out_files']} held-out files "
             f"(sha1(relative path) % 100 < {HELD_OUT_PERCENT} is held out; list in split.json)",
             f"- training: {card['training']['steps']} steps × {card['batch']} × {card['seq']} tokens "
             f"({card['training']['tokens_seen']:,} tokens), {card['training']['seconds'] / 60:.1f} min on CPU, seed {card['seed']}",
             f"- loss: {card['loss']}",
             "", "Held-out perplexity (shared final norm + head applied after each layer):", "",
             "| exit after layer | perplexity |", "| --- | --- |"]
    lines += [f"| {i + 1} | {p:.2f} |" for i, p in enumerate(card["held_out_perplexity"])]
    lines += ["", f"Reproduce: `{card['command']}`", ""]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tokenfx" / "assets"))
    parser.add_argument("--minutes", type=float, default=90.0, help="safety cap for the main model (steps decide)")
    parser.add_argument("--draft-minutes", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--draft-steps", type=int, default=400)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed for repeatable numerics)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    import platform

    root, files = stdlib_files()
    train_files, held_files = split_files(root, files)
    train_texts, held_texts = [read(p) for p in train_files], [read(p) for p in held_files]
    tok_dir = out / "tiny-code"
    tokenizer = train_tokenizer(train_texts, tok_dir)
    eos, pad = tokenizer.convert_tokens_to_ids(EOS), tokenizer.convert_tokens_to_ids(PAD)
    train_ids, held_ids = encode_corpus(tokenizer, train_texts), encode_corpus(tokenizer, held_texts)
    split = {"root": str(root), "rule": f"sha1(relative path) % 100 < {HELD_OUT_PERCENT} → held out",
             "held_out": [str(p.relative_to(root)) for p in held_files], "train_count": len(train_files),
             "train_tokens": len(train_ids), "held_out_tokens": len(held_ids)}
    command = "python tools/train_tiny_lm.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "minutes", "draft_minutes"))

    for name, layers, minutes, steps, early, dropout in (
        ("tiny-code", 6, args.minutes, args.steps, 0.3, 0.1),
        ("tiny-code-draft", 2, args.draft_minutes, args.draft_steps, 0.0, 0.0),
    ):
        model = make_model(layers, args.seed, eos, pad)
        stats = train(model, train_ids, steps=steps, minutes=minutes, seq=args.seq, batch=args.batch, lr=args.lr,
                      early_scale=early, layer_dropout=dropout, seed=args.seed, label=name)
        ppl = held_out_perplexity(model, held_ids, args.seq)
        loss = ("LayerSkip-style early-exit loss: final layer weight 1, layer l<L weight 0.3·l/L, layer dropout "
                "rising linearly to 0.1 at the last layer" if early else "next-token cross-entropy")
        card = {"name": f"tokenfx:{name}", "summary": ("Small Python-code LM bundled with tokenfx; every layer can exit "
                "through the shared head." if early else "Two-layer draft model for speculative decoding with tiny-code."),
                "layers": layers, "parameters": sum(p.numel() for p in model.parameters()), "python": platform.python_version(),
                "train_files": len(train_files), "held_out_files": len(held_files), "seq": args.seq, "batch": args.batch,
                "seed": args.seed, "training": stats, "loss": loss, "held_out_perplexity": ppl, "command": command}
        save(model, tokenizer, out / name, card)
        (out / name / "split.json").write_text(json.dumps(split, indent=1))
        print(name, json.dumps({"held_out_perplexity": [round(p, 2) for p in ppl], **stats}))


if __name__ == "__main__":
    main()
