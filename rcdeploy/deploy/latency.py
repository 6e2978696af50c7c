"""Latency, throughput, session load time and peak memory of an ONNX file in onnxruntime (or OpenVINO).

Measured in a fresh child process (`python -m rcdeploy.deploy.latency`, spec on stdin, JSON on
stdout) so that nothing of the parent (torch's thread pool, the dataset, autograd buffers) shares
the cores or the memory figures: the child imports numpy, onnx and onnxruntime only.

Memory: the child's peak resident set (VmHWM in /proc/self/status), reset to the current RSS
(`echo 5 > /proc/self/clear_refs`) just before the session is created, so the figure counts
what loading the model and running it cost, not the interpreter and library imports (which are
reported apart as `baseline_rss_bytes`). tracemalloc cannot see onnxruntime's C++ allocations;
RSS can. Where /proc is missing, `resource.getrusage` gives the whole child's peak instead
(`memory_method` says which one was used).

Timing: each run is timed alone with perf_counter_ns after a warm-up; runs continue until
`min_repeats` and `min_seconds` are reached and the medians of the first and second half agree
within `STABLE_REL` (at most `EXTEND` times the time budget), so medians are stable.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rcdeploy.errors import UsageError

__all__ = ["STABLE_REL", "measure_latency", "measure_in_subprocess"]

WARMUP_RUNS = 10  # at least this many untimed runs ...
WARMUP_SECONDS = 0.2  # ... and at least this long (thread pools spun up, caches and allocator warm)
MIN_REPEATS = 30  # timed runs per batch size, at least
MAX_REPEATS = 100_000
STABLE_REL = 0.05  # medians of the two halves of the timed runs agree within 5%: stop
EXTEND = 4  # an unstable measurement runs for up to EXTEND x min_seconds
LOADS = 3  # session creations timed (the first includes reading the file from the page cache)
CHILD_TIMEOUT_S = 1800.0


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(m[1]) if m else None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rusage_peak_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB


def _percentiles(times_ns: np.ndarray) -> dict[str, float]:
    ms = times_ns / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
            "min_ms": float(ms.min()), "max_ms": float(ms.max())}


def _time_batch(session: Any, name: str, x: np.ndarray, min_repeats: int, min_seconds: float) -> dict[str, Any]:
    output = session.get_outputs()[0].name
    feed = {name: x}
    t0, warm = time.perf_counter(), 0
    while warm < WARMUP_RUNS or time.perf_counter() - t0 < WARMUP_SECONDS:
        session.run([output], feed)
        warm += 1
    times: list[int] = []
    spent = 0
    budget_ns = int(min_seconds * 1e9)
    stable_rel = float("nan")
    while len(times) < MAX_REPEATS:
        t = time.perf_counter_ns()
        session.run([output], feed)
        times.append(time.perf_counter_ns() - t)
        spent += times[-1]
        if len(times) >= min_repeats and spent >= budget_ns:
            half = len(times) // 2
            a, b = float(np.median(times[:half])), float(np.median(times[half:]))
            stable_rel = abs(a - b) / max(min(a, b), 1.0)
            if stable_rel <= STABLE_REL or spent >= EXTEND * budget_ns:
                break
    if math.isnan(stable_rel):  # MAX_REPEATS reached inside the time budget: compare the halves now
        half = len(times) // 2
        a, b = float(np.median(times[:half])), float(np.median(times[half:]))
        stable_rel = abs(a - b) / max(min(a, b), 1.0)
    arr = np.asarray(times, dtype=np.float64)
    out = {"batch_size": int(x.shape[0]), "warmup_runs": warm, "repeats": len(times),
           "timed_s": float(arr.sum() / 1e9), **_percentiles(arr)}
    out["img_per_s"] = x.shape[0] / (out["p50_ms"] / 1e3) if out["p50_ms"] > 0 else None
    out["halves_median_diff_pct"] = 100.0 * stable_rel
    out["stable"] = bool(stable_rel <= STABLE_REL)
    return out


def measure_latency(path: str | Path, *, target: str = "cpu", batch_sizes: list[int] | tuple[int, ...] = (1,),
                    min_seconds: float = 1.0, min_repeats: int = MIN_REPEATS, seed: int = 0,
                    runtime: str = "onnxruntime") -> dict[str, Any]:
    """Latency of `path` on the `target` profile in this process (see module docstring).

    Inputs are uniform random images in [0, 1] of the model's input shape (integer kernels take
    the same time whatever the pixel values). Returns JSON-able figures; times in ms, memory in
    bytes, throughput in images per second at the median latency.
    """
    from rcdeploy.runtime.session import get_target, input_spec, load_model_proto, open_runtime_session

    profile = get_target(target)
    baseline = _status_kib("VmRSS")
    proto = load_model_proto(path)  # parsed once outside the timed loads: a UsageError comes first
    del proto
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    load_s: list[float] = []
    session = None
    for _ in range(LOADS):
        session = None  # free the previous session before timing the next one
        t = time.perf_counter()
        session = open_runtime_session(path, runtime=runtime, target=target)
        load_s.append(time.perf_counter() - t)
    name, shape = input_spec(session)
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise UsageError(f"{path}: input {name!r} of shape {shape} is not an image batch [N, C, H, W]")
    rows = []
    rng = np.random.default_rng(seed)
    for b in batch_sizes:
        x = rng.random((int(b), *shape[1:]), dtype=np.float32)
        rows.append(_time_batch(session, name, x, min_repeats, min_seconds))
    rss_after = _status_kib("VmRSS")
    memory = _memory_figures(reset, before)
    engine = _engine_figures(runtime, profile, session)
    return {
        "target": profile.name,
        "description": profile.description,
        "intra_op_threads": profile.intra_op_threads(),
        "inter_op_threads": 1,
        **engine,
        "cpu_count": os.cpu_count(),
        "session_load_s": load_s[0],
        "session_load_median_s": float(np.median(load_s)),
        "session_loads": len(load_s),
        "baseline_rss_bytes": baseline * 1024 if baseline is not None else None,
        "rss_after_bytes": rss_after * 1024 if rss_after is not None else None,
        **memory,
        "input": "uniform random images in [0, 1]",
        "batches": rows,
    }


def _memory_figures(reset: bool, before: int | None) -> dict[str, Any]:
    """Peak memory the session cost (VmHWM since the reset), or the whole process's where no reset works."""
    peak = _status_kib("VmHWM")
    if reset and peak is not None and before is not None:
        return {"memory_method": "VmHWM after reset (clear_refs) before session creation",
                "session_peak_rss_delta_bytes": (peak - before) * 1024, "peak_rss_bytes": peak * 1024}
    return {"memory_method": "whole process peak RSS (getrusage); no per-session reset available",
            "session_peak_rss_delta_bytes": None, "peak_rss_bytes": _rusage_peak_bytes()}


def _engine_figures(runtime: str, profile: Any, session: Any) -> dict[str, Any]:
    """What ran the model: onnxruntime's execution settings, or OpenVINO's and its int8 layers."""
    if runtime == "openvino":
        from rcdeploy.runtime.ov_session import openvino_version

        return {"runtime": runtime, "openvino": openvino_version(), "openvino_config":
                "CPU, INFERENCE_PRECISION_HINT f32, PERFORMANCE_HINT LATENCY, NUM_STREAMS 1",
                "int8_layers": session.int8_layers()}
    import onnxruntime as ort

    return {"runtime": runtime,
            "execution_mode": "sequential" if profile.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL else "parallel",
            "graph_optimization": str(profile.optimization).rsplit(".", 1)[-1], "onnxruntime": ort.__version__}


def measure_in_subprocess(path: str | Path, *, target: str = "cpu", batch_sizes: list[int] | tuple[int, ...] = (1,),
                          min_seconds: float = 1.0, min_repeats: int = MIN_REPEATS, seed: int = 0,
                          runtime: str = "onnxruntime") -> dict[str, Any]:
    """`measure_latency` in a fresh Python process (same interpreter); UsageErrors come back as such."""
    spec = {"path": str(Path(path).resolve()), "target": target, "batch_sizes": [int(b) for b in batch_sizes],
            "min_seconds": float(min_seconds), "min_repeats": int(min_repeats), "seed": int(seed),
            "runtime": runtime}
    env = dict(os.environ)
    # The child must find this rcdeploy even when it runs from a checkout that is not installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "rcdeploy.deploy.latency"], input=json.dumps(spec),
                              capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise UsageError(f"latency measurement of {path} took over {CHILD_TIMEOUT_S:.0f} s; "
                         "pass fewer or smaller --batch-sizes") from None
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"latency child process failed (exit {proc.returncode}): {tail}")
    if "usage_error" in result:
        raise UsageError(result["usage_error"])
    return result


def _main() -> None:
    spec = json.loads(sys.stdin.read())
    try:
        out = measure_latency(spec["path"], target=spec["target"], batch_sizes=spec["batch_sizes"],
                              min_seconds=spec["min_seconds"], min_repeats=spec["min_repeats"], seed=spec["seed"],
                              runtime=spec.get("runtime", "onnxruntime"))
    except UsageError as e:
        out = {"usage_error": str(e)}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    _main()
