"""torch.distributed plumbing shared by train and bench: who this process is, a few collectives, the launcher.

A `World` is this process's place in a job: rank and size, and the small collectives the stages need
(sum a tensor, agree on a flag). One process is `World()` (rank 0 of 1), whose collectives are the
identity, so the stages run one code path with or without torch.distributed.

`launch(nproc, fn, *args)` runs `fn(*args)` on `nproc` local workers through torch's elastic launcher
(the engine under torchrun; rendezvous on 127.0.0.1, a free port, no restarts) and returns rank 0's
result. A `UsageError` in a worker stays a `UsageError` in the caller (one line, exit 2): the worker
writes its message to a file the launcher reads back, because the launcher reports only a failure.
Under torchrun, `World.from_env()` joins the job torchrun started.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rcdeploy.errors import UsageError, WorkerFailed

TIMEOUT_ENV = "RCDEPLOY_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks (default 1800)
_USAGE_FILE_ENV = "RCDEPLOY_USAGE_ERROR_FILE"


@dataclass(frozen=True)
class World:
    """This process's rank among `size` processes (one process: rank 0 of 1, no process group)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> World:
        """The job torchrun or `launch` started (joined on first call), else one process."""
        if job_size() < 2:
            return cls()
        if not dist.is_initialized():
            backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
            dist.init_process_group(backend, store=_attempt_store(timeout), rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        return cls(rank=dist.get_rank(), size=dist.get_world_size())

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (and return it)."""
        if self.distributed:
            _all_reduce(t, dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a stop request seen by one rank stops all at one batch)."""
        if not self.distributed:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0])
        _all_reduce(t, dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _attempt_store(timeout: datetime.timedelta) -> Any:
    """The job's key-value store (as env:// would open it), under a prefix per elastic attempt: after a
    restart (--max-restarts) the agent's store still holds the dead attempt's gloo addresses, and a rank
    that read one would try to connect to a process that is gone."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=not agent_store and int(os.environ["RANK"]) == 0,
                          timeout=timeout, multi_tenant=not agent_store)
    return dist.PrefixStore(f"rcdeploy/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _all_reduce(t: torch.Tensor, op: Any) -> None:
    """In place; nccl reduces CUDA tensors only, so a CPU tensor makes a round trip through this rank's GPU."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu, op=op)
        t.copy_(on_gpu.cpu())
    else:
        dist.all_reduce(t, op=op)


def local_device(device: torch.device) -> torch.device:
    """One GPU per rank: cuda means cuda:LOCAL_RANK inside a job."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def report_usage_error(e: UsageError) -> None:
    """Inside a launched worker: leave `e`'s message where `launch` reads it (the first rank's wins)."""
    path = os.environ.get(_USAGE_FILE_ENV)
    if path and not os.path.exists(path):
        try:
            Path(path).write_text(str(e))
        except OSError:
            pass


def _worker(fn: Callable[..., Any], args: tuple[Any, ...], filters: list[Any]) -> Any:
    warnings.filters[:] = filters  # the caller's: a spawned interpreter starts with Python's defaults
    try:
        return fn(*args)
    except UsageError as e:
        report_usage_error(e)
        raise
    finally:
        shutdown()


def _quiet_launcher_logs() -> list[tuple[logging.Logger, int]]:
    """The elastic agent logs every worker failure as a traceback on stderr; rcdeploy reports one line."""
    saved = []
    names = [n for n in logging.root.manager.loggerDict  # torch's elastic loggers each set their own level
             if n.startswith(("torch.distributed", "torch.multiprocessing"))]
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.CRITICAL)
    return saved


def _failure_line(e: Any) -> str:
    """One line for a failed job: the first failed rank, its exit code or signal, its error's last line."""
    if not e.failures:
        return f"a worker failed ({' '.join(str(e).split())[:300]})"
    rank = min(e.failures)
    failure = e.failures[rank]
    message = " ".join(str(failure.message or "").split())
    if failure.exitcode is not None and failure.exitcode < 0:
        how = f"killed by signal {-failure.exitcode}"
    else:
        how = f"exit code {failure.exitcode}"
    detail = f": {message[-300:]}" if message and "Signal" not in message else ""
    return f"worker rank {rank} of the job failed ({how}){detail}; the other ranks were stopped"


def _signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}


def launch(nproc: int, fn: Callable[..., Any], *args: Any, max_restarts: int = 0) -> Any:
    """Run `fn(*args)` on `nproc` local worker processes; rank 0's return value.

    The workers are spawned (fresh interpreters), so `fn` and `args` must be picklable: a module-level
    function and plain data. A worker that fails stops the others (the elastic agent watches them), so no
    rank is left waiting in a collective.
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with tempfile.TemporaryDirectory(prefix="rcdeploy-launch-") as tmp:
        usage_file = os.path.join(tmp, "usage-error.txt")
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"rcdeploy-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=max_restarts, monitor_interval=0.1,
            start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=os.path.join(tmp, "logs")))
        previous = os.environ.get(_USAGE_FILE_ENV)
        os.environ[_USAGE_FILE_ENV] = usage_file  # the spawned workers inherit it
        quiet, handlers = _quiet_launcher_logs(), _signal_handlers()
        try:
            results = elastic_launch(config, entrypoint=_worker)(fn, args, list(warnings.filters))
        except ChildFailedError as e:
            if os.path.exists(usage_file):
                raise UsageError(Path(usage_file).read_text()) from None
            raise WorkerFailed(_failure_line(e)) from None
        finally:
            for logger, level in quiet:
                logger.setLevel(level)
            for sig, handler in handlers.items():  # the agent leaves its own installed
                signal.signal(sig, handler)
            if previous is None:
                os.environ.pop(_USAGE_FILE_ENV, None)
            else:
                os.environ[_USAGE_FILE_ENV] = previous
        return results[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (attacks and checkpoints use it), else `model`."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def env_rank() -> int:
    """This process's global rank as the launcher set it (0 outside a job), before the process group exists."""
    return int(os.environ.get("RANK", "0")) if job_size() > 1 else 0


def job_size() -> int:
    """The number of processes of the torchrun / `launch` job this process belongs to (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
