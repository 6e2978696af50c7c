"""How the long benchmarks (flagship, seed002 --full) run their table rows: each row in its own worker process
(a crash loses that row only, its thread count is its own, a kill lets it save its checkpoint), trained by
`rcdeploy.train` into a run folder that is resumed from its last.pt and emptied when the row's settings change.
`<row>.spec.json` says what a worker does; `<row>.row.json` is written only when the row is complete; its output
also goes to `<row>.log`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common import _jsonable

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------- workers


def start_row_worker(script: str, row: str, spec: Mapping[str, Any], out: Path,
                     log: Log) -> tuple[subprocess.Popen, threading.Thread]:
    """Start `python script --worker <row>.spec.json`; returns the process and the thread copying its output."""
    spec_path = out / f"{row}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    log(f"{row}: started (log {out / (row + '.log')})")
    proc = subprocess.Popen([sys.executable, script, "--worker", str(spec_path)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, _tee(proc, out / f"{row}.log")


def _tee(proc: subprocess.Popen, log_path: Path) -> threading.Thread:
    """Copy a worker's output to its log file and to this process's stderr."""
    def pump() -> None:
        with log_path.open("a") as f:
            for line in proc.stdout:  # type: ignore[union-attr]
                f.write(line)
                f.flush()
                sys.stderr.write(line)
                sys.stderr.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def row_worker(spec_path: Path, build: Callable[[dict[str, Any], Path], dict[str, Any]]) -> int:
    """The worker's side: read the spec, set torch's threads, `build(spec, out)` the row and write
    `<row>.row.json` (atomically); on an error the traceback goes to the log and nothing is written."""
    import torch

    warnings.filterwarnings("ignore")
    spec = json.loads(spec_path.read_text())
    out = spec_path.parent
    torch.set_num_threads(spec["threads"])
    try:
        row = build(spec, out)
    except Exception:
        traceback.print_exc()
        return 1
    dest = out / f"{spec['row']}.row.json"
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_jsonable(row), indent=1) + "\n")
    tmp.replace(dest)
    return 0


# ----------------------------------------------------------------------------------------- training


def prepare_run(out: Path, row: str, train: Mapping[str, Any], log: Log, *, make_run_dir: bool = False) -> Path:
    """The row's run folder `out/runs/<row>`, emptied with the row's files (all but its log) when it holds a run
    of other settings (never resumed into). rcdeploy creates the run folder itself (it refuses an existing one);
    `make_run_dir` makes it here, for a script's own training loop."""
    run_dir, marker = out / "runs" / row, out / "runs" / f"{row}.train.json"
    if not marker.is_file() or json.loads(marker.read_text()) != train:
        if run_dir.exists():
            log(f"{row}: settings changed, starting the run afresh")
        shutil.rmtree(run_dir, ignore_errors=True)
        for p in out.glob(f"{row}.*"):  # its file, model card, bench cache, results (not its log and spec)
            if p.is_dir():
                shutil.rmtree(p)
            elif not p.name.endswith((".log", ".spec.json")):
                p.unlink()
    (run_dir if make_run_dir else run_dir.parent).mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(train, indent=1) + "\n")
    return run_dir


def run_history(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl, an entry per finished epoch ([] before the first)."""
    p = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


class EpochLines:
    """A `rcdeploy.train` reporter: one stderr line per epoch (`line(metrics)`), and one when a run resumes."""

    def __init__(self, row: str, line: Callable[[dict[str, Any]], str], log: Log) -> None:
        self.row, self.line, self.log = row, line, log

    def start_epoch(self, epoch: int, epochs: int, batches: int, skip: int = 0) -> None:
        if skip:
            self.log(f"{self.row}: epoch {epoch + 1} resumed at batch {skip}/{batches}")

    def batch(self, loss: float, images: int) -> None:
        pass

    def end_epoch(self, m: dict[str, Any]) -> None:
        self.log(self.line(m))


def train_or_resume(row: str, recipe: str, overrides: Mapping[str, Any], run_dir: Path, *, epochs: int,
                    threads: int, reporter: EpochLines, log: Log) -> Path:
    """Train one row with `rcdeploy.train` into `run_dir`, continue it from its last.pt, or leave a finished
    one as it is; a run interrupted again (Ctrl-C, SIGTERM: last.pt saved) exits 130."""
    import rcdeploy

    if len(run_history(run_dir)) >= epochs and (run_dir / "best.pt").is_file():
        log(f"{row}: training already finished in {run_dir}")
        return run_dir
    if (run_dir / "last.pt").is_file():
        log(f"{row}: resuming {run_dir}")
        res = rcdeploy.train(resume=run_dir, threads=threads, reporter=reporter)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run that stopped before its first checkpoint
        res = rcdeploy.train(recipe, out=str(run_dir.parent), name=run_dir.name, threads=threads,
                             reporter=reporter, **overrides)
    if res.interrupted:
        log(f"{row}: interrupted, last.pt saved; rerun the same command to continue")
        raise SystemExit(130)
    return run_dir
