"""``tokenfx demo``, decoder part: KV-cached generation with the real pretrained
SmolLM2-135M-Instruct (``tokenfx:smollm2``), through the default code path.

1. build — ``tokenfx.Generator("tokenfx:smollm2")``: capture the Hugging Face Llama, run the
   ``kv_cache`` pass into prefill and decode graphs, compile them with AOTInductor block by
   block (once, with a progress bar; later runs load the cached packages in about a second);
2. greedy — two chat prompts (the tokenizer's chat template) and two code prompts, each alone
   at batch 1: Hugging Face ``generate`` vs ``tokenfx.Generator``, token-identical check and
   tokens/s of both (timed in turns), and the answers;
3. speculative — plain greedy vs Token Recycling verified by the ``tree_verify`` graph on the
   same prompts: token-identical check, tokens/s, tokens per verify step;
4. prefix reuse — time to first token for a request that shares a 512-token prefix with an
   earlier one, with and without the radix-tree prefix cache;
5. export — the bundled ``tokenfx:tiny-code``'s decode graph (cache as inputs / outputs) to
   ONNX, one step in onnxruntime against the graph (small enough to export in seconds).
"""

from __future__ import annotations

import json
import sysconfig
import time
from pathlib import Path

import torch


def held_out_code(min_chars: int = 20000) -> list[str]:
    """Source files the bundled model never trained on (its split.json), from this Python's stdlib."""
    import tokenfx.assets

    split = json.loads((tokenfx.assets.path("tiny-code") / "split.json").read_text())
    texts = []
    for root in (Path(split["root"]), Path(sysconfig.get_paths()["stdlib"])):
        for rel in split["held_out"]:
            f = root / rel
            if f.is_file():
                texts.append(f.read_text(errors="replace"))
        if sum(map(len, texts)) >= min_chars:
            return texts
        texts = []
    raise FileNotFoundError("the held-out standard-library files of tokenfx:tiny-code's split are not on this machine")


CHAT = ("What is the capital of France?", "Explain in two sentences what a hash table is.")
CODE = ("def is_prime(n):\n    \"\"\"Return True when n is a prime number.\"\"\"\n",
        "import json\n\n\ndef load_config(path):\n    \"\"\"Read a JSON config file into a dict.\"\"\"\n")


def run_decoder_demo(out_dir: Path, console, *, compile: bool = True, new_tokens: int = 48,
                     model_spec: str = "tokenfx:smollm2") -> dict:
    from rich.table import Table

    from tokenfx.demo_timing import interleaved_median_ms
    from tokenfx.frontends.load import load_hf_model, load_tokenizer, model_dir
    from tokenfx.frontends.onnx import export_onnx, run_onnxruntime
    from tokenfx.ir.kv_layout import example_inputs
    from tokenfx.runtime.generate import Generator

    console.rule(f"[bold]tokenfx demo · decoding with {model_spec}")
    directory = model_dir(model_spec)  # tokenfx:smollm2 converts its GGUF file once (cached)
    model = load_hf_model(directory, dtype=torch.float32)  # Hugging Face's own model: the baseline
    tokenizer = load_tokenizer(model_spec)
    torch.set_num_threads(1)  # the setting the README's numbers use; batch-1 decoding streams weights

    console.print("\n[bold]1. build[/bold] — kv_cache pass → prefill + decode graphs" +
                  (", AOTInductor block by block (the default)" if compile else " (fx graphs)"))
    start = time.perf_counter()
    with console.status("capturing, rewriting" + (" and compiling (packages are cached on disk)" if compile else "")):
        gen = Generator(model_spec, compile="auto" if compile else False, prefix_cache_bytes=256 << 20)
    build_s = time.perf_counter() - start
    layout = gen.layout
    console.print(f"{layout.layers} layers · cache \\[layers, 2, batch, {layout.kv_heads} kv heads, length, {layout.head_dim}] · "
                  f"{layout.max_positions} positions · built in {build_s:.1f} s")

    def encode(kind, text):
        if kind == "chat":
            return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)["input_ids"]
        return tokenizer(text, return_tensors="pt")["input_ids"]

    prompts = [("chat", t, encode("chat", t)) for t in CHAT] + [("code", t, encode("code", t)) for t in CODE]
    console.print(f"\n[bold]2. greedy[/bold] — {len(CHAT)} chat and {len(CODE)} code prompts, batch 1, "
                  f"{new_tokens} new tokens, one CPU thread")
    rows, hf_total, fx_total, spec_total, produced = [], 0.0, 0.0, 0.0, 0
    identical = spec_identical = True
    accepted = []
    with torch.inference_mode(), console.status("generating (each method warmed up, then timed in turns)"):
        for kind, text, ids in prompts:
            def hf():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=[], pad_token_id=gen.pad_id)

            def ours():
                return gen.generate(ids, max_new_tokens=new_tokens, stop=[])

            def recycled():
                return gen.generate(ids, max_new_tokens=new_tokens, stop=[], speculate="recycling")

            ref, out, spec = hf(), ours(), recycled()
            identical &= bool(torch.equal(ref, out))
            spec_identical &= bool(torch.equal(spec, out))
            ms = interleaved_median_ms({"hf": hf, "fx": ours, "spec": recycled}, repeats=2)
            accepted.append(gen.last_stats["accepted_per_step"])
            hf_total, fx_total, spec_total = hf_total + ms["hf"], fx_total + ms["fx"], spec_total + ms["spec"]
            produced += new_tokens
            answer = out[0, ids.shape[1]:].tolist()  # timed without a stop token; shown up to the first EOS
            answer = answer[:next((i for i, t in enumerate(answer) if t in gen.eos_ids), len(answer))]
            rows.append((kind, text, tokenizer.decode(answer, skip_special_tokens=True), ms))
    table = Table(show_edge=False, header_style="bold")
    for col in ("prompt", "tokenfx answer (token-identical to HF)" if identical else "tokenfx answer", "HF tok/s",
                "tokenfx tok/s", "vs HF"):
        table.add_column(col)
    for kind, text, answer, ms in rows:
        table.add_row(f"[{kind}] {text.splitlines()[0][:40]}", " ".join(answer.split())[:70],
                      f"{new_tokens / ms['hf'] * 1000:.1f}", f"{new_tokens / ms['fx'] * 1000:.1f}", f"{ms['hf'] / ms['fx']:.2f}×")
    console.print(table)
    speedup = hf_total / fx_total
    console.print(f"overall: HF {produced / hf_total * 1000:.1f} tok/s → tokenfx {produced / fx_total * 1000:.1f} tok/s "
                  f"([bold]{speedup:.2f}×[/bold]); " +
                  ("[green]token-identical to Hugging Face[/green]" if identical else "[red]outputs differ from Hugging Face[/red]"))

    console.print("\n[bold]3. speculative[/bold] — Token Recycling drafts a tree per step, one tree_verify call "
                  "checks it (lossless)")
    spec_speedup = fx_total / spec_total
    console.print(f"plain {produced / fx_total * 1000:.1f} tok/s → recycling {produced / spec_total * 1000:.1f} tok/s "
                  f"({spec_speedup:.2f}× tokenfx greedy, {hf_total / spec_total:.2f}× HF), "
                  f"{sum(accepted) / len(accepted):.2f} tokens per verify step; "
                  + ("[green]token-identical[/green]" if spec_identical else "[red]outputs differ[/red]"))
    texts = held_out_code()

    console.print("\n[bold]4. prefix reuse[/bold] — two requests sharing a 512-token prefix, 32-token suffixes")
    stream = tokenizer("\n".join(texts[4:]), return_tensors="pt")["input_ids"][0]
    prefix, suffix_a, suffix_b = stream[:512], stream[512:544], stream[600:632]
    first = torch.cat([prefix, suffix_a])[None]
    second = torch.cat([prefix, suffix_b])[None]
    with torch.inference_mode():
        gen.prefix_cache.clear()
        cold = gen.generate(second, max_new_tokens=8)
        cold_ttft = gen.last_stats["first_token_seconds"]
        gen.prefix_cache.clear()
        gen.generate(first, max_new_tokens=8)
        warm = gen.generate(second, max_new_tokens=8)
        warm_ttft, reused = gen.last_stats["first_token_seconds"], gen.last_stats["reused_tokens"]
    console.print(f"time to first token: {cold_ttft * 1000:.1f} ms without reuse → {warm_ttft * 1000:.1f} ms reusing "
                  f"{reused} cached tokens ({cold_ttft / warm_ttft:.1f}× lower); outputs "
                  + ("identical" if torch.equal(cold, warm) else "[red]differ[/red]"))

    console.print("\n[bold]5. export[/bold] — tokenfx:tiny-code's decode graph to ONNX, one step in onnxruntime")
    onnx_path = out_dir / "tiny_code_decode.onnx"
    with console.status("building the portable decode graph (new K/V as an output) and exporting it"):
        small = Generator("tokenfx:tiny-code", compile=False)
        portable = small.graph("decode", cache_update="output")
        export_onnx(portable, onnx_path)
    args = list(example_inputs(portable.kv, batch=2, tokens=1, past=16, vocab=small.vocab_size))
    args[2] = torch.randn(args[2].shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits, new_kv = portable.gm(*args)
    ort = run_onnxruntime(onnx_path, dict(zip(portable.kv.inputs, args)))
    onnx_err = max(float((torch.as_tensor(o) - r).abs().max()) for o, r in zip(ort, (logits, new_kv)))
    console.print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB); onnxruntime vs graph max |Δ| {onnx_err:.1e}")

    return {
        "model": model_spec, "compile": compile, "build_seconds": build_s,
        "greedy": {"prompts": [[k, t] for k, t, _ in prompts], "batch": 1, "new_tokens": new_tokens,
                   "identical_to_hf": identical, "hf_tokens_per_s": produced / hf_total * 1000,
                   "tokenfx_tokens_per_s": produced / fx_total * 1000, "speedup": speedup,
                   "answers": [[k, a] for k, _, a, _ in rows]},
        "speculative": {"drafter": "recycling", "new_tokens": new_tokens, "identical": spec_identical,
                        "accepted_per_step": sum(accepted) / len(accepted), "speedup_over_plain": spec_speedup,
                        "speedup_over_hf": hf_total / spec_total},
        "prefix_reuse": {"prefix_tokens": 512, "reused_tokens": reused, "ttft_ms_cold": cold_ttft * 1000,
                         "ttft_ms_cached": warm_ttft * 1000, "identical": bool(torch.equal(cold, warm))},
        "onnx": {"path": str(onnx_path), "max_abs_error": onnx_err},
        "ok": bool(identical and spec_identical and torch.equal(cold, warm) and onnx_err < 1e-3),
    }
