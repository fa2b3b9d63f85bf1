"""Triton kernels for token reduction: ``tokenfx::bipartite_match``, ``merge_tokens`` and
``attention_pagerank`` (the ops and their plain-torch references: :mod:`tokenfx.codegen.token_reduce`).

- :func:`bipartite_match_kernel` — one program per (block of ``BLOCK_M`` rows, row b); grid
  ``(cdiv(N, BLOCK_M), B)``. It walks the row's N tokens in blocks of ``BLOCK_N`` columns
  and keeps a running max / argmax of the cosine, so the ``[N, N]`` score matrix is never
  built. ``cos = (a·b) · 1/|a| · 1/|b|`` (fp32 ``tl.dot``, IEEE products, channels in
  chunks of ``BLOCK_C``); cells that are not (A row, B column) are ``-inf``. Ties go to the
  lowest column, as the reference's ``max(dim=-1)``: first within a block
  (``tie_break_left``), then across blocks (a later block must be strictly greater). A row
  that never sees a finite score keeps ``-inf`` and its own index. Scores equal the
  reference's within fp32 rounding; the match is the reference's unless two candidates'
  cosines are within that rounding of each other.
- :func:`merge_tokens_kernel` — one program per (destination j, row b, block of ``BLOCK_C``
  channels); grid ``(N - r, B, cdiv(C, BLOCK_C))``. The sources of each destination come
  from a CSR grouping built in torch (a stable sort of ``assign`` per row plus per-destination
  offsets, :func:`_merge_groups`); the program sums ``size_i · x_i`` and ``size_i`` over them
  in ascending source order in fp32 (fp64 for fp64 ``x``, as the reference) and divides. No
  atomics: the result is bit-identical run to run, and equals the reference within the
  rounding of a different summation order. The discard slot ``N - r`` has no program.
- :func:`attention_pagerank_kernel` — one program per (head h, row b); grid ``(H, B)``.
  ``s`` lives in registers as ``BLOCK_N`` (next power of two >= N) lanes; each of the
  ``ITERATIONS`` steps reads ``A`` in blocks of ``BLOCK_I`` rows and accumulates
  ``Σ_i A[i, :] s_i``, then multiplies by
  ``real`` (pads hold 0), exactly the reference's steps in fp32; equal to it within the
  rounding of the summation order (NaN in ``A`` propagates as in the reference). Meant for
  N <= ~1024 (registers); larger N runs with smaller row blocks.

Launchers (``*_triton``) take any strides and fp32 / fp16 / bf16 inputs. :func:`emit_source`
writes one op's kernel and launcher as a standalone file specialised to the graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenfx.codegen.emit import emit
from tokenfx.errors import OpInputError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- bipartite_match -----------------------------------------------------------------------------------
@triton.jit
def bipartite_match_kernel(
    METRIC, ROLE, SCORE, MATCH,  # METRIC [B, N, C], ROLE [B, N] (any strides); SCORE, MATCH [B, N] contiguous
    N,
    stride_mb, stride_mn, stride_mc, stride_rb, stride_rn,
    CHANNELS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_in = rows < N
    is_a = tl.load(ROLE + b * stride_rb + rows * stride_rn, mask=row_in, other=0) == 1
    metric = METRIC + b * stride_mb

    sq_a = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, CHANNELS, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(metric + rows[:, None] * stride_mn + offs_c[None, :] * stride_mc,
                    mask=row_in[:, None] & (offs_c < CHANNELS)[None, :], other=0.0).to(tl.float32)
        sq_a += tl.sum(a * a, axis=1)
    inv_a = 1.0 / tl.maximum(tl.sqrt_rn(sq_a), 1e-12)  # the reference's norm().clamp_min(1e-12)

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_idx = rows  # a row without any (A, B) score keeps its own index
    for start in range(0, N, BLOCK_N):
        cols = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_in = cols < N
        is_b = tl.load(ROLE + b * stride_rb + cols * stride_rn, mask=col_in, other=0) == 2
        dots = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        sq_b = tl.zeros([BLOCK_N], tl.float32)
        for c0 in range(0, CHANNELS, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_in = offs_c < CHANNELS
            a = tl.load(metric + rows[:, None] * stride_mn + offs_c[None, :] * stride_mc,
                        mask=row_in[:, None] & c_in[None, :], other=0.0).to(tl.float32)
            k = tl.load(metric + cols[:, None] * stride_mn + offs_c[None, :] * stride_mc,
                        mask=col_in[:, None] & c_in[None, :], other=0.0).to(tl.float32)
            dots = tl.dot(a, tl.trans(k), dots, input_precision="ieee")
            sq_b += tl.sum(k * k, axis=1)
        inv_b = 1.0 / tl.maximum(tl.sqrt_rn(sq_b), 1e-12)
        cos = dots * inv_a[:, None] * inv_b[None, :]
        cos = tl.where(is_a[:, None] & is_b[None, :], cos, float("-inf"))
        block_best, block_idx = tl.max(cos, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # Strictly greater: on a tie the earlier block, i.e. the lower column, keeps it.
        better = block_best > best
        best = tl.where(better, block_best, best)
        best_idx = tl.where(better, start + block_idx.to(tl.int64), best_idx)

    tl.store(SCORE + b * N + rows, best, mask=row_in)
    tl.store(MATCH + b * N + rows, best_idx, mask=row_in)


# Copied into the emitted standalone file, which imports no tokenfx: so a plain ValueError.
def _check_match(metric, role):
    if metric.dim() != 3 or role.dim() != 2 or tuple(role.shape) != tuple(metric.shape[:2]):
        raise ValueError(f"bipartite_match: expected metric [B, N, C], role [B, N]; got {tuple(metric.shape)}, "
                         f"{tuple(role.shape)}")
    if role.is_floating_point() or role.dtype == torch.bool:
        raise ValueError(f"bipartite_match: role must hold integer roles 0 / 1 / 2, got {role.dtype}")


def _match_blocks(tokens: int, channels: int) -> dict:
    # tl.dot needs every block dim >= 16. 32 x 32 tiles, 32 channels a step, 4 warps: no register
    # spills on sm_90 in fp32 / fp16 / bf16 (ptxas -v); 64 x 64 spills at 4 warps.
    block = min(max(triton.next_power_of_2(tokens), 16), 32)
    return dict(block_m=block, block_n=block, block_c=min(max(triton.next_power_of_2(channels), 16), 32),
                num_warps=4)


def _match_launch(metric, role, *, block_m, block_n, block_c, num_warps):
    """Run :func:`bipartite_match_kernel` on checked inputs; returns ``score [B, N] f32, match [B, N] i64``."""
    B, N, C = metric.shape
    score = torch.empty((B, N), dtype=torch.float32, device=metric.device)
    match = torch.empty((B, N), dtype=torch.long, device=metric.device)
    if score.numel() == 0:
        return score, match
    bipartite_match_kernel[(triton.cdiv(N, block_m), B)](
        metric, role, score, match, N, *metric.stride(), *role.stride(),
        CHANNELS=C, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps,
    )
    return score, match


def bipartite_match_triton(metric, role):
    """Launch :func:`bipartite_match_kernel`: metric ``[B, N, C]`` (any strides, fp32 / fp16 /
    bf16), role ``[B, N]`` (integer) → ``score [B, N] f32, match [B, N] i64``; equals
    ``bipartite_match_reference`` within fp32 rounding of the cosines (module docstring)."""
    _check_match(metric, role)
    return _match_launch(metric, role, **_match_blocks(metric.shape[1], metric.shape[2]))


# -- merge_tokens ---------------------------------------------------------------------------------------
@triton.jit
def merge_tokens_kernel(
    X, SIZE, ORDER, OFFSETS, OUT, OUT_SIZE,  # X [B, N, C], SIZE [B, N] (any strides); the rest contiguous
    N, N_OUT,  # ORDER [B, N]: sources grouped by destination; OFFSETS [B, N_OUT + 1]: each group's start
    stride_xb, stride_xn, stride_xc, stride_sb, stride_sn,
    CHANNELS: tl.constexpr, BLOCK_C: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    j = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_c = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_in = offs_c < CHANNELS
    start = tl.load(OFFSETS + b * (N_OUT + 1) + j)
    end = tl.load(OFFSETS + b * (N_OUT + 1) + j + 1)

    num = tl.zeros([BLOCK_C], ACC_DTYPE)
    den = tl.zeros((), ACC_DTYPE)
    for k in range(start, end):  # ascending source index: a fixed order, so runs are bit-identical
        src = tl.load(ORDER + b * N + k)
        w = tl.load(SIZE + b * stride_sb + src * stride_sn).to(ACC_DTYPE)
        x = tl.load(X + b * stride_xb + src * stride_xn + offs_c * stride_xc, mask=c_in, other=0.0)
        num += x.to(ACC_DTYPE) * w
        den += w

    out = b * N_OUT + j
    tl.store(OUT + out * CHANNELS + offs_c, (num / den).to(OUT.dtype.element_ty), mask=c_in)
    if tl.program_id(2) == 0:
        tl.store(OUT_SIZE + out, den.to(OUT_SIZE.dtype.element_ty))


# Copied into the emitted standalone file, which imports no tokenfx: so a plain ValueError.
def _check_merge(x, size, assign, r):
    if x.dim() != 3 or tuple(size.shape) != tuple(x.shape[:2]) or tuple(assign.shape) != tuple(x.shape[:2]):
        raise ValueError(f"merge_tokens: expected x [B, N, C], size [B, N], assign [B, N]; got {tuple(x.shape)}, "
                         f"{tuple(size.shape)}, {tuple(assign.shape)}")
    if assign.is_floating_point() or assign.dtype == torch.bool:
        raise ValueError(f"merge_tokens: assign must hold integer token indices, got {assign.dtype}")
    if not 0 <= r <= x.shape[1]:
        raise ValueError(f"merge_tokens: r must be in [0, N={x.shape[1]}], got {r}")


def _merge_groups(assign, n_out: int):
    """CSR grouping of sources by destination: ``order [B, N]`` (source indices, stably sorted by
    ``assign``, so ascending within a group) and ``offsets [B, n_out + 1]`` (group j is
    ``order[b, offsets[b, j]:offsets[b, j + 1]]``); the discard slot ``n_out`` lies past the end."""
    grouped = torch.sort(assign.long(), dim=-1, stable=True)
    bounds = torch.arange(n_out + 1, device=assign.device).expand(assign.shape[0], n_out + 1).contiguous()
    return grouped.indices.contiguous(), torch.searchsorted(grouped.values.contiguous(), bounds)


def _merge_block_c(channels: int) -> int:
    # One channel block per program per source; 512 lanes keep wide rows to a few programs.
    return min(max(triton.next_power_of_2(channels), 16), 512)


def _merge_launch(x, size, assign, r, *, block_c):
    """Run :func:`merge_tokens_kernel` on checked inputs; returns ``x' [B, N - r, C], size' [B, N - r]``."""
    B, N, C = x.shape
    n_out = N - r
    out = torch.empty((B, n_out, C), dtype=x.dtype, device=x.device)
    out_size = torch.empty((B, n_out), dtype=size.dtype, device=x.device)
    if out_size.numel() == 0:
        return out, out_size
    order, offsets = _merge_groups(assign, n_out)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32  # the reference's promote_types(x, f32)
    merge_tokens_kernel[(n_out, B, max(triton.cdiv(C, block_c), 1))](
        x, size, order, offsets, out, out_size, N, n_out, *x.stride(), *size.stride(),
        CHANNELS=C, BLOCK_C=block_c, ACC_DTYPE=acc, num_warps=4 if block_c >= 512 else 1,
    )
    return out, out_size


def merge_tokens_triton(x, size, assign, r: int):
    """Launch :func:`merge_tokens_kernel`: x ``[B, N, C]``, size ``[B, N]``, assign ``[B, N]``
    (values in ``[0, N - r]``; ``N - r`` discards) → ``x' [B, N - r, C]`` in x.dtype and
    ``size' [B, N - r]`` in size.dtype. Deterministic; equals ``merge_tokens_reference``
    within fp32 rounding (the sum runs in ascending source order)."""
    _check_merge(x, size, assign, r)
    return _merge_launch(x, size, assign, r, block_c=_merge_block_c(x.shape[2]))


# -- attention_pagerank ---------------------------------------------------------------------------------
@triton.jit
def attention_pagerank_kernel(
    P, REAL, OUT,  # P [B, H, N, N] (any strides); REAL [B, N] f32, OUT [B, H, N] f32: contiguous
    H, N,
    stride_pb, stride_ph, stride_pi, stride_pj,
    ITERATIONS: tl.constexpr, CLS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    NUM_CHUNKS: tl.constexpr = BLOCK_N // BLOCK_I
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    col_in = cols < N
    chunk_ids = tl.arange(0, NUM_CHUNKS)
    probs = P + b * stride_pb + h * stride_ph

    real = tl.load(REAL + b * N + cols, mask=col_in, other=0.0)
    n = tl.maximum(tl.sum(real, axis=0), 1.0)
    s = real / n  # Zero-TPrune: a uniform start over the real tokens
    if CLS_WEIGHT:
        s = tl.where(cols == 0, s * tl.sqrt_rn(n), s)

    for _ in range(ITERATIONS):
        # Triton cannot slice a register tensor: view s as [NUM_CHUNKS, BLOCK_I] and pick row
        # block c with a masked sum over NUM_CHUNKS (a select, so other lanes' NaN stays out).
        s_chunks = tl.reshape(s, [NUM_CHUNKS, BLOCK_I])
        acc = tl.zeros([BLOCK_N], tl.float32)
        for c in range(0, tl.cdiv(N, BLOCK_I)):
            rows = (c * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
            s_rows = tl.sum(tl.where(chunk_ids[:, None] == c, s_chunks, 0.0), axis=0)
            a = tl.load(probs + rows[:, None] * stride_pi + cols[None, :] * stride_pj,
                        mask=(rows < N)[:, None] & col_in[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * s_rows[:, None], axis=0)  # s_j ← Σ_i A_ij s_i
        s = acc * real  # pads hold no importance (no 1/n per step: see the reference)

    tl.store(OUT + (b * H + h) * N + cols, s, mask=col_in)


# Copied into the emitted standalone file, which imports no tokenfx: so a plain ValueError.
def _check_pagerank(probs, real, iterations):
    if probs.dim() != 4 or probs.shape[2] != probs.shape[3] or tuple(real.shape) != (probs.shape[0], probs.shape[2]):
        raise ValueError(f"attention_pagerank: expected probs [B, H, N, N], real [B, N]; got {tuple(probs.shape)}, "
                         f"{tuple(real.shape)}")
    if iterations < 0:
        raise ValueError(f"attention_pagerank: iterations must be >= 0, got {iterations}")


def _pagerank_blocks(tokens: int) -> dict:
    # A [BLOCK_I, BLOCK_N] tile of at most 4096 lanes per step (4 rows at N = 1024): no register
    # spills on sm_90 up to BLOCK_N = 1024 (ptxas -v); 8192 lanes spill at BLOCK_N = 256.
    block_n = max(triton.next_power_of_2(tokens), 16)
    return dict(block_n=block_n, block_i=min(max(4096 // block_n, 1), block_n), num_warps=4 if block_n <= 256 else 8)


def _pagerank_launch(probs, real, iterations, cls_weight, *, block_n, block_i, num_warps):
    """Run :func:`attention_pagerank_kernel` on checked inputs; returns ``s [B, H, N] f32``."""
    B, H, N, _ = probs.shape
    out = torch.empty((B, H, N), dtype=torch.float32, device=probs.device)
    if out.numel() == 0:
        return out
    realf = real.to(torch.float32).contiguous()  # the reference's real.to(p.dtype)
    attention_pagerank_kernel[(H, B)](
        probs, realf, out, H, N, *probs.stride(),
        ITERATIONS=int(iterations), CLS_WEIGHT=bool(cls_weight), BLOCK_N=block_n, BLOCK_I=block_i,
        num_warps=num_warps,
    )
    return out


def attention_pagerank_triton(probs, real, iterations: int, cls_weight: bool):
    """Launch :func:`attention_pagerank_kernel`: probs ``[B, H, N, N]`` (any strides, fp32 /
    fp16 / bf16), real ``[B, N]`` bool → ``s [B, H, N] f32``; equals
    ``attention_pagerank_reference`` within fp32 summation-order rounding."""
    _check_pagerank(probs, real, iterations)
    return _pagerank_launch(probs, real, iterations, cls_weight, **_pagerank_blocks(probs.shape[2]))


# -- standalone source ----------------------------------------------------------------------------------
_MATCH_LAUNCH = '''

def launch(metric, role):
    """score [B, N] f32, match [B, N] i64 = bipartite_match(metric [B, N, {C}] {dtype}, role [B, N])."""
    _check_match(metric, role)
    if metric.shape[-1] != CHANNELS or metric.dtype != DTYPE:
        raise ValueError(
            f"kernel specialised to [B, N, {{CHANNELS}}] {{DTYPE}}; got metric {{metric.dtype}} {{tuple(metric.shape)}}"
        )
    return _match_launch(metric, role, **_match_blocks(metric.shape[1], CHANNELS))
'''

_MERGE_LAUNCH = '''

def launch(x, size, assign, r):
    """x' [B, N - r, {C}], size' [B, N - r] = merge_tokens(x [B, N, {C}] {dtype}, size [B, N], assign [B, N], r)."""
    _check_merge(x, size, assign, r)
    if x.shape[-1] != CHANNELS or x.dtype != DTYPE:
        raise ValueError(f"kernel specialised to [B, N, {{CHANNELS}}] {{DTYPE}}; got x {{x.dtype}} {{tuple(x.shape)}}")
    return _merge_launch(x, size, assign, r, block_c=BLOCK_C)
'''

_PAGERANK_LAUNCH = '''

def launch(probs, real):
    """s [B, H, N] f32 = attention_pagerank(probs [B, H, N, N] {dtype}, real [B, N], iterations={iterations},
    cls_weight={cls_weight})."""
    _check_pagerank(probs, real, ITERATIONS)
    if probs.dtype != DTYPE:
        raise ValueError(f"kernel specialised to {{DTYPE}}; got probs {{probs.dtype}} {{tuple(probs.shape)}}")
    return _pagerank_launch(probs, real, ITERATIONS, CLS_WEIGHT, **_pagerank_blocks(probs.shape[2]))
'''


def _check_dtype(op: str, dtype: str) -> str:
    dtype = dtype.removeprefix("torch.")
    if dtype not in _DTYPES:
        raise OpInputError(f"{op}: dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
    return dtype


def _check_channels(op: str, channels: int) -> None:
    if channels < 1:
        raise OpInputError(f"{op}: channels must be positive, got {channels}")


def _emit_match(*, dtype: str, channels: int) -> tuple[tuple[str, tuple[str, ...]], str, tuple, str]:
    dtype = _check_dtype("bipartite_match", dtype)
    _check_channels("bipartite_match", channels)
    comment = (f"channels={channels}, dtype={dtype}",
               ("score, match = launch(metric, role): for each A token (role 1) the largest cosine to a B token",
                "  (role 2) and its index (first on ties); -inf and its own index for every other token."))
    constants = (f"CHANNELS = {channels}\n"
                 f"DTYPE = torch.{dtype}\n")
    functions = (bipartite_match_kernel, _check_match, _match_blocks, _match_launch)
    return comment, constants, functions, _MATCH_LAUNCH.format(C=channels, dtype=dtype)


def _emit_merge(*, dtype: str, channels: int) -> tuple[tuple[str, tuple[str, ...]], str, tuple, str]:
    dtype = _check_dtype("merge_tokens", dtype)
    _check_channels("merge_tokens", channels)
    block_c = _merge_block_c(channels)
    comment = (f"channels={channels}, dtype={dtype}",
               ("x', size' = launch(x, size, assign, r): x'[j] = sum_(i -> j) size_i x_i / sum_(i -> j) size_i,",
                "  size'[j] = sum_(i -> j) size_i, in fp32, summed in ascending i; assign = N - r discards."))
    constants = (f"CHANNELS = {channels}\n"
                 f"BLOCK_C = {block_c}  # channels per program\n"
                 f"DTYPE = torch.{dtype}\n")
    functions = (merge_tokens_kernel, _check_merge, _merge_groups, _merge_launch)
    return comment, constants, functions, _MERGE_LAUNCH.format(C=channels, dtype=dtype)


def _emit_pagerank(*, dtype: str, iterations: int, cls_weight: bool) -> tuple[tuple[str, tuple[str, ...]], str, tuple, str]:
    dtype = _check_dtype("attention_pagerank", dtype)
    if iterations < 0:
        raise OpInputError(f"attention_pagerank: iterations must be >= 0, got {iterations}")
    comment = (f"iterations={iterations}, cls_weight={bool(cls_weight)}, dtype={dtype}",
               ("s = launch(probs, real): per head, s <- A^T s from a uniform start over the n real tokens",
                "  (the first token's start x sqrt(n) with cls_weight); pads hold 0."))
    constants = (f"ITERATIONS = {int(iterations)}\n"
                 f"CLS_WEIGHT = {bool(cls_weight)}\n"
                 f"DTYPE = torch.{dtype}\n")
    functions = (attention_pagerank_kernel, _check_pagerank, _pagerank_blocks, _pagerank_launch)
    return comment, constants, functions, _PAGERANK_LAUNCH.format(dtype=dtype, iterations=int(iterations),
                                                                  cls_weight=bool(cls_weight))


_EMITTERS = {"bipartite_match": _emit_match, "merge_tokens": _emit_merge, "attention_pagerank": _emit_pagerank}


def emit_source(op: str, **specialisation) -> str:
    """Standalone Python source of one op's kernel plus its ``launch(...)``, specialised to:

    - ``op="bipartite_match"``: ``dtype``, ``channels`` (C of the metric) → ``launch(metric, role)``;
    - ``op="merge_tokens"``: ``dtype``, ``channels`` (C of x) → ``launch(x, size, assign, r)``;
    - ``op="attention_pagerank"``: ``dtype``, ``iterations``, ``cls_weight`` → ``launch(probs, real)``.

    ``dtype`` is a torch dtype name: ``"float32"``, ``"float16"`` or ``"bfloat16"``. Token
    counts are not specialised: block sizes follow N at launch."""
    if op not in _EMITTERS:
        raise OpInputError(f"token_reduce: op must be one of {tuple(_EMITTERS)}, got {op!r}")
    (specialised_to, notes), constants, functions, launch = _EMITTERS[op](**specialisation)
    return emit(op, __name__, specialised_to, notes, constants, functions, launch)
