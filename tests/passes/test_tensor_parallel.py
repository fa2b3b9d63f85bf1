"""``tensor_parallel``: each rank's graph, run in a real gloo process group of 2 (and 4) ranks
spawned on 127.0.0.1, gives the single-rank graph's logits within an fp32 tolerance;
structure (two all-reduces per block, after o and after down; local weight shapes; which
kv-heads a rank holds) is checked without a process group; bad input gets one error naming
the block and the counts. ``kv_cache`` graphs (prefill, decode with the cache written in
place or returned, and the ``tree_verify`` graph on top of decode) are sharded too: each
rank's cache input and ``new_kv`` output hold its kv-heads only (a replica when kv_heads <
world size), and its logits equal the single-rank graph's for the same cache. GPT-2's fused
c_attn (one Conv1D for q, k and v, split after it) is sharded by taking each part's columns for
the rank's heads, on the full-sequence graph and on prefill / decode kv graphs. With
``vocab_parallel`` the head computes the rank's vocabulary rows and an all-gather rebuilds the
full logits on every rank (full-sequence and decode graphs, tied and untied heads).

The spawn harness is bounded: every rank has a process-group timeout, results and errors come
back through a queue, the first rank error fails the test with that rank's traceback, and
stragglers (a rank blocked in an all-reduce its peer never joins) are killed.
"""

from __future__ import annotations

import datetime
import functools
import multiprocessing
import os
import queue as queue_module
import socket
import time
import traceback

import pytest
import torch

import tokenfx
from models import gpt2, llama, token_inputs
from tokenfx.errors import PassOptionError
from tokenfx.passes.base import PassManager, parse_pipeline, tolerance_for
from tokenfx.passes.tensor_parallel import ALL_GATHER, ALL_REDUCE, WAIT, TensorParallel

RANK_TIMEOUT_S = 60  # process group + each collective
GROUP_DEADLINE_S = 150  # a whole spawned group, imports and captures included

# (batch, tokens) the graphs run at: not the capture example, so the dynamic dims are exercised
RUN_SHAPE = (3, 11)


# -- the cases: what every rank builds -------------------------------------------------------------------
def _build(spec: tuple):
    """``(graph, inputs)`` in a rank: the .pt2 the parent captured and saved, and the case's inputs
    (``(path, "mask")``: ids + a right-padding mask; ``(path, vocab)``: ids only)."""
    path, kind = spec
    if kind == "mask":
        return tokenfx.load(path), token_inputs(*RUN_SHAPE, seed=1)
    ids = torch.randint(0, kind, RUN_SHAPE, generator=torch.Generator().manual_seed(1))
    return tokenfx.load(path), {"input_ids": ids}


def _run(graph, inputs):
    with torch.no_grad():
        out = graph.gm(**inputs) if isinstance(inputs, dict) else graph.gm(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _fail_fast_worker(rank, world):
    """A harness check: rank 1 raises while rank 0 waits in an all-reduce it never joins."""
    import torch.distributed as dist

    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")
    dist.all_reduce(torch.ones(1))
    return {}


def _compare_worker(rank, world, cases):
    """Per case: the single-rank graph's logits and this rank's TP graph's logits, compared here."""
    out = {}
    for name, spec in cases:
        graph, inputs = _build(spec)
        reference = _run(graph, inputs)
        (tp,) = parse_pipeline(f"tensor_parallel(world_size={world}, rank={rank})")
        sharded = PassManager([tp]).run(graph).graph
        logits = _run(sharded, inputs)
        error = float((logits - reference).abs().max())
        out[name] = (error, tolerance_for(reference, "exact"), tuple(logits.shape) == tuple(reference.shape))
    return out


KV_GRAPHS = {  # label: (kv_cache options, tree_verify on top)
    "prefill": (dict(mode="prefill", logits="all", max_positions=64), False),
    "decode_inplace": (dict(mode="decode", logits="all", cache_update="inplace", max_positions=64), False),
    "decode_output": (dict(mode="decode", logits="last", max_positions=64), False),
    "tree_verify": (dict(mode="decode", logits="all", cache_update="inplace", max_positions=64), True),
}


def _rank_kv_heads(layout, world: int, rank: int) -> slice:
    """The kv-heads a rank's cache holds (q head h reads kv head h // (H/KV))."""
    local = layout.heads // world
    first = rank * local // (layout.heads // layout.kv_heads)
    return slice(first, first + max(1, layout.kv_heads // world))


def _kv_compare_worker(rank, world, cases, vocab_parallel=False):
    """Per case and kv graph: the single-rank kv graph and this rank's shard run on the same
    inputs (a random cache, seeded alike on every rank; the shard gets its kv-heads of it)."""
    from tokenfx.ir.kv_layout import example_inputs
    from tokenfx.passes.kv_cache import KVCache
    from tokenfx.passes.tree_verify import TreeVerify

    from tokenfx.frontends.load import decoder_graph, load_decoder

    out = {}
    for name, labels in cases:  # captured here: a .pt2 loads without the config and LM head kv_cache needs
        models = {"qwen2_h4_kv1": lambda: _qwen2(heads=4, kv_heads=1), "gpt2": lambda: gpt2(layers=2),
                  "llama_h4_kv2": lambda: llama(layers=2, heads=4, kv_heads=2)}
        full = decoder_graph(models[name]() if name in models else load_decoder(name))
        vocab = int(full.config.vocab_size)
        for label in labels:
            options, tree = KV_GRAPHS[label]
            passes = [KVCache(**options)] + ([TreeVerify()] if tree else [])
            single = PassManager(passes).run(full).graph
            sharded = TensorParallel(world_size=world, rank=rank, vocab_parallel=vocab_parallel).run(single).graph
            args = list(example_inputs(single.kv, batch=2, tokens=4, past=5, vocab=vocab))
            heads = _rank_kv_heads(single.kv, world, rank)
            if "kv_cache" in single.kv.inputs:
                at = single.kv.inputs.index("kv_cache")
                args[at] = torch.randn(args[at].shape, generator=torch.Generator().manual_seed(3))
            local = list(args)
            if "kv_cache" in single.kv.inputs:
                local[at] = args[at][:, :, :, heads].contiguous()
                args[at] = args[at].clone()  # the in-place graphs write into it
            with torch.no_grad():
                ref_logits, ref_kv = single.gm(*args)
                logits, kv = sharded.gm(*local)
            out[(name, label)] = (float((logits - ref_logits).abs().max()), tolerance_for(ref_logits, "exact"),
                                  float((kv - ref_kv[:, :, :, heads]).abs().max()), tuple(kv.shape),
                                  tuple(ref_kv.shape), (sharded.kv.heads, sharded.kv.kv_heads))
    return out


def _entry(rank, world, port, worker, args, results):
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S))
        results.put(("ok", rank, worker(rank, world, *args)))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent, then the rank exits
        results.put(("error", rank, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, worker, *args, deadline_s: float = GROUP_DEADLINE_S) -> list:
    """Run ``worker(rank, world, *args)`` in ``world`` spawned gloo ranks; their results by rank.

    The first rank error raises with that rank's traceback; past ``deadline_s`` it raises too;
    either way every rank still alive is killed before returning."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, worker, args, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(got) < world:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"ranks {sorted(set(range(world)) - set(got))} of {world} did not finish "
                                     f"within {deadline_s} s")
            try:
                status, rank, value = results.get(timeout=min(left, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
                if dead:
                    raise AssertionError(f"rank {dead[0]} of {world} died (exit code {procs[dead[0]].exitcode}) "
                                         "without reporting")
                continue
            if status == "error":
                raise AssertionError(f"rank {rank} of {world} failed:\n{value}")
            got[rank] = value
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [got[r] for r in range(world)]


@functools.lru_cache(maxsize=None)
def _compared(world: int, cases: tuple) -> tuple:
    return tuple(spawn_ranks(world, _compare_worker, cases))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case captured once here (the random-init Llamas with ``tokenfx.capture``, tiny-code
    with ``load_decoder`` + its full-sequence capture) and saved as .pt2: ranks load them (a
    quarter second) instead of each importing transformers and capturing (on this shared 2-core
    machine that was most of a minute per group)."""
    from tokenfx.frontends.load import decoder_graph, load_decoder
    from tokenfx.frontends.onnx import save_pt2

    folder = tmp_path_factory.mktemp("tp")
    out = {f"llama_h4_kv{kv}": (str(save_pt2(_graph(4, kv), folder / f"llama_h4_kv{kv}.pt2")), "mask")
           for kv in (2, 1)}
    out["gpt2"] = (str(save_pt2(_gpt2_graph(), folder / "gpt2.pt2")), "mask")
    qwen2 = decoder_graph(_qwen2(heads=4, kv_heads=1))  # input_ids only: what kv_cache takes
    out["qwen2_h4_kv1"] = (str(save_pt2(qwen2, folder / "qwen2_h4_kv1.pt2")), 100)
    tiny = decoder_graph(load_decoder("tokenfx:tiny-code"))
    out["tiny_code"] = (str(save_pt2(tiny, folder / "tiny_code.pt2")), int(tiny.config.vocab_size))
    return out


# -- numerics in a real process group ------------------------------------------------------------------
TWO_RANK_CASES = ("llama_h4_kv2",  # kv-heads split across the ranks (one each)
                  "llama_h4_kv1",  # kv_heads < world size: the one kv-head replicated
                  "qwen2_h4_kv1",  # q/k/v biases (sliced with their rows), one kv-head replicated
                  "tiny_code",  # trained, 8 heads / 2 kv-heads, 6 blocks, tied head
                  "gpt2")  # fused c_attn (Conv1D, addmm), learned positions, LayerNorms, biases, tied head


@pytest.mark.parametrize("name", TWO_RANK_CASES)
def test_two_ranks_give_the_single_rank_logits(name, saved):
    cases = tuple(sorted(saved.items()))
    for rank, by_case in enumerate(_compared(2, cases)):
        error, tol, same_shape = by_case[name]
        assert same_shape, f"rank {rank}: logits shape changed"
        assert error <= tol, f"{name} rank {rank}: |tp - single| = {error:.3g} > {tol:.3g}"


# (case, kv graphs): the random-init Qwen2 (kv_heads 1 < 2 ranks) in each kind of kv graph (the
# tree graph is decode with the cache written in place, plus a tree mask); tiny-code's prefill
# and decode graphs are compared in tests/runtime/test_tp_generate.py, where the Generator
# builds them anyway
KV_CASES = (("qwen2_h4_kv1", ("prefill", "decode_output", "tree_verify")),
            ("gpt2", ("prefill", "decode_output")))  # the fused c_attn's k and v parts written to the cache


@functools.lru_cache(maxsize=None)
def _kv_compared() -> tuple:
    return tuple(spawn_ranks(2, _kv_compare_worker, KV_CASES))


@pytest.mark.parametrize("name, label", [(name, label) for name, labels in KV_CASES for label in labels])
def test_kv_cache_graphs_shard_their_cache_and_give_the_single_rank_logits(name, label):
    for rank, by_graph in enumerate(_kv_compared()):
        logits_error, tol, kv_error, kv_shape, ref_kv_shape, (heads, kv_heads) = by_graph[(name, label)]
        assert logits_error <= tol, f"{name} {label} rank {rank}: |tp - single| = {logits_error:.3g} > {tol:.3g}"
        assert kv_error <= tol, f"{name} {label} rank {rank}: new K/V differ by {kv_error:.3g}"
        expected_kv_heads = max(1, ref_kv_shape[3] // 2)
        assert kv_shape == ref_kv_shape[:3] + (expected_kv_heads,) + ref_kv_shape[4:], (kv_shape, ref_kv_shape)
        assert kv_heads == expected_kv_heads


def test_four_ranks_replicate_the_one_kv_head(saved):
    """heads 4 / kv_heads 1 on 4 ranks: one q head per rank, every rank holds the kv-head."""
    results = _compared(4, (("llama_h4_kv1", saved["llama_h4_kv1"]),))
    for rank, by_case in enumerate(results):
        error, tol, _ = by_case["llama_h4_kv1"]
        assert error <= tol, f"rank {rank}: |tp - single| = {error:.3g} > {tol:.3g}"


def test_a_failing_rank_fails_the_test_and_the_waiting_rank_is_killed():
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 of 2 failed:(.|\n)*rank 1 failed on purpose"):
        spawn_ranks(2, _fail_fast_worker, deadline_s=60)
    assert time.monotonic() - start < 60


# -- structure, without a process group -------------------------------------------------------------------
def _qwen2(heads: int, kv_heads: int):
    import transformers

    from models import randomize_

    cfg = transformers.Qwen2Config(vocab_size=100, hidden_size=heads * 8, intermediate_size=heads * 16,
                                   num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return randomize_(transformers.Qwen2ForCausalLM(cfg), 0)


@functools.lru_cache(maxsize=None)
def _graph(heads: int, kv_heads: int):
    return tokenfx.capture(llama(layers=2, heads=heads, kv_heads=kv_heads), token_inputs(2, 7))


def _weight(graph, projection) -> torch.Tensor:
    from tokenfx.ir import aten as A

    _, w = A.linear_input_weight(projection)
    obj = graph.gm
    for part in A.skip_views(w).target.split("."):
        obj = getattr(obj, part)
    return obj


def _reduced_projection(node):
    """The projection an all_reduce sums (its input)."""
    return node.args[0]


def test_two_all_reduces_per_block_after_o_and_down():
    graph = _graph(4, 2)
    sharded = TensorParallel(world_size=2, rank=1).run(graph).graph
    blocks = sharded.structure.blocks
    assert sharded.count(ALL_REDUCE) == 2 * len(blocks) == sharded.count(WAIT)
    for block in blocks:
        a = block.attention[0]
        reduced = {_reduced_projection(n) for n in block.nodes if n.target is ALL_REDUCE}
        assert reduced == {a.o_proj, block.mlp[-1]}, block.name
        for r in (a.o_proj, block.mlp[-1]):  # the residual add reads the wait, not the partial sum
            (all_reduce,) = [u for u in r.users if u.target is ALL_REDUCE]
            (wait,) = all_reduce.users
            assert wait.target is WAIT and any(u in block.residual_adds for u in wait.users)
    assert sharded.count(torch.ops.aten.linear.default) == graph.count(torch.ops.aten.linear.default)


def test_projection_weights_have_the_local_shapes():
    graph = _graph(4, 2)  # hidden 32, head_dim 8, MLP width 64
    sharded = TensorParallel(world_size=2, rank=0).run(graph).graph
    for block in sharded.structure.blocks:
        a = block.attention[0]
        assert (a.heads, a.kv_heads, a.head_dim) == (2, 1, 8)
        assert _weight(sharded, a.q_proj).shape == (16, 32)
        assert _weight(sharded, a.k_proj).shape == (8, 32) == _weight(sharded, a.v_proj).shape
        assert _weight(sharded, a.o_proj).shape == (32, 16)
        gate, up, down = block.mlp
        assert _weight(sharded, gate).shape == (32, 32) == _weight(sharded, up).shape
        assert _weight(sharded, down).shape == (32, 32)
    # the rank keeps its shards only: the full weights stay with the caller's graph
    full = sum(p.numel() for p in graph.gm.parameters())
    assert sum(p.numel() for p in sharded.gm.parameters()) < full


@pytest.mark.parametrize("world, kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_ranks_hold_their_heads_and_share_kv_heads(world, kv_heads):
    """q rows of the ranks concatenate to the full weight; k rows are the kv-head each rank's
    q heads read (q head h reads kv head h // (heads / kv_heads))."""
    graph = _graph(4, kv_heads)
    a0 = graph.structure.blocks[0].attention[0]
    full_q, full_k = _weight(graph, a0.q_proj), _weight(graph, a0.k_proj)
    qs, ks = [], []
    for rank in range(world):
        a = TensorParallel(world_size=world, rank=rank).run(graph).graph
        attn = a.structure.blocks[0].attention[0]
        qs.append(_weight(a, attn.q_proj))
        ks.append(_weight(a, attn.k_proj))
    assert torch.equal(torch.cat(qs), full_q)
    group, local = 4 // kv_heads, 4 // world
    for rank, k in enumerate(ks):
        first_kv = rank * local // group
        expected = full_k[first_kv * 8:(first_kv * 8 + k.shape[0])]
        assert k.shape[0] == 8 * max(1, kv_heads // world)
        assert torch.equal(k, expected), f"rank {rank}"


def test_the_rank_graph_exports():
    graph = _graph(4, 1)
    sharded = TensorParallel(world_size=2, rank=1).run(graph).graph
    ep = torch.export.export(sharded.gm, (), dict(graph.example_kwargs), strict=False)
    targets = [n.target for n in ep.graph.nodes]
    assert targets.count(ALL_REDUCE) == 4 and targets.count(WAIT) == 4


def test_the_pipeline_syntax_reaches_it():
    (p,) = parse_pipeline("tensor_parallel(world_size=4, rank=3)")
    assert isinstance(p, TensorParallel) and (p.options.world_size, p.options.rank) == (4, 3)
    assert not p.options.vocab_parallel
    (p,) = parse_pipeline("tensor_parallel(world_size=2, rank=1, vocab_parallel=true)")
    assert p.options.vocab_parallel
    with pytest.raises(PassOptionError, match=r"rank must be in \[0, 2\), got 2"):
        parse_pipeline("tensor_parallel(world_size=2, rank=2)")


def test_world_size_one_leaves_the_graph_unsharded():
    graph = _graph(4, 2)
    same = TensorParallel(world_size=1, rank=0).run(graph).graph
    assert same.count(ALL_REDUCE) == 0
    assert torch.equal(_run(same, graph.example_kwargs), _run(graph, graph.example_kwargs))


# -- bad input ---------------------------------------------------------------------------------------------
def test_heads_not_divisible_name_the_block_and_counts():
    with pytest.raises(PassOptionError, match=r"block model\.layers\.0 has 4 attention heads, not divisible by "
                                              r"world_size=3"):
        TensorParallel(world_size=3, rank=0).run(_graph(4, 2))


def test_kv_heads_that_ranks_cannot_share_are_refused():
    graph = tokenfx.capture(llama(layers=1, heads=6, kv_heads=3), token_inputs(2, 7))
    with pytest.raises(PassOptionError, match=r"block model\.layers\.0 has 3 kv-heads for world_size=2"):
        TensorParallel(world_size=2, rank=0).run(graph)


# -- fused QKV (GPT-2's c_attn) ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _gpt2_graph():
    return tokenfx.capture(gpt2(layers=2), token_inputs(2, 7))  # hidden 32: 4 heads × 8, MLP width 128


@pytest.mark.parametrize("world", [2, 4])
def test_gpt2_fused_qkv_keeps_each_ranks_q_k_v_columns(world):
    """Rank r's c_attn weight [C, 3·C/W] (and bias) is its heads' columns of q, of k and of v side by
    side; the split after it cuts C/W per part; c_fc is cut by columns, c_proj by rows (Conv1D
    weights are [in, out]); each block all-reduces twice."""
    graph = _gpt2_graph()
    full = graph.structure.blocks[0].attention[0]
    w, b = _weight(graph, full.q_proj), full.q_proj.args[0]
    w_bias = graph.gm.get_parameter(b.target)
    c, local = 32, 32 // world
    for rank in range(world):
        sharded = TensorParallel(world_size=world, rank=rank).run(graph).graph
        block = sharded.structure.blocks[0]
        a = block.attention[0]
        assert (a.heads, a.kv_heads, a.head_dim) == (4 // world, 4 // world, 8)
        cols = [part * c + rank * local + i for part in range(3) for i in range(local)]
        assert torch.equal(_weight(sharded, a.q_proj), w[:, cols])
        assert torch.equal(sharded.gm.get_parameter(a.q_proj.args[0].target), w_bias[cols])
        (split,) = [n for n in block.nodes if n.target is torch.ops.aten.split.Tensor]
        assert split.args[1] == local
        fc, proj = block.mlp
        assert _weight(sharded, fc).shape == (32, 128 // world) and _weight(sharded, proj).shape == (128 // world, 32)
        assert _weight(sharded, a.o_proj).shape == (local, 32)
        assert sharded.count(ALL_REDUCE) == 2 * len(sharded.structure.blocks) == sharded.count(WAIT)


# -- vocab-parallel head -----------------------------------------------------------------------------------
VOCAB_CASES = ("llama_h4_kv2",  # untied head, vocabulary 100 → 50 rows per rank
               "tiny_code")  # trained, tied head: the embedding keeps the full table, the head its rows
VOCAB_KV_CASES = (("llama_h4_kv2", ("decode_output", "decode_inplace")),)


def _vocab_worker(rank, world, cases, kv_cases):
    """One spawned group for both: full-sequence graphs and kv_cache decode graphs, vocab-parallel.
    The graphs are captured here, not loaded from .pt2: a loaded graph's ModelMap finds no head
    (its final norm ends before the norm weight's multiply, so the head's input is not the norm
    output), and the head is what this shards."""
    from tokenfx.frontends.load import decoder_graph, load_decoder

    out = {}
    for name in cases:
        if name == "llama_h4_kv2":
            graph, inputs = tokenfx.capture(llama(layers=2, heads=4, kv_heads=2), token_inputs(2, 7)), \
                token_inputs(*RUN_SHAPE, seed=1)
        else:
            graph = decoder_graph(load_decoder(f"tokenfx:{name.replace('_', '-')}"))
            vocab = int(graph.config.vocab_size)
            inputs = {"input_ids": torch.randint(0, vocab, RUN_SHAPE, generator=torch.Generator().manual_seed(1))}
        reference = _run(graph, inputs)
        sharded = TensorParallel(world_size=world, rank=rank, vocab_parallel=True).run(graph).graph
        logits = _run(sharded, inputs)
        out[name] = (float((logits - reference).abs().max()), tolerance_for(reference, "exact"),
                     tuple(logits.shape) == tuple(reference.shape))
    return {"full": out, "kv": _kv_compare_worker(rank, world, kv_cases, True)}


@pytest.fixture(scope="module")
def vocab_compared():
    return spawn_ranks(2, _vocab_worker, VOCAB_CASES, VOCAB_KV_CASES)


@pytest.mark.parametrize("name", VOCAB_CASES)
def test_vocab_parallel_head_gives_every_rank_the_single_rank_logits(name, vocab_compared):
    for rank, by_kind in enumerate(vocab_compared):
        error, tol, same_shape = by_kind["full"][name]
        assert same_shape, f"rank {rank}: logits shape changed"
        assert error <= tol, f"{name} rank {rank}: |tp - single| = {error:.3g} > {tol:.3g}"


@pytest.mark.parametrize("name, label", [(name, label) for name, labels in VOCAB_KV_CASES for label in labels])
def test_vocab_parallel_decode_graphs_give_the_single_rank_logits(name, label, vocab_compared):
    for rank, by_kind in enumerate(vocab_compared):
        logits_error, tol, kv_error, kv_shape, ref_kv_shape, _ = by_kind["kv"][(name, label)]
        assert logits_error <= tol, f"{name} {label} rank {rank}: |tp - single| = {logits_error:.3g} > {tol:.3g}"
        assert kv_error <= tol and kv_shape[3] == ref_kv_shape[3] // 2, (kv_error, kv_shape, ref_kv_shape)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_head_holds_its_rows_and_gathers_once(world):
    """Rank r's head weight is rows [r·V/W, (r+1)·V/W) of the full one; one all-gather (and its
    wait) follows it; the logits keep the full vocabulary (fake shapes re-propagated)."""
    graph = _graph(4, 2)  # vocabulary 100, hidden 32
    full = _weight(graph, graph.structure.head)
    vocab, local = full.shape[0], full.shape[0] // world
    rows = []
    for rank in range(world):
        sharded = TensorParallel(world_size=world, rank=rank, vocab_parallel=True).run(graph).graph
        head = sharded.structure.head
        rows.append(_weight(sharded, head))
        assert rows[-1].shape == (local, 32)
        assert sharded.count(ALL_GATHER) == 1 and sharded.count(WAIT) == 2 * len(sharded.structure.blocks) + 1
        (gather,) = head.users
        assert gather.target is ALL_GATHER and gather.args[1] == world
        (out,) = [n for n in sharded.gm.graph.nodes if n.op == "output"]
        assert out.args[0][0].meta["val"].shape[-1] == vocab
    assert torch.equal(torch.cat(rows), full)
    plain = TensorParallel(world_size=world, rank=0).run(graph).graph
    assert plain.count(ALL_GATHER) == 0 and _weight(plain, plain.structure.head).shape == full.shape


def test_vocab_parallel_rank_graph_exports():
    graph = _graph(4, 2)
    sharded = TensorParallel(world_size=2, rank=1, vocab_parallel=True).run(graph).graph
    ep = torch.export.export(sharded.gm, (), dict(graph.example_kwargs), strict=False)
    assert [n.target for n in ep.graph.nodes].count(ALL_GATHER) == 1


def test_vocab_not_divisible_names_the_head_and_counts():
    graph = tokenfx.capture(llama(layers=1, heads=8, kv_heads=8), token_inputs(2, 7))  # blocks split 8 ways
    with pytest.raises(PassOptionError, match=r"head lm_head has a vocabulary of 100, not divisible by world_size=8"):
        TensorParallel(world_size=8, rank=0, vocab_parallel=True).run(graph)
    TensorParallel(world_size=8, rank=0).run(graph)  # a replicated head does not need it
