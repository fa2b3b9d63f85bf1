"""Train the bundled masked-diffusion code LM ``tokenfx:tiny-code-dllm``.

    python tools/train_tiny_dllm.py                          # the bundled model (~25 min on one CPU thread)
    python tools/train_tiny_dllm.py --steps 20 --out /tmp/dllm   # a quick smoke run

A masked-diffusion LM of the LLaDA kind: Llama blocks *without* the causal mask (every token
attends to every token), a mask token, and the loss of "Large Language Diffusion Models"
(Nie et al. 2025): for a masking rate ``t ~ U(eps, 1)`` each (answer) token is replaced by the
mask token with probability ``t`` and the model is trained on the cross-entropy of the masked
tokens weighted by ``1/t``, summed and divided by the number of answer tokens — an upper bound
on the negative log-likelihood. Half of the sequences keep a random-length prefix unmasked
(the "prompt", as in LLaDA's SFT) so the model learns to continue a given prefix.

Data and tokenizer are *the same* as ``tiny-code`` (``tools/train_tiny_lm.py``: the Python
standard library, split by a hash of each file's path; its 4096-id byte-level BPE) with one
added special token ``<|mask|>`` (id 4096). Ids 0..4095 mean the same in both models, so
``tiny-code`` can guide or judge this model's output.

The result is a standard Hugging Face directory: ``LlamaForCausalLM`` weights plus two keys in
config.json that tokenfx reads — ``"is_causal": false`` and ``"mask_token_id": 4096`` — and a
model card with the held-out masked-token NLL at several masking rates. Loaded through
``transformers`` alone it is a causal Llama (wrong); tokenfx (``tokenfx.frontends.load``)
turns the causal mask off. Everything is seeded: the same command gives the same model.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_lm import encode_corpus, read, split_files, stdlib_files  # noqa: E402  (same data, same split)

ASSETS = Path(__file__).resolve().parents[1] / "tokenfx" / "assets"
MASK = "<|mask|>"
EPS = 1e-3  # smallest masking rate (LLaDA)
HELD_OUT_RATES = (0.1, 0.3, 0.5, 0.7, 0.9)


def load_tokenizer(out: Path):
    """tiny-code's tokenizer plus ``<|mask|>``, saved into ``out``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-code")
    tokenizer.add_special_tokens({"mask_token": MASK})
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return tokenizer


def make_model(layers: int, vocab: int, seed: int, eos_id: int, pad_id: int, mask_id: int, seq: int,
               init_from: Path | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=seq,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=eos_id,
        eos_token_id=eos_id, pad_token_id=pad_id, attn_implementation="sdpa",
    )
    config.is_causal = False
    config.mask_token_id = mask_id
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if init_from:
        adapt_from_ar(model, init_from)
    bidirectional(model)
    return model


def adapt_from_ar(model, ar_dir: Path) -> None:
    """Start from the AR model's weights (AR-to-diffusion adaptation, as Dream and DiffuLLaMA do):
    same architecture and tokenizer; the mask token's embedding row starts as the mean row."""
    from transformers import AutoModelForCausalLM

    ar = AutoModelForCausalLM.from_pretrained(ar_dir, dtype=torch.float32)
    state = ar.state_dict()
    table = state["model.embed_tokens.weight"]
    extra = model.config.vocab_size - table.shape[0]
    state["model.embed_tokens.weight"] = torch.cat([table, table.mean(0, keepdim=True).expand(extra, -1)])
    state.pop("lm_head.weight", None)  # tied to the embedding
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"cannot adapt {ar_dir}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


def bidirectional(model) -> None:
    """Every attention module attends both ways (SDPA without ``is_causal`` and without a mask)."""
    for layer in model.model.layers:
        layer.self_attn.is_causal = False


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Bidirectional forward of full (unpadded) sequences: ``[B, N] -> [B, N, V]``."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    rope = inner.rotary_emb(hidden, position_ids=positions)
    for layer in inner.layers:
        hidden = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=positions)
    return model.lm_head(inner.norm(hidden))


def corrupt(clean: torch.Tensor, mask_id: int, generator: torch.Generator, *, prompt_share: float = 0.5,
            rate: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process: ``(noisy, masked, t, answer)`` for a batch of clean sequences.

    ``t`` is drawn per sequence (or fixed to ``rate``); a ``prompt_share`` of the sequences keep a
    random-length prefix (up to half the sequence) clean and only their answer part is masked.
    """
    batch, seq = clean.shape
    t = torch.full((batch,), rate) if rate is not None else EPS + (1 - EPS) * torch.rand(batch, generator=generator)
    prompt_len = torch.randint(1, seq // 2, (batch,), generator=generator)
    has_prompt = torch.rand(batch, generator=generator) < prompt_share
    prompt_len = torch.where(has_prompt, prompt_len, torch.zeros_like(prompt_len))
    answer = torch.arange(seq).unsqueeze(0) >= prompt_len.unsqueeze(1)
    masked = (torch.rand(batch, seq, generator=generator) < t.unsqueeze(1)) & answer
    noisy = torch.where(masked, torch.full_like(clean, mask_id), clean)
    return noisy, masked, t, answer


def diffusion_loss(model, clean: torch.Tensor, mask_id: int, generator: torch.Generator, **kw) -> torch.Tensor:
    noisy, masked, t, answer = corrupt(clean, mask_id, generator, **kw)
    out = logits(model, noisy)
    token_loss = F.cross_entropy(out[masked], clean[masked], reduction="none")
    weights = (1.0 / t).unsqueeze(1).expand_as(masked)[masked]
    return (token_loss * weights).sum() / answer.sum().clamp(min=1)


@torch.no_grad()
def held_out_nll(model, data: torch.Tensor, seq: int, mask_id: int, max_windows: int = 64) -> dict[str, float]:
    """Mean cross-entropy (nats) of masked tokens at fixed masking rates, no prompt, fixed seed."""
    model.eval()
    windows = data[: (len(data) // seq) * seq].view(-1, seq)[:max_windows].long()
    result = {}
    for rate in HELD_OUT_RATES:
        generator = torch.Generator().manual_seed(1234)
        total, count = 0.0, 0
        for start in range(0, len(windows), 8):
            clean = windows[start:start + 8]
            noisy, masked, _, _ = corrupt(clean, mask_id, generator, prompt_share=0.0, rate=rate)
            out = logits(model, noisy)
            total += F.cross_entropy(out[masked].float(), clean[masked], reduction="sum").item()
            count += int(masked.sum())
        result[f"{rate:g}"] = total / max(count, 1)
    return result


def train(model, data: torch.Tensor, *, steps: int, minutes: float, seq: int, batch: int, lr: float, seed: int,
          mask_id: int) -> dict:
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 50)
    model.train()
    start, done, loss = time.time(), 0, torch.tensor(0.0)
    bar = tqdm(range(steps), desc="tiny-code-dllm", mininterval=5)
    for step in bar:
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        offsets = [rng.randrange(0, len(data) - seq) for _ in range(batch)]
        clean = torch.stack([data[o:o + seq] for o in offsets]).long()
        loss = diffusion_loss(model, clean, mask_id, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done = step + 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (time.time() - start) / 60 > minutes:  # a safety cap; the card records the steps actually run
            print(f"stopped at the {minutes}-minute cap after {done} of {steps} steps")
            break
    model.eval()
    return {"steps": done, "seconds": round(time.time() - start, 1), "tokens_seen": done * batch * seq,
            "final_train_loss": round(loss.item(), 4)}


def save(model, out: Path, card: dict) -> None:
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    config = json.loads((out / "config.json").read_text())
    # what tokenfx reads: run it bidirectionally, its mask token, and the AR model that shares its tokenizer (guided policy)
    config.update(is_causal=False, mask_token_id=card["mask_token_id"], guide_model="tokenfx:tiny-code")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "training.json").write_text(json.dumps(card, indent=2))
    lines = [f"# {card['name']}", "", card["summary"], "",
             f"- architecture: Llama blocks without the causal mask ({card['layers']} layers, hidden 256, 8 heads / "
             f"2 kv-heads, head dim 32, SwiGLU 704, RoPE, tied embeddings), {card['parameters']:,} parameters, "
             "stored fp16; config.json says `\"is_causal\": false` and the `mask_token_id`",
             f"- tokenizer: tiny-code's byte-level BPE (4096 ids) plus `{MASK}` = {card['mask_token_id']}",
             f"- data: Python {card['python']} standard library source, the same split as tiny-code "
             f"({card['train_files']} train / {card['held_out_files']} held-out files)",
             f"- training: {card['training']['steps']} steps × {card['batch']} × {card['seq']} tokens "
             f"({card['training']['tokens_seen']:,} tokens), {card['training']['seconds'] / 60:.1f} min on CPU, "
             f"seed {card['seed']}",
             f"- loss: {card['loss']}",
             f"- initialisation: {card['init']}",
             "", "Held-out masked-token cross-entropy (nats per masked token, no prompt, 64 windows):", "",
             "| masking rate t | NLL | perplexity |", "| --- | --- | --- |"]
    lines += [f"| {rate} | {nll:.3f} | {math.exp(nll):.1f} |" for rate, nll in card["held_out_nll"].items()]
    lines += ["", "Generate with `tokenfx generate tokenfx:tiny-code-dllm --diffusion threshold --prompt ...`.",
              "", f"Reproduce: `{card['command']}`", ""]
    (out / "README.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ASSETS / "tiny-code-dllm"))
    parser.add_argument("--minutes", type=float, default=75.0, help="safety cap (steps decide)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--seq", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed for repeatable numerics)")
    parser.add_argument("--init-from", default="tiny-code", help="bundled AR model to adapt from ('' = random init)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)

    root, files = stdlib_files()
    train_files, held_files = split_files(root, files)
    tokenizer = load_tokenizer(out)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    mask_id = tokenizer.convert_tokens_to_ids(MASK)
    train_ids = encode_corpus(tokenizer, [read(p) for p in train_files])
    held_ids = encode_corpus(tokenizer, [read(p) for p in held_files])
    model = make_model(6, len(tokenizer), args.seed, eos, pad, mask_id, args.seq,
                       ASSETS / args.init_from if args.init_from else None)
    stats = train(model, train_ids, steps=args.steps, minutes=args.minutes, seq=args.seq, batch=args.batch,
                  lr=args.lr, seed=args.seed, mask_id=mask_id)
    nll = held_out_nll(model, held_ids, args.seq, mask_id)
    command = "python tools/train_tiny_dllm.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "minutes"))
    card = {"name": "tokenfx:tiny-code-dllm",
            "summary": "Small masked-diffusion (LLaDA-style) Python-code LM bundled with tokenfx; same data and "
                       "tokenizer as tiny-code, which can guide it.",
            "layers": 6, "parameters": sum(p.numel() for p in model.parameters()), "python": platform.python_version(),
            "train_files": len(train_files), "held_out_files": len(held_files), "seq": args.seq, "batch": args.batch,
            "seed": args.seed, "mask_token_id": mask_id, "training": stats,
            "loss": "masked-token cross-entropy weighted by 1/t, t ~ U(0.001, 1); half the sequences keep a clean "
                    "random-length prefix (prompt) and mask only the rest",
            "init": f"adapted from tokenfx:{args.init_from} (its weights; the mask row = the mean embedding)"
                    if args.init_from else "random",
            "held_out_nll": nll, "command": command}
    save(model, out, card)
    print(json.dumps({"held_out_nll": {k: round(v, 3) for k, v in nll.items()}, **stats}))


if __name__ == "__main__":
    main()
