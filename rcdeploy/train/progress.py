"""Terminal rendering of training progress (rich): a bar per epoch with img/s and loss, one line per epoch."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rcdeploy.train.loop import Reporter


class RichReporter(Reporter):
    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:>7.0f} img/s  loss {task.fields[loss]:.3f}"),
                                 TimeElapsedColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)
        self.task = None
        self.images = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> RichReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, batches: int, skip: int = 0) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"epoch {epoch + 1}/{epochs}", total=batches, completed=skip,
                                           rate=0.0, loss=float("nan"))
        self.images, self.t0 = 0, time.perf_counter()

    def batch(self, loss: float, images: int) -> None:
        self.images += images
        rate = self.images / max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(self.task, advance=1, rate=rate, loss=loss)

    def end_epoch(self, m: dict[str, Any]) -> None:
        sp = m.get("sparsity") or {}
        sparsity = f"  channels removed {sp['channel_sparsity'] * 100:.0f}%" if "channel_sparsity" in sp else ""
        self.console.print(
            f"epoch {m['epoch']:>3}  loss {m['train_loss']:.3f}  train {m['train_acc']:5.1f}%  "
            f"val clean {m['val_clean_acc']:5.1f}%  {m['val_attack']} {m['val_robust_acc']:5.1f}%  "
            f"{m['img_per_s']:6.0f} img/s  lr {m['lr']:.4f}  [{m['phase']}]{sparsity}")
