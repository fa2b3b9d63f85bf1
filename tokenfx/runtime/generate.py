"""``Generator``: decoding over the prefill / decode-step graphs of the ``kv_cache`` pass.

::

    gen = Generator("tokenfx:tiny-code")                   # or an HF causal LM, or a ModelGraph
    out = gen.generate(input_ids, max_new_tokens=64)       # [B, prompt + new], greedy
    out = gen.generate(ids, attention_mask=m, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)
    tokenfx.generate(model, ids, max_new_tokens=64)        # the same, with the Generator cached per model

One step of the hot loop is: sample from ``[B, V]`` logits, write the token, run the decode
graph on ``[B, 1]`` with the preallocated cache ``[L, 2, B, Hkv, max_len, D]`` (slots not
yet written are masked), copy the step's K/V into the cache. Nothing is allocated per step except what the graph
returns; layers are inside the graph, never a Python loop.

Semantics follow Hugging Face ``generate``: left-padded batches, positions counted over real
tokens, finished rows continue with the pad token, generation ends when every row has hit
a stop token or ``max_new_tokens`` is reached; sampling applies temperature, then top-k,
then top-p. Greedy output is token-identical to HF (tests).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from tokenfx.errors import GenerationError, MappingError, ModelLoadError
from tokenfx.ir.graph import ModelGraph
from tokenfx.ir.kv_layout import KVLayout
from tokenfx.runtime.kv import PrefixCache
from tokenfx.runtime.timing import RoundClock


_BUCKET = 64  # cache length granularity: attention reads the whole buffer, so keep it tight


class Generator:
    """Prefill + decode graphs of one decoder, a preallocated cache and an optional prefix cache.

    ``model``: a Hugging Face causal LM, a :class:`ModelGraph` of one, or any spec
    :func:`tokenfx.load` accepts (``tokenfx:tiny-code``, an HF directory …).
    ``compile``: ``"auto"`` (default) and ``True`` compile the graphs with AOTInductor, block by
    block, once per architecture (packages cached on disk, a progress bar while it runs, see
    :mod:`tokenfx.runtime.executor`); a later process loads them in about a second. ``"auto"``
    falls back to the fx graphs when compiling fails or ``TOKENFX_COMPILE=0`` is set;
    ``False`` runs the fx graphs as they are.
    ``prefix_cache_bytes``: > 0 keeps prompts' K/V in a radix tree for reuse (LRU under the cap).
    """

    def __init__(self, model, *, compile: bool | str = "auto", prefix_cache_bytes: int = 0, max_positions: int = 0):
        self.compile, self._compile_strict = _compile_mode(compile)
        self._max_positions = max_positions
        self.spec = str(model) if isinstance(model, str) or hasattr(model, "__fspath__") else None
        self._source = _resolve(model)  # an nn.Module or a ModelGraph
        self._graphs: dict = {}
        self.config = getattr(self._source, "config", None)
        # the graphs a Generator runs: prompt with padding, prompt without (SDPA is_causal), one step
        specs = {"prefill": ("prefill", "output", True), "prefill_dense": ("prefill", "output", False),
                 "decode": ("decode", "inplace", True)}
        warm = None
        module = self._source if isinstance(self._source, torch.nn.Module) else None
        if self.compile and module is not None:
            from tokenfx.runtime import executor

            # a model compiled before (same weights, config, tokenfx and torch): skip capture and passes
            self._warm_key = executor.module_key(module, f"generator:{max_positions}")
            warm = executor.load_compiled_set(self._warm_key, tuple(specs), module=module)
        if warm is not None:
            (self._prefill, self._prefill_dense, self._decode), meta = warm
            self.layout = KVLayout.from_json(meta["layout"])
        else:
            graphs = {label: self.graph(*spec) for label, spec in specs.items()}
            self.layout = graphs["decode"].kv
            run = {label: self.compiled(g, label) for label, g in graphs.items()}
            if self.compile and module is not None:
                from tokenfx.runtime import executor

                executor.remember_compiled_set(self._warm_key, run, {"layout": self.layout.to_json()}, module=module)
            self._prefill, self._prefill_dense, self._decode = run["prefill"], run["prefill_dense"], run["decode"]
        self.vocab_size = int(getattr(self.config, "vocab_size", 0) or 0)
        self.eos_ids, self.pad_id = _special_tokens(self.config)
        self._runners = {"prefill": self._prefill, "prefill_dense": self._prefill_dense, "decode": self._decode}
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self._buffers: dict = {}
        self.last_stats: dict = {}

    def compiled(self, graph: ModelGraph, label: str):
        """``graph`` as this Generator runs it: AOTInductor-compiled when it compiles, else the fx
        graph (with its linears lowered for the CPU, :func:`tokenfx.runtime.executor.lower`). Under
        ``compile="auto"`` a compile that fails (no C++ compiler …) warns once and the Generator
        goes on with the fx graphs."""
        from tokenfx.runtime import executor

        if not self.compile:
            return executor.lower(graph).gm
        try:
            return executor.compiled(graph, label)
        except Exception as exc:
            if self._compile_strict:
                raise
            import warnings

            warnings.warn(f"tokenfx: compiling the {label} graph failed ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); running the fx graphs "
                          "instead (compile=False skips the attempt)", RuntimeWarning, stacklevel=2)
            self.compile = False
            return executor.lower(graph).gm

    @property
    def model(self) -> torch.nn.Module | None:
        """The model object it decodes (None when it was given a captured graph)."""
        return self._source if isinstance(self._source, torch.nn.Module) else None

    # -- graphs (built on first use; a warm compiled Generator never needs them to decode) ---------
    @property
    def prefill_graph(self) -> ModelGraph:
        return self.graph("prefill")

    @property
    def decode_graph(self) -> ModelGraph:
        """The decode graph the Generator runs: it writes new K/V into the cache itself."""
        return self.graph("decode", cache_update="inplace")

    def graph(self, mode: str, cache_update: str = "output", padded: bool = True, logits: str = "last") -> ModelGraph:
        """A ``kv_cache`` graph of this model (``cache_update="output"`` is the portable one, for ONNX)."""
        key = (mode, cache_update if mode == "decode" else "output", padded or mode == "decode", logits)
        if key not in self._graphs:
            from tokenfx.passes.base import optimize
            from tokenfx.passes.kv_cache import KVCache

            if "full" not in self._graphs:
                self._graphs["full"] = decoder_graph(self._source)
            graph = self._graphs["full"]
            try:
                self._graphs[key] = optimize(graph, [KVCache(mode=mode, logits=logits, max_positions=self._max_positions,
                                                             cache_update=key[1], padded=key[2])])
            except MappingError as exc:
                raise GenerationError(f"cannot generate with {graph.family}: {exc}") from exc
        return self._graphs[key]

    @property
    def tree_graph(self) -> ModelGraph:
        """The decode graph rewritten by ``tree_verify``: verifies a draft tree per row in one call."""
        if "tree" not in self._graphs:
            from tokenfx.passes.base import optimize
            from tokenfx.passes.tree_verify import TreeVerify

            decode = self.graph("decode", cache_update="inplace", logits="all")
            self._graphs["tree"] = optimize(decode, [TreeVerify()])
        return self._graphs["tree"]

    @property
    def stages(self):
        """The early-exit pieces of the tree graph (:class:`tokenfx.runtime.early_exit.Stages`)."""
        if "_stages" not in self.__dict__:
            from tokenfx.runtime.early_exit import Stages

            self._stages = Stages(self)
        return self._stages

    def runner(self, label: str):
        """The callable for one of this Generator's graphs: ``prefill``, ``prefill_dense``, ``decode``
        or ``tree`` (built, and compiled when ``compile=True``, on first use)."""
        if label not in self._runners:
            if label != "tree":
                raise GenerationError(f"no graph {label!r}; choose prefill, prefill_dense, decode or tree")
            warm_key = None
            module = self._source if isinstance(self._source, torch.nn.Module) else None
            if self.compile and module is not None:
                from tokenfx.runtime import executor

                warm_key = executor.module_key(module, f"generator-tree:{self._max_positions}")
                warm = executor.load_compiled_set(warm_key, ("tree",), module=module)
                if warm is not None:
                    self._runners["tree"] = warm[0][0]
                    return self._runners["tree"]
            graph = self.tree_graph
            run = self.compiled(graph, "tree")
            if warm_key is not None and self.compile:
                from tokenfx.runtime import executor

                executor.remember_compiled_set(warm_key, {"tree": run}, {}, module=module)
            self._runners["tree"] = run
        return self._runners[label]

    # -- public -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids, *, max_new_tokens: int, attention_mask=None, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None, stop=None,
                 stream: Callable[[torch.Tensor], None] | None = None, speculate=None, tree=None,
                 tree_budget=None, early_exit=None) -> torch.Tensor:
        """``input_ids [B, P]`` (left-padded with ``attention_mask``) → ``[B, P + new]``.

        ``stop``: token id(s) that end a row (default: the model's EOS); ``stream(tokens[B])`` is
        called with each step's tokens. Greedy when ``temperature == 0``.

        ``speculate``: a drafter (``"recycling"``, ``"lookup"``, ``"draft[:MODEL]"``,
        ``"draft-tree[:MODEL]"``, ``"dynamic[:MODEL]"``, ``"self[:LAYER|auto|adapter]"``,
        ``"adapter:FILE"`` or a :class:`Drafter`); each step then
        verifies a draft tree in one call of the ``tree_verify`` graph, and the output is the
        same as without it (token-identical when greedy, the same distribution when sampling).
        ``stream`` then gets one call per emitted column, ``-1`` for rows without a token there.
        ``tree``: a :class:`Tree` template (recycling); ``tree_budget``: the most nodes per tree,
        ``"auto"`` (default) sized from this machine's measured verify cost.

        ``early_exit`` (approximate: the output may differ from the full model's): a confidence
        threshold in [0, 1], a :class:`~tokenfx.runtime.early_exit.ConfidenceExit` or a
        :class:`~tokenfx.runtime.early_exit.SkipDecode` (see :mod:`tokenfx.runtime.early_exit`).
        """
        ids, mask = self._check_inputs(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
        batch, prompt = ids.shape
        stop_ids = self.eos_ids if stop is None else _as_ids(stop)
        pad = self.pad_id if self.pad_id is not None else (stop_ids[0] if stop_ids else 0)
        if speculate is not None and early_exit is not None:
            raise GenerationError("speculate and early_exit do not combine: self-speculation (speculate='self:E') is "
                                  "the lossless early exit")
        if speculate is not None:
            from tokenfx.runtime.speculative.decode import speculative_generate

            drafter = self.drafter(speculate, tree=tree)
            return speculative_generate(self, drafter, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids, pad=pad, stream=stream,
                                        tree_budget=tree_budget)
        generator = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
        sample = temperature > 0
        step = None
        if early_exit is not None:
            from tokenfx.runtime.early_exit import make_step

            step = make_step(self, early_exit, max_new_tokens)

        start = time.perf_counter()
        clock = RoundClock()
        cache, cache_mask, out, slots, positions, logits, reused = self._start(ids, mask, prompt + max_new_tokens)
        clock.lap("prefill")
        first_token_s = time.perf_counter() - start

        position = positions[:, -1:] + 1
        unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
        stop_tensor = torch.tensor(stop_ids, device=ids.device) if stop_ids else None
        ones = torch.ones(batch, 1, dtype=torch.long, device=ids.device)
        steps = 0
        for steps in range(1, max_new_tokens + 1):
            scores = logits[:, -1, :]
            token = _sample(scores, temperature, top_k, top_p, generator) if sample else scores.argmax(-1)
            clock.lap("verdict")
            token = torch.where(unfinished, token, pad)
            slot = prompt + steps - 1  # the token's column in ``out`` and its slot in the cache
            out[:, slot] = token
            if stream is not None:
                stream(token)
            if stop_tensor is not None:
                unfinished &= ~torch.isin(token, stop_tensor)
                if not bool(unfinished.any()):
                    break
            if steps == max_new_tokens:
                break
            clock.lap("bookkeeping")
            if step is None:
                logits, _ = self._decode(token[:, None], position, cache, cache_mask, ones, slots[slot:slot + 1])  # writes K/V
            else:
                logits = step(token, position, cache, cache_mask, slots[slot:slot + 1], steps - 1)
            clock.lap("forward")
            cache_mask[:, slot] = 1
            position += 1
        total = prompt + steps
        self._remember(out[:, :total], mask, cache, prompt)
        clock.lap("bookkeeping")
        seconds = time.perf_counter() - start
        self.last_stats = {"prompt_tokens": prompt, "new_tokens": steps, "batch": batch, "reused_tokens": reused,
                           "seconds": seconds, "first_token_seconds": first_token_s, "steps": max(steps - 1, 0),
                           "accepted_per_step": 1.0, "stages": clock.stats(),
                           "decode_tokens_per_s": (steps - 1) * batch / max(seconds - first_token_s, 1e-9) if steps > 1 else 0.0}
        if step is not None:
            self.last_stats.update(step.stats())
        return out[:, :total].clone()

    def verify_cost(self, batch: int, sizes=(1, 4, 8, 16, 32, 48, 64, 81), context: int = 256) -> dict[int, float]:
        """Seconds per call of the tree graph for ``T`` tree nodes (fastest of 5) after ``context``
        cached tokens, for each ``T`` in ``sizes``: the curve that sizes draft trees to this machine.
        Measured once per batch size and process (about a second compiled: a curve kept from
        another time would carry that time's load)."""
        costs = self.__dict__.setdefault("_verify_costs", {})
        key = (batch, tuple(sizes), context)
        if key in costs:
            return costs[key]
        run = self.runner("tree")
        limit = self.layout.max_positions
        sizes = [t for t in sizes if t < limit] or [1]
        context = max(0, min(context, limit - max(sizes)))  # positions stay inside the model's tables
        size = context + max(sizes)
        cache = torch.zeros(self.layout.cache_shape(batch, size), dtype=self.layout.dtype)
        cache_mask = torch.zeros(batch, size, dtype=torch.long)
        cache_mask[:, :context] = 1
        slots = torch.arange(size)
        result = {}
        with torch.inference_mode():
            for t in sizes:
                tokens = torch.zeros(batch, t, dtype=torch.long)
                positions = (torch.arange(t) + context).expand(batch, t).contiguous()
                mask = torch.ones(t, t, dtype=torch.bool).tril().expand(batch, t, t).contiguous()
                times = []
                for rep in range(6):  # the first call warms up; the fastest is the least disturbed by other load
                    start = time.perf_counter()
                    run(tokens, positions, cache, cache_mask, mask, slots[context:context + t])
                    times.append(time.perf_counter() - start)
                result[t] = min(times[1:])
        costs[key] = result
        return result

    def drafter(self, speculate, tree=None):
        """The Drafter for ``speculate`` (kept per spec, so Token Recycling's matrix stays hot)."""
        from tokenfx.runtime.speculative.drafters import make_drafter

        if not isinstance(speculate, str):
            return make_drafter(speculate)
        key = (speculate, id(tree))
        drafters = self.__dict__.setdefault("_drafters", {})
        if key not in drafters:
            compile = self.compile if self._compile_strict or not self.compile else "auto"  # a draft model as this one
            drafters[key] = make_drafter(speculate, tree=tree, compile=compile)
        return drafters[key]

    # -- pieces -------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p):
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
            raise GenerationError(f"input_ids must be a non-empty [batch, tokens] integer tensor, got shape {tuple(ids.shape)}")
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to(ids.device).long()
        if mask.dim() == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise GenerationError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
        if not bool((mask.sum(-1) > 0).all()):
            raise GenerationError("attention_mask: every row needs at least one real token")
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            raise GenerationError("attention_mask has padding on the right; tokenfx.generate expects left padding "
                                  "(tokenizer.padding_side = 'left')")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        limit = self.layout.max_positions
        if ids.shape[1] + max_new_tokens > limit:
            raise GenerationError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                                  f"model's {limit} positions")
        if self.vocab_size and (bool((ids < 0).any()) or bool((ids >= self.vocab_size).any())):
            raise GenerationError(f"input_ids has ids outside the vocabulary [0, {self.vocab_size})")
        if temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
        return ids.long().contiguous(), mask.contiguous()

    def _allocate(self, batch: int, length: int, device):
        size = min(math.ceil(length / _BUCKET) * _BUCKET, self.layout.max_positions)
        key = (batch, device)
        buf = self._buffers.get(key)
        if buf is None or buf[0].shape[4] != size:  # the graph attends over the whole buffer: keep it tight
            cache = torch.zeros(self.layout.cache_shape(batch, size), dtype=self.layout.dtype, device=device)
            buf = (cache, torch.zeros(batch, size, dtype=torch.long, device=device),
                   torch.empty(batch, size, dtype=torch.long, device=device), torch.arange(size, device=device))
            self._buffers = {key: buf}  # one live allocation
        return buf

    def _start(self, ids, mask, length: int):
        """Buffers for a request of ``length`` slots, the prompt copied into ``out`` and prefilled
        into the cache: ``(cache, cache_mask, out, slots, positions, last logits, reused tokens)``."""
        prompt = ids.shape[1]
        cache, cache_mask, out, slots = self._allocate(ids.shape[0], length, ids.device)
        out[:, :prompt] = ids
        cache_mask.zero_()
        cache_mask[:, :prompt] = mask
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        logits, reused = self._prefill_prompt(ids, mask, positions, cache, cache_mask, slots)
        return cache, cache_mask, out, slots, positions, logits, reused

    def _prefill_prompt(self, ids, mask, positions, cache, cache_mask, slots):
        """Fill the cache for the prompt; return the last position's logits and the reused count."""
        batch, prompt = ids.shape
        start = 0
        if self.prefix_cache is not None:
            pads = (prompt - mask.sum(-1)).tolist()
            found = []
            for row in range(batch):
                real = ids[row, pads[row]:]
                n, kv = self.prefix_cache.match(real[:-1])  # keep >= 1 token to compute: its logits start decoding
                found.append((n, kv))
            start = min(pads[r] + found[r][0] for r in range(batch))
            if start > 0:
                for row, (n, kv) in enumerate(found):
                    use = start - pads[row]
                    if use > 0:
                        cache[:, :, row, :, pads[row]:start].copy_(kv[:, :, :, :use])
        if start == 0:
            unpadded = bool(mask.all())
            logits, new_kv = self._prefill_dense(ids, positions) if unpadded else self._prefill(ids, positions, mask)
            cache[:, :, :, :, :prompt].copy_(new_kv)
            return logits, 0
        cache_mask[:, start:].zero_()  # the suffix is the graph's "new" part until it is written
        logits, _ = self._decode(ids[:, start:].contiguous(), positions[:, start:].contiguous(), cache, cache_mask,
                                 mask[:, start:].contiguous(), slots[start:prompt])  # writes the suffix's K/V
        cache_mask[:, start:prompt] = mask[:, start:]
        return logits, start

    def _remember(self, tokens, mask, cache, prompt) -> None:
        """Put each row's prompt + generated K/V into the prefix cache (the last token has none yet)."""
        if self.prefix_cache is None:
            return
        pads = (prompt - mask.sum(-1)).tolist()
        for row in range(tokens.shape[0]):
            seq = tokens[row, pads[row]:-1]
            if seq.numel():
                self.prefix_cache.insert(seq, cache[:, :, row, :, pads[row]:pads[row] + seq.numel()])


def _sample(scores: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """HF order: temperature → top-k → top-p (smallest set with mass >= top_p), then one draw."""
    from tokenfx.runtime.speculative.verify import warp

    return torch.multinomial(warp(scores, temperature, top_k, top_p), 1, generator=generator).squeeze(1)


def _compile_mode(compile) -> tuple[bool, bool]:
    """``(compile, strict)`` for ``compile=`` True / False / "auto" (strict: a failed compile raises)."""
    import os

    if compile == "auto":
        return os.environ.get("TOKENFX_COMPILE", "1").lower() not in ("0", "false", "off", "no"), False
    if isinstance(compile, bool):
        return compile, True
    raise GenerationError(f"compile must be True, False or 'auto', got {compile!r}")


def _as_ids(stop) -> list[int]:
    if isinstance(stop, int):
        return [stop]
    if isinstance(stop, torch.Tensor):
        return [int(x) for x in stop.flatten().tolist()]
    return [int(x) for x in stop]


def _special_tokens(config) -> tuple[list[int], int | None]:
    if config is None:
        return [], None
    eos = getattr(config, "eos_token_id", None)
    eos_ids = [] if eos is None else _as_ids(eos)
    pad = getattr(config, "pad_token_id", None)
    return eos_ids, (int(pad) if pad is not None else (eos_ids[0] if eos_ids else None))


# -- models -------------------------------------------------------------------------------------------
def _resolve(model):
    """``model`` as an nn.Module or a ModelGraph (specs are loaded)."""
    if isinstance(model, (str,)) or hasattr(model, "__fspath__"):
        model = _load_decoder(str(model))
    if isinstance(model, ModelGraph):
        return model
    if not isinstance(model, torch.nn.Module):
        raise GenerationError(f"cannot generate with a {type(model).__name__}: pass a causal LM, a ModelGraph or a model spec")
    return model  # whether it is a causal LM is the ModelMap's call (kv_cache refuses encoders / no LM head)


def decoder_graph(model) -> ModelGraph:
    """A full-sequence ModelGraph of a decoder, captured with token ids only."""
    from tokenfx.frontends.torch_export import capture

    model = _resolve(model)
    if isinstance(model, ModelGraph):
        return model
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    return capture(model, (ids.to(device),))


def _model_dir(spec: str):
    """The directory behind ``tokenfx:<name>`` or an HF directory spec, else None."""
    from pathlib import Path

    if spec.startswith("tokenfx:"):
        from tokenfx import assets

        return Path(assets.path(spec.split(":", 1)[1]))  # unknown names: ModelLoadError listing the bundled ones
    path = Path(spec)
    if path.suffix == ".gguf":
        from tokenfx.frontends.gguf import hf_directory

        return hf_directory(path)  # converted once into the tokenfx cache
    return path if path.is_dir() else None


def tokenizer_vocab(spec: str | None) -> dict | None:
    """The token → id map of the ``tokenizer.json`` stored with ``spec`` (None when there is none)."""
    import json

    directory = _model_dir(str(spec)) if spec is not None else None
    if directory is None or not (directory / "tokenizer.json").exists():
        return None
    vocab = json.loads((directory / "tokenizer.json").read_text()).get("model", {}).get("vocab")
    return vocab if isinstance(vocab, dict) else None


def load_tokenizer(spec: str):
    """The Hugging Face tokenizer stored with ``spec`` (left padding, for batched prompts)."""
    directory = _model_dir(str(spec))
    if directory is None or not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ModelLoadError(f"{spec} has no tokenizer; give an HF directory with tokenizer files or tokenfx:<name>")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.padding_side = "left"
    return tokenizer


def _load_decoder(spec: str):
    from tokenfx.frontends.load import load, load_hf_model

    directory = _model_dir(spec)
    if directory is not None:
        return load_hf_model(directory, dtype=torch.float32)
    return load(spec)


# -- the function ---------------------------------------------------------------------------------------
_GENERATORS: dict = {}


def generator_for(model, **options) -> Generator:
    """The cached Generator for ``model`` (keyed by object identity or spec string and options)."""
    options = {"compile": "auto", **options}
    key = (model if isinstance(model, str) else id(model), tuple(sorted(options.items())))
    gen = _GENERATORS.get(key)
    if gen is None or (not isinstance(model, str) and gen._owner is not model):
        gen = Generator(model, **options)
        gen._owner = model
        _GENERATORS[key] = gen
    return gen


def generate(model, input_ids, *, max_new_tokens: int, attention_mask=None, temperature: float = 0.0, top_k=None,
             top_p=None, seed=None, stop=None, speculate=None, tree=None, tree_budget=None, stream=None,
             compile: bool | str = "auto") -> torch.Tensor:
    """Generate with ``model`` (HF causal LM, ModelGraph or model spec); returns ``[B, prompt + new]``.

    The prefill / decode graphs are built on first use and cached for the model;
    ``speculate`` / ``tree`` / ``tree_budget`` as in :meth:`Generator.generate`.
    """
    gen = generator_for(model, compile=compile)
    return gen.generate(input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop=stop, stream=stream, speculate=speculate, tree=tree,
                        tree_budget=tree_budget)
