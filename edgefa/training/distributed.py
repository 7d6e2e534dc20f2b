"""Data-parallel host training with torch.distributed: DDP over gloo (CPU) or NCCL (one GPU a rank).

Two ways in, one worker:

    edgefa train --nproc N ...                          spawns N local worker processes
    torchrun --nproc_per_node N -m edgefa.cli train ... every process torchrun starts is a rank
                                                        (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)

`--batch-size` is the *global* batch. Every rank draws the same `batch_indices(n, batch_size,
seed, step)` batch the single-process trainer draws and takes its contiguous 1/N of it
(`train_steps(..., shard=(rank, N))`); its loss is the mean over that shard and DDP averages the
gradients over the ranks, so the world takes exactly the single-process step, under every rule:
the fa/dfa autograd functions leave their gradients in `.grad` like any other, and DDP all-reduces
those. The feedback matrices are drawn from the run's seed, so every rank draws the same ones;
`check_replicas` verifies that (and the initial weights) before training and again after it, and
DDP keeps `broadcast_buffers` on regardless.

Rank 0 evaluates (on the unwrapped module: a DDP forward is a collective), reports each epoch and
writes the run with `save_run` (the module's own state_dict, no `module.` prefixes, so `load_run`
and export work unchanged). In spawn mode the parent is a watchdog: the first worker to fail is
reported as one line (an EdgefaError: exit 2 from the CLI) and the others are terminated; every
collective has a timeout (`EDGEFA_DIST_TIMEOUT`, seconds, default 600), so nothing waits forever.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue as queue_mod
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..shared.datasets import Dataset, load_dataset, stratified_split
from ..errors import EdgefaError
from .trainer import Run, TrainConfig, pick_device, save_run, train

OnEpoch = Callable[[int, dict], None]


def timeout_s() -> float:
    return float(os.environ.get("EDGEFA_DIST_TIMEOUT", "600"))


@dataclass(frozen=True)
class WorldEnv:
    rank: int
    world: int
    local_rank: int


def torchrun_env() -> WorldEnv | None:
    """This process's place in a world torchrun (or any env:// launcher) made, else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return WorldEnv(rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def check_world(config: TrainConfig, world: int) -> None:
    """Every rank must take an equal share of the global batch; else one line, exit 2."""
    if world < 1:
        raise EdgefaError(f"--nproc must be at least 1, got {world}")
    if config.batch_size % world:
        raise EdgefaError(f"--batch-size {config.batch_size} is not divisible by {world} processes: "
                          "each process takes an equal share of the global batch")


def check_gpus(device_name: str, nproc: int) -> None:
    """NCCL takes one GPU per process: N local CUDA processes need N GPUs."""
    if pick_device(device_name).type == "cuda" and torch.cuda.device_count() < nproc:
        raise EdgefaError(f"--nproc {nproc} on CUDA needs {nproc} GPUs, found {torch.cuda.device_count()} "
                          "(NCCL takes one GPU per process; use --device cpu for gloo)")


def check_launch(config: TrainConfig, env: WorldEnv | None = None) -> None:
    """Everything that can be said before a process starts or joins a world: one line, exit 2."""
    if env is not None:
        if config.nproc not in (1, env.world):
            raise EdgefaError(f"--nproc {config.nproc} disagrees with torchrun's WORLD_SIZE {env.world}")
        check_world(config, env.world)
    else:
        check_world(config, config.nproc)
        check_gpus(config.device, config.nproc)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(name: str, local_rank: int, world: int) -> torch.device:
    """The device of this rank: `cuda:LOCAL_RANK` when the run is on CUDA, else the CPU."""
    device = pick_device(name)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise EdgefaError(f"{world} CUDA processes on this node need {local_rank + 1} GPUs, found {count} "
                          "(NCCL takes one GPU per process; use --device cpu for gloo)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@torch.no_grad()
def check_replicas(module: torch.nn.Module, when: str) -> None:
    """Raise unless every parameter and buffer equals rank 0's (NaN where it has NaN) on every rank."""
    differ = []
    for name, value in module.state_dict().items():
        mine = value.detach()
        if mine.dtype == torch.bool:
            mine = mine.to(torch.uint8)
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        if not ((mine == theirs) | (mine.isnan() & theirs.isnan())).all():    # a diverged run's NaNs agree
            differ.append(name)
    flag = torch.tensor([len(differ)], dtype=torch.int64, device=next(iter(module.state_dict().values())).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if differ:
        raise RuntimeError(f"{when}: {', '.join(differ[:4])}{' ...' if len(differ) > 4 else ''} "
                           f"differ from rank 0's on rank {dist.get_rank()}")
    if flag.item():
        raise RuntimeError(f"{when}: the replicas on another rank differ from rank 0's")


class DDPReplicas:
    """`trainer.train`'s hooks for one rank of an initialized process group."""

    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        # DDP's defaults: parameters and buffers broadcast from rank 0 at construction, buffers again
        # before every forward (the argument that says so, broadcast_buffers, is deprecated in newer torch)
        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def mean_loss(self, losses: list[float], device: torch.device) -> float:
        # the mean over whole batches (equal shards: the mean of the ranks' means), on every rank
        summed = torch.tensor(losses, dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        return float(np.mean(summed.cpu().numpy() / self.world))

    check = staticmethod(check_replicas)

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": dist.get_backend()}


def train_rank(config: TrainConfig, device: torch.device, on_epoch: OnEpoch | None = None,
               data: Dataset | None = None) -> Run:
    """This rank's share of `train(config)` in an initialized process group: the same steps, the
    same metrics on rank 0 (the other ranks neither evaluate nor report)."""
    replicas = DDPReplicas()
    full = data if data is not None else load_dataset(config.dataset)
    n_train = len(stratified_split(full, config.test_fraction, config.seed)[0])
    global_batch = min(config.batch_size, n_train)
    if global_batch % replicas.world:
        raise EdgefaError(f"the global batch ({global_batch} samples: the whole training set) is not "
                          f"divisible by {replicas.world} processes")
    run = train(config, on_epoch, full, replicas=replicas, device=device)
    run.metrics = {**run.metrics, "batch_per_process": global_batch // replicas.world}
    run.config = dataclasses.replace(config, nproc=replicas.world)
    return run


def run_jobs(jobs: list[tuple[TrainConfig, Path]], env: WorldEnv,
             on_epoch: Callable[[int, int, dict], None] | None = None,
             on_done: Callable[[int, dict, Path], None] | None = None,
             data: Dataset | None = None) -> list[tuple[dict, Path]]:
    """Join the world `env` describes (MASTER_ADDR/MASTER_PORT from the environment), train every
    job in turn, rank 0 writing each run; leave the world. Returns (metrics, checkpoint path) per
    job on rank 0, [] elsewhere. `on_epoch(job, epoch, row)` and `on_done(job, metrics, path)` are
    called on rank 0 only."""
    device = rank_device(jobs[0][0].device, env.local_rank, env.world)
    for config, _ in jobs[1:]:
        if rank_device(config.device, env.local_rank, env.world) != device:
            raise EdgefaError("every run of one process group must be on the same device")
    dist.init_process_group(backend_for(device), init_method="env://", rank=env.rank, world_size=env.world,
                            timeout=timedelta(seconds=timeout_s()))
    results = []
    try:
        for i, (config, out) in enumerate(jobs):
            report = (lambda epoch, row, i=i: on_epoch(i, epoch, row)) if on_epoch and env.rank == 0 else None
            run = train_rank(config, device, report, data)
            if env.rank == 0:
                path = save_run(run, out)
                results.append((run.metrics, path))
                if on_done:
                    on_done(i, run.metrics, path)
        # nobody leaves before rank 0 has written every run
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()
    finally:
        dist.destroy_process_group()
    return results


def train_distributed(config: TrainConfig, out: str | os.PathLike, on_epoch: OnEpoch | None = None,
                      env: WorldEnv | None = None, data: Dataset | None = None) -> tuple[dict, Path] | None:
    """Train one run data-parallel. With `env` (this process is a rank torchrun started), train this
    rank: (metrics, checkpoint path) on rank 0, None on the others. Without, spawn `config.nproc`
    local workers and wait for them: (metrics, checkpoint path)."""
    check_launch(config, env)
    if env is not None:
        config = dataclasses.replace(config, nproc=env.world)
        results = run_jobs([(config, Path(out))], env, data=data,
                           on_epoch=(lambda _, epoch, row: on_epoch(epoch, row)) if on_epoch else None)
        return results[0] if results else None
    return spawn([(config, Path(out))], config.nproc, data=data,
                 on_epoch=(lambda _, epoch, row: on_epoch(epoch, row)) if on_epoch else None)[0]


# --- spawn mode -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, EdgefaError) else f"{type(exc).__name__}: {exc}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _worker(rank: int, world: int, port: int, jobs, data: Dataset | None, messages, threads: int) -> None:
    """One spawned rank: everything it has to say goes through `messages`; it prints nothing."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    code = 0
    try:
        run_jobs(jobs, WorldEnv(rank, world, rank), data=data,
                 on_epoch=lambda i, epoch, row: messages.put(("epoch", i, epoch, row)),
                 on_done=lambda i, metrics, path: messages.put(("done", i, metrics, str(path))))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which exits non-zero
        messages.put(("error", rank, one_line(exc)))
        code = 2 if isinstance(exc, EdgefaError) else 1
    # Everything is written and the group is gone: flush what was said and leave without the
    # interpreter's teardown (hundreds of modules that torch's determinism switch imports; tens of
    # seconds on a loaded 2-core machine).
    messages.close()
    messages.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def root_cause(failed: list[tuple[int, int]], errors: list[tuple[int, str]]) -> str:
    """'rank R: what went wrong'. A rank that died without a word (a signal, the OOM killer) comes
    first: the others' errors (a peer closed the connection) follow from it. Else the first line
    said: a rank reports before it exits, and its peers notice only after."""
    spoke = {rank for rank, _ in errors}
    for rank, code in failed:
        if rank not in spoke:
            if code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = f"signal {-code}"
                return f"rank {rank}: killed by {name}"
            return f"rank {rank}: exited with status {code}"
    rank, line = errors[0]
    return f"rank {rank}: {line}"


def spawn(jobs: list[tuple[TrainConfig, Path]], nproc: int,
          on_epoch: Callable[[int, int, dict], None] | None = None,
          data: Dataset | None = None) -> list[tuple[dict, Path]]:
    """Run `jobs` (TrainConfig, run dir) one after another in a world of `nproc` local processes
    (gloo on the CPU, NCCL with one GPU each on CUDA; the first job's device decides). `data`: the
    jobs' dataset (one for all) already loaded, handed to every worker instead of each loading it
    again. Returns (metrics, checkpoint path) per job. A failing worker: the others are terminated
    and the line that says what went wrong (`root_cause`) is raised as an EdgefaError."""
    for config, _ in jobs:
        check_world(config, nproc)
    check_gpus(jobs[0][0].device, nproc)
    if data is not None and len({config.dataset for config, _ in jobs}) > 1:
        raise ValueError("one loaded dataset for jobs on different datasets")
    jobs = [(dataclasses.replace(config, nproc=nproc), Path(out)) for config, out in jobs]
    threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // nproc)
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, jobs, data, messages, threads), daemon=True,
                         name=f"edgefa-rank{r}") for r in range(nproc)]
    results: dict[int, tuple[dict, Path]] = {}
    errors: list[tuple[int, str]] = []

    def handle(msg) -> None:
        if msg[0] == "epoch" and on_epoch:
            on_epoch(*msg[1:])
        elif msg[0] == "done":
            results[msg[1]] = (msg[2], Path(msg[3]))
        elif msg[0] == "error":
            errors.append((msg[1], msg[2]))

    def drain(wait: float) -> None:
        end = time.monotonic() + wait
        while True:
            try:
                handle(messages.get(timeout=max(0.0, end - time.monotonic())))
            except queue_mod.Empty:
                return

    try:
        for p in procs:
            p.start()
        while True:
            drain(0.2)
            codes = [p.exitcode for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                drain(2.0)                 # the failing worker's line, if it had time to say it
                raise EdgefaError(f"distributed training failed on {root_cause(failed, errors)}")
            if all(c == 0 for c in codes):
                drain(0.5)
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
        messages.close()
    missing = [i for i in range(len(jobs)) if i not in results]
    if missing:
        raise EdgefaError(f"distributed training ended without writing run {jobs[missing[0]][1]}")
    return [results[i] for i in range(len(jobs))]
