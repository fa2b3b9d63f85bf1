"""The ``tokenfx`` command.

    tokenfx inspect MODEL [--json]
    tokenfx passes [--json]
    tokenfx rewrite MODEL --passes P -o OUT.pt2|OUT.onnx [--verify] [--emit-kernels DIR] [--json]
    tokenfx generate MODEL --prompt TEXT|--prompt-file F [--max-new-tokens N]
                     [--chat] [--temperature T --top-k K --top-p P --seed S] [--no-compile] [--json]
    tokenfx generate MODEL --prompt P --max-new-tokens N --diffusion vanilla|threshold|ete|guided|learned
                     [--no-cache] [--block-length K] [--json]        (masked-diffusion LMs)
    tokenfx demo [--model SPEC] [--out DIR]

MODEL is anything :func:`tokenfx.load` accepts. Errors print one line and exit 2 (a full
traceback with ``--debug``); outputs are written atomically, so a failed run leaves none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from tokenfx.report import pass_json, render_catalogue, render_passes, render_structure, terminal

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
DIFFUSION_POLICIES = ("vanilla", "topk", "threshold", "ete", "guided", "learned")  # tokenfx.runtime.unmasking.POLICIES


# -- inspect ---------------------------------------------------------------------------------------
def cmd_inspect(args) -> int:
    import tokenfx

    graph = tokenfx.load(args.model)
    structure = graph.structure
    data = structure.to_json()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    render_structure(terminal(), data, title=f"{args.model}")
    return 0


# -- passes ----------------------------------------------------------------------------------------
def pass_catalogue() -> list[dict]:
    from tokenfx.passes.base import registered_passes

    out = []
    for name, cls in registered_passes().items():
        options = [{"name": f.name, "type": getattr(f.type, "__name__", str(f.type)),
                    "default": f.default if f.default is not dataclasses.MISSING else None}
                   for f in dataclasses.fields(cls.Options)]
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        out.append({"name": name, "contract": cls.contract, "summary": doc[0] if doc else "", "options": options})
    return out


def cmd_passes(args) -> int:
    catalogue = pass_catalogue()
    if args.json:
        print(json.dumps(catalogue, indent=2, default=str))
        return 0
    render_catalogue(terminal(), catalogue)
    return 0


# -- rewrite ---------------------------------------------------------------------------------------
def cmd_rewrite(args) -> int:
    import tokenfx
    from tokenfx.errors import ExportError
    from tokenfx.frontends.onnx import export_onnx, save_pt2
    from tokenfx.passes.base import PassManager

    out = Path(args.output)
    if out.suffix not in (".pt2", ".onnx"):
        raise ExportError(f"-o must name a .pt2 or .onnx file, got {out}")
    if not out.parent.exists():
        raise ExportError(f"output directory {out.parent} does not exist")
    manager = PassManager(args.passes, verify=args.verify)  # parse before the (slow) load
    kernel_dir = Path(args.emit_kernels) if args.emit_kernels else None
    if kernel_dir is not None and kernel_dir.exists() and not kernel_dir.is_dir():
        raise ExportError(f"--emit-kernels: {kernel_dir} exists and is not a directory")
    console = terminal(stderr=args.json)  # --json: stdout carries only the JSON
    with console.status("loading and capturing the model"):
        graph = tokenfx.load(args.model)
    with console.status(f"running {args.passes}"):
        report = manager.run(graph)
    sources = {}
    if kernel_dir is not None:  # build every kernel source before writing anything
        from tokenfx.codegen.emit import kernel_sources

        sources = kernel_sources(report.graph.gm)
    onnx_check = None
    with console.status(f"writing {out}"):
        if args.verify and out.suffix == ".onnx" and str(args.model).endswith(".onnx"):
            onnx_check = _verify_against_input_onnx(args.model, report, out)  # writes out only if it verifies
        else:
            (export_onnx if out.suffix == ".onnx" else save_pt2)(report.graph, out)
    kernels = []
    if kernel_dir is not None:
        from tokenfx.codegen.emit import write_kernels

        kernels = [str(p) for p in write_kernels(sources, kernel_dir)]
    summary = {
        "model": str(args.model), "output": str(out), "passes": [pass_json(p) for p in report.passes],
        "kernels": kernels,
    }
    if onnx_check is not None:
        summary["onnx_verify"] = dataclasses.asdict(onnx_check)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        render_passes(console, report.passes)
        if onnx_check is not None:
            console.print(f"onnxruntime, {out} vs {args.model}: max |error| {onnx_check.max_abs_error:.2e}"
                          f" (tol {onnx_check.tolerance:.1e}), cosine {onnx_check.cosine:.6f}")
        console.print(f"wrote [bold]{out}[/bold]" + (f" and {len(kernels)} kernel file(s) in {args.emit_kernels}" if kernels else ""))
    return 0


def _verify_against_input_onnx(model: str, report, out: Path):
    """Export to a file beside ``out``, run it and the *input* ONNX file in onnxruntime on the
    same inputs, and move it onto ``out`` only if it agrees (exact pipelines: within fp32
    tolerance; approximate ones: finite). A failure is one VerificationError, no output."""
    from tokenfx.errors import VerificationError
    from tokenfx.frontends.onnx import export_onnx
    from tokenfx.frontends.onnx_verify import compare, sample_inputs

    tmp = out.with_name(f".{out.stem}.verify.onnx")
    try:
        export_onnx(report.graph, tmp)
        exact = all(p.contract == "exact" for p in report.passes)
        check = compare(Path(model), tmp, sample_inputs(report.graph), exact)
        if not check.verified:
            bound = f"more than the tolerance {check.tolerance:.3g}" if exact else "not finite"
            raise VerificationError(f"--verify: in onnxruntime {out.name} differs from {model} by "
                                    f"{check.max_abs_error:.3g} ({bound}; cosine {check.cosine:.6f})")
        os.replace(tmp, out)
        return check
    finally:
        if tmp.exists():
            tmp.unlink()


# -- generate --------------------------------------------------------------------------------------
def _early_exit_policy(args):
    """``--early-exit`` / ``--exit-measure`` / ``--skip-decode`` → an early-exit policy or None."""
    from tokenfx.errors import GenerationError

    if args.early_exit is None and args.skip_decode is None:
        if args.exit_measure is not None:
            raise GenerationError("--exit-measure needs --early-exit THRESHOLD")
        return None
    if args.early_exit is not None and args.skip_decode is not None:
        raise GenerationError("give one of --early-exit and --skip-decode")
    if args.speculate is not None:
        raise GenerationError("--speculate and --early-exit / --skip-decode do not combine: self-speculation "
                              "(--speculate self[:LAYER|auto]) is the lossless early exit")
    from tokenfx.runtime.early_exit import ConfidenceExit, SkipDecode

    if args.skip_decode is not None:
        return SkipDecode(min_layers=args.skip_decode)
    return ConfidenceExit(args.early_exit, measure=args.exit_measure or "softmax")


def cmd_generate(args) -> int:
    from tokenfx.errors import GenerationError

    if (args.prompt is None) == (args.prompt_file is None):
        raise GenerationError("give exactly one of --prompt TEXT or --prompt-file F")
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise GenerationError(f"--prompt-file {args.prompt_file}: {exc}") from exc
    else:
        prompt = args.prompt
    if args.diffusion is not None:
        return cmd_diffuse(args, prompt)
    _check_not_diffusion(args)
    tp = _tensor_parallel(args)
    if tp is None:  # the ranks ran it
        return 0
    if tp.rank != 0:  # one rank speaks for all (they make the same tokens); errors still reach the launcher
        import contextlib
        import os

        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            return _generate(args, prompt, tp)
    return _generate(args, prompt, tp)


def _tensor_parallel(args):
    """``--tp N`` outside a launched rank: start N local ranks running this command and return
    None; inside one (``--tp N`` started it, or torchrun: ``RANK`` / ``WORLD_SIZE`` set): join
    the group and return its :class:`~tokenfx.runtime.tensor_parallel.Rank`."""
    from tokenfx.errors import TensorParallelError
    from tokenfx.runtime import tensor_parallel

    if args.tp < 1:
        raise TensorParallelError(f"--tp must be a positive number of ranks, got {args.tp}")
    if tensor_parallel.launched():
        rank = tensor_parallel.init_process_group()
        if args.tp not in (1, rank.world_size):
            raise TensorParallelError(f"--tp {args.tp} but the launcher started {rank.world_size} ranks "
                                      f"(WORLD_SIZE={rank.world_size})")
        return rank
    if args.tp == 1:
        return tensor_parallel.Rank()
    tensor_parallel.launch(_generate_rank, args.tp, getattr(args, "_argv", sys.argv[1:]))
    return None


def _generate_rank(argv) -> None:
    """One rank of ``tokenfx generate --tp N`` (started by :func:`tensor_parallel.launch`): the same
    command, its errors raised so the launcher names the rank that failed."""
    args = build_parser().parse_args(argv)
    args._argv = argv
    code = args.func(args)
    if code:
        raise SystemExit(code)


def _generate(args, prompt: str, tp) -> int:
    import time

    from tokenfx.errors import GenerationError
    from tokenfx.frontends.load import load_tokenizer
    from tokenfx.runtime.generate import generator_for

    early_exit = _early_exit_policy(args)  # bad options fail before anything is loaded or printed
    tokenizer = load_tokenizer(args.model)  # before the (slow) graph build: a missing tokenizer fails fast
    ids = _prompt_ids(args, prompt, tokenizer)
    err = terminal(stderr=True)
    with err.status("loading the model and building its prefill / decode graphs"):
        gen = generator_for(args.model, compile=False if args.no_compile else True if args.compile else "auto",
                            tp=tp.world_size)
    generated: list[int] = []
    printed = ""

    def stream(token):
        nonlocal printed
        if int(token[0]) < 0:  # speculative steps: no token for this row in this column
            return
        generated.append(int(token[0]))
        text = tokenizer.decode(generated, skip_special_tokens=True)
        if not args.json and text.startswith(printed):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    speculative = {}
    if args.speculate is not None:
        from tokenfx.errors import TreeError
        from tokenfx.ir.tree import Tree

        try:
            tree = Tree.parse(args.tree) if args.tree else None
        except TreeError as exc:
            raise GenerationError(f"--tree: {exc}") from exc
        budget = args.tree_budget
        if budget != "auto":
            try:
                budget = int(budget)
            except ValueError:
                raise GenerationError(f"--tree-budget must be a number of nodes or auto, got {budget!r}") from None
        speculative = {"speculate": args.speculate, "tree": tree, "tree_budget": budget}
        with err.status(f"preparing the {args.speculate} drafter and the tree-verify graph"):
            gen.drafter(args.speculate, tree=tree).prepare(gen)
    elif args.tree is not None or args.tree_budget != "auto":
        raise GenerationError("--tree and --tree-budget need --speculate")
    if early_exit is not None:
        speculative["early_exit"] = early_exit
    if not args.json:  # echoed once every option was checked: bad input prints nothing but its error
        sys.stdout.write(prompt + ("\n" if args.chat else ""))
        sys.stdout.flush()
    start = time.perf_counter()
    out = gen.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, stream=stream, **speculative)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    stats = gen.last_stats
    if args.json:
        result = {"text": text, "token_ids": new, "new_tokens": len(new), "seconds": round(seconds, 4),
                  "tokens_per_s": round(len(new) / seconds, 2) if seconds > 0 else None}
        if args.speculate is not None:
            result.update(speculate=args.speculate, steps=stats["steps"],
                          accepted_per_step=round(stats["accepted_per_step"], 3), tree_nodes=stats["tree_nodes"])
        if early_exit is not None:  # the output may differ from the full model's
            result.update(approximate=True, early_exit=stats["early_exit"], mean_layers=round(stats["mean_layers"], 3))
        print(json.dumps(result))
    else:
        sys.stdout.write(text[len(printed):] + "\n")
        extra = (f", {stats['accepted_per_step']:.2f} tokens per verify step over {stats['steps']} steps"
                 if args.speculate is not None else "")
        if early_exit is not None:
            extra += (f", APPROXIMATE early exit: {stats['mean_layers']:.2f} of {gen.layout.layers} blocks per token "
                      "(output may differ from the full model's)")
        err.print(f"[dim]{len(new)} tokens in {seconds:.2f} s ({len(new) / seconds:.1f} tokens/s{extra})[/dim]")
    return 0


def _prompt_ids(args, prompt: str, tokenizer):
    """The prompt's token ids ``[1, P]`` (through the chat template with ``--chat``)."""
    from tokenfx.errors import GenerationError

    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationError(f"--chat: the tokenizer of {args.model} has no chat template; drop --chat to "
                                  "continue the prompt as plain text")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise GenerationError("the prompt is empty after tokenization")
    return ids


def _check_not_diffusion(args) -> None:
    """Left-to-right decoding: the diffusion-only flags, and a masked-diffusion model, are refused."""
    from tokenfx.errors import DiffusionError
    from tokenfx.frontends.load import diffusion_config

    if args.no_cache or args.block_length is not None:
        raise DiffusionError("--no-cache and --block-length need --diffusion POLICY (masked-diffusion LMs)")
    mask_id = diffusion_config(args.model)
    if mask_id is not None:
        raise DiffusionError(f"{args.model} is a masked-diffusion LM (config is_causal: false, mask_token_id {mask_id}): "
                             "it is not decoded left to right; add --diffusion vanilla|threshold|ete|guided|learned")


def cmd_diffuse(args, prompt: str) -> int:
    """``tokenfx generate MODEL --diffusion POLICY``: a masked-diffusion LM denoises ``--max-new-tokens``
    mask tokens in blocks of ``--block-length``; with the cache (the default; ``--no-cache`` is
    the exact baseline) the output is APPROXIMATE and says so."""
    from tokenfx.errors import DiffusionError
    from tokenfx.frontends.load import load_tokenizer
    from tokenfx.runtime.diffusion import block_schedule, diffuser_for

    others = {"--speculate": args.speculate, "--early-exit": args.early_exit, "--skip-decode": args.skip_decode,
              "--exit-measure": args.exit_measure, "--tree": args.tree, "--top-k": args.top_k, "--top-p": args.top_p}
    given = [flag for flag, value in others.items() if value is not None]
    given += ["--tp"] if getattr(args, "tp", 1) != 1 else []  # tensor parallel is a left-to-right decoding option
    if given:
        raise DiffusionError(f"{', '.join(given)} do(es) not combine with --diffusion (left-to-right decoding options)")
    block_schedule(args.max_new_tokens, args.block_length)  # a bad block length fails before the (slow) load
    err = terminal(stderr=True)
    with err.status("loading the masked-diffusion model"):
        diffuser = diffuser_for(args.model, compile=False if args.no_compile else True if args.compile else "auto")
        tokenizer = load_tokenizer(args.model)
        ids = _prompt_ids(args, prompt, tokenizer)
        cache = "none" if args.no_cache else "dual"
        diffuser.prepare(cache)  # graphs built (or loaded compiled) before the timed run
    prompt_len = ids.shape[1]
    printed = ""

    def stream(report):  # print the finished left part of the buffer as it grows
        nonlocal printed
        row = report.tokens[0, prompt_len:]
        open_ = (row == diffuser.mask_id).nonzero()
        done = row[: int(open_[0]) if open_.numel() else row.numel()].tolist()
        text = tokenizer.decode(done, skip_special_tokens=True)
        if text.startswith(printed) and len(text) > len(printed):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    if not args.json:
        sys.stdout.write(prompt + ("\n" if args.chat else ""))
        sys.stdout.flush()
    result = diffuser.diffuse(ids, gen_length=args.max_new_tokens, block_length=args.block_length,
                              policy=args.diffusion, cache=cache, temperature=args.temperature, seed=args.seed,
                              on_round=None if args.json else stream)
    new = result.sequences[0, prompt_len:].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    tokens_per_s = len(new) / result.seconds if result.seconds > 0 else None
    if args.json:
        print(json.dumps({"text": text, "token_ids": new, "new_tokens": len(new), "rounds": result.rounds,
                          "seconds": round(result.seconds, 4),
                          "tokens_per_s": round(tokens_per_s, 2) if tokens_per_s is not None else None,
                          "diffusion": args.diffusion, "cache": cache, "approximate": result.approximate}))
        return 0
    sys.stdout.write(text[len(printed):] + "\n" if text.startswith(printed) else "\n" + text + "\n")
    label = "exact, no cache" if cache == "none" else f"APPROXIMATE: {cache} K/V cache reused across rounds"
    err.print(f"[dim]{len(new)} tokens in {result.seconds:.2f} s ({tokens_per_s or 0:.1f} tokens/s, {result.rounds} "
              f"rounds, {args.diffusion} unmasking, {label})[/dim]")
    return 0


# -- demo ------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from tokenfx.demo import run_demo

    return run_demo(args.model, Path(args.out), console=terminal(), decoder=not args.no_decoder, compile=not args.no_compile)


# -- entry point -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfx", description="Compile transformers for fewer FLOPs per token.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show the recovered transformer structure (ModelMap)")
    p.add_argument("model", help="HF directory, .pt2, .onnx, tokenfx:<name> or package.module:factory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list the passes, their options and contracts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("rewrite", help="run a pass pipeline and write .pt2 or .onnx")
    p.add_argument("model")
    p.add_argument("--passes", required=True, help='pipeline, e.g. "fuse_norm"')
    p.add_argument("-o", "--output", required=True, help="OUT.pt2 or OUT.onnx")
    p.add_argument("--verify", action="store_true", help="compare outputs with the original after each pass")
    p.add_argument("--emit-kernels", metavar="DIR", help="write the specialised Triton source of each new op")
    p.add_argument("--json", action="store_true", help="print the pass report as JSON")
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("generate", help="generate text with KV-cached decoding, streaming to the terminal")
    p.add_argument("model", help="HF directory with a tokenizer, a .gguf file, or tokenfx:<name> (e.g. tokenfx:smollm2)")
    p.add_argument("--prompt", help="the prompt text")
    p.add_argument("--prompt-file", help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true",
                   help="the prompt is a user message: apply the tokenizer's chat template (instruction models)")
    p.add_argument("--compile", action="store_true",
                   help="compile the graphs with AOTInductor and fail if that fails (the default compiles too, "
                        "falling back to the fx graphs; packages cached on disk)")
    p.add_argument("--no-compile", action="store_true", help="run the fx graphs without compiling them")
    p.add_argument("--speculate", metavar="DRAFTER",
                   help="lossless speculative decoding: recycling, lookup, draft[:MODEL], draft-tree[:MODEL], "
                        "dynamic[:MODEL], self[:LAYER|auto|adapter], adapter:FILE (output identical to plain decoding)")
    p.add_argument("--early-exit", type=float, metavar="THRESHOLD",
                   help="APPROXIMATE: confidence-gated early exit (CALM), exit a token at the first layer whose "
                        "confidence reaches THRESHOLD in [0, 1]; skipped layers' K/V filled from the exit state")
    p.add_argument("--exit-measure", choices=["softmax", "margin", "entropy", "state"],
                   help="confidence for --early-exit (default softmax)")
    p.add_argument("--skip-decode", type=int, metavar="MIN_LAYERS",
                   help="APPROXIMATE: SkipDecode, layers per token falling linearly from all to MIN_LAYERS")
    p.add_argument("--tree", metavar="TEMPLATE",
                   help="draft tree for recycling: recycling (80 nodes), chain:K, levels:A,B,..., or a JSON file "
                        "of rank paths")
    p.add_argument("--tree-budget", default="auto", metavar="N|auto",
                   help="most nodes per draft tree; auto (default) sizes it from this machine's measured verify cost")
    p.add_argument("--diffusion", choices=DIFFUSION_POLICIES, metavar="POLICY",
                   help="masked-diffusion LMs: denoise the new tokens in rounds, unmasking by POLICY: "
                        + ", ".join(DIFFUSION_POLICIES) + " (the cache makes it APPROXIMATE; see --no-cache)")
    p.add_argument("--no-cache", action="store_true",
                   help="--diffusion: a full forward every round (exact; with vanilla, the LLaDA baseline) instead "
                        "of reusing K/V across rounds (Fast-dLLM's dual cache)")
    p.add_argument("--block-length", type=int, metavar="K",
                   help="--diffusion: semi-autoregressive block length, dividing --max-new-tokens (default 32, or "
                        "--max-new-tokens when smaller)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel over N local ranks (gloo on CPU, NCCL on CUDA; at most one rank per core / "
                        "GPU); under torchrun the launcher's ranks are used")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job end to end on the bundled default model")
    p.add_argument("--model", default="tokenfx:minilm", help="the encoder to rewrite")
    p.add_argument("--out", default="out/demo", help="where the rewritten model and report go")
    p.add_argument("--no-decoder", action="store_true", help="skip the tokenfx:smollm2 generation part")
    p.add_argument("--no-compile", action="store_true", help="run the decoder graphs without AOTInductor")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # what --tp N re-runs in each rank
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.debug:
            raise
        from tokenfx.errors import TokenfxError

        message = str(exc).strip() or type(exc).__name__
        if isinstance(exc, TokenfxError):
            terminal(stderr=True).print(f"[red]error:[/red] {message}", markup=True, soft_wrap=True)
            return 2
        first = message.splitlines()[0]
        terminal(stderr=True).print(f"[red]internal error:[/red] {type(exc).__name__}: {first} (run with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
