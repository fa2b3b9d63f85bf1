"""Train Kangaroo's exit adapter for a model, with an FR-Spec draft vocabulary, where
``speculate="self:adapter"`` (and DEL, ``"self:auto"``) finds it.

    python tools/train_exit_adapter.py                              # tokenfx:smollm2, exit after 6 blocks
    python tools/train_exit_adapter.py --layer 4 --steps 600 --vocab 8192
    python tools/train_exit_adapter.py --quick                      # a smoke run (minutes → seconds)

Data (self-distillation, what the adapter will draft for): the model's own greedy
continuations of chat instructions (templated, through the tokenizer's chat template) and of
the beginnings of Python standard-library files (the tiny-code *train* split, so the
benchmarks' held-out files stay unseen), packed into windows of ``--window`` tokens. The
adapter (a copy of block ``E`` + the final norm) is distilled with ``KL(p_full || p_adapter)``
over the draft vocabulary, the target frozen (:func:`tokenfx.runtime.speculative.adapter.train_adapter`).

Draft vocabulary (FR-Spec): the ``--vocab`` most frequent ids of the training tokens; the
draft head computes only those logits (verification keeps the full head: lossless).

Writes ``$TOKENFX_CACHE/adapters/<model digest>.safetensors`` (fp16 weights, the layer, the
target digest, the held-out top-1 agreement) and a ``.json`` beside it with the recipe and
the measurements (KL before / after, agreement, vocabulary coverage, seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenfx.cache import cache_dir  # noqa: E402
from tokenfx.frontends.load import load_tokenizer  # noqa: E402
from tokenfx.runtime.generate import Generator  # noqa: E402
from tokenfx.runtime.speculative import adapter as A  # noqa: E402

TOPICS = ("photosynthesis", "a hash table", "the French Revolution", "compound interest", "black holes",
          "recursion", "the water cycle", "vaccines", "binary search", "inflation", "plate tectonics",
          "a linked list", "climate change", "the stock market", "neural networks", "the Roman Empire",
          "gravity", "HTTP", "democracy", "the immune system", "prime numbers", "sorting algorithms",
          "the Moon", "electric cars", "sleep", "coffee", "volcanoes", "the internet", "DNA", "music theory")
TEMPLATES = ("Explain {} in simple terms.", "Write a short paragraph about {}.", "What are three facts about {}?",
             "Why is {} important?", "Give me a brief summary of {}.", "How would you teach {} to a child?")


def chat_prompts(tokenizer, count: int) -> list[torch.Tensor]:
    texts = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    step = max(1, len(texts) // max(count, 1))
    out = []
    for text in texts[::step][:count]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_dict=False)
        out.append(torch.tensor(ids if isinstance(ids, list) else ids["input_ids"]))
    return out


def code_prompts(tokenizer, count: int, held_out: bool = False) -> list[torch.Tensor]:
    """The first 40 lines of stdlib files of the tiny-code split (train files, or held-out ones)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    out = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        out_of_train = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100 < 5
        if out_of_train != held_out:
            continue
        text = "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[:40]) + "\n"
        ids = torch.tensor(tokenizer(text)["input_ids"][-192:])
        if ids.numel() >= 16:
            out.append(ids)
        if len(out) == count:
            break
    return out


def continuations(gen: Generator, prompts: list[torch.Tensor], new_tokens: int, pad: int, batch: int = 8,
                  label: str = "") -> list[torch.Tensor]:
    """Each prompt followed by the model's greedy continuation (padding dropped)."""
    from rich.progress import Progress

    out = []
    with Progress(transient=True) as bar:
        task = bar.add_task(f"generating {label} continuations", total=len(prompts))
        for i in range(0, len(prompts), batch):
            rows = prompts[i:i + batch]
            width = max(r.numel() for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, width - r.numel():], mask[j, width - r.numel():] = r, 1
            result = gen.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, stop=[])
            for j, r in enumerate(rows):
                out.append(result[j, width - r.numel():])
            bar.advance(task, len(rows))
    return out


def windows(sequences: list[torch.Tensor], length: int) -> torch.Tensor:
    stream = torch.cat(sequences)
    count = stream.numel() // length
    return stream[:count * length].view(count, length)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tokenfx:smollm2")
    parser.add_argument("--layer", type=int, default=6, help="the adapter reads the residual stream after this many blocks")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192, help="FR-Spec draft vocabulary size (0: the whole vocabulary)")
    parser.add_argument("--chat", type=int, default=96, help="chat instructions to continue")
    parser.add_argument("--code", type=int, default=96, help="stdlib file beginnings to continue")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--out", type=Path, default=None, help="default: $TOKENFX_CACHE/adapters/<digest>.safetensors")
    parser.add_argument("--data", type=Path, default=None,
                        help="keep the generated windows in this file and reuse them when it exists (try other --layer "
                             "values without generating again)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few prompts, few steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.chat, args.code, args.new_tokens = 20, 8, 8, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    gen = Generator(args.model)
    model = gen.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chat = chat_prompts(tokenizer, args.chat)
    code = code_prompts(tokenizer, args.code)
    recipe = {"model": args.model, "chat": args.chat, "code": args.code, "new_tokens": args.new_tokens,
              "window": args.window}
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if args.data is not None and args.data.exists() and json.loads(
            safe_open(str(args.data), "pt").metadata()["recipe"]) == recipe:
        saved = load_file(str(args.data))
        data, held_data = saved["train"], saved["held_out"]
    else:
        held = (code_prompts(tokenizer, max(4, args.code // 8), held_out=True)
                + chat_prompts(tokenizer, 200)[-max(4, args.chat // 8):])
        train_rows = continuations(gen, chat + code, args.new_tokens, pad, label="training")
        held_rows = continuations(gen, held, args.new_tokens, pad, label="held-out")
        data, held_data = windows(train_rows, args.window), windows(held_rows, args.window)
        if args.data is not None:
            save_file({"train": data, "held_out": held_data}, str(args.data), metadata={"recipe": json.dumps(recipe)})
    vocab_size = model.get_output_embeddings().weight.shape[0]
    vocab = A.frequent_tokens(data, args.vocab, vocab_size) if args.vocab else None
    coverage = 1.0 if vocab is None else float(torch.isin(held_data, vocab).float().mean())
    generated_s = time.perf_counter() - start
    print(f"data: {data.shape[0]} windows of {args.window} tokens ({generated_s:.0f} s); held-out {held_data.shape[0]}; "
          f"draft vocabulary {len(vocab) if vocab is not None else vocab_size} ids cover {coverage:.1%} of held-out tokens")
    fresh = A._fresh(model, args.layer)
    fresh.vocab = vocab
    kl_fresh = A.adapter_kl(model, fresh, held_data)
    train_start = time.perf_counter()
    adapter = A.train_adapter(model, args.layer, data, steps=args.steps, lr=args.lr, batch=args.batch, vocab=vocab)
    train_s = time.perf_counter() - train_start
    kl = A.adapter_kl(model, adapter, held_data)
    adapter.agreement = A.agreement(model, adapter, held_data)
    print(f"held-out KL {kl_fresh:.3f} → {kl:.3f}; top-1 agreement with the full model {adapter.agreement:.1%} "
          f"(trained in {train_s:.0f} s)")
    out = args.out or cache_dir() / "adapters" / f"{adapter.target}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    adapter.save(out, dtype=torch.float16)
    report = {"model": args.model, "target": adapter.target, "layer": args.layer, "steps": args.steps, "lr": args.lr,
              "batch": args.batch, "window": args.window, "vocab": args.vocab, "chat_prompts": len(chat),
              "code_prompts": len(code), "new_tokens": args.new_tokens, "train_windows": int(data.shape[0]),
              "held_out_windows": int(held_data.shape[0]), "vocab_coverage": coverage, "kl_fresh": kl_fresh,
              "kl_trained": kl, "agreement": adapter.agreement, "data_seconds": generated_s, "train_seconds": train_s,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
