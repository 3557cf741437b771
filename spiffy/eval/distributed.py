"""Data-parallel evaluation on torch.distributed: which rank this process is, its device, and the few collectives
an evaluation needs (docs/distributed.md).

A process started by `torchrun` or `accelerate launch` finds its rank in the environment (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); a task of a submitit job with several tasks (Hydra's SLURM launcher
with `tasks_per_node` > 1 or `nodes` > 1) gets them from submitit's environment. `join` starts the process group (gloo on CPU,
NCCL for CUDA tensors with gloo beside it for Python objects) with a timeout on every collective, so a rank that
never arrives fails the job instead of hanging it. Requests are sharded by lm-eval (document i goes to rank
i mod world_size); every exchange here is of small Python objects (statuses, graphs, per-request records).

A failure is exchanged, not hidden: `share_from_rank0` and `check_all` raise `RankFailed` naming the failing rank
and its error on every other rank, and the failing rank re-raises its own. Model weights are never exchanged.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

DEFAULT_TIMEOUT_S = (
    1800  # torch's own default for gloo; bounds every wait, including rank 0's calibration
)


class RankFailed(RuntimeError):
    """Another rank failed; the message names it and carries its error."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: `rank` of `world_size` processes, `local_rank` on its node, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_ranks() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) for a plain process."""
    values = {}
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", None)):
        raw = os.environ.get(key, default if key != "LOCAL_RANK" else os.environ.get("RANK", "0"))
        try:
            values[key] = int(raw)
        except ValueError:
            raise ValueError(f"environment {key}={raw!r} must be an integer") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(
            f"environment RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} is not a valid rank"
        )
    return rank, world, local


def export_submitit_ranks() -> None:
    """In a submitit job of several tasks, set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`
    from submitit's environment (SLURM's, or the local executor's), unless a launcher already set them."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def rank_device(device: str, local_rank: int, world_size: int) -> str:
    """The device of this rank: `cuda` becomes `cuda:<LOCAL_RANK>` (one GPU per process); CPU stays CPU."""
    if world_size == 1 or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ValueError(
            f"model.device={device!r} with {world_size} processes: pass model.device=cuda, and each process "
            "takes cuda:<LOCAL_RANK>"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK={local_rank} but this node shows {count} CUDA device(s): start at most one process per "
            "GPU (torchrun --nproc-per-node <GPUs>)"
        )
    return f"cuda:{local_rank}"


def join(device: str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """This process's `Ranks`, starting the process group when launched as one of several processes.

    Idempotent: a group already started (by an earlier job of a multirun, or by accelerate) is reused."""
    import torch.distributed as dist

    if timeout_s <= 0:
        raise ValueError(f"eval.dist_timeout_s={timeout_s} must be > 0")
    export_submitit_ranks()
    rank, world, local = launched_ranks()
    mine = rank_device(device, local, world)
    if world == 1:
        return Ranks(device=mine)
    if mine.startswith("cuda"):
        torch.cuda.set_device(torch.device(mine))
    if not dist.is_initialized():
        # objects (statuses, records) go over gloo, CPU-side; NCCL serves CUDA tensors, which evaluation never sends
        backend = "cpu:gloo,cuda:nccl" if mine.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise RuntimeError(
            f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the environment says "
            f"RANK={rank} WORLD_SIZE={world}"
        )
    return Ranks(rank, world, local, mine, timeout_s)


def describe_error(error: BaseException) -> str:
    """`Type: message` and the innermost frame: what another rank prints about this failure."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def _collective(ranks: Ranks, what: str, fn: Callable[[], Any]) -> Any:
    """`fn()`, a collective; a timeout or a lost peer becomes `RankFailed` saying what waited and for how long."""
    try:
        return fn()
    except RuntimeError as error:  # torch's DistBackendError / DistNetworkError, gloo's timeout
        raise RankFailed(
            f"rank {ranks.rank} of {ranks.world_size}: {what} did not complete on every rank within "
            f"{ranks.timeout_s:g} s (eval.dist_timeout_s) or a rank left: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}"
        ) from error


def all_gather(ranks: Ranks, obj: Any, what: str = "an exchange") -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ranks.distributed:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * ranks.world_size
    _collective(ranks, what, lambda: dist.all_gather_object(out, obj))
    return out


def gather(ranks: Ranks, obj: Any, what: str = "gathering the results") -> list | None:
    """Every rank's `obj`, in rank order, on rank 0; None elsewhere."""
    if not ranks.distributed:
        return [obj]
    import torch.distributed as dist

    out: list | None = [None] * ranks.world_size if ranks.is_main else None
    _collective(ranks, what, lambda: dist.gather_object(obj, out, dst=0))
    return out


def check_all(ranks: Ranks, what: str, error: BaseException | None) -> None:
    """Every rank reports how `what` went; if one failed, every rank raises (the failing one its own error).

    Call it on every rank at the same point, with the exception caught there (None if none)."""
    statuses = all_gather(ranks, None if error is None else describe_error(error), what)
    if error is not None:
        raise error
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        rank, status = failed[0]
        raise RankFailed(f"rank {rank} of {ranks.world_size} failed during {what}: {status}")


def checked(ranks: Ranks, what: str, fn: Callable[[], Any]) -> Any:
    """`fn()` on every rank, then `check_all`: a failure on any rank fails all of them with its error."""
    try:
        value = fn()
    except (
        Exception
    ) as error:  # KeyboardInterrupt and SystemExit leave at once; the launcher stops the rest
        check_all(ranks, what, error)
        raise
    check_all(ranks, what, None)
    return value


def share_from_rank0(ranks: Ranks, what: str, fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0 only, its value sent to every rank (e.g. the calibrated graph: calibration runs once).

    The others wait in the broadcast (bounded by the group's timeout); rank 0's error reaches them as `RankFailed`."""
    if not ranks.distributed:
        return fn()
    import torch.distributed as dist

    box: list = [None]
    error = None
    if ranks.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as caught:
            error = caught
            box[0] = ("error", describe_error(caught))
    _collective(ranks, what, lambda: dist.broadcast_object_list(box, src=0))
    if error is not None:
        raise error
    status, value = box[0]
    if status != "ok":
        raise RankFailed(f"rank 0 of {ranks.world_size} failed during {what}: {value}")
    return value


def request_order(request_id: str) -> tuple:
    """Sort key of lm-eval's `<task>:<doc_id>:<idx>` request ids within one task: document, then request."""
    _, doc, idx = request_id.rsplit(":", 2)
    return int(doc), int(idx)


def merge_in_request_order(per_rank: list[list]) -> list:
    """The single-process order of per-request records from every rank (each with a `request_id`).

    lm-eval gives rank r documents r, r + W, ...; one process sees them in document order, task by task, tasks in
    the order they were requested (the order the ranks share)."""
    tasks: list[str] = []
    for records in per_rank:
        for record in records:
            task = record.request_id.rsplit(":", 2)[0]
            if task not in tasks:
                tasks.append(task)
    merged = [r for records in per_rank for r in records]
    return sorted(
        merged,
        key=lambda r: (tasks.index(r.request_id.rsplit(":", 2)[0]), *request_order(r.request_id)),
    )
