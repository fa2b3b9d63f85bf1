"""``tokenfx demo``, decoder part: KV-cached generation with the bundled ``tokenfx:tiny-code``.

1. build — capture the Hugging Face Llama, run the ``kv_cache`` pass into prefill and decode
   graphs, compile both with AOTInductor (once; later runs load the cached packages);
2. greedy — a left-padded batch of 4 held-out code prompts: Hugging Face ``generate`` vs
   ``tokenfx.Generator``, token-identical check and tokens/s of both (timed in turns);
3. speculative — one prompt, plain greedy vs Token Recycling verified by the ``tree_verify``
   graph (compiled too): token-identical check, tokens/s, tokens per verify step;
4. prefix reuse — time to first token for a request that shares a 512-token prefix with an
   earlier one, with and without the radix-tree prefix cache;
5. export — the decode graph (cache as inputs / outputs) to ONNX, one step in onnxruntime
   against the graph.
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


def run_decoder_demo(out_dir: Path, console, *, compile: bool = True, new_tokens: int = 64) -> dict:
    from rich.table import Table
    from transformers import AutoTokenizer

    import tokenfx.assets
    from tokenfx.demo import _interleaved_median_ms
    from tokenfx.frontends.load import load_hf_model
    from tokenfx.frontends.onnx import export_onnx, run_onnxruntime
    from tokenfx.passes.kv_cache import example_inputs
    from tokenfx.runtime.generate import Generator

    directory = tokenfx.assets.path("tiny-code")
    console.rule("[bold]tokenfx demo · decoding with tokenfx:tiny-code")
    model = load_hf_model(directory, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.padding_side = "left"
    texts = held_out_code()

    console.print("\n[bold]1. build[/bold] — kv_cache pass → prefill + decode graphs" + (", AOTInductor" if compile else ""))
    start = time.perf_counter()
    with console.status("capturing, rewriting and compiling (compiled packages are cached on disk)"):
        gen = Generator(model, compile=compile, prefix_cache_bytes=256 << 20)
    build_s = time.perf_counter() - start
    layout = gen.layout
    console.print(f"{layout.layers} layers · cache \\[layers, 2, batch, {layout.kv_heads} kv heads, length, {layout.head_dim}] · "
                  f"{layout.max_positions} positions · built in {build_s:.1f} s")

    console.print(f"\n[bold]2. greedy[/bold] — batch of 4 held-out prompts (left-padded), {new_tokens} new tokens")
    prompts = [t[:600] for t in texts[:4]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        def hf():
            return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)

        def ours():
            return gen.generate(ids, attention_mask=mask, max_new_tokens=new_tokens)

        ref, out = hf(), ours()
        identical = torch.equal(ref, out)
        ms = _interleaved_median_ms({"hf": hf, "fx": ours}, repeats=3)  # in turns: background load hits both alike
        hf_s, fx_s = ms["hf"] / 1000, ms["fx"] / 1000
    produced = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    table = Table(show_edge=False, header_style="bold")
    for col in ("", "tokens/s", "vs HF"):
        table.add_column(col)
    table.add_row("Hugging Face generate", f"{produced / hf_s:.0f}", "1.00×")
    table.add_row("tokenfx.generate" + (" (AOTInductor)" if compile else ""), f"{produced / fx_s:.0f}", f"{hf_s / fx_s:.2f}×")
    console.print(table)
    console.print(("[green]token-identical to Hugging Face[/green]" if identical else "[red]outputs differ from Hugging Face[/red]"))
    sample = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    console.print(f"[dim]prompt 1 continues:[/dim] {sample[:160]!r}")

    console.print(f"\n[bold]3. speculative[/bold] — Token Recycling drafts a tree per step, one tree_verify call "
                  f"checks it (lossless), {2 * new_tokens} new tokens")
    one = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    with torch.inference_mode(), console.status("building the tree-verify graph" + (" and compiling it" if compile else "")):
        gen.generate(one, max_new_tokens=8, speculate="recycling")  # builds / loads the graph, seeds the matrix

        def plain():
            return gen.generate(one, max_new_tokens=2 * new_tokens, stop=[])

        def recycled():
            return gen.generate(one, max_new_tokens=2 * new_tokens, stop=[], speculate="recycling")

        spec_identical = torch.equal(plain(), recycled())
        accepted = gen.last_stats["accepted_per_step"]
        ms = _interleaved_median_ms({"plain": plain, "spec": recycled}, repeats=3)
    spec_speedup = ms["plain"] / ms["spec"]
    console.print(f"plain {2 * new_tokens / ms['plain'] * 1000:.0f} tokens/s → recycling "
                  f"{2 * new_tokens / ms['spec'] * 1000:.0f} tokens/s ({spec_speedup:.2f}×), {accepted:.2f} tokens per "
                  "verify step; " + ("[green]token-identical[/green]" if spec_identical else "[red]outputs differ[/red]"))

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

    console.print("\n[bold]5. export[/bold] — the decode graph to ONNX, one step in onnxruntime")
    onnx_path = out_dir / "tiny_code_decode.onnx"
    with console.status("building the portable decode graph (new K/V as an output) and exporting it"):
        portable = gen.graph("decode", cache_update="output")
        export_onnx(portable, onnx_path)
    args = list(example_inputs(portable.kv, batch=2, tokens=1, past=16, vocab=gen.vocab_size))
    args[2] = torch.randn(args[2].shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits, new_kv = portable.gm(*args)
    ort = run_onnxruntime(onnx_path, dict(zip(portable.kv.inputs, args)))
    onnx_err = max(float((torch.as_tensor(o) - r).abs().max()) for o, r in zip(ort, (logits, new_kv)))
    console.print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB); onnxruntime vs graph max |Δ| {onnx_err:.1e}")

    return {
        "model": "tokenfx:tiny-code", "compile": compile, "build_seconds": build_s,
        "greedy": {"batch": list(ids.shape), "new_tokens": new_tokens, "identical_to_hf": identical,
                   "hf_tokens_per_s": produced / hf_s, "tokenfx_tokens_per_s": produced / fx_s, "speedup": hf_s / fx_s},
        "speculative": {"drafter": "recycling", "new_tokens": 2 * new_tokens, "identical": spec_identical,
                        "accepted_per_step": accepted, "speedup_over_plain": spec_speedup},
        "prefix_reuse": {"prefix_tokens": 512, "reused_tokens": reused, "ttft_ms_cold": cold_ttft * 1000,
                         "ttft_ms_cached": warm_ttft * 1000, "identical": bool(torch.equal(cold, warm))},
        "onnx": {"path": str(onnx_path), "max_abs_error": onnx_err},
        "ok": bool(identical and spec_identical and torch.equal(cold, warm) and onnx_err < 1e-3),
    }
