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

What other decoding loops (speculative decoding, self-speculation, early exit) use of a
Generator, and nothing else: :meth:`Generator.start` (a :class:`Request`: buffers with the
prompt prefilled), :meth:`Generator.runner` (the callable of one graph kind: ``prefill``,
``prefill_dense``, ``decode``, ``tree``), :attr:`Generator.layout` (the cache's shape and
its ``max_positions``), :attr:`Generator.model`, :attr:`Generator.stages`,
:meth:`Generator.cached_runners` (the compile cache), :meth:`Generator.sibling` (a draft
model's Generator), ``vocab_size`` / ``config`` / ``spec`` / ``prefix_cache`` / ``last_stats``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch

from tokenfx.errors import GenerationError, MappingError
from tokenfx.frontends.load import decoder_graph, load_decoder
from tokenfx.ir.graph import ModelGraph
from tokenfx.ir.kv_layout import KVLayout
from tokenfx.runtime.batch import left_padded
from tokenfx.runtime.executor import compile_mode
from tokenfx.runtime.kv import PrefixCache
from tokenfx.runtime.speculative.verify import sample_token
from tokenfx.runtime.timing import RoundClock


_BUCKET = 64  # cache length granularity: attention reads the whole buffer, so keep it tight


@dataclasses.dataclass
class Request:
    """One request's buffers after its prompt's prefill (:meth:`Generator.start`); ``S`` slots,
    committed column ``j`` of a row at slot ``j`` (left-padded prompt first)."""

    cache: torch.Tensor  # [L, 2, B, Hkv, S, D]: the prompt's K/V in slots [0, P)
    cache_mask: torch.Tensor  # [B, S] long: 1 where a slot holds a real token's K/V
    out: torch.Tensor  # [B, S] tokens by column: the prompt in [0, P), the rest unwritten
    slots: torch.Tensor  # [S] arange: slot indices to slice for a graph call
    positions: torch.Tensor  # [B, P] the prompt's positions (counted over real tokens)
    logits: torch.Tensor  # [B, N, V] logits of the prompt's last position(s): the first token's scores are [:, -1]
    reused: int  # prompt columns whose K/V came from the prefix cache


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
    ``tp``: > 1 runs tensor-parallel inside an initialised process group of ``tp`` ranks (the rank
    is the group's, :mod:`tokenfx.runtime.tensor_parallel`): every graph is this rank's shard
    (``tensor_parallel`` pass) and the cache holds its kv-heads; every rank returns the same tokens.
    """

    def __init__(self, model, *, compile: bool | str = "auto", prefix_cache_bytes: int = 0, max_positions: int = 0,
                 tp: int = 1):
        from tokenfx.runtime.tensor_parallel import rank_of

        self.tp = rank_of(tp)
        self.compile, self._compile_strict = compile_mode(compile)
        self._max_positions = max_positions
        self.spec = str(model) if isinstance(model, str) or hasattr(model, "__fspath__") else None
        if self.spec is not None:
            model = load_decoder(self.spec)  # resolved once: the graphs are built from this object
        if not isinstance(model, (torch.nn.Module, ModelGraph)):
            raise GenerationError(f"cannot generate with a {type(model).__name__}: pass a causal LM, a ModelGraph or "
                                  "a model spec")  # whether it is a causal LM is the ModelMap's call (kv_cache)
        self._source = model
        self._graphs: dict = {}
        self.config = getattr(self._source, "config", None)
        # the graphs a Generator runs: prompt with padding, prompt without (SDPA is_causal), one step
        specs = {"prefill": ("prefill", "output", True), "prefill_dense": ("prefill", "output", False),
                 "decode": ("decode", "inplace", True)}

        def build():
            graphs = {label: self.graph(*spec) for label, spec in specs.items()}
            return ({label: self.compiled(g, label) for label, g in graphs.items()},
                    {"layout": graphs["decode"].kv.to_json()})

        # a model compiled before (same weights, config, tokenfx and torch): no capture, no passes
        runners, meta = self.cached_runners(tuple(specs), build)
        self.layout = KVLayout.from_json(meta["layout"])
        self._runners = dict(runners)
        self.vocab_size = int(getattr(self.config, "vocab_size", 0) or 0)
        self.eos_ids, self.pad_id = _special_tokens(self.config)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self._buffers: dict = {}
        self.last_request: Request | None = None
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

    @property
    def model_key(self) -> str | None:
        """Content hash of the model (weights, config, the position cap) and of the tokenfx and
        torch code that turns it into graphs: the name of its compiled graphs and of drafter
        tables kept in the tokenfx cache (None for a captured graph). Computed once."""
        if "_model_key" not in self.__dict__:
            from tokenfx.runtime import executor

            module = self.model
            salt = f"generator:{self._max_positions}{self.tp.key}"  # each tensor-parallel rank has its own shard
            self._model_key = executor.module_key(module, salt) if module is not None else None
        return self._model_key

    def cached_runners(self, labels: tuple[str, ...], build: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict]:
        """``({label: runner}, meta)`` for graphs of this model: loaded from the compile cache when
        this Generator compiles and an earlier process remembered all of ``labels``, else
        ``build()`` (the same pair), remembered when it compiled
        (:func:`tokenfx.runtime.executor.load_or_build`)."""
        from tokenfx.runtime import executor

        key = self.model_key if self.compile else None
        return executor.load_or_build(key, tuple(labels), build, module=self.model)

    def sibling(self, model, *, compile: bool | str | None = None) -> "Generator":
        """The cached Generator (:func:`generator_for`) of another model — a draft model — compiled
        as this one is (``"auto"`` stays ``"auto"``; ``compile`` overrides) and covering this
        one's positions."""
        if compile is None:
            compile = self.compile if self._compile_strict or not self.compile else "auto"
        return generator_for(model, compile=compile, max_positions=self.layout.max_positions)

    @property
    def built_graphs(self) -> list:
        """The keys of the graphs this Generator captured or rewrote in this process (empty when
        every graph it ran came from the compile cache)."""
        return list(self._graphs)

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
            passes = [KVCache(mode=mode, logits=logits, max_positions=self._max_positions, cache_update=key[1],
                              padded=key[2])]
            if self.tp.world_size > 1:  # this rank's shard; its cache holds its kv-heads
                from tokenfx.passes.tensor_parallel import TensorParallel

                passes.append(TensorParallel(world_size=self.tp.world_size, rank=self.tp.rank))
            try:
                self._graphs[key] = optimize(graph, passes)
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
        or ``tree`` (built, and compiled when the Generator compiles, on first use). Called as the
        graph: ``decode(ids [B, N], positions [B, N], cache, cache_mask [B, S], new_mask [B, N],
        slots [N])`` returns the logits first and writes the new K/V into ``cache`` at ``slots``;
        ``tree`` takes a ``tree_mask [B, N, N]`` instead of ``new_mask``; ``prefill(ids,
        positions, mask)`` / ``prefill_dense(ids, positions)`` return ``(logits, kv)``."""
        run = self._runners.get(label)
        if run is None:
            if label != "tree":
                raise GenerationError(f"no graph {label!r}; choose prefill, prefill_dense, decode or tree")
            runners, _ = self.cached_runners(("tree",), lambda: ({"tree": self.compiled(self.tree_graph, "tree")}, {}))
            run = self._runners["tree"] = runners["tree"]
        return run

    def install(self, label: str, run) -> None:
        """Run ``label``'s graph (``prefill``, ``prefill_dense``, ``decode`` or ``tree``) with
        ``run`` from now on: a callable with the graph's signature (a block-wise runner, a test's
        instrumented one)."""
        if label not in ("prefill", "prefill_dense", "decode", "tree"):
            raise GenerationError(f"no graph {label!r}; choose prefill, prefill_dense, decode or tree")
        self._runners[label] = run

    def release_buffers(self) -> None:
        """Drop the request buffers kept for reuse: the next request allocates fresh (zeroed) ones."""
        self._buffers = {}

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
        if self.tp.world_size > 1:
            from tokenfx.runtime import tensor_parallel

            tensor_parallel.check_lockstep(speculate, early_exit)
            seed = tensor_parallel.shared_seed(self.tp, seed) if temperature > 0 else seed
        if speculate is not None:
            from tokenfx.runtime.speculative.decode import speculative_generate

            drafter = self.drafter(speculate, tree=tree)
            if self.tp.world_size > 1 and tree_budget in (None, "auto"):
                tree_budget = drafter.max_nodes  # "auto" resizes trees from each rank's own timings: they would differ
            return self._agreed(speculative_generate(self, drafter, ids, mask, max_new_tokens=max_new_tokens,
                                                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                                     stop_ids=stop_ids, pad=pad, stream=stream, tree_budget=tree_budget))
        generator = torch.Generator(device=ids.device).manual_seed(seed) if seed is not None else None
        sample = temperature > 0
        step = None
        if early_exit is not None:
            from tokenfx.runtime.early_exit import make_step

            step = make_step(self, early_exit, max_new_tokens)

        start = time.perf_counter()
        clock = RoundClock()
        request = self.start(ids, mask, prompt + max_new_tokens)
        cache, cache_mask, out, slots, logits = request.cache, request.cache_mask, request.out, request.slots, request.logits
        clock.lap("prefill")
        first_token_s = time.perf_counter() - start

        position = request.positions[:, -1:] + 1
        decode = self._runners["decode"]
        unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
        stop_tensor = torch.tensor(stop_ids, device=ids.device) if stop_ids else None
        ones = torch.ones(batch, 1, dtype=torch.long, device=ids.device)
        steps = 0
        for steps in range(1, max_new_tokens + 1):
            scores = logits[:, -1, :]
            token = sample_token(scores, temperature, top_k, top_p, generator) if sample else scores.argmax(-1)
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
                logits, _ = decode(token[:, None], position, cache, cache_mask, ones, slots[slot:slot + 1])  # writes K/V
            else:
                logits = step(token, position, cache, cache_mask, slots[slot:slot + 1], steps - 1)
            clock.lap("forward")
            cache_mask[:, slot] = 1
            position += 1
        total = prompt + steps
        self._remember(out[:, :total], mask, cache, prompt)
        clock.lap("bookkeeping")
        seconds = time.perf_counter() - start
        self.last_stats = {"prompt_tokens": prompt, "new_tokens": steps, "batch": batch, "reused_tokens": request.reused,
                           "seconds": seconds, "first_token_seconds": first_token_s, "steps": max(steps - 1, 0),
                           "accepted_per_step": 1.0, "stages": clock.stats(),
                           "decode_tokens_per_s": (steps - 1) * batch / max(seconds - first_token_s, 1e-9) if steps > 1 else 0.0}
        if step is not None:
            self.last_stats.update(step.stats())
        return self._agreed(out[:, :total].clone())

    def _agreed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``, checked to be every tensor-parallel rank's (a no-op on one rank)."""
        if self.tp.world_size == 1:
            return tokens
        from tokenfx.runtime.tensor_parallel import agreed

        return agreed(self.tp, tokens)

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
        if self.tp.world_size > 1:  # one curve for all ranks: what is sized from it must agree
            from tokenfx.runtime.tensor_parallel import agreed_costs

            result = agreed_costs(self.tp, result)
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
            drafters[key] = make_drafter(speculate, tree=tree)  # a draft model compiles as this one (sibling)
        return drafters[key]

    # -- pieces -------------------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p):
        ids, mask = left_padded(input_ids, attention_mask, caller="tokenfx.generate")
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

    def start(self, ids: torch.Tensor, mask: torch.Tensor, length: int) -> Request:
        """Start a request of ``length`` slots for ``ids [B, P]`` (left-padded, ``mask [B, P]``; both
        checked by the caller): the prompt copied into ``out`` and prefilled into the cache (from the
        prefix cache where it holds the prompt's start). The buffers are this Generator's, reused by
        its next request (one request at a time); the Request is kept as ``last_request``."""
        prompt = ids.shape[1]
        cache, cache_mask, out, slots = self._allocate(ids.shape[0], length, ids.device)
        out[:, :prompt] = ids
        cache_mask.zero_()
        cache_mask[:, :prompt] = mask
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        logits, reused = self._prefill_prompt(ids, mask, positions, cache, cache_mask, slots)
        self.last_request = Request(cache, cache_mask, out, slots, positions, logits, reused)
        return self.last_request

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
            logits, new_kv = (self._runners["prefill_dense"](ids, positions) if unpadded
                              else self._runners["prefill"](ids, positions, mask))
            cache[:, :, :, :, :prompt].copy_(new_kv)
            return logits, 0
        cache_mask[:, start:].zero_()  # the suffix is the graph's "new" part until it is written
        logits, _ = self._runners["decode"](ids[:, start:].contiguous(), positions[:, start:].contiguous(), cache,
                                            cache_mask, mask[:, start:].contiguous(), slots[start:prompt])  # writes the suffix's K/V
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
