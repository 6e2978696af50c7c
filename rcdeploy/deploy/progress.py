"""The bench's progress display: a rich progress bar on stderr, or nothing.

One task per attack (in images) and one for latency; a failure leaves no half-done bars above its
error line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class _ProgressSink:
    """A rich progress bar on stderr (or nothing): one task per attack (in images) and one for latency."""

    def __init__(self, enabled: bool | Any) -> None:
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = enabled if not isinstance(enabled, bool) else Console(stderr=True)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=console, transient=False)

    def __enter__(self) -> _ProgressSink:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            if exc[0] is not None:  # a failure is one error line: no half-done bars left above it
                for tid in self._progress.task_ids:
                    self._progress.update(tid, visible=False)
            self._progress.stop()

    def task(self, description: str, total: int, unit: str = "img") -> Callable[..., None]:
        """A callback `update(advance=0, description=None)` for one task."""
        if self._progress is None:
            return lambda advance=0, description=None: None
        tid = self._progress.add_task(description, total=total, unit=unit)

        def update(advance: int = 0, description: str | None = None) -> None:
            self._progress.update(tid, advance=advance, **({"description": description} if description else {}))

        return update
