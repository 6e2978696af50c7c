"""DDP training on real torch.distributed processes over loopback (gloo): N ranks take the step that one
process with N micro-batches takes, a run moves between rank counts on resume, torchrun runs a rank,
SIGTERM stops every rank at one batch and saves, a dead rank stops the job.

Every multi-process launch runs as a subprocess under a timeout, so a hang fails the test instead of
stalling CI; the one-process references run in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import rcdeploy
from rcdeploy.train.scaleout import BatchNormAverager, batches_per_epoch, micro_slices
from tests._cli import run_cli

LAUNCH_TIMEOUT = 300  # seconds; a 2-rank run here takes ~10-20 s on 2 busy cores
# A tiny PGD run on digits with channel sparsity (group lasso, mask fixed in the last epoch), 4-bit QAT.
TINY = {"dataset": "digits", "model": "small_cnn", "bits": 4, "adv": "pgd", "eps": 0.1, "steps": 2,
        "batch_size": 32, "lr": 0.05, "val_attack": "pgd3", "val_samples": 40, "prune_channels": 0.5,
        "threads": 1, "train_samples": 200, "finetune_fraction": 0.5, "seed": 3}


def _env() -> dict[str, str]:
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", RCDEPLOY_DIST_TIMEOUT="120", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    return env


def _recipe(tmp_path: Path, **changes) -> Path:
    path = tmp_path / ("-".join(["tiny", *(f"{k}{v}" for k, v in sorted(changes.items()))]) + ".yaml")
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


def _train_cli(*args, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rcdeploy.cli", "train", *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _reference(recipe: Path, name: str, **settings) -> dict:
    """One process, two micro-batches: the run the 2-rank jobs must equal."""
    result = rcdeploy.train(recipe, out=str(recipe.parent / "runs"), name=name, micro_batches=2, **settings)
    return torch.load(result.run_dir / "last.pt", weights_only=False)


def _load(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=False)


def _assert_same_state(a: dict, b: dict, tol: float = 1e-6) -> None:
    """Every parameter and buffer (BatchNorm running statistics, quantizer scales) within `tol`."""
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    worst = max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].numel())
    assert worst <= tol, f"largest parameter/buffer difference {worst:.3g}"
    assert a["position"] == b["position"]
    assert [m["val_robust_acc"] for m in a["history"]] == [m["val_robust_acc"] for m in b["history"]]


# ------------------------------------------------------------------------------------ the step's definition


def test_micro_slices_and_batches_per_epoch():
    assert [(s.start, s.stop) for s in micro_slices(7, 2)] == [(0, 4), (4, 7)]
    assert sum(s.stop - s.start for s in micro_slices(130, 4)) == 130
    # The last partial batch is kept only if every micro-batch of it gets an image.
    assert batches_per_epoch(100, 32, 1) == 4 and batches_per_epoch(100, 32, 4) == 4
    assert batches_per_epoch(97, 32, 2) == 3


def test_batchnorm_running_stats_are_the_weighted_mean_over_micro_batches():
    """Each micro-batch starts from the step's statistics; the step ends with their n_j / B mean."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(3)
    avg = BatchNormAverager(bn, micro_batches=2)
    a, b = torch.randn(6, 3), torch.randn(2, 3) + 5
    expected = []
    for part in (a, b):
        ref = torch.nn.BatchNorm1d(3)
        ref(part)
        expected.append(ref.running_mean)
    avg.begin_step()
    for part in (a, b):
        avg.begin_micro()
        bn(part)
        avg.end_micro(len(part) / 8)
    from rcdeploy.distributed import World

    avg.end_step(World())
    torch.testing.assert_close(bn.running_mean, 0.75 * expected[0] + 0.25 * expected[1])
    assert int(bn.num_batches_tracked) == 1


class _Shard:
    """Rank `rank` of `size` without a process group: its collectives leave its own share alone, so the
    shares of all ranks can be added up here."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t


def test_validation_shards_by_chunk_and_any_split_gives_the_same_figures():
    """Each chunk's attack starts (and model noise) are seeded by the chunk alone: ranks 0 and 1 of 2, or
    0..2 of 3, each scoring their chunks, add up to what one process scores."""
    from rcdeploy.data import load_dataset
    from rcdeploy.models import create_model
    from rcdeploy.train.loop import evaluate

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_chans=1, input_size=8, mean=[0.3], std=[0.4])
    data = load_dataset("digits")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(60):  # a few clean steps: an accurate model, so the attacks have something to break
        xb, yb = data.train.x[i % 10 * 64:(i % 10 + 1) * 64], data.train.y[i % 10 * 64:(i % 10 + 1) * 64]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()
    val = data.val
    x, y = val.x[:180], val.y[:180]
    one = evaluate(model, x, y, "pgd1,square30", 0.06, seed=4, batch=8)
    for size in (2, 3):
        shares = [evaluate(model, x, y, "pgd1,square30", 0.06, seed=4, batch=8, world=_Shard(r, size))
                  for r in range(size)]
        for key in ("clean_acc", "robust_acc"):
            assert sum(s[key] for s in shares) == pytest.approx(one[key], abs=1e-9)
    assert one["clean_acc"] > 50 and one["robust_acc"] < one["clean_acc"] - 5  # the attacks did something


# ------------------------------------------------------------------------------------------- 2 ranks


@pytest.mark.parametrize("adv", ["pgd", "trades"])
def test_two_ranks_equal_one_process_with_two_micro_batches(tmp_path, adv):
    ref = _reference(_recipe(tmp_path), f"one-{adv}", epochs=2, adv=adv)
    proc = _train_cli("--config", _recipe(tmp_path), "--out", tmp_path / "runs", "--name", f"two-{adv}",
                      "--epochs", 2, "--adv", adv, "--nproc", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = _load(tmp_path / "runs" / f"two-{adv}")
    assert two["config"]["micro_batches"] == 2 and two["config"]["nproc"] == 2
    assert two["sparsity"]["channel_sparsity"] > 0.3  # the mask was fixed: sparsity was really on
    _assert_same_state(ref, two)


def test_a_one_process_run_resumes_on_two_ranks(tmp_path):
    """Stopped mid-epoch on one process, finished on 2 ranks: equal to the uninterrupted run. (The reverse,
    2 ranks stopped by SIGTERM and finished on one process, is the SIGTERM test below.)"""
    from rcdeploy.config import make_config
    from rcdeploy.train.loop import fit

    ref = _reference(_recipe(tmp_path), "ref", epochs=2)
    runs = tmp_path / "runs"
    cfg = make_config(_recipe(tmp_path), {"out": str(runs), "name": "b", "micro_batches": 2, "epochs": 2})
    assert fit(cfg, stop_at=(1, 3)).interrupted
    assert _load(runs / "b")["position"] == [1, 3]
    proc = _train_cli("--resume", runs / "b", "--nproc", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--nproc 2 overrides the run's 1" in proc.stderr
    _assert_same_state(ref, _load(runs / "b"))


def test_torchrun_runs_one_rank_each(tmp_path):
    ref = _reference(_recipe(tmp_path), "ref", epochs=1)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "rcdeploy.train", "--config", str(_recipe(tmp_path)), "--out",
                           str(tmp_path / "runs"), "--name", "tr", "--epochs", "1"],
                          env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("best (epoch 1)") == 1  # rank 0 alone reports
    _assert_same_state(ref, _load(tmp_path / "runs" / "tr"))


def test_sigterm_stops_every_rank_saves_and_resumes_exactly(tmp_path):
    runs = tmp_path / "runs"
    recipe = _recipe(tmp_path, train_samples=400)
    ref = _reference(recipe, "ref", epochs=2)
    proc = subprocess.Popen([sys.executable, "-m", "rcdeploy.cli", "train", "--config", str(recipe), "--out",
                             str(runs), "--name", "s", "--epochs", "2", "--nproc", "2"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # After the first epoch's checkpoint the run is surely inside the training loop of both ranks.
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (runs / "s" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: saved" in err
    stopped = _load(runs / "s")
    assert stopped["position"][0] >= 1 and stopped["position"] != [2, 0]
    rcdeploy.train(resume=runs / "s", nproc=1)
    _assert_same_state(ref, _load(runs / "s"))


def _workers_of(pid: int) -> list[int]:
    """The spawned worker processes of launcher `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            spawned = b"spawn_main" in (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and spawned:
            found.append(int(entry.name))
    return found


def _kill_a_worker_after_the_first_checkpoint(tmp_path: Path, *args) -> tuple[subprocess.Popen, str, float]:
    """Start a 2-rank run of 3 epochs, kill -9 one worker once last.pt exists: (process, its stderr, seconds
    from the kill to its exit)."""
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "rcdeploy.cli", "train", "--config", str(_recipe(tmp_path)),
                             "--out", str(runs), "--name", "k", "--epochs", "3", "--nproc", "2", *args],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (runs / "k" / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = _workers_of(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        t = time.monotonic()
        _, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
        elapsed = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err, elapsed


_needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the workers in Linux /proc")


@_needs_proc
def test_a_dead_worker_stops_the_job_instead_of_leaving_a_rank_waiting(tmp_path):
    """kill -9 of one rank mid-training: the other is stopped (not left in an all-reduce until the timeout),
    the command fails with one line, and the last checkpoint is whole and resumes."""
    runs = tmp_path / "runs"
    proc, err, elapsed = _kill_a_worker_after_the_first_checkpoint(tmp_path)
    assert elapsed < 60  # well below the collectives' 120 s timeout set in _env
    assert proc.returncode == 1, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "worker rank" in lines[0] and "Traceback" not in err, err[-2000:]
    assert _load(runs / "k")["position"][0] >= 1
    result = rcdeploy.train(resume=runs / "k", nproc=1)
    assert not result.interrupted and result.metrics[-1]["epoch"] == 3


@_needs_proc
def test_max_restarts_restarts_the_workers_and_they_resume_the_run_exactly(tmp_path):
    ref = _reference(_recipe(tmp_path), "ref", epochs=3)
    proc, err, _ = _kill_a_worker_after_the_first_checkpoint(tmp_path, "--max-restarts", "1")
    assert proc.returncode == 0, err[-2000:]
    assert "the job restarted (restart 1) and resumed the run" in err
    _assert_same_state(ref, _load(tmp_path / "runs" / "k"))


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "--nproc"),
    (["--nproc", "4", "--micro-batches", "2"], "above the run's 2 micro-batch"),
    (["--nproc", "2", "--micro-batches", "3"], "does not divide"),
    (["--sync-bn"], "--sync-bn needs --device cuda"),
    (["--micro-batches", "64"], "above --batch-size 32"),
])
def test_bad_scale_out_settings_are_one_line_exit_2(tmp_path, capsys, args, message):
    code, _, err = run_cli(["train", "--config", _recipe(tmp_path), "--out", tmp_path / "runs", "--epochs", 1,
                            "--device", "cpu", *args], capsys)
    assert code == 2, err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resume_on_a_rank_count_that_does_not_divide_the_micro_batches_is_refused(tmp_path, capsys):
    rcdeploy.train(_recipe(tmp_path), out=str(tmp_path / "runs"), name="r", micro_batches=4, epochs=1)
    for nproc, message in ((3, "does not divide the run's 4 micro-batches"), (8, "above the run's 4")):
        code, _, err = run_cli(["train", "--resume", tmp_path / "runs" / "r", "--epochs", 2, "--nproc", nproc],
                               capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err
