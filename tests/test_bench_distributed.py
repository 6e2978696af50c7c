"""`rcdeploy bench --nproc N`: sharded, exactly mergeable, resumable robust evaluation.

The CLI runs as a subprocess (the workers are spawned processes joined with gloo over loopback), every
launch under a timeout so a hang fails instead of stalling. Chunks are 4 images (RCDEPLOY_BENCH_CHUNK)
so 96 images make 24 chunks per attack: the split over ranks, and the resume, have something to share.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _cli import run_cli
from _deploy_models import digits, export_fp32, noisy, quantize, train_digits

from rcdeploy.deploy.bench import bench_model

TIMEOUT_S = 180  # per launch: a hung rank fails the test instead of stalling the suite
ARGS = ["--dataset", "digits", "--samples", "96", "--attack", "pgd100,square100", "--eps", "0.1", "--no-latency"]
CHUNKS = 3 * 24  # clean, pgd100 and square100, 96 images in chunks of 4
ENV = {"GLOO_SOCKET_IFNAME": "lo", "RCDEPLOY_BENCH_CHUNK": "4", "OMP_NUM_THREADS": "1"}
TIMED = {"time_s", "img_per_s"}  # wall-time fields: summed over ranks, so they differ between splits


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QDQ-quantized TinyResNet fitted to digits (the white-box attacks go through the twin's rounding)."""
    root = tmp_path_factory.mktemp("bench_dist")
    fp32 = export_fp32(train_digits(steps=100), root / "fp32.onnx", (1, 8, 8))
    x, _ = digits()
    return quantize(fp32, root / "model.onnx", x[:128])


def _bench(model: Path, *extra: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rcdeploy.cli", "bench", str(model), *ARGS, *map(str, extra)],
                          env={**os.environ, **ENV}, capture_output=True, text=True, timeout=TIMEOUT_S)


def _report(model: Path, out: Path, *extra: object) -> dict:
    done = _bench(model, "--json", out, *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def _same_results(a: dict, b: dict) -> None:
    """Identical per-image results and every figure computed from them (wall times aside)."""
    acc_a, acc_b = a["accuracy"], b["accuracy"]
    assert acc_a["per_image"] == acc_b["per_image"]
    for ra, rb in zip(acc_a["robust"], acc_b["robust"], strict=True):
        assert {k: v for k, v in ra.items() if k not in TIMED} == {k: v for k, v in rb.items() if k not in TIMED}
    for key in ("clean_acc_pct", "clean_acc_draws_pct", "worst_case_acc_pct", "first_broken_by", "flags"):
        assert acc_a[key] == acc_b[key], key
    twin_a, twin_b = ({k: v for k, v in acc["twin"].items() if k != "build_s"} for acc in (acc_a, acc_b))
    assert twin_a == twin_b


@pytest.fixture(scope="module")
def reference(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process, no cache: the results every split and every resume must reproduce."""
    return _report(model, tmp_path_factory.mktemp("ref") / "one.json", "--no-cache")


def test_nproc_2_matches_one_process_then_resumes(model: Path, reference: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    two = _report(model, tmp_path / "two.json", "--nproc", 2, "--cache-dir", cache)
    _same_results(reference, two)
    acc = two["accuracy"]
    assert two["settings"]["nproc"] == 2 and reference["settings"]["nproc"] == 1
    assert acc["chunks"]["ranks"] == 2 and acc["chunks"]["computed"] == CHUNKS and acc["chunks"]["from_cache"] == 0
    assert acc["per_image"]["order"] == ["clean", "pgd100", "square100"] and len(acc["per_image"]["test_index"]) == 96
    # the attacks really split the images: neither row is all-robust or all-broken
    assert all(0 < r["robust_acc_pct"] < 100 for r in acc["robust"])

    # Resume: delete some chunks (as if the run had stopped before them); one process finishes them.
    folder = Path(acc["chunks"]["cache_dir"])
    files = sorted(folder.glob("*.npz"))
    assert len(files) == CHUNKS
    gone = [f for f in files if f.name.startswith(("00-pgd100-0000", "01-square100-0001"))]
    kept = {f: f.stat().st_mtime_ns for f in files if f not in gone}
    for f in gone:
        f.unlink()
    again = _report(model, tmp_path / "again.json", "--cache-dir", cache)
    _same_results(reference, again)
    assert again["accuracy"]["chunks"]["computed"] == len(gone) == 20
    assert again["accuracy"]["chunks"]["from_cache"] == CHUNKS - len(gone)
    assert all(f.stat().st_mtime_ns == t for f, t in kept.items())  # only the missing chunks were written
    assert any("read from the bench cache" in n for n in again["notes"])



def test_interrupted_bench_leaves_whole_chunks_and_resumes(model: Path, reference: dict, tmp_path: Path) -> None:
    """SIGTERM to `bench --nproc 2` once attack chunks are written: exit 130, only whole chunk files; a
    rerun (here with one process) computes the missing chunks only and gives the uninterrupted results."""
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "rcdeploy.cli", "bench", str(model), *ARGS, "--nproc", "2", "--cache-dir", str(cache)]
    proc = subprocess.Popen(cmd, env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None and len(list(cache.glob("*/00-pgd100-*.npz"))) < 2:
            time.sleep(0.02)
        assert proc.poll() is None, "bench finished (or failed) before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    (folder,) = cache.iterdir()
    names = os.listdir(folder)
    assert not [n for n in names if n.endswith(".tmp")], names  # no half-written chunk left behind
    chunks = [folder / n for n in names if n.endswith(".npz")]
    assert 2 <= len(chunks) < CHUNKS
    for f in chunks:  # every file is whole
        with np.load(f) as z:
            assert "preds" in z.files and z["preds"].shape[1] == 4

    resumed = _report(model, tmp_path / "resumed.json", "--cache-dir", cache)
    _same_results(reference, resumed)
    assert resumed["accuracy"]["chunks"]["from_cache"] == len(chunks)
    assert resumed["accuracy"]["chunks"]["computed"] == CHUNKS - len(chunks)


def test_cache_is_keyed_by_the_settings(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun with the same settings reads every chunk; any setting that changes results uses another folder;
    the default folder is `<model file>.bench-cache` beside the model."""
    monkeypatch.setenv("RCDEPLOY_BENCH_CHUNK", "4")
    base = dict(dataset="digits", samples=12, attacks="pgd2", eps=0.1, latency=False, progress=False)
    first = bench_model(model, cache_dir=tmp_path, **base)["accuracy"]["chunks"]
    assert first["computed"] == 2 * 3 and first["from_cache"] == 0  # chunks of 4: clean and pgd2
    assert bench_model(model, cache_dir=tmp_path, **base)["accuracy"]["chunks"]["from_cache"] == 6
    folders = {first["cache_dir"]}
    for change in ({"seed": 1}, {"eps": 0.05}, {"attacks": "pgd3"}, {"samples": 16}, {"step": 0.01}):
        chunks = bench_model(model, cache_dir=tmp_path, **{**base, **change})["accuracy"]["chunks"]
        assert chunks["from_cache"] == 0 and chunks["cache_dir"] not in folders, change
        folders.add(chunks["cache_dir"])
    assert len(list(tmp_path.iterdir())) == 6
    default = bench_model(model, **base)["accuracy"]["chunks"]["cache_dir"]
    assert Path(default).parent == model.with_name("model.onnx.bench-cache")
    assert bench_model(model, cache=False, **base)["accuracy"]["chunks"]["cache_dir"] is None


def test_stochastic_graph_chunks_depend_on_nothing_else(model: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph that draws noise in onnxruntime and in the twin: chunks recomputed alone, in another process
    (onnxruntime's own seed differs per process) with the other chunks read back from the cache (no RNG
    advanced through them), give exactly the draws of the full run."""
    monkeypatch.setenv("RCDEPLOY_BENCH_CHUNK", "4")
    graph = noisy(model.with_name("fp32.onnx"), tmp_path / "graph.onnx", 0.3)
    kw = dict(dataset="digits", samples=24, attacks="pgd3,square20", eps=0.1, eot=2, latency=False, progress=False)
    full = bench_model(graph, cache=False, **kw)
    assert full["model"]["stochastic"] and full["accuracy"]["evaluation_draws"] == 2
    assert 1 in sum(full["accuracy"]["per_image"]["correct_draws"], [])  # live noise: right in one draw of 2
    first = bench_model(graph, cache_dir=tmp_path / "c", **kw)
    _same_results(full, first)
    folder = Path(first["accuracy"]["chunks"]["cache_dir"])
    for f in sorted(folder.glob("*.npz"))[1::2]:
        f.unlink()
    again = bench_model(graph, cache_dir=tmp_path / "c", **kw)
    assert again["accuracy"]["chunks"]["computed"] == 9 and again["accuracy"]["chunks"]["from_cache"] == 9
    _same_results(full, again)
    for f in sorted(folder.glob("*.npz"))[::2]:
        f.unlink()
    out = tmp_path / "child.json"
    cmd = [sys.executable, "-m", "rcdeploy.cli", "bench", str(graph), "--dataset", "digits", "--samples", "24",
           "--attack", "pgd3,square20", "--eps", "0.1", "--eot", "2", "--no-latency", "--cache-dir", str(tmp_path / "c"),
           "--json", str(out)]
    done = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    child = json.loads(out.read_text())
    assert child["accuracy"]["chunks"]["computed"] == 9
    _same_results(full, child)


def test_bad_nproc_and_cache_options_exit_2_with_one_line(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cases = {
        "'--nproc': 0 is not in the range": ["--nproc", "0"],
        "'--nproc': -2 is not in the range": ["--nproc", "-2"],
        "'two' is not a valid integer": ["--nproc", "two"],
        "--cache-dir and --no-cache": ["--cache-dir", tmp_path / "c", "--no-cache"],
    }
    for expect, extra in cases.items():
        code, _, err = run_cli(["bench", model, "--dataset", "digits", "--no-latency", *extra], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], (expect, err)
    monkeypatch.setenv("RCDEPLOY_BENCH_CHUNK", "0")
    code, _, err = run_cli(["bench", model, "--dataset", "digits", "--no-latency"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "RCDEPLOY_BENCH_CHUNK" in err, err
