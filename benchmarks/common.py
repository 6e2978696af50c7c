"""Shared pieces of the benchmark scripts: interleaved timing, onnxruntime sessions, the int8 GEMM limit,
profile-based MAC accounting, tables, and the BENCHMARKS.md / results.json writers.

Every figure the scripts publish is a ratio of two things measured in the same run, interleaved:
this machine is shared, so absolute times drift with other people's load, while a ratio of
candidates timed round-robin (each round runs every candidate back to back) sees the same load.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

# One list of integer / float conv-matmul kernels and one MAC counter for the whole project.
from rcdeploy.runtime.graph import FLOAT_KERNELS, INTEGER_KERNELS, node_macs

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
CIFAR_SLICE = SHARED_DATA / "cifar10-slice"
MARKDOWN = ROOT / "BENCHMARKS.md"
RESULTS = ROOT / "benchmarks" / "results.json"
SCRATCH = ROOT / ".bench" / "perf"  # git-ignored; runs and exported files the scripts make

TITLE = "# Benchmarks\n"
INTRO_KEY = "perf-intro"
INTRO = """The speed and size sections below (inference, attack, training; written by `make bench`, i.e.
`python benchmarks/run_all.py`, `--quick` for a short smoke run) report **ratios of candidates measured
in the same run**. This machine is shared (2 CPU cores, other engineers' test suites running), so
absolute times drift by tens of percent from minute to minute; candidates are therefore timed
round-robin (every round runs each candidate back to back, in rotating order) and a ratio is the median
over rounds of the per-round ratio, so that load hitting a round hits all candidates alike. Absolute
times are printed for scale only; spreads are the p25-p75 of single timed runs. Each section states
its machine (CPU, cores, load average at its start), library versions and thread counts; raw figures
are in `benchmarks/results.json`. The seed002 section is an accuracy reproduction with its own script."""


# ----------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU, cores, load and library versions, for every section's header."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m[1].strip() if m else cpu
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = set(m[1].split()) if m else set()
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "isa": isa,
                            "load_avg_1_5_15": [round(v, 2) for v in load], "python": platform.python_version(),
                            "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")}
    for mod in ("onnxruntime", "torch", "brevitas", "onnx"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def machine_line(info: Mapping[str, Any]) -> str:
    isa = ", ".join(info.get("isa") or []) or "no AVX2"
    load = info.get("load_avg_1_5_15") or []
    return (f"{info['cpu']} ({isa}), {info['cpu_count']} cores, load average {load[0] if load else '?'} at start; "
            f"onnxruntime {info.get('onnxruntime')}, torch {info.get('torch')}, brevitas {info.get('brevitas')}; "
            f"{info['date_utc']} UTC")


# ----------------------------------------------------------------------------------------- timing


def percentiles(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    p10, p25, p50, p75, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {"p10": float(p10), "p25": float(p25), "median": float(p50), "p75": float(p75), "p90": float(p90),
            "n": int(a.size)}


@dataclass
class Timings:
    """Seconds of every timed call of one candidate, grouped by round."""

    rounds: list[list[float]] = field(default_factory=list)

    @property
    def all(self) -> list[float]:
        return [t for r in self.rounds for t in r]

    @property
    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.rounds if r]

    @property
    def median(self) -> float:
        """Median over rounds of each round's median (robust to a round hit by a burst of load)."""
        return statistics.median(self.round_medians)

    def summary(self) -> dict[str, Any]:
        out = percentiles(self.all)
        out["median_of_round_medians"] = self.median
        out["rounds"] = len(self.rounds)
        return out


def interleave(candidates: Mapping[str, Callable[[], Any]], *, rounds: int, runs: int | Mapping[str, int],
               warmup: int = 2) -> dict[str, Timings]:
    """Time each candidate `runs` times per round, all candidates in every round (round-robin).

    The candidate order rotates every round so that no candidate always runs right after the same
    neighbour (caches, thermal, a neighbour's thread pool still spinning).
    """
    names = list(candidates)
    per = {n: (runs[n] if isinstance(runs, Mapping) else runs) for n in names}
    for n in names:
        for _ in range(warmup):
            candidates[n]()
    out = {n: Timings() for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            fn, times = candidates[n], []
            for _ in range(per[n]):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[n].rounds.append(times)
    return out


def round_ratio(ref: Timings, other: Timings) -> dict[str, float]:
    """ref/other per round (same round = same load), summarized: >1 means `other` is faster."""
    ratios = [a / b for a, b in zip(ref.round_medians, other.round_medians) if b > 0]
    if not ratios:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


# ----------------------------------------------------------------------------------------- onnxruntime


def ort_session(model: bytes, threads: int, *, spin: bool = True, profile_prefix: str | None = None,
                optimized_path: str | Path | None = None) -> Any:
    """A plain onnxruntime CPU session (what an app would open): ORT_ENABLE_ALL, sequential, `threads` intra-op.

    `spin=False` sets session.intra_op.allow_spinning=0: idle pool threads sleep instead of busy-waiting,
    which matters on an oversubscribed machine where a spinning thread steals a slice from a working one.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def gemm_model(m: int, k: int, n: int, *, integer: bool) -> bytes:
    """[m, k] x [k, n] as one ONNX node: MatMulInteger (uint8 x int8 -> int32) or float MatMul.

    B is an initializer (as a weight is), so onnxruntime pre-packs it like a conv's weights.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if integer:
        b = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        b = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", a_type, [m, k])],
                              [helper.make_tensor_value_info("Y", y_type, [m, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def identity_model(shape: Sequence[int]) -> bytes:
    """One Identity node on a float [N, *shape] input: the floor of an InferenceSession.run call."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "floor",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", *shape])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def gemm_input(m: int, k: int, integer: bool) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (m, k), dtype=np.uint8) if integer else rng.standard_normal((m, k), dtype=np.float32)


def profile_model(model: bytes, x: np.ndarray, *, threads: int, spin: bool = True, runs: int = 3) -> dict[str, Any]:
    """Run `model` under onnxruntime's profiler; where the time goes and how many MACs run on integers.

    Reads the per-node events (kernel time, output shapes) and ORT's optimized graph (the kernels it
    really runs, with their weights) from the same session. MACs of a node = output elements x the
    reduction size read from its weight initializer; a float conv that ORT re-laid out to NCHWc counts
    its padded channels, so float MACs can be slightly high (never integer ones).
    """
    import onnx

    with tempfile.TemporaryDirectory(prefix="rcdeploy-prof-") as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        sess = ort_session(model, threads, spin=spin, profile_prefix=str(Path(tmp) / "prof"), optimized_path=opt_path)
        feed = {sess.get_inputs()[0].name: x}
        sess.run(None, feed)  # warm-up: first-run allocations are not what an app sees
        t0 = time.perf_counter()
        for _ in range(runs):
            sess.run(None, feed)
        wall = (time.perf_counter() - t0) / runs
        events = json.loads(Path(sess.end_profiling()).read_text())
        opt = onnx.load(str(opt_path))
    nodes = {n.name: n for n in opt.graph.node}
    inits = {t.name: t for t in opt.graph.initializer}
    # Only the timed runs: node events inside the last `runs` model_run windows (not the warm-up).
    windows = sorted((int(e["ts"]), int(e["ts"]) + int(e.get("dur", 0))) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[-runs:]

    def timed(e: Mapping[str, Any]) -> bool:
        ts = int(e.get("ts", 0))
        return not windows or any(a <= ts <= b for a, b in windows)

    events = [e for e in events if e.get("cat") != "Node" or timed(e)]
    # Per node, the median of its timed runs: a run preempted by another process does not skew the shares.
    durations: dict[str, list[float]] = defaultdict(list)
    node_op: dict[str, str] = {}
    node_info: dict[str, dict[str, Any]] = {}
    int_macs = float_macs = 0
    counted: set[str] = set()
    batch = int(x.shape[0])
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        name = e["name"][: -len("_kernel_time")]
        durations[name].append(float(e.get("dur", 0)) / 1e6)
        node_op[name] = op
        if name in counted or (op not in INTEGER_KERNELS and op not in FLOAT_KERNELS) or name not in nodes:
            continue
        counted.add(name)
        outs = args.get("output_type_shape") or []
        ins = args.get("input_type_shape") or []
        out_shape = next(iter(outs[0].values())) if outs else None
        in_shapes = [next(iter(i.values())) if i else None for i in ins]
        node = nodes[name]
        # The profile's input list leaves pre-packed initializers out: weights come from the graph then.
        shapes = {t: list(inits[t].dims) for t in node.input if t in inits}
        shapes.update({t: list(sh) for t, sh in zip(node.input, in_shapes) if t and sh and t not in shapes})
        if out_shape:
            shapes[node.output[0]] = list(out_shape)
        total = node_macs(node, shapes)
        if not out_shape or not total:
            continue
        macs = int(total) // batch
        k = macs * batch // int(np.prod(out_shape))
        w_index = 3 if op in ("QLinearConv", "NhwcQLinearConv") else 1
        dims = shapes.get(node.input[w_index]) if len(node.input) > w_index else None
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        node_info[name] = {"op": op, "macs": macs, "k": k,
                           "out_channels": int(dims[0]) if dims and "Conv" in op else None,
                           "depthwise": bool(dims and "Conv" in op and group > 1 and group == dims[0])}
        if op in INTEGER_KERNELS:
            int_macs += macs
        else:
            float_macs += macs
    time_by_op: dict[str, float] = defaultdict(float)
    for name, ds in durations.items():
        time_by_op[node_op[name]] += statistics.median(ds)
        if name in node_info:
            node_info[name]["s"] = statistics.median(ds)
    total_t = sum(time_by_op.values())
    total_macs = int_macs + float_macs
    return {
        "ops": dict(sorted(Counter(n.op_type for n in opt.graph.node).items())),
        "macs_per_image": int(total_macs),
        "integer_macs_per_image": int(int_macs),
        "integer_mac_share": (int_macs / total_macs) if total_macs else 0.0,
        "kernel_time_s": total_t,  # sum over nodes of each node's median kernel time, one run
        "kernel_nodes": len(durations),
        "conv_gemm_nodes": node_info,  # name -> op, MACs per image, output channels, median seconds
        "wall_s": wall,
        "time_share_by_op": {k: v / total_t for k, v in sorted(time_by_op.items(), key=lambda kv: -kv[1])}
        if total_t else {},
    }


# ----------------------------------------------------------------------------------------- tables


def profile_groups(p: Mapping[str, Any], group_of: Callable[[Mapping[str, Any]], str], *,
                   other: Callable[[str], str] = str, total: str = "total") -> dict[str, dict[str, float]]:
    """One `profile_model` result summarized: seconds, MACs per image and node count per conv/GEMM group
    (`group_of(node info)`; each also with the min/max reduction length k of its nodes), per non-conv op type
    (named `other(op)`: an op's kernel time less its conv/GEMM nodes'), and in `total`."""
    groups: dict[str, dict[str, float]] = {}
    conv_s: Counter[str] = Counter()
    conv_n: Counter[str] = Counter()
    for info in p["conv_gemm_nodes"].values():
        g = groups.setdefault(group_of(info), {"s": 0.0, "macs": 0.0, "nodes": 0, "k_min": info["k"],
                                               "k_max": info["k"]})
        g["k_min"], g["k_max"] = min(g["k_min"], info["k"]), max(g["k_max"], info["k"])
        g["s"] += info.get("s", 0.0)
        g["macs"] += info["macs"]
        g["nodes"] += 1
        conv_s[info["op"]] += info.get("s", 0.0)
        conv_n[info["op"]] += 1
    for op, share in p["time_share_by_op"].items():
        rest = share * p["kernel_time_s"] - conv_s[op]
        if rest > 1e-9:
            groups[other(op)] = {"s": rest, "macs": 0.0, "nodes": max(0, p["ops"].get(op, 0) - conv_n[op])}
    groups[total] = {"s": p["kernel_time_s"], "macs": float(p["macs_per_image"]), "nodes": p["kernel_nodes"]}
    return groups


def median_groups(runs: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """Per group of `profile_groups`, the median over repeated profiles (a repeat hit by load does not skew it)."""
    names = {g for r in runs for g in r}
    keys = ("s", "macs", "nodes", "k_min", "k_max")
    return {g: {k: statistics.median(r[g][k] for r in runs if g in r and k in r[g]) for k in keys
                if any(g in r and k in r[g] for r in runs)} for g in names}


def fmt_ms(seconds: float) -> str:
    ms = 1000 * seconds
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_spread(summary: Mapping[str, float]) -> str:
    """'median (p25-p75)' in ms."""
    return f"{fmt_ms(summary['median'])} ({fmt_ms(summary['p25'])}-{fmt_ms(summary['p75'])})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` is one char per column ('l' or 'r'), default: first left, rest right."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(map(str, headers)) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table for a terminal (fixed-width columns)."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    out = []
    for j, row in enumerate(cells):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- outputs


def _put_block(text: str, key: str, body: str, *, after_title: bool = False) -> str:
    """`text` with the `key` block (between HTML comment markers) replaced, or added at the end (or
    right after the title line)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _m: block, text)
    if after_title and text.startswith("# "):
        title, _, rest = text.partition("\n")
        return f"{title}\n\n{block}\n{rest.lstrip(chr(10))}"
    return text.rstrip("\n") + "\n\n" + block


def write_section(key: str, text: str, path: Path = MARKDOWN) -> None:
    """Replace (or append) the `key` section of BENCHMARKS.md; other sections stay as they are.

    Also keeps the short intro (how every speed figure is measured) right under the title, creating the
    file with both when it is missing.
    """
    old = path.read_text() if path.exists() else TITLE
    new = _put_block(old, INTRO_KEY, INTRO, after_title=True)
    new = _put_block(new, key, text)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new)
    tmp.replace(path)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if np.isfinite(f) else None
    if isinstance(v, Path):
        return str(v)
    return v


def update_results(key: str, data: Mapping[str, Any], path: Path = RESULTS) -> None:
    """Set `key` in benchmarks/results.json (other keys kept), written atomically."""
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        old = {}
    old[key] = _jsonable(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(old, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def goal_line(name: str, value: float | None, goal: float, *, higher: bool = True, unit: str = "x") -> str:
    """'met' / 'missed by N%' against a goal (never an assert: slow figures are reported, not failed)."""
    if value is None or not np.isfinite(value):
        return f"{name}: not measured (goal {'>=' if higher else '<='} {goal:g}{unit})"
    ok = value >= goal if higher else value <= goal
    if ok:
        verdict = "met"
    elif higher:
        pct = 100 * value / goal
        verdict = f"MISSED: at {pct:.1f}% of the goal" if pct >= 99.5 else f"MISSED: at {pct:.0f}% of the goal"
    else:
        verdict = f"MISSED: {100 * (value / goal - 1):.1f}% over the goal"
    return f"{name}: {value:.3g}{unit} (goal {'>=' if higher else '<='} {goal:g}{unit}): {verdict}"
