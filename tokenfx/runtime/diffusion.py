"""Masked-diffusion LMs (LLaDA / Dream kind): denoise a buffer of mask tokens over rounds.

::

    result = tokenfx.diffuse("tokenfx:tiny-code-dllm", ids, gen_length=128, block_length=32)
    result.sequences                                    # [B, P + 128]
    tokenfx.diffuse(model, ids, gen_length=128, block_length=32, policy="threshold", cache="dual")

LLaDA's semi-autoregressive sampling ("Large Language Diffusion Models", Nie et al. 2025): the
prompt is followed by ``gen_length`` mask tokens, cut into ``gen_length / block_length``
blocks denoised left to right. ``steps`` rounds are split evenly over the blocks; in each
round one bidirectional forward gives logits at the current block's positions, a proposal per
masked position (the argmax, or a Gumbel-max draw at ``temperature > 0``) with its confidence
(its softmax probability), and an unmasking policy (:mod:`tokenfx.runtime.unmasking`) decides
which proposals become final; :func:`~tokenfx.runtime.unmasking.enforce_budget` makes every
policy unmask at least one token per round and the rest in the block's last round. The mask
token itself is never proposed. ``policy="vanilla"`` with the default ``steps = gen_length``
(one token per round) is LLaDA's low-confidence remasking baseline.

Forwards run through tokenfx graphs of the ``kv_cache`` pass in its bidirectional mode
(``causal=False``):

- ``cache="none"`` (exact): every round runs the full forward over prompt + buffer (the
  prefill graph: logits of every position, left padding masked by ``token_mask``);
- ``cache="prefix"`` (APPROXIMATE, Fast-dLLM's prefix cache): the block's first round runs the
  full forward and keeps every position's K/V; later rounds run only the block and everything
  after it (the step graph, writing their K/V in place) against the cached K/V of the prompt
  and the finished blocks;
- ``cache="dual"`` (APPROXIMATE, Fast-dLLM's DualCache): as ``prefix``, but the masked suffix's
  K/V are cached too and later rounds run only the current block;
- ``refresh=n`` (FreeCache's refresh schedule): the full forward also runs every ``n``-th round
  of a block, so K/V reused since the last refresh are at most ``n - 1`` rounds old.

The cached modes reuse K/V that bidirectional attention would have changed (a finished token
attends to the tokens unmasked after it), so their logits differ from exact recomputation;
``measure_cache_error=True`` measures that difference at every round. When nothing changed
since the cache was written the cached forward equals the full one (tests).

Batches are left-padded (``attention_mask``): positions count real tokens and padding is
masked out of attention, so a row's result is the same as the row run alone.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from tokenfx.errors import DiffusionError, GenerationError, MappingError
from tokenfx.frontends.load import decoder_graph, load_decoder, model_config
from tokenfx.ir.graph import ModelGraph, max_tokens
from tokenfx.runtime.batch import left_padded
from tokenfx.runtime.executor import compile_mode
from tokenfx.runtime.unmasking import Policy, RoundState, enforce_budget, make_policy

CACHES = ("none", "prefix", "dual")
DEFAULT_BLOCK = 32  # LLaDA's block length


@dataclasses.dataclass
class DiffusionResult:
    """What :func:`diffuse` returns."""

    sequences: torch.Tensor  # [B, P + gen_length]: the prompt as given, then the generated tokens
    new_tokens: int  # generated tokens per row (gen_length: every mask is filled)
    rounds: int  # denoising rounds run (one forward each), over all blocks
    seconds: float  # wall time of the whole run (with the measuring forwards of measure_cache_error)
    exact_rounds: int  # rounds that ran the full (exact) forward: every round when cache="none"
    cache: str  # "none" | "prefix" | "dual"
    approximate: bool  # True when cached K/V were reused (cache != "none"): logits may differ from exact
    cache_errors: list[float] | None = None  # per round: max |cached - exact| block logits (0.0 on exact rounds)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second over the batch."""
        return self.sequences.shape[0] * self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class RoundReport:
    """What ``on_round`` receives after each round (streaming)."""

    block: int  # index of the block being denoised
    round: int  # round within the block (0 first)
    block_start: int  # column of the block's first position in ``tokens``
    tokens: torch.Tensor  # [B, P + gen_length] the sequence after this round (do not modify)
    unmasked: torch.Tensor  # [B, block_length] bool: positions this round made final


class Diffuser:
    """The bidirectional graphs of one masked-diffusion LM and the denoising loop over them.

    ``model``: a spec (``tokenfx:tiny-code-dllm``, an HF directory), a Hugging Face module or a
    captured :class:`ModelGraph` whose config says ``is_causal: false`` and names a
    ``mask_token_id``. ``compile`` as for :class:`~tokenfx.runtime.generate.Generator`
    (``"auto"``: AOTInductor packages cached on disk, the fx graphs when that fails or
    ``TOKENFX_COMPILE=0``). Graphs are built on first use: ``full`` (padded prefill, every
    position's logits and K/V), ``full_dense`` (the same without padding), ``step`` (a window
    of the sequence against cached K/V, writing its own K/V into the cache).
    """

    def __init__(self, model, *, compile: bool | str = "auto", max_positions: int = 0):
        self.compile, self._compile_strict = compile_mode(compile)
        self._max_positions = max_positions
        self.spec = str(model) if isinstance(model, str) or hasattr(model, "__fspath__") else None
        if self.spec is not None:
            if model_config(self.spec) is not None:
                mask_token(self.spec, self.spec)  # from config.json, before loading: a wrong model fails fast
            model = load_decoder(self.spec)
        self.mask_id = mask_token(model, self.spec)
        if not isinstance(model, (torch.nn.Module, ModelGraph)):
            raise DiffusionError(f"cannot diffuse with a {type(model).__name__}: pass a masked-diffusion LM, a "
                                 "ModelGraph or a model spec")
        self._source = model
        self.config = getattr(model, "config", None)
        self.vocab_size = int(getattr(self.config, "vocab_size", 0) or 0)
        self.guide_model = (model_config(model) or {}).get("guide_model")
        if self.vocab_size and not 0 <= self.mask_id < self.vocab_size:
            raise DiffusionError(f"{self.spec or type(model).__name__}: mask_token_id {self.mask_id} is outside the "
                                 f"vocabulary [0, {self.vocab_size})")
        self._graphs: dict = {}
        self._runners: dict = {}

    @property
    def model(self) -> torch.nn.Module | None:
        """The module it runs (None when it was given a captured graph)."""
        return self._source if isinstance(self._source, torch.nn.Module) else None

    @property
    def max_positions(self) -> int:
        """Prompt + generated tokens must fit in this many positions."""
        limit = self._max_positions or (max_tokens(self.config) if self.config is not None else None)
        return int(limit or 0)

    # -- graphs and runners ---------------------------------------------------------------------------
    def graph(self, label: str) -> ModelGraph:
        """The ``kv_cache(causal=False)`` graph ``full``, ``full_dense`` or ``step`` of this model."""
        options = {"full": {"mode": "prefill"}, "full_dense": {"mode": "prefill", "padded": False},
                   "step": {"mode": "decode", "cache_update": "inplace"}}
        if label not in options:
            raise DiffusionError(f"no diffusion graph {label!r}; choose full, full_dense or step")
        if label not in self._graphs:
            from tokenfx.passes.base import optimize
            from tokenfx.passes.kv_cache import KVCache

            if "capture" not in self._graphs:
                self._graphs["capture"] = decoder_graph(self._source, diffusion=True)
            graph = self._graphs["capture"]
            try:
                self._graphs[label] = optimize(graph, [KVCache(logits="all", causal=False,
                                                               max_positions=self._max_positions, **options[label])])
            except MappingError as exc:
                raise DiffusionError(f"cannot diffuse with {graph.family}: {exc}") from exc
        return self._graphs[label]

    def runner(self, label: str):
        """The callable of one graph (see :meth:`graph`), compiled when this Diffuser compiles and
        remembered in the compile cache like a Generator's (:func:`tokenfx.runtime.executor.load_or_build`)."""
        if label not in self._runners:
            from tokenfx.runtime import executor

            module = self.model
            key = executor.module_key(module, f"diffusion:{self._max_positions}") if self.compile and module is not None else None
            runners, _ = executor.load_or_build(key, (label,), lambda: ({label: self._compiled(label)}, {}), module=module)
            self._runners[label] = runners[label]
        return self._runners[label]

    def _compiled(self, label: str):
        from tokenfx.runtime import executor

        from tokenfx.codegen import kv_write  # noqa: F401  (registered before the block partition looks for it)

        graph = self.graph(label)
        if not self.compile:
            return executor.lower(graph).gm
        try:
            return executor.compiled(graph, f"diffusion-{label}")
        except Exception as exc:
            if self._compile_strict:
                raise
            import warnings

            warnings.warn(f"tokenfx: compiling the diffusion {label} graph failed ({type(exc).__name__}); running the "
                          "fx graphs instead (compile=False skips the attempt)", RuntimeWarning, stacklevel=2)
            self.compile = False
            return executor.lower(graph).gm

    def prepare(self, cache: str = "none", padded: bool = False) -> None:
        """Build (or load compiled) the runners a run with ``cache`` needs, so that timing a run
        excludes them: the full forward (padded or not) and, when caching, the step graph."""
        self.runner("full" if padded else "full_dense")
        if cache != "none":
            self.runner("step")

    # -- the two forwards -------------------------------------------------------------------------------
    def full(self, tokens: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None = None):
        """Exact bidirectional forward: ``tokens [B, N]``, ``valid [B, N]`` (False on left padding)
        → ``(logits [B, N, V], kv [L, 2, B, Hkv, N, D])``, the K/V of every position."""
        if positions is None:
            positions = positions_of(valid)
        if bool(valid.all()):
            return self.runner("full_dense")(tokens, positions)
        return self.runner("full")(tokens, positions, valid.long())

    def cached(self, kv: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
               start: int, stop: int, visible: torch.Tensor) -> torch.Tensor:
        """APPROXIMATE forward of the window ``tokens[:, start:stop]`` against cached K/V: its
        tokens attend to themselves (where ``valid``) and to the slots of ``kv`` marked in
        ``visible [B, N]`` (outside the window). Their new K/V are written into ``kv`` at
        ``start:stop``. Returns the window's logits ``[B, stop - start, V]``; equal to the full
        forward's when ``kv`` holds the K/V of the same tokens."""
        cache_mask = visible.long()
        cache_mask[:, start:stop] = 0  # the window's slots are the graph's new tokens
        slots = torch.arange(start, stop, device=tokens.device)
        logits, _ = self.runner("step")(tokens[:, start:stop].contiguous(), positions[:, start:stop].contiguous(), kv,
                                        cache_mask, valid[:, start:stop].long().contiguous(), slots)
        return logits

    # -- the denoising loop -----------------------------------------------------------------------------
    @torch.inference_mode()
    def diffuse(self, input_ids, attention_mask=None, *, gen_length: int, block_length: int | None = None,
                steps: int | None = None, policy: str | Policy = "vanilla", policy_options: dict | None = None,
                cache: str = "none", refresh: int | None = None, temperature: float = 0.0, seed: int | None = None,
                on_round: Callable[[RoundReport], None] | None = None, guide=None,
                measure_cache_error: bool = False) -> DiffusionResult:
        """See :func:`diffuse`."""
        ids, prompt_valid = self._check_inputs(input_ids, attention_mask, gen_length)
        block_length, blocks, per_block = block_schedule(gen_length, block_length, steps)
        if cache not in CACHES:
            raise DiffusionError(f"cache must be one of {', '.join(CACHES)}; got {cache!r}")
        if refresh is not None and (not isinstance(refresh, int) or refresh < 1):
            raise DiffusionError(f"refresh must be a positive number of rounds (or None); got {refresh!r}")
        if temperature < 0:
            raise DiffusionError(f"temperature must be >= 0; got {temperature}")
        policy = self._policy(policy, policy_options, guide)
        self.prepare(cache, padded=not bool(prompt_valid.all()))  # graph builds / compiles stay out of the timing

        start_time = time.perf_counter()
        batch, prompt = ids.shape
        device = ids.device
        x = torch.cat([ids, torch.full((batch, gen_length), self.mask_id, dtype=ids.dtype, device=device)], 1)
        valid = torch.cat([prompt_valid.bool(), torch.ones(batch, gen_length, dtype=torch.bool, device=device)], 1)
        positions = positions_of(valid)
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        kv = None  # [L, 2, B, Hkv, N, D]: every position's K/V, from the last full forward
        rounds = exact_rounds = 0
        errors: list[float] | None = [] if measure_cache_error else None
        for block in range(blocks):
            start, stop = prompt + block * block_length, prompt + (block + 1) * block_length
            for r in range(per_block):
                masked = x[:, start:stop] == self.mask_id
                if not bool(masked.any()):
                    break  # a policy that unmasks several tokens a round finished the block early
                exact = cache == "none" or r == 0 or (refresh is not None and r % refresh == 0)
                if exact:
                    logits, kv = self.full(x, valid, positions)
                    logits = logits[:, start:stop]
                    exact_rounds += 1
                else:
                    window_stop = x.shape[1] if cache == "prefix" else stop
                    visible = valid.clone()
                    visible[:, start:window_stop] = False
                    logits = self.cached(kv, x, valid, positions, start, window_stop, visible)[:, :block_length]
                logits = logits.float().clone()  # a view of the graph's output: masked below
                if errors is not None:
                    errors.append(0.0 if exact else _max_error(logits, self.full(x, valid, positions)[0][:, start:stop],
                                                               masked))
                logits[..., self.mask_id] = torch.finfo(logits.dtype).min  # the mask token is never proposed
                candidates, confidence = propose(logits, masked, x[:, start:stop], temperature, generator)
                state = RoundState(tokens=x, valid=valid, block_start=start, masked=masked, candidates=candidates,
                                   confidence=confidence, logits=logits, round=r, rounds_left=per_block - r,
                                   generator=generator)
                decision = policy.select(state)
                unmask = enforce_budget(state, decision.unmask)
                chosen = candidates if decision.tokens is None else decision.tokens
                x[:, start:stop] = torch.where(unmask, chosen, x[:, start:stop])
                rounds += 1
                if on_round is not None:
                    on_round(RoundReport(block, r, start, x, unmask))
        seconds = time.perf_counter() - start_time
        return DiffusionResult(x, gen_length, rounds, seconds, exact_rounds, cache, cache != "none", errors)

    def _policy(self, policy, options: dict | None, guide) -> Policy:
        if not isinstance(policy, str):
            if options:
                raise DiffusionError("policy_options apply to a policy given by name; configure a Policy object directly")
            return policy
        options = dict(options or {})
        if policy == "guided" and "guide" not in options:
            if guide is None:
                if not self.guide_model:
                    raise DiffusionError("the guided policy needs an AR model: pass guide=... (a Generator or a model "
                                         "spec) or name guide_model in the dLLM's config.json")
                from tokenfx.runtime.generate import generator_for

                guide = generator_for(self.guide_model, compile="auto" if not self._compile_strict else self.compile)
            options["guide"] = guide
        return make_policy(policy, **options)

    def _check_inputs(self, input_ids, attention_mask, gen_length):
        ids, mask = left_padded(input_ids, attention_mask, caller="diffusion")
        if not isinstance(gen_length, int) or gen_length < 1:
            raise DiffusionError(f"gen_length must be a positive integer; got {gen_length!r}")
        limit = self.max_positions
        if limit and ids.shape[1] + gen_length > limit:
            raise GenerationError(f"prompt ({ids.shape[1]} tokens) + gen_length ({gen_length}) exceeds the model's "
                                  f"{limit} positions")
        if self.vocab_size and (bool((ids < 0).any()) or bool((ids >= self.vocab_size).any())):
            raise GenerationError(f"input_ids has ids outside the vocabulary [0, {self.vocab_size})")
        return ids.long().contiguous(), mask.contiguous()


# -- one round's pieces ---------------------------------------------------------------------------------
def positions_of(valid: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` positions counted over real tokens (left padding gets 0, and is masked anyway)."""
    return (valid.long().cumsum(-1) - 1).clamp_(min=0)


def propose(logits: torch.Tensor, masked: torch.Tensor, current: torch.Tensor, temperature: float,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's proposal at each block position: ``(candidates [B, K], confidence [B, K])``.

    The candidate is the argmax of ``logits [B, K, V]``, or at ``temperature > 0`` a Gumbel-max
    draw (``argmax(logits / T + g)``, ``g ~ Gumbel(0, 1)``: a sample of ``softmax(logits / T)``);
    its confidence is its probability under ``softmax(logits)`` (low-confidence remasking).
    Positions not ``masked`` keep their ``current`` token and confidence 0."""
    if temperature > 0:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20)))
        candidates = (logits.double() / temperature + gumbel).argmax(-1)
    else:
        candidates = logits.argmax(-1)
    confidence = torch.softmax(logits, -1).gather(-1, candidates.unsqueeze(-1)).squeeze(-1)
    candidates = torch.where(masked, candidates, current)
    return candidates, torch.where(masked, confidence, torch.zeros_like(confidence))


def _max_error(cached: torch.Tensor, exact: torch.Tensor, masked: torch.Tensor) -> float:
    """Largest |cached - exact| logit over the still-masked positions (the ones a policy reads)."""
    return float((cached - exact.float()).abs()[masked].max())


def block_schedule(gen_length: int, block_length: int | None = None, steps: int | None = None) -> tuple[int, int, int]:
    """``(block_length, blocks, rounds per block)`` of a run, checked: ``block_length`` divides
    ``gen_length`` (default ``min(32, gen_length)``), ``steps`` is a multiple of the blocks
    (default ``gen_length``: one token per round)."""
    if not isinstance(gen_length, int) or gen_length < 1:
        raise DiffusionError(f"gen_length must be a positive integer; got {gen_length!r}")
    block_length = _block_length(gen_length, block_length)
    blocks = gen_length // block_length
    return block_length, blocks, _rounds_per_block(gen_length, blocks, steps)


def _block_length(gen_length: int, block_length: int | None) -> int:
    if block_length is None:
        return min(DEFAULT_BLOCK, gen_length)
    if not isinstance(block_length, int) or block_length < 1:
        raise DiffusionError(f"block_length must be a positive integer; got {block_length!r}")
    if gen_length % block_length:
        raise DiffusionError(f"gen_length {gen_length} is not a multiple of block_length {block_length}: the generation "
                             "buffer is denoised in whole blocks (choose a block length that divides it)")
    return block_length


def _rounds_per_block(gen_length: int, blocks: int, steps: int | None) -> int:
    """LLaDA splits ``steps`` evenly over the blocks; None = ``gen_length`` (one token per round)."""
    steps = gen_length if steps is None else steps
    if not isinstance(steps, int) or steps < blocks or steps % blocks:
        raise DiffusionError(f"steps {steps!r} must be a positive multiple of the number of blocks ({blocks} = "
                             "gen_length / block_length): LLaDA gives every block the same rounds")
    return steps // blocks


def mask_token(model, spec: str | None = None) -> int:
    """The mask token id of a masked-diffusion LM (config ``is_causal: false`` + ``mask_token_id``);
    one :class:`DiffusionError` for an autoregressive model or a model without a mask token."""
    name = spec or type(model).__name__
    config = model_config(model)
    if config is None:
        raise DiffusionError(f"{name}: no config says it is a masked-diffusion LM; diffusion needs a model whose "
                             "config.json has is_causal: false and mask_token_id")
    if config.get("is_causal", True) is not False:
        raise DiffusionError(f"{name} is an autoregressive (causal) LM, not a masked-diffusion LM (its config has no "
                             "is_causal: false); decode it with tokenfx.generate, or the CLI without --diffusion")
    if config.get("mask_token_id") is None:
        raise DiffusionError(f"{name} has no mask token: a masked-diffusion LM's config.json names mask_token_id, the "
                             "token it was trained to denoise")
    return int(config["mask_token_id"])


# -- the function -------------------------------------------------------------------------------------------
_DIFFUSERS: dict = {}


def diffuser_for(model, **options) -> Diffuser:
    """The cached Diffuser for ``model`` (keyed by object identity or spec string and options)."""
    options = {"compile": "auto", **options}
    key = (model if isinstance(model, str) else id(model), tuple(sorted(options.items())))
    found = _DIFFUSERS.get(key)
    if found is None or (not isinstance(model, str) and found[1] is not model):
        found = (Diffuser(model, **options), model)
        _DIFFUSERS[key] = found
    return found[0]


def diffuse(model, input_ids, attention_mask=None, *, gen_length: int, block_length: int | None = None,
            steps: int | None = None, policy: str | Policy = "vanilla", policy_options: dict | None = None,
            cache: str = "none", refresh: int | None = None, temperature: float = 0.0, seed: int | None = None,
            on_round: Callable[[RoundReport], None] | None = None, guide=None, measure_cache_error: bool = False,
            compile: bool | str = "auto") -> DiffusionResult:
    """Generate ``gen_length`` tokens after ``input_ids [B, P]`` (left-padded with
    ``attention_mask``) with a masked-diffusion LM (spec, HF module or ModelGraph).

    ``block_length``: semi-autoregressive block size (must divide ``gen_length``; default
    ``min(32, gen_length)``). ``steps``: total rounds, split evenly over the blocks (a multiple
    of their number; default ``gen_length``, one token per round). ``policy``: an unmasking
    policy name (``vanilla``, ``topk``, ``threshold``, ``ete``, ``guided``, ``learned``; options
    in ``policy_options``) or a :class:`Policy`; ``guide``: the guided policy's AR model
    (default: the config's ``guide_model``). ``cache``: ``"none"`` (exact), ``"prefix"`` or
    ``"dual"`` (APPROXIMATE K/V reuse, see the module docstring), refreshed by a full forward
    every ``refresh`` rounds of a block. ``temperature > 0`` samples (Gumbel-max; ``seed`` makes
    it repeat). ``on_round(RoundReport)`` streams each round. ``measure_cache_error``: also run
    the exact forward in cached rounds and report the max logit error per round (slower).
    """
    runner = diffuser_for(model, compile=compile)
    return runner.diffuse(input_ids, attention_mask, gen_length=gen_length, block_length=block_length, steps=steps,
                          policy=policy, policy_options=policy_options, cache=cache, refresh=refresh,
                          temperature=temperature, seed=seed, on_round=on_round, guide=guide,
                          measure_cache_error=measure_cache_error)
