"""Data-parallel training on torch.distributed: a step is micro-batches, shared by the ranks.

The one idea: a training step is defined by its micro-batches, not by the processes that compute them.
`--batch-size B` is the global batch; it splits into `micro_batches` G slices. Each micro-batch has its
own random stream (augmentation, attack starts, EnResNet noise), its own BatchNorm batch statistics and
its share n_j / B of the loss. One process computes the G micro-batches one after another and
accumulates their gradients; N ranks (N divides G) compute G / N each and DistributedDataParallel sums
the gradients. Both take the same step, so a run can move between 1 and N processes (resume).

BatchNorm running statistics follow the same rule: every micro-batch starts from the step's running
statistics, and the step ends with their n_j / B-weighted mean over all micro-batches (one all-reduce).
Attacks run on the unwrapped module: an attack's forward and input gradient must not enter DDP's gradient
reduction (no collectives inside attack loops). DDP is built with `broadcast_buffers=False`: TRADES runs
two forwards before one backward, which buffer broadcast turns into an in-place autograd error.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rcdeploy.distributed import World, launch, unwrap
from rcdeploy.errors import UsageError

MICRO_STRIDE = 1 << 40  # keeps micro-batch keys apart from (epoch, batch) keys


def micro_key(seed: int, epoch: int, batch: int, micro: int) -> int:
    """The seed of micro-batch `micro` of batch `batch` in `epoch`; micro 0 keeps the one-process key."""
    return (seed * 1_000_003 + epoch * 10_007 + batch + micro * MICRO_STRIDE) % (2**63 - 1)


def micro_slices(n: int, parts: int) -> list[slice]:
    """[0, n) in `parts` consecutive slices whose sizes differ by at most one (as torch.tensor_split)."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for j in range(parts):
        bounds.append(bounds[-1] + base + (j < extra))
    return [slice(bounds[j], bounds[j + 1]) for j in range(parts)]


def batches_per_epoch(n: int, batch_size: int, micro_batches: int) -> int:
    """Full batches, plus the last partial one if every micro-batch of it gets an image."""
    full, rest = divmod(n, batch_size)
    return full + (rest >= micro_batches)


def mine(world: World, micro_batches: int) -> range:
    """The micro-batch indices this rank computes: a contiguous block of G / N."""
    per = micro_batches // world.size
    return range(world.rank * per, (world.rank + 1) * per)


class BatchNormAverager:
    """Running statistics of BatchNorm layers over a step's micro-batches (see the module docstring).

    With one micro-batch it does nothing, so a one-process run updates them exactly as plain PyTorch.
    """

    def __init__(self, model: nn.Module, micro_batches: int) -> None:
        self.layers = [m for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.active = micro_batches > 1 and bool(self.layers)
        self.start: list[dict[str, torch.Tensor]] = []
        self.sums: list[torch.Tensor] = []

    def begin_step(self) -> None:
        if self.active:
            self.start = [{k: b.detach().clone() for k, b in _buffers(m).items()} for m in self.layers]
            self.sums = [torch.zeros_like(b) for m in self.layers for b in _float_buffers(m)]

    def begin_micro(self) -> None:
        if self.active:
            with torch.no_grad():
                for m, saved in zip(self.layers, self.start):
                    for k, b in _buffers(m).items():
                        b.copy_(saved[k])

    def end_micro(self, weight: float) -> None:
        if self.active:
            with torch.no_grad():
                for acc, b in zip(self.sums, (b for m in self.layers for b in _float_buffers(m))):
                    acc.add_(b, alpha=weight)

    def end_step(self, world: World) -> None:
        if not self.active:
            return
        flat = torch.cat([s.flatten() for s in self.sums])
        world.sum_(flat)
        with torch.no_grad():
            offset = 0
            for b in (b for m in self.layers for b in _float_buffers(m)):
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()


def _buffers(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: b for k, b in m.named_buffers(recurse=False) if b is not None}


def _float_buffers(m: nn.Module) -> list[torch.Tensor]:
    # num_batches_tracked is the same count after every micro-batch (each restarts from the step's value)
    return [b for b in _buffers(m).values() if b.is_floating_point()]


def wrap(model: nn.Module, world: World, device: torch.device, sync_bn: bool) -> nn.Module:
    """The module the loss's forward goes through: DDP across ranks, the model itself in one process."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **_no_buffer_sync(DistributedDataParallel))


def _no_buffer_sync(ddp: type) -> dict[str, bool]:
    """Buffers are not broadcast before each forward (newer PyTorch names it forward_sync_buffers; its
    sync at construction is harmless here: every rank built the same model)."""
    import inspect

    params = inspect.signature(ddp.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def no_sync(forward: nn.Module, last: bool):
    """DDP reduces gradients on a rank's last micro-batch only; the others accumulate locally."""
    return nullcontext() if last or forward is unwrap(forward) else forward.no_sync()


def threads_per_rank() -> int:
    """Cores shared out over the ranks of this machine (torch's default would oversubscribe them)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, (os.cpu_count() or 1) // max(1, local))


# ------------------------------------------------------------------------------------------- launching


def fit_worker(cfg_dict: dict[str, Any] | None, resume: str | None, overrides: dict[str, Any] | None,
               progress: bool) -> Any:
    """One rank of `rcdeploy train --nproc N` (spawned by `launch`): rank 0 reports progress on stderr."""
    from rcdeploy.config import config_from_dict
    from rcdeploy.train.loop import Reporter, fit

    cfg = None if cfg_dict is None else config_from_dict(cfg_dict).validate()
    reporting: Any = nullcontext(Reporter())
    if progress and int(os.environ.get("RANK", "0")) == 0:
        from rich.console import Console

        from rcdeploy.train.progress import RichReporter

        reporting = RichReporter(Console(stderr=True, soft_wrap=True))
    with reporting as reporter:
        return fit(cfg, resume=resume, overrides=overrides, reporter=reporter)


def launch_fit(cfg: Any, resume: str | Path | None, overrides: dict[str, Any] | None, nproc: int,
               progress: bool) -> Any:
    """Run the fit on `nproc` local workers; rank 0's RunResult. Checked here first, so bad input is
    one line before any worker starts; an interrupt (SIGINT/SIGTERM) stops every rank at one batch, rank 0
    saves last.pt, and this returns an interrupted RunResult."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from rcdeploy.train.loop import RunResult, prepare_launch, resumed_settings

    cfg, run_dir = prepare_launch(cfg, resume, overrides)
    try:
        restarts = (cfg or resumed_settings(resume, overrides)).max_restarts
        return launch(nproc, fit_worker, None if cfg is None else cfg.to_dict(),
                      None if resume is None else str(resume), overrides, progress, max_restarts=restarts)
    except SignalException:
        last = run_dir / "last.pt"
        if not last.is_file():
            raise KeyboardInterrupt from None
        return RunResult(run_dir=run_dir, interrupted=True, metrics=_history(last))


def _history(last: Path) -> list[dict[str, Any]]:
    from rcdeploy.train.checkpoint import load_checkpoint

    try:
        return list(load_checkpoint(last).get("history", []))
    except UsageError:
        return []
