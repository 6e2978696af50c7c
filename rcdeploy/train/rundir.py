"""Run folders: created once, locked while a training writes them, never reused silently.

* A new run makes its folder with an atomic mkdir: a `--name` that exists is refused (continue it
  with `--resume`), so two runs never mix their files in one folder.
* Whoever writes a run folder holds an exclusive lock on `RUN/.lock` (flock: the kernel releases it
  when the process dies, so a killed run never leaves a stale lock); a second writer is refused.
* `runs/latest` moves to a run only once it has a checkpoint, so `rcdeploy export` never follows it
  into an empty folder.
* A new run that fails before its first checkpoint removes its folder: nothing half-made stays.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from rcdeploy.config import TrainConfig
from rcdeploy.errors import UsageError
from rcdeploy.io import check_folder_writable, clean_stray_temps, reason

LOCK_NAME = ".lock"


def run_name(cfg: TrainConfig) -> str:
    """The folder name: --name, else one derived from the settings and the time."""
    return cfg.name or "-".join(filter(None, [
        cfg.model, cfg.dataset.replace("folder:", "").replace("/", "_"), f"w{cfg.bits}", cfg.adv,
        f"p{round(cfg.prune_channels * 100)}" if cfg.prune_channels else "", datetime.now().strftime("%Y%m%d-%H%M%S")]))


def _exists_message(run_dir: Path) -> str:
    return (f"run folder {run_dir} already exists; continue it with `rcdeploy train --resume {run_dir}`, "
            "or pick another --name")


def check_new_run(cfg: TrainConfig) -> None:
    """Before any work: --out is writable and a named run's folder is free."""
    out = check_folder_writable(cfg.out, "--out")
    if cfg.name is not None and (out / cfg.name).exists():
        raise UsageError(_exists_message(out / cfg.name))


def _make_folder(cfg: TrainConfig) -> Path:
    """mkdir without exist_ok: of two runs racing for one name, exactly one gets it."""
    out = check_folder_writable(cfg.out, "--out")
    name = run_name(cfg)
    for k in range(1, 1000):
        run_dir = out / (name if k == 1 else f"{name}-{k}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            if cfg.name is not None:
                raise UsageError(_exists_message(run_dir)) from None
        except OSError as e:
            raise UsageError(f"cannot create run folder {run_dir}: {reason(e)}") from None
    raise UsageError(f"{out} already holds runs {name} to {name}-999; pass --name")


@contextmanager
def locked(run_dir: Path) -> Iterator[Path]:
    """Hold RUN/.lock for the block; another process holding it is a UsageError naming its pid."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"cannot lock run folder {run_dir}: {reason(e)}") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock, the atomic mkdir still keeps new runs apart
            pass
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"run folder {run_dir} is in use by another training (pid {holder}); wait for it to "
                             "finish or stop it, then resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        clean_stray_temps(run_dir, all_temps=True)  # we are its only writer: any temp is a dead writer's
        yield run_dir
    finally:
        os.close(fd)  # releases the flock


@contextmanager
def new_run(cfg: TrainConfig) -> Iterator[Path]:
    """Create and lock a new run folder; if the block fails before a checkpoint exists, remove the folder."""
    run_dir = _make_folder(cfg)
    try:
        with locked(run_dir):
            yield run_dir
    except BaseException:
        if not any((run_dir / n).exists() for n in ("last.pt", "best.pt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def point_latest(run_dir: Path) -> None:
    """Point OUT/latest at `run_dir` (a relative symlink, swapped atomically; a text file where no symlinks)."""
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}.link.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, latest)
    except OSError:
        tmp.unlink(missing_ok=True)
        from rcdeploy.io import atomic_write_text

        atomic_write_text(run_dir.parent / "latest.txt", str(run_dir.resolve()) + "\n")
