"""Train the learned unmasking policy of ``--diffusion learned`` (``tokenfx/assets/unmask-policy``).

    python tools/train_unmask_policy.py                                   # on tokenfx:tiny-code-dllm
    python tools/train_unmask_policy.py --model /tmp/dllm --updates 4 --out /tmp/policy   # a smoke run

"Learning Unmasking Policies for Diffusion Language Models": a one-layer transformer
(:class:`tokenfx.runtime.unmasking.UnmaskNet`) reads per-position features of a round (the
candidate's confidence, entropy, top-1 minus top-2 margin, position in the block, share of the
block's rounds used, still masked) and gives each masked position an unmask probability.

Training is REINFORCE with a baseline. An episode decodes one block of ``--block-length``
tokens after a train-split prompt with the dLLM; each round the policy *samples* which masked
positions to unmask (Bernoulli per position; the runtime's budget rule then adds the most
confident one if it chose none). Reward = quality − λ · rounds / block length, where quality is
the share of the block's tokens equal to the vanilla dLLM's one-token-per-round output for the
same prompt (the best the model does; computed once per prompt). Each prompt gets ``--samples``
episodes, and each episode's baseline is the mean reward of the prompt's other episodes
(leave-one-out), so the gradient is Σ_t ∇ log π(a_t | s_t) · (R − b).

Before RL the network is warm-started by imitation of Fast-dLLM's threshold rule (unmask where
confidence ≥ ``--warm-threshold``, or the most confident) on the features of the vanilla
episodes, so the few RL updates a CPU affords start from a sensible policy.

The dLLM forward is the reference bidirectional one of ``tools/train_tiny_dllm.py``
(:func:`logits`). Everything is seeded; the folder gets ``policy.safetensors``,
``config.json`` (width, heads, features), ``training.json`` (command, rewards) and a README card.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_dllm import bidirectional, logits  # noqa: E402  (the reference dLLM forward)
from train_tiny_lm import read, split_files, stdlib_files  # noqa: E402  (the same split as tiny-code)

from tokenfx.runtime.unmasking import (  # noqa: E402
    FEATURES, RoundState, UnmaskNet, Vanilla, enforce_budget, unmask_features,
)

ASSETS = ROOT / "tokenfx" / "assets"


def load_dllm(path: Path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).float().eval()
    bidirectional(model)
    return model, AutoTokenizer.from_pretrained(path), int(model.config.mask_token_id)


def train_prompts(tokenizer, n: int, length: int, seed: int) -> list[torch.Tensor]:
    """``n`` windows of ``length`` tokens from the stdlib files tiny-code was trained on."""
    root, files = stdlib_files()
    train_files, _ = split_files(root, files)
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        ids = tokenizer(read(rng.choice(train_files)))["input_ids"]
        if len(ids) > length + 64:
            start = rng.randrange(0, len(ids) - length - 64)
            prompts.append(torch.tensor(ids[start:start + length]))
    return prompts


@torch.no_grad()
def proposals(model, tokens: torch.Tensor, start: int, k: int):
    """The dLLM's greedy proposals for the block ``[start, start + k)``: logits, candidates, confidence."""
    block_logits = logits(model, tokens)[:, start:start + k].float()
    probs = block_logits.softmax(-1)
    confidence, candidates = probs.max(-1)
    return block_logits, candidates, confidence


def episode(model, prompts: torch.Tensor, mask_id: int, k: int, choose):
    """Decode one block after ``prompts [B, P]`` with ``choose(state) -> unmask [B, K]`` (the
    budget rule applied after it); returns the block's tokens ``[B, K]`` and rounds per row."""
    batch, p = prompts.shape
    tokens = torch.cat([prompts, torch.full((batch, k), mask_id)], 1)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    rounds = torch.zeros(batch, dtype=torch.long)
    for r in range(k):
        masked = tokens[:, p:] == mask_id
        if not bool(masked.any()):
            break
        block_logits, candidates, confidence = proposals(model, tokens, p, k)
        state = RoundState(tokens, valid, p, masked, candidates, torch.where(masked, confidence, 0.0), block_logits,
                           r, k - r)
        unmask = enforce_budget(state, choose(state))
        tokens[:, p:] = torch.where(unmask, candidates, tokens[:, p:])
        rounds += masked.any(1).long()
    return tokens[:, p:], rounds


def warm_start(net: UnmaskNet, model, prompts: list[torch.Tensor], mask_id: int, k: int, threshold: float,
               epochs: int, seed: int) -> tuple[list, float]:
    """Vanilla one-token-per-round episodes (their blocks are the quality reference) and imitation
    of the threshold rule on their rounds' features."""
    from tqdm import tqdm

    vanilla, feats, labels, masks = Vanilla(), [], [], []

    def record(state):
        feats.append(unmask_features(state))
        rule = (state.confidence >= threshold) | (state.confidence >= state.confidence.max(1, keepdim=True).values)
        labels.append((rule & state.masked).float())
        masks.append(state.masked)
        return vanilla.select(state).unmask

    references = []
    for prompt in tqdm(prompts, desc="vanilla reference episodes", mininterval=5):
        block, _ = episode(model, prompt[None], mask_id, k, record)
        references.append(block[0])
    x, y, m = torch.cat(feats), torch.cat(labels), torch.cat(masks)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            out = net(x[idx])
            loss = F.binary_cross_entropy_with_logits(out[m[idx]], y[idx][m[idx]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return references, loss.item()


def reinforce(net: UnmaskNet, model, prompts: list[torch.Tensor], references: list, mask_id: int, k: int, *,
              updates: int, prompts_per_update: int, samples: int, lam: float, lr: float, seed: int) -> list[dict]:
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    history = []
    bar = tqdm(range(updates), desc="REINFORCE", mininterval=5)
    for step in bar:
        pick = torch.randint(0, len(prompts), (prompts_per_update,), generator=generator).tolist()
        batch = torch.stack([prompts[i] for i in pick]).repeat_interleave(samples, 0)
        reference = torch.stack([references[i] for i in pick]).repeat_interleave(samples, 0)
        log_prob = torch.zeros(batch.shape[0])

        def sample(state):
            nonlocal log_prob
            p = torch.sigmoid(net(unmask_features(state))).clamp(1e-4, 1 - 1e-4)
            action = torch.bernoulli(p.detach(), generator=generator).bool() & state.masked
            step_logp = torch.where(action, p.log(), (1 - p).log())
            log_prob = log_prob + (step_logp * state.masked).sum(1)
            return action

        block, rounds = episode(model, batch, mask_id, k, sample)
        quality = (block == reference).float().mean(1)
        reward = quality - lam * rounds.float() / k
        grouped = reward.view(prompts_per_update, samples)
        baseline = (grouped.sum(1, keepdim=True) - grouped) / max(samples - 1, 1)  # leave-one-out mean
        advantage = (grouped - baseline).view(-1)
        loss = -(advantage * log_prob).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        history.append({"update": step, "reward": round(float(reward.mean()), 4),
                        "quality": round(float(quality.mean()), 4), "rounds": round(float(rounds.float().mean()), 2)})
        bar.set_postfix(reward=history[-1]["reward"], quality=history[-1]["quality"], rounds=history[-1]["rounds"])
    return history


@torch.no_grad()
def evaluate(net: UnmaskNet, model, prompts: list[torch.Tensor], references: list, mask_id: int, k: int) -> dict:
    """The deterministic policy (unmask where probability >= 0.5) on ``prompts``: quality and rounds."""
    from tokenfx.runtime.unmasking import Learned

    policy = Learned(net=net)
    block, rounds = episode(model, torch.stack(prompts), mask_id, k, lambda s: policy.select(s).unmask)
    quality = (block == torch.stack(references)).float().mean(1)
    return {"quality": round(float(quality.mean()), 4), "rounds": round(float(rounds.float().mean()), 2)}


def save(net: UnmaskNet, out: Path, card: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().contiguous() for name, t in net.state_dict().items()}, str(out / "policy.safetensors"))
    (out / "config.json").write_text(json.dumps({"width": net.width, "heads": net.heads, "features": list(FEATURES)},
                                                indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(card, indent=2) + "\n")
    ev = card["evaluation"]
    lines = ["# tokenfx unmask-policy", "",
             "The learned unmasking policy of `--diffusion learned` (\"Learning Unmasking Policies for Diffusion "
             "Language Models\"): one transformer layer (width "
             f"{net.width}, {net.heads} heads, {sum(p.numel() for p in net.parameters()):,} parameters) over per-position "
             f"features ({', '.join(FEATURES)}) giving each masked position an unmask probability; positions with "
             "probability >= 0.5 are unmasked (the runtime adds the most confident one when none is).", "",
             f"- dLLM: `{card['model']}`; episodes: one block of {card['block_length']} tokens after "
             f"{card['prompt_length']}-token windows of train-split stdlib files ({card['prompts']} prompts)",
             f"- warm start: imitation of the confidence-threshold rule (>= {card['warm_threshold']}), final BCE "
             f"{card['warm_loss']:.3f}",
             f"- REINFORCE with a leave-one-out baseline ({card['samples']} episodes per prompt): {card['updates']} updates, "
             f"reward = agreement with the vanilla one-token-per-round block − {card['lambda']} · rounds / block length",
             f"- {card['seconds'] / 60:.1f} min on CPU ({card['threads']} thread), seed {card['seed']}", "",
             f"Held-out-prompt check ({card['eval_prompts']} held-out windows, one block): agreement with vanilla "
             f"{ev['after']['quality']:.3f} in {ev['after']['rounds']:.1f} rounds (warm start alone: "
             f"{ev['warm']['quality']:.3f} in {ev['warm']['rounds']:.1f}; vanilla: 1.000 in {card['block_length']}).", "",
             f"Reproduce: `{card['command']}`", ""]
    (out / "README.md").write_text("\n".join(lines))


def held_out_prompts(tokenizer, n: int, length: int, seed: int) -> list[torch.Tensor]:
    root, files = stdlib_files()
    _, held = split_files(root, files)
    rng = random.Random(seed)
    ids = tokenizer("\n".join(read(p) for p in sorted(held)[:8]))["input_ids"]
    return [torch.tensor(ids[s:s + length]) for s in (rng.randrange(0, len(ids) - length) for _ in range(n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ASSETS / "tiny-code-dllm"), help="the dLLM's HF directory")
    parser.add_argument("--out", default=str(ASSETS / "unmask-policy"))
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=24, help="train-split prompts (each decoded once by vanilla)")
    parser.add_argument("--updates", type=int, default=40)
    parser.add_argument("--prompts-per-update", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4, help="episodes per prompt (leave-one-out baseline)")
    parser.add_argument("--lam", type=float, default=0.1, help="λ: reward per round saved, in block-length units")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warm-threshold", type=float, default=0.9)
    parser.add_argument("--warm-epochs", type=int, default=20)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    model, tokenizer, mask_id = load_dllm(Path(args.model))
    k = args.block_length
    prompts = train_prompts(tokenizer, args.prompts, args.prompt_length, args.seed)
    net = UnmaskNet()
    references, warm_loss = warm_start(net, model, prompts, mask_id, k, args.warm_threshold, args.warm_epochs, args.seed)
    held = held_out_prompts(tokenizer, args.eval_prompts, args.prompt_length, args.seed)
    held_refs = [episode(model, p[None], mask_id, k, lambda s: Vanilla().select(s).unmask)[0][0] for p in held]
    warm_eval = evaluate(net, model, held, held_refs, mask_id, k)
    history = reinforce(net, model, prompts, references, mask_id, k, updates=args.updates,
                        prompts_per_update=args.prompts_per_update, samples=args.samples, lam=args.lam, lr=args.lr,
                        seed=args.seed)
    after = evaluate(net, model, held, held_refs, mask_id, k)
    model_name = "tokenfx:tiny-code-dllm" if Path(args.model).resolve() == (ASSETS / "tiny-code-dllm").resolve() else args.model
    command = "python tools/train_unmask_policy.py " + " ".join(
        f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if key not in ("out",)
        and not (key == "model" and model_name.startswith("tokenfx:")))
    card = {"model": model_name, "block_length": k, "prompt_length": args.prompt_length, "prompts": args.prompts,
            "updates": args.updates, "samples": args.samples, "lambda": args.lam, "lr": args.lr,
            "warm_threshold": args.warm_threshold, "warm_loss": warm_loss, "eval_prompts": args.eval_prompts,
            "evaluation": {"warm": warm_eval, "after": after}, "history": history, "seed": args.seed,
            "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__,
            "seconds": round(time.time() - started, 1), "command": command,
            "quality": "share of the block's tokens equal to the vanilla one-token-per-round output"}
    save(net, Path(args.out), card)
    print(json.dumps({"warm": warm_eval, "after": after, "seconds": card["seconds"]}))


if __name__ == "__main__":
    main()
