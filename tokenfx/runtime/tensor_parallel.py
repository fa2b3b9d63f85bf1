"""Tensor-parallel runtime: the process group a ``Generator(model, tp=N)`` runs in, and the
local launcher that starts its ranks.

::

    # N local ranks started by tokenfx (what ``tokenfx generate MODEL --tp N`` does)
    results = launch(work, 2, prompt)          # work(prompt) runs in each rank; results by rank
    # or inside ranks someone else started (torchrun --nproc-per-node N ..., or your own group)
    init_process_group()                       # from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    Generator(model, tp=N).generate(ids, max_new_tokens=64)

Launcher: torch's elastic launcher API (``torch.distributed.launcher.api.elastic_launch``),
the library form of ``torchrun``, rather than ``torch.multiprocessing.spawn``: its workers get
exactly the environment torchrun gives them (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), so one code path serves ``--tp N`` and torchrun; its agent
watches the workers and, when one fails, stops the others and reports which rank failed with
that rank's own error (``@record``) — the "a rank dies, the rest must not hang" contract,
kept by the component torch maintains for it. ``spawn`` would leave both to us.

Backend: ``gloo`` on CPU; with CUDA, ``"cpu:gloo,cuda:nccl"`` (collectives on CUDA tensors go
through NCCL, on CPU tensors through gloo) and each rank on ``cuda:LOCAL_RANK``.

Device rule (:func:`check_devices`): with CUDA, ``tp <= torch.cuda.device_count()`` (one GPU
per rank); on CPU, ``tp <=`` the cores this process may run on (``os.sched_getaffinity``): a
rank blocked in an all-reduce spins, so two ranks on one core slow each other down instead of
splitting the work. Each CPU rank then uses ``cores // tp`` threads.

No hang: every group gets a timeout (``TOKENFX_TP_TIMEOUT`` seconds, default 300) that bounds
each collective; under the launcher a failed rank stops the others at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import tempfile
import uuid

import torch

from tokenfx.errors import TensorParallelError

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def timeout_s() -> float:
    """Seconds a collective may wait for its peers before the rank fails (``TOKENFX_TP_TIMEOUT``)."""
    return float(os.environ.get("TOKENFX_TP_TIMEOUT", "300"))


@dataclasses.dataclass(frozen=True)
class Rank:
    """Where a Generator runs: ``world_size`` ranks, this one ``rank`` (``1, 0``: no tensor parallel)."""

    world_size: int = 1
    rank: int = 0

    @property
    def key(self) -> str:
        """Part of the compile-cache key: each rank compiles its own shard."""
        return "" if self.world_size == 1 else f":tp{self.world_size}.{self.rank}"


def rank_of(tp) -> Rank:
    """The :class:`Rank` of ``Generator(tp=N)``: ``N == 1`` is no tensor parallel; ``N > 1`` needs
    an initialised default process group of ``N`` ranks (the rank is the group's)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise TensorParallelError(f"tp must be a positive number of ranks, got {tp!r}")
    if tp == 1:
        return Rank()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise TensorParallelError(f"Generator(tp={tp}) runs inside a process group of {tp} ranks, and none is "
                                  f"initialised: start it with `tokenfx generate MODEL --tp {tp}`, `torchrun "
                                  f"--nproc-per-node {tp} ...` + tokenfx.runtime.tensor_parallel.init_process_group(), "
                                  "or torch.distributed.init_process_group")
    world = dist.get_world_size()
    if world != tp:
        raise TensorParallelError(f"Generator(tp={tp}) but the process group has {world} ranks; tp must equal the "
                                  "world size")
    return Rank(world, dist.get_rank())


def launched() -> bool:
    """Is this process a rank that a launcher (torchrun, :func:`launch`) started?"""
    return all(name in os.environ for name in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def check_devices(tp: int) -> None:
    """Refuse ``tp`` larger than the devices (module docstring: one GPU, or at least one core, per rank)."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if tp > count:
            raise TensorParallelError(f"--tp {tp} needs {tp} GPUs (one per rank); torch.cuda.device_count() is "
                                      f"{count}")
        return
    cores = usable_cores()
    if tp > cores:
        raise TensorParallelError(f"--tp {tp} on CPU needs at least {tp} cores (one per rank); this process may use "
                                  f"{cores}")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), the CPU ranks' limit."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def init_process_group(timeout: float | None = None) -> Rank:
    """Join the default process group from the launcher's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``; ``LOCAL_RANK`` picks the GPU); a no-op when one is
    initialised. Collectives time out after ``timeout`` seconds (default :func:`timeout_s`)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return Rank(dist.get_world_size(), dist.get_rank())
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise TensorParallelError(f"no launcher environment ({', '.join(missing)} unset): start the ranks with "
                                  "`tokenfx generate MODEL --tp N` or `torchrun --nproc-per-node N`")
    world = int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        backend = "gloo"
        torch.set_num_threads(max(1, usable_cores() // world))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout or timeout_s()))
    return Rank(world, dist.get_rank())


# -- lockstep: every rank must make the same choices -------------------------------------------------
def shared_seed(rank: Rank, seed: int | None) -> int | None:
    """The sampling seed every rank uses: ``seed`` itself, or (``None``) one drawn on rank 0 and
    broadcast, so the ranks' draws agree (their logits are the same all-reduced values)."""
    if rank.world_size == 1 or seed is not None:
        return seed
    import torch.distributed as dist

    drawn = torch.randint(0, 2 ** 62, (1,), dtype=torch.long)
    dist.broadcast(drawn, src=0)
    return int(drawn)


LOCKSTEP_DRAFTERS = ("recycling", "lookup")


def check_lockstep(speculate, early_exit) -> None:
    """Refuse decoding whose choices are not the same on every rank. Token Recycling and prompt
    lookup draft from the tokens alone (the same on every rank); self-speculation, adapters and
    dynamic draft models pick depths from their own timings, early exit from per-layer
    confidences of pieces of the graph that are not sharded."""
    if early_exit is not None:
        raise TensorParallelError("early_exit does not run tensor-parallel (its exit pieces of the graph are not "
                                  "sharded); decode without it, or with speculate='recycling' / 'lookup'")
    if speculate is None or not isinstance(speculate, str):
        return  # a Drafter object: its author vouches that it drafts from the tokens alone
    if speculate.partition(":")[0] not in LOCKSTEP_DRAFTERS:
        raise TensorParallelError(f"speculate={speculate!r} does not run tensor-parallel (its drafts need not be the "
                                  f"same on every rank); use one of {', '.join(LOCKSTEP_DRAFTERS)}")


def agreed(rank: Rank, tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` after checking that every rank produced the same (one all-gather of the
    ``[B, T]`` ids). Ranks disagreeing means they were given different prompts or options."""
    if rank.world_size == 1:
        return tokens
    import torch.distributed as dist

    shape = torch.tensor(tokens.shape, dtype=torch.long)
    shapes = [torch.empty_like(shape) for _ in range(rank.world_size)]
    dist.all_gather(shapes, shape)  # first the shapes: ranks that stopped at other lengths differ already
    differ = [r for r, s in enumerate(shapes) if not torch.equal(s, shapes[0])]
    if not differ:
        gathered = [torch.empty_like(tokens) for _ in range(rank.world_size)]
        dist.all_gather(gathered, tokens.contiguous())
        differ = [r for r, t in enumerate(gathered) if not torch.equal(t, gathered[0])]
    if differ:
        raise TensorParallelError(f"tensor parallel: rank(s) {differ} generated other tokens than rank 0; every rank "
                                  "must get the same input_ids, attention_mask and options")
    return tokens


def agreed_costs(rank: Rank, costs: dict) -> dict:
    """A measured cost curve every rank shares (the max over ranks): decisions sized from it
    (tree budgets) then agree."""
    if rank.world_size == 1 or not costs:
        return costs
    import torch.distributed as dist

    keys = sorted(costs)
    values = torch.tensor([costs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(keys, values.tolist()))


# -- the local launcher ------------------------------------------------------------------------------
def launch(fn, tp: int, *args, timeout: float | None = None) -> list:
    """Run ``fn(*args)`` in ``tp`` local ranks (torch's elastic launcher, module docstring), each
    inside an initialised default group; returns their results by rank. ``fn`` must be a
    module-level function (ranks are spawned processes). A rank that fails stops the others and
    raises :class:`TensorParallelError` naming it and its error."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_devices(tp)
    logs = tempfile.TemporaryDirectory(prefix="tokenfx-tp-")  # the ranks' error files, read on failure
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=tp, run_id=f"tokenfx-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=logs.name))
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the agent logs each failure's traceback; the error below names it once
    try:
        results = elastic_launch(config, _rank_main)(fn, args, timeout)
    except ChildFailedError as exc:
        rank, reason = _first_failure(exc.failures)
        raise TensorParallelError(f"tensor parallel: rank {rank} of {tp} failed ({reason}); the other ranks "
                                  "were stopped") from None
    finally:
        quiet.setLevel(level)
        logs.cleanup()
    return [results[r] for r in range(tp)]


def _rank_main(fn, args, timeout):
    """One launched rank: join the group, run ``fn``, leave the group."""
    from torch.distributed.elastic.multiprocessing.errors import record

    @record  # the failure (and its traceback) reaches the launcher's ChildFailedError
    def run():
        import torch.distributed as dist

        init_process_group(timeout)
        # a failure leaves the group up: tearing it down before this rank's error is on file would
        # fail the peers first, and the earliest error on file is taken as the cause
        result = fn(*args)
        dist.destroy_process_group()
        return result

    return run()


def _first_failure(failures: dict) -> tuple[int, str]:
    """``(rank, its error)`` of the rank that failed first: the cause (the ranks after it lost
    their peer mid-collective). The agent reports the first exit it sees, which may be such a
    peer, so every rank's error file (``@record``, one folder per local rank beside the
    reported one) is read and the earliest taken."""
    import json
    from pathlib import Path

    found, reported = [], []
    for rank, failure in failures.items():
        reported.append((failure.timestamp, rank, _message(failure.message) or f"exit code {failure.exitcode}"))
        attempt = Path(failure.error_file).parent.parent if failure.error_file else None
        for path in sorted(attempt.glob("*/error.json")) if attempt is not None and attempt.is_dir() else []:
            try:  # the file's write time: the recorded timestamp counts whole seconds
                found.append((path.stat().st_mtime_ns, int(path.parent.name), _message(json.loads(path.read_text())["message"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue
    _, rank, reason = min(found or reported)
    return rank, reason


def _message(message) -> str:
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [line.strip() for line in str(message or "").splitlines() if line.strip()]
    return next((line for line in lines if "Error" in line or "Exception" in line), lines[0] if lines else "")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
