"""Inference speed and size of one network in every form a user could ship it, measured in one run.

    python benchmarks/inference.py [--quick] [--nets resnet20,mobilenetv2,small_cnn] [--rounds 7]

For each network (ResNet-20 and MobileNetV2 at CIFAR shape 3x32x32, the small CNN at digits shape
1x8x8), the same weights in these forms, all run in a plain onnxruntime InferenceSession (CPU
provider, ORT_ENABLE_ALL, sequential, nothing rcdeploy-specific at load time):

  fp32                 torch.onnx.export of the float network (BatchNorm folded by the exporter), dynamic batch
  ort qs S8S8 (default) onnxruntime quantize_static as users run it: defaults (QDQ, int8 activations and weights)
  ort qs U8S8 (best)   quantize_static at its best: quant_pre_process first, uint8 activations, int8 weights
  ort qs U8S8 rr       the same with reduce_range=True (7-bit weights: onnxruntime's advice for x86 without VNNI)
  brevitas QCDQ        Brevitas' own export_onnx_qcdq of the rcdeploy 8-bit model, as is (fixed batch 1:
                       its b64 figure is 64 batch-1 calls, which is what a user of that file gets)
  rcdeploy w8 / w4     rcdeploy.export.qdq.build_qdq at 8-bit and 4-bit weights (4-bit stored as packed INT4)
  ... -50%ch           the same after removing 50% of every prunable channel group (zeroed, then
                       physically removed by rcdeploy.export.shrink.shrink_model)

  ... -50%ch x16        the 8-bit pruned model with every group rounded up to a multiple of 16 channels
                       (shrink_model's channel_multiple), because 8-channel int8 convs run slowly on x86

Weights and BatchNorm statistics are random and activation scales are calibrated on random images:
latency and size do not depend on training. Settings: b1 and b64 with 1 intra-op thread; b64 with all
cores, with onnxruntime's default thread-pool spinning and with spinning off. Every setting also times,
in the same rounds, the machine's int8 limit (one 1024x1024x1024 MatMulInteger, uint8 x int8 -> int32,
at the setting's thread count) and the floor of a session.run (a 1-node Identity graph). GMAC/s of a
model = its MACs (from ORT's profile of the optimized graph) x batch / median latency. Integer-kernel
share = MACs that run in integer kernels / all conv+matmul MACs. Per-layer kernel times come from
onnxruntime's profiler (SessionOptions.enable_profiling) and say what limits each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/ is not a package; the scripts run from a checkout)

NETS: dict[str, dict[str, Any]] = {
    "resnet20": {"label": "ResNet-20", "shape": (3, 32, 32), "mean": (0.4914, 0.4822, 0.4465),
                 "std": (0.2470, 0.2435, 0.2616)},
    "mobilenetv2": {"label": "MobileNetV2", "shape": (3, 32, 32), "mean": (0.4914, 0.4822, 0.4465),
                    "std": (0.2470, 0.2435, 0.2616)},
    "small_cnn": {"label": "small CNN (digits)", "shape": (1, 8, 8), "mean": (0.305483,), "std": (0.37611,)},
}
# (label, batch, threads (None: all cores), spinning)
SETTINGS = (("b1/1t", 1, 1, True), ("b64/1t", 64, 1, True), ("b64/all", 64, None, True),
            ("b64/all nospin", 64, None, False))
# Where the goals are read: b1/1t, and for b64 on all cores the thread-pool setting (spinning on or off)
# under which the int8 GEMM probe ran faster in this run. Which one wins depends on the machine's load
# (spinning threads lose their slices to other processes on an oversubscribed machine), and the choice
# is made by the model-independent probe, never by a candidate's own figure.
GOAL_B1 = "b1/1t"
ALL_CORE_B64 = ("b64/all", "b64/all nospin")
B64_SETTINGS = ("b64/1t", *ALL_CORE_B64)  # efficiency table: GMAC/s and share of the int8 limit


def goal_b64(res: dict[str, Any]) -> str:
    """The all-core b64 setting the goals are read at (see ALL_CORE_B64)."""
    return max(ALL_CORE_B64, key=lambda s: res[s]["int8_limit_gmacs"])
GEMM = (1024, 1024, 1024)
PRUNE = 0.5
# A variant of the pruned model whose every group keeps a multiple of 16 channels (shrink_model's
# channel_multiple): measured because onnxruntime's int8 conv on x86 runs 8-channel layers slower than
# 16-channel ones, so removing the last 8 channels of a 16-channel layer costs time.
MULTIPLE = 16


@dataclass
class Candidate:
    name: str
    data: bytes
    fixed_batch1: bool = False  # Brevitas QCDQ: input shape [1, C, H, W]
    note: str = ""


# ----------------------------------------------------------------------------------------- models


def make_model(net: str, bits: int, seed: int = 0, prune: float = 0.0, first_last_bits: int = 8) -> Any:
    """rcdeploy's `net` with random weights and BN statistics; quantized ones calibrated on random images.

    prune: zero that share of every prunable channel group (the removable way) before calibration,
    so that shrink_model can remove them; the same channels for every bit width (seeded).
    """
    import torch

    from rcdeploy.models import create_model
    from rcdeploy.quant.calibrate import calibrate_activations
    from rcdeploy.quant.spec import QuantSpec

    spec = NETS[net]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    float_model = bits == 32
    quant = QuantSpec(bits=bits, act_bits=32 if float_model else 8,
                      first_last_bits=None if float_model else first_last_bits)
    model = create_model(net, num_classes=10, in_chans=spec["shape"][0], mean=spec["mean"], std=spec["std"],
                         quant=quant, input_size=spec["shape"][1])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    if prune:
        from rcdeploy.export.shrink import zero_channels
        from rcdeploy.models.channels import trace_channels

        graph = trace_channels(model)
        pgen = torch.Generator().manual_seed(seed + 1)
        masks = {g.index: torch.randperm(g.size, generator=pgen)[: int(g.size * prune)]
                 for g in graph.prunable() if g.size > 1}
        zero_channels(model, masks, graph)
    if not float_model:
        calibrate_activations(model, [torch.rand(64, *spec["shape"], generator=gen) for _ in range(2)])
    return model.eval()


def fp32_onnx(model: Any, shape: tuple[int, ...]) -> bytes:
    import torch

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "fp32.onnx"
        torch.onnx.export(model, (torch.rand(1, *shape),), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        return path.read_bytes()


def ort_quantize_static(fp32: bytes, shape: tuple[int, ...], *, best: bool, reduce_range: bool = False) -> bytes:
    """onnxruntime's own post-training quantizer: defaults (S8S8 QDQ), or pre-processed U8S8 QDQ
    (reduce_range: 7-bit weights, which onnxruntime recommends where u8 x s8 pairs saturate)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            gen = np.random.default_rng(0)
            self.batches = iter([{"input": gen.random((16, *shape), dtype=np.float32)} for _ in range(4)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src, pre, out = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "q.onnx"))
        src.write_bytes(fp32)
        if best:
            quant_pre_process(str(src), str(pre))
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range)
        else:
            quantize_static(str(src), str(out), Reader())
        return out.read_bytes()


def brevitas_qcdq(model: Any, shape: tuple[int, ...]) -> tuple[bytes | None, str]:
    """Brevitas' export_onnx_qcdq as is; (None, why) when it fails."""
    import torch
    from brevitas.export import export_onnx_qcdq

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "qcdq.onnx"
        chatter = io.StringIO()  # torch.onnx prints its export steps; keep the table readable
        quiet = logging.getLogger("onnxscript")
        level = quiet.level
        try:
            quiet.setLevel(logging.CRITICAL)
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                export_onnx_qcdq(model, torch.rand(1, *shape), export_path=str(path))
        except Exception as e:  # any failure is a result to report, not a crash of the benchmark
            return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:200]
        finally:
            quiet.setLevel(level)
        return path.read_bytes(), ""


def build_candidates(net: str, log: Any) -> tuple[list[Candidate], dict[str, Any]]:
    """Every form of `net`, as ONNX bytes, plus what was learned building them."""
    import torch

    from rcdeploy.export.qdq import build_qdq
    from rcdeploy.export.shrink import shrink_model
    from rcdeploy.export.verify import compare_logits, torch_logits
    from rcdeploy.runtime.graph import bytes_by_dtype
    from rcdeploy.runtime.session import open_session, run_logits

    shape = NETS[net]["shape"]
    info: dict[str, Any] = {"shape": list(shape), "notes": []}
    t = time.perf_counter()
    fp32 = fp32_onnx(make_model(net, 32), shape)
    cands = [Candidate("fp32", fp32)]
    cands.append(Candidate("ort qs S8S8 (default)", ort_quantize_static(fp32, shape, best=False)))
    cands.append(Candidate("ort qs U8S8 (best)", ort_quantize_static(fp32, shape, best=True)))
    cands.append(Candidate("ort qs U8S8 rr", ort_quantize_static(fp32, shape, best=True, reduce_range=True)))
    q8 = make_model(net, 8)
    qcdq, why = brevitas_qcdq(q8, shape)
    if qcdq is None:
        info["notes"].append(f"Brevitas export_onnx_qcdq failed: {why}")
    else:
        cands.append(Candidate("brevitas QCDQ", qcdq, fixed_batch1=True))
    x_check = torch.rand(64, *shape, generator=torch.Generator().manual_seed(5))
    checks = {}
    # (bits, share of channels zeroed, channel multiple kept by shrink_model)
    # w7: 8-bit-class layers trained at 7 bits, so every layer runs u8 x s8 kernels (8-bit ones are
    # uint8-weight u8 x u8 kernels, exact on every CPU but without VNNI's speed); first/last at 7 too.
    for bits, prune, multiple in ((8, 0.0, 1), (8, PRUNE, 1), (8, PRUNE, MULTIPLE), (7, 0.0, 1), (4, 0.0, 1),
                                  (4, PRUNE, 1)):
        model = q8 if (bits, prune) == (8, 0.0) else make_model(net, bits, prune=prune,
                                                                   first_last_bits=7 if bits == 7 else 8)
        name = f"rcdeploy w{bits}" + (" -50%ch" if prune else "") + (f" x{multiple}" if multiple > 1 else "")
        if prune:
            model, report = shrink_model(model, input_shape=shape, channel_multiple=multiple)
            tot = report.totals()
            info.setdefault("pruning", {})[name] = {
                "channels": [tot["channels_before"], tot["channels_after"]],
                "macs": [tot["macs_before"], tot["macs_after"]]}
        ex = build_qdq(model.eval(), shape, storage="packed")
        data = ex.to_bytes()
        info.setdefault("bytes_by_dtype", {})[name] = bytes_by_dtype(ex.model)
        # Not a gate (random weights give near-tied logits): a figure that says the file computes the model.
        got = run_logits(open_session(ex.model, threads=1, widen=False), x_check.numpy())
        checks[name] = {k: v for k, v in compare_logits(torch_logits(model, x_check), got).items()
                        if k in ("top1_agreement", "max_abs_logit_diff", "logit_range")}
        cands.append(Candidate(name, data))
    info["rcdeploy_vs_pytorch_on_64_random_images"] = checks
    info["exact_on_every_cpu"] = {c.name: exact_everywhere(c.data) for c in cands}
    info["build_s"] = time.perf_counter() - t
    log(f"  built {len(cands)} forms of {net} in {info['build_s']:.0f} s")
    return cands, info


def exact_everywhere(data: bytes) -> bool:
    """rcdeploy's static proof on onnxruntime's optimized graph: no u8 x s8 int16 pair sum can saturate,
    so the file computes the same on x86 with and without VNNI (see rcdeploy.runtime.u8s8)."""
    from rcdeploy.export.verify import saturation_report
    from rcdeploy.runtime.session import optimized_graph

    return bool(saturation_report(optimized_graph(data))["saturation_free"])


# ----------------------------------------------------------------------------------------- timing


def _runner(sess: Any, x: np.ndarray, fixed_batch1: bool) -> Any:
    name = sess.get_inputs()[0].name
    if fixed_batch1 and x.shape[0] > 1:
        rows = [x[i:i + 1] for i in range(x.shape[0])]
        return lambda: [sess.run(None, {name: r}) for r in rows]
    feed = {name: x}
    return lambda: sess.run(None, feed)


def runs_for(fn: Any, budget_s: float, cap: int = 200) -> int:
    """Runs per round so that one candidate takes about `budget_s` per round (at least 1)."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return int(max(1, min(cap, round(budget_s / max(dt, 1e-6)))))


def measure_net(net: str, cands: list[Candidate], *, rounds: int, budget_s: float, cpus: int,
                log: Any) -> dict[str, Any]:
    shape = NETS[net]["shape"]
    rng = np.random.default_rng(0)
    gemm_int = common.gemm_model(*GEMM, integer=True)
    gemm_a = common.gemm_input(GEMM[0], GEMM[1], integer=True)
    gemm_macs = GEMM[0] * GEMM[1] * GEMM[2]
    floor = common.identity_model(shape)
    out: dict[str, Any] = {}
    for label, batch, threads, spin in SETTINGS:
        nthreads = threads or cpus
        x = rng.random((batch, *shape), dtype=np.float32)
        fns = {}
        for c in cands:
            fns[c.name] = _runner(common.ort_session(c.data, nthreads, spin=spin), x, c.fixed_batch1)
        gsess = common.ort_session(gemm_int, nthreads, spin=spin)
        fns["int8 GEMM limit"] = (lambda s=gsess: s.run(None, {"A": gemm_a}))
        fns["session.run floor"] = _runner(common.ort_session(floor, nthreads, spin=spin), x, False)
        runs = {n: runs_for(f, budget_s) for n, f in fns.items()}
        t = time.perf_counter()
        times = common.interleave(fns, rounds=rounds, runs=runs, warmup=1)
        lim = times["int8 GEMM limit"]
        row: dict[str, Any] = {"batch": batch, "threads": nthreads, "spinning": spin, "runs_per_round": runs,
                               "int8_limit_gmacs": gemm_macs / lim.median / 1e9,
                               "int8_limit_latency": lim.summary(),
                               "session_run_floor": times["session.run floor"].summary(), "models": {}}
        for c in cands:
            tm = times[c.name]
            row["models"][c.name] = {"latency": tm.summary(),
                                     "speedup_vs_fp32": common.round_ratio(times["fp32"], tm),
                                     "vs_int8_limit_time_ratio": common.round_ratio(lim, tm)}
        out[label] = row
        log(f"  {net} {label}: {rounds} rounds in {time.perf_counter() - t:.0f} s; int8 limit "
            f"{row['int8_limit_gmacs']:.0f} GMAC/s")
    return out


def profile_net(net: str, cands: list[Candidate], cpus: int, spin: bool = False) -> dict[str, Any]:
    """ORT profile of every form at b64/all threads (Brevitas QCDQ: b1) and of the rcdeploy ones at b1/1t."""
    shape = NETS[net]["shape"]
    rng = np.random.default_rng(2)
    out: dict[str, Any] = {}
    for c in cands:
        x = rng.random((1 if c.fixed_batch1 else 64, *shape), dtype=np.float32)
        out[c.name] = {"b64": common.profile_model(c.data, x, threads=cpus, spin=spin, runs=2)}
        if c.name.startswith("rcdeploy") or c.name == "fp32":
            out[c.name]["b1"] = common.profile_model(c.data, x[:1], threads=1, runs=50)
            out[c.name]["b64_1t"] = common.profile_model(c.data, x, threads=1, runs=3)
    return out


# ----------------------------------------------------------------------------------------- report


def _x(v: float | None) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.2f}x"


def latency_table(res: dict[str, Any], sizes: dict[str, int], exact: dict[str, bool]) -> tuple[list, list]:
    headers = ["model", "exact w/o VNNI", "bytes", "size/fp32"]
    for s in res:
        headers += [f"{s} ms (p25-p75)", "x fp32"]
    rows = []
    for name in res[GOAL_B1]["models"]:
        r = [name, "yes" if exact.get(name) else "**no**", f"{sizes[name]:,}", f"{sizes[name] / sizes['fp32']:.3f}"]
        for s in res:
            m = res[s]["models"][name]
            r += [common.fmt_spread(m["latency"]), _x(m["speedup_vs_fp32"]["median"])]
        rows.append(r)
    return headers, rows


def efficiency(res: dict[str, Any], setting: str, name: str, macs: int) -> tuple[float, float]:
    """GMAC/s of a model at a b64 setting and its fraction of the int8 limit timed in the same rounds.

    The fraction is the median over rounds of (limit time / model time) x (model work / limit work),
    so load that hits a whole round cancels.
    """
    row = res[setting]
    m = row["models"][name]
    work = macs * row["batch"]
    g = work / m["latency"]["median_of_round_medians"] / 1e9
    frac = m["vs_int8_limit_time_ratio"]["median"] * work / (GEMM[0] * GEMM[1] * GEMM[2])
    return g, frac


def efficiency_table(res: dict[str, Any], prof: dict[str, Any]) -> tuple[list, list]:
    headers = ["model", "int MAC share", "MMAC/img"]
    for s in B64_SETTINGS:
        headers += [f"GMAC/s {s}", "% int8 limit"]
    headers += ["top kernels at b64 (share of kernel time)"]
    rows = []
    for name in res[GOAL_B1]["models"]:
        p = prof[name]["b64"]
        macs = p["macs_per_image"]
        r = [name, f"{100 * p['integer_mac_share']:.0f}%", f"{macs / 1e6:.1f}"]
        for s in B64_SETTINGS:
            g, frac = efficiency(res, s, name, macs)
            r += [f"{g:.1f}", f"{100 * frac:.0f}%"]
        r.append(_top_ops(p, 3))
        rows.append(r)
    return headers, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS), help=f"comma list of: {', '.join(NETS)}")
    ap.add_argument("--rounds", type=int, default=7, help="round-robin rounds per setting")
    ap.add_argument("--budget", type=float, default=0.4, help="seconds per candidate per round (sets runs)")
    ap.add_argument("--quick", action="store_true", help="ResNet-20 only, 2 short rounds (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results.json alone")
    args = ap.parse_args(argv)
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        ap.error(f"unknown net(s) {', '.join(unknown)}; choose from {', '.join(NETS)}")
    if args.quick:
        nets, args.rounds, args.budget = ["resnet20"], 2, 0.1
    return run(nets, rounds=args.rounds, budget_s=args.budget, write=not args.no_write, quick=args.quick)


def run(nets: list[str], *, rounds: int, budget_s: float, write: bool = True, quick: bool = False) -> int:
    import os

    import torch

    torch.set_num_threads(1)  # model building only; timing is onnxruntime's
    cpus = os.cpu_count() or 1
    info = common.machine_info()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict[str, Any] = {"machine": info, "rounds": rounds, "budget_s_per_candidate_round": budget_s,
                               "quick": quick, "gemm": list(GEMM), "nets": {}}
    sections = []
    for net in nets:
        log(f"[inference] {net}")
        cands, binfo = build_candidates(net, log)
        sizes = {c.name: len(c.data) for c in cands}
        res = measure_net(net, cands, rounds=rounds, budget_s=budget_s, cpus=cpus, log=log)
        t = time.perf_counter()
        prof = profile_net(net, cands, cpus, spin=res[goal_b64(res)]["spinning"])
        log(f"  profiled in {time.perf_counter() - t:.0f} s")
        results["nets"][net] = {"build": binfo, "sizes_bytes": sizes, "settings": res, "profile": compact(prof)}
        tables = [latency_table(res, sizes, binfo["exact_on_every_cpu"]), efficiency_table(res, prof)]
        print(f"\n{NETS[net]['label']} {'x'.join(map(str, NETS[net]['shape']))}: median latency over {rounds} "
              f"rounds (p25-p75 of single runs), ratio = per-round fp32/model median")
        for headers, rows in tables:
            print(common.text_table(headers, rows))
        print("int8 limit (1024^3 MatMulInteger): " + ", ".join(
            f"{s}: {res[s]['int8_limit_gmacs']:.0f} GMAC/s" for s in res))
        for note in binfo["notes"]:
            print("note:", note)
        sections.append((net, tables, res, prof, binfo))  # full profiles: the markdown reads per-layer times
    results["goals"] = goals(results)
    for line in results["goals"]["lines"]:
        print(line)
    if write:
        common.update_results("inference", results)
        common.write_section("inference", markdown(results, sections, cpus))
        log(f"[inference] wrote {common.MARKDOWN.name} (inference section) and {common.RESULTS.relative_to(common.ROOT)}")
    return 0


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The compass goals, reported (never asserted) for each network measured."""
    lines, figures = [], {}
    for net, r in results["nets"].items():
        st, sizes, lab = r["settings"], r["sizes_bytes"], NETS[net]["label"]

        def speed(model: str, setting: str, st: dict = st) -> float | None:
            m = st[setting]["models"].get(model)
            return m["speedup_vs_fp32"]["median"] if m else None

        macs = r["profile"]["rcdeploy w8"]["b64"]["macs_per_image"]
        g64 = goal_b64(st)
        f = {"goal_b64_setting": g64, "w8_b1": speed("rcdeploy w8", GOAL_B1), "w8_b64": speed("rcdeploy w8", g64),
             "w8p_b1": speed("rcdeploy w8 -50%ch", GOAL_B1), "w8p_b64": speed("rcdeploy w8 -50%ch", g64),
             "w8_b64_1t": speed("rcdeploy w8", "b64/1t"), "w8p_b64_1t": speed("rcdeploy w8 -50%ch", "b64/1t"),
             "w8p16_b1": speed(f"rcdeploy w8 -50%ch x{MULTIPLE}", GOAL_B1),
             "w8p16_b64": speed(f"rcdeploy w8 -50%ch x{MULTIPLE}", g64),
             "w4_over_w8_size": sizes["rcdeploy w4"] / sizes["rcdeploy w8"],
             "w8_int8_limit_fraction": efficiency(st, g64, "rcdeploy w8", macs)[1],
             "w8_int8_limit_fraction_1t": efficiency(st, "b64/1t", "rcdeploy w8", macs)[1]}
        figures[net] = f
        f["w7_b1"], f["w7_b64"] = speed("rcdeploy w7", GOAL_B1), speed("rcdeploy w7", g64)
        lines += [
            common.goal_line(f"{lab}: w8 vs fp32 at {GOAL_B1}", f["w8_b1"], 2.2),
            common.goal_line(f"{lab}: w7 (8-bit-class layers at 7 bits: u8 x s8 kernels) vs fp32 at {GOAL_B1}",
                             f["w7_b1"], 2.2),
            common.goal_line(f"{lab}: w7 vs fp32 at {g64}", f["w7_b64"], 2.2),
            common.goal_line(f"{lab}: w8 vs fp32 at {g64} (b64/1t: {_x(f['w8_b64_1t'])})", f["w8_b64"], 2.2),
            common.goal_line(f"{lab}: w8 -50%ch vs fp32 at {GOAL_B1} (x{MULTIPLE} variant: {_x(f['w8p16_b1'])})",
                             f["w8p_b1"], 3.5),
            common.goal_line(f"{lab}: w8 -50%ch vs fp32 at {g64} (b64/1t: {_x(f['w8p_b64_1t'])}; "
                             f"x{MULTIPLE} variant: {_x(f['w8p16_b64'])})", f["w8p_b64"], 3.5),
            common.goal_line(f"{lab}: w8 share of the int8 limit at {g64} "
                             f"(b64/1t: {f['w8_int8_limit_fraction_1t']:.2f})", f["w8_int8_limit_fraction"], 0.70,
                             unit=""),
            common.goal_line(f"{lab}: w4 file / w8 file", f["w4_over_w8_size"], 0.55, higher=False, unit=""),
        ]
    return {"figures": figures, "lines": lines, "settings": {"b1": GOAL_B1, "b64": {n: figures[n]["goal_b64_setting"]
                                                                                 for n in figures}}}


def _top_ops(p: dict[str, Any], n: int = 4) -> str:
    return ", ".join(f"{op} {100 * share:.0f}%" for op, share in list(p["time_share_by_op"].items())[:n])


def _ms(seconds: float) -> str:
    return common.fmt_ms(seconds) + " ms"


def compact(prof: dict[str, Any]) -> dict[str, Any]:
    """Profiles for results.json: per-layer records replaced by their per-channel-count summary."""
    out: dict[str, Any] = {}
    for name, views in prof.items():
        out[name] = {}
        for view, p in views.items():
            q = {k: v for k, v in p.items() if k != "conv_gemm_nodes"}
            q["integer_convs_by_out_channels"] = by_channels(p) if view == "b64_1t" else None
            out[name][view] = q
    return out


def by_channels(p: dict[str, Any]) -> str:
    """GMAC/s of the integer (non-depthwise) convs grouped by output channel count, and their share of time."""
    groups: dict[int, list[float]] = {}
    total = sum(n.get("s", 0.0) for n in p["conv_gemm_nodes"].values())
    for n in p["conv_gemm_nodes"].values():
        if n["op"] in common.INTEGER_KERNELS and n["out_channels"] and not n["depthwise"] and n.get("s"):
            g = groups.setdefault(n["out_channels"] if n.get("k", 99) > 27 else "stem", [0.0, 0.0])
            g[0] += n["macs"]
            g[1] += n["s"]
    dw = [0.0, 0.0]
    for n in p["conv_gemm_nodes"].values():
        if n["op"] in common.INTEGER_KERNELS and n["depthwise"] and n.get("s"):
            dw[0] += n["macs"]
            dw[1] += n["s"]
    batch = 64
    parts = [f"{c if c == 'stem' else f'{c} ch'} {batch * m / t / 1e9:.0f} GMAC/s ({100 * t / total:.0f}% of conv time)"
             for c, (m, t) in sorted(groups.items(), key=lambda kv: (kv[0] != "stem", str(kv[0]).zfill(6)))]
    if dw[1]:
        parts.append(f"depthwise {batch * dw[0] / dw[1] / 1e9:.0f} GMAC/s ({100 * dw[1] / total:.0f}% of conv time, "
                     f"{100 * dw[0] / max(1, sum(n['macs'] for n in p['conv_gemm_nodes'].values())):.0f}% of MACs)")
    return ", ".join(parts) if parts else "none"


def limits(net: str, res: dict[str, Any], prof: dict[str, Any], binfo: dict[str, Any]) -> list[str]:
    """Measured facts that say what bounds each rcdeploy figure (profile + timing of the same run)."""
    out = []
    by = binfo.get("bytes_by_dtype", {})
    if "rcdeploy w4" in by and "rcdeploy w8" in by:
        def parts(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v:,}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
        out.append(f"file payload by dtype, w8: {parts(by['rcdeploy w8'])}; w4: {parts(by['rcdeploy w4'])} bytes "
                   "(4-bit weights halve only the weight bytes; per-channel float scales and int32 biases stay)")
    lat = {n: res[GOAL_B1]["models"][n]["latency"]["median_of_round_medians"] for n in res[GOAL_B1]["models"]}
    for name in ("rcdeploy w8", "rcdeploy w8 -50%ch", f"rcdeploy w8 -50%ch x{MULTIPLE}"):
        p = prof.get(name, {}).get("b1")
        if not p:
            continue
        conv = sum(v for k, v in p["time_share_by_op"].items() if k in common.INTEGER_KERNELS)
        floor = res[GOAL_B1]["session_run_floor"]["median_of_round_medians"]
        out.append(f"{name} at b1/1t: {_ms(lat[name])} per image (a session.run of a 1-node graph: "
                   f"{_ms(floor)}); profiled: {p['kernel_nodes']} kernels, {_ms(p['kernel_time_s'])} of kernel time, "
                   f"{1e6 * p['kernel_time_s'] / max(1, p['kernel_nodes']):.1f} us per kernel on average; integer "
                   f"conv/gemm {100 * conv:.0f}% of it ({_top_ops(p, 4)})")
    for name in ("rcdeploy w8", "rcdeploy w8 -50%ch"):
        p = prof.get(name, {}).get("b64_1t")
        if p:
            out.append(f"{name}, integer convs by output channels (b64/1t profile; stem = first conv, 1-3 input channels): " + by_channels(p))
    g64 = goal_b64(res)
    sc = {n: res["b64/1t"]["models"][n]["latency"]["median_of_round_medians"]
          / res[g64]["models"][n]["latency"]["median_of_round_medians"]
          for n in ("fp32", "rcdeploy w8", "rcdeploy w8 -50%ch", f"rcdeploy w8 -50%ch x{MULTIPLE}")
          if n in res[g64]["models"]}
    out.append(f"speed-up from 1 to {res[g64]['threads']} threads at b64 ({g64} vs b64/1t): " + ", ".join(
        f"{n} {v:.2f}x" for n, v in sc.items()) + f", int8 GEMM limit {scaling_limit(res):.2f}x")
    if "b64/all" in res and "b64/all nospin" in res:
        def spin_cost(name: str) -> float:
            a = res["b64/all"]["models"][name]["latency"]["median_of_round_medians"]
            return a / res["b64/all nospin"]["models"][name]["latency"]["median_of_round_medians"]
        out.append(f"onnxruntime's spinning thread pool (its default) vs spinning off, b64 on all cores: fp32 "
                   f"{spin_cost('fp32'):.2f}x and rcdeploy w8 {spin_cost('rcdeploy w8'):.2f}x the latency; int8 GEMM "
                   f"probe {res['b64/all nospin']['int8_limit_gmacs'] / res['b64/all']['int8_limit_gmacs']:.2f}x. "
                   "Which is faster depends on the other load on this shared machine")
    for pruned in ("rcdeploy w8 -50%ch", f"rcdeploy w8 -50%ch x{MULTIPLE}"):
        if pruned not in prof or "rcdeploy w8" not in prof:
            continue
        m_full = prof["rcdeploy w8"]["b64"]["macs_per_image"]
        m_half = prof[pruned]["b64"]["macs_per_image"]
        cuts = []
        for s in res:
            t_full = res[s]["models"]["rcdeploy w8"]["latency"]["median_of_round_medians"]
            t_half = res[s]["models"][pruned]["latency"]["median_of_round_medians"]
            cuts.append(f"{t_full / t_half:.2f}x at {s}")
        out.append(f"{pruned}: MACs cut {m_full / max(m_half, 1):.2f}x, latency cut " + ", ".join(cuts))
    return out


def _channel_buckets(p: dict[str, Any]) -> dict[Any, tuple[float, float]]:
    """(GMAC/s at batch 64, share of conv time) of integer convs per output-channel count ('dw': depthwise)."""
    nodes = [n for n in p["conv_gemm_nodes"].values() if n["op"] in common.INTEGER_KERNELS and n.get("s")]
    total = sum(n["s"] for n in nodes) or 1.0
    acc: dict[Any, list[float]] = {}
    for n in nodes:
        if n["out_channels"] is None:
            continue
        # The stem conv (3 or 1 input channels: reduction <= 27) is slow for its tiny reduction, not its width.
        key = "dw" if n["depthwise"] else "stem" if n.get("k", 99) <= 27 else n["out_channels"]
        a = acc.setdefault(key, [0.0, 0.0])
        a[0] += n["macs"]
        a[1] += n["s"]
    return {k: (64 * m / t / 1e9, t / total) for k, (m, t) in acc.items()}


def bucket_scaling(one: dict[str, Any], many: dict[str, Any]) -> str:
    """Per output-channel bucket: conv time with 1 thread / with all threads, from the two b64 profiles."""
    a, b = _channel_buckets(one), _channel_buckets(many)
    parts, slow = [], []
    for k in sorted(a, key=lambda k: (not isinstance(k, int), str(k).zfill(6))):
        if k in b and b[k][0] > 0:
            name = {"stem": "the stem conv", "dw": "depthwise convs"}.get(k, f"{k}-channel convs")
            parts.append(f"{name} {b[k][0] / a[k][0]:.2f}x")
            if b[k][0] / a[k][0] < 1.5:
                slow.append(name)

    def other(p: dict[str, Any]) -> float:
        conv = sum(n.get("s", 0.0) for n in p["conv_gemm_nodes"].values())
        return max(p["kernel_time_s"] - conv, 1e-12)

    o = other(one) / other(many)
    parts.append(f"all other kernels {o:.2f}x")
    if o < 1.5:
        slow.append("the other kernels (adds, pooling, quantize, transposes)")
    text = ", ".join(parts)
    if slow:
        text += "; " + " and ".join(slow) + " gain little from extra threads"
    return text


def scaling_limit(res: dict[str, Any]) -> float:
    """Speed-up of the int8 GEMM limit from b64/1t to the b64 goal setting (same rounds as the models)."""
    return res[goal_b64(res)]["int8_limit_gmacs"] / res["b64/1t"]["int8_limit_gmacs"]


def misses(net: str, figures: dict[str, Any], res: dict[str, Any], prof: dict[str, Any],
           binfo: dict[str, Any]) -> list[str]:
    """For each goal this network misses: by how much, and what the same run's profile says limits it."""
    out = []
    f = figures[net]
    g64 = goal_b64(res)
    full_b1 = prof.get("rcdeploy w8", {}).get("b1")
    fp32_b1 = res[GOAL_B1]["models"]["fp32"]["latency"]["median_of_round_medians"]
    floor = res[GOAL_B1]["session_run_floor"]["median_of_round_medians"]
    if f["w8_b1"] is not None and f["w8_b1"] < 2.2 and full_b1:
        out.append(f"w8 at b1 is {f['w8_b1']:.2f}x fp32 (goal 2.2x): the whole fp32 model takes only {_ms(fp32_b1)}; "
                   f"the integer graph runs {full_b1['kernel_nodes']} kernels averaging "
                   f"{1e6 * full_b1['kernel_time_s'] / max(1, full_b1['kernel_nodes']):.1f} us under the profiler, "
                   f"against a session.run floor of {_ms(floor)}: at this size, per-kernel fixed costs (quantize the "
                   "input, layout transposes, pooling, the head) weigh as much as the MACs, so integer arithmetic "
                   "cannot give its full factor")
    def scaling(name: str) -> float:
        one = res["b64/1t"]["models"][name]["latency"]["median_of_round_medians"]
        return one / res[g64]["models"][name]["latency"]["median_of_round_medians"]

    threads = res[g64]["threads"]
    if f["w8_b64"] is not None and f["w8_b64"] < 2.2:
        out.append(f"w8 at {g64} is {f['w8_b64']:.2f}x fp32 (goal 2.2x; {f['w8_b64_1t']:.2f}x at b64/1t): going "
                   f"from 1 to {threads} threads speeds fp32 up {scaling('fp32'):.2f}x but the integer graph only "
                   f"{scaling('rcdeploy w8'):.2f}x (the int8 GEMM limit: {scaling_limit(res):.2f}x). Per layer "
                   f"(profiles at 1 and {threads} threads, GMAC/s ratio): "
                   f"{bucket_scaling(prof['rcdeploy w8']['b64_1t'], prof['rcdeploy w8']['b64'])}")
    half_b1 = prof.get("rcdeploy w8 -50%ch", {}).get("b1")
    if half_b1 and (f["w8p_b1"] or 0) < 3.5 <= (f["w8p_b64"] or 0):
        out.append(f"w8 -50%ch is {f['w8p_b1']:.2f}x fp32 at b1 (goal 3.5x; {f['w8p_b64']:.2f}x at b64): at batch 1 "
                   f"its {half_b1['kernel_nodes']} kernels average "
                   f"{1e6 * half_b1['kernel_time_s'] / max(1, half_b1['kernel_nodes']):.1f} us under the profiler, "
                   "so per-kernel fixed costs, which channel removal does not shrink, bound the gain")
    pr = prof.get("rcdeploy w8 -50%ch", {}).get("b64_1t")
    if pr and (f["w8p_b64"] or 0) < 3.5:
        b = _channel_buckets(pr)
        chans = sorted(k for k in b if k not in ("dw", "stem"))
        worst = min(chans, key=lambda k: b[k][0]) if chans else None
        fast = max(chans, key=lambda k: b[k][0]) if chans else None
        m_full = prof["rcdeploy w8"]["b64"]["macs_per_image"]
        m_half = prof["rcdeploy w8 -50%ch"]["b64"]["macs_per_image"]
        t_full = res["b64/1t"]["models"]["rcdeploy w8"]["latency"]["median_of_round_medians"]
        t_half = res["b64/1t"]["models"]["rcdeploy w8 -50%ch"]["latency"]["median_of_round_medians"]
        text = (f"w8 -50%ch is {f['w8p_b1']:.2f}x fp32 at b1 and {f['w8p_b64']:.2f}x at b64 (goal 3.5x): removing half "
                f"the channels cuts MACs {m_full / max(1, m_half):.2f}x but b64/1t latency only {t_full / t_half:.2f}x")
        if worst is not None and fast is not None:
            text += (f". The narrow layers it leaves run slowly in onnxruntime's int8 conv: {worst}-channel convs at "
                     f"{b[worst][0]:.0f} GMAC/s take {100 * b[worst][1]:.0f}% of conv time, while {fast}-channel ones "
                     f"reach {b[fast][0]:.0f} GMAC/s")
        if "dw" in b:
            text += f"; depthwise convs run at {b['dw'][0]:.0f} GMAC/s ({100 * b['dw'][1]:.0f}% of conv time)"
        text += (f"; from 1 to {threads} threads it speeds up {scaling('rcdeploy w8 -50%ch'):.2f}x "
                 f"(fp32 {scaling('fp32'):.2f}x; per layer: "
                 f"{bucket_scaling(pr, prof['rcdeploy w8 -50%ch']['b64'])})")
        if f.get("w8p16_b64") is not None:
            text += (f". Keeping a multiple of {MULTIPLE} channels per group (shrink_model(channel_multiple="
                     f"{MULTIPLE}), fewer channels removed) gives {f['w8p16_b1']:.2f}x at b1 and {f['w8p16_b64']:.2f}x "
                     "at b64")
        out.append(text)
    if f["w8_int8_limit_fraction"] < 0.70:
        p = prof.get("rcdeploy w8", {}).get("b64_1t")
        text = (f"w8 reaches {100 * f['w8_int8_limit_fraction']:.0f}% of the int8 GEMM limit at {g64} "
                f"({100 * f['w8_int8_limit_fraction_1t']:.0f}% at b64/1t; goal 70%)")
        if p:
            b = _channel_buckets(p)
            if "dw" in b:
                text += (f": depthwise convs run at {b['dw'][0]:.0f} GMAC/s and take {100 * b['dw'][1]:.0f}% of conv "
                         "time (one input channel per output: no reduction to vectorize over)")
            text += (f". Per layer at b64/1t the convs run at: {by_channels(p)}, against a limit of "
                     f"{res['b64/1t']['int8_limit_gmacs']:.0f} GMAC/s; and the non-conv kernels take "
                     f"{100 * (1 - sum(n.get('s', 0.0) for n in p['conv_gemm_nodes'].values()) / p['kernel_time_s']):.0f}%"
                     " of kernel time")
            if f["w8_int8_limit_fraction"] < f["w8_int8_limit_fraction_1t"]:
                text += f"; with {threads} threads the graph scales less than the GEMM (see the thread line below)"
        out.append(text)
    by = binfo.get("bytes_by_dtype", {}).get("rcdeploy w4")
    if f["w4_over_w8_size"] > 0.55 and by:
        other = sum(v for k, v in by.items() if k not in ("int4",))
        total = sum(by.values())
        out.append(f"the w4 file is {f['w4_over_w8_size']:.3f}x the w8 one (goal 0.55x): only the weights halve; "
                   f"per-channel float scales, int32 biases and 8-bit first/last layers are {other:,} of its "
                   f"{total:,} payload bytes ({100 * other / total:.0f}%)")
    return out


def markdown(results: dict[str, Any], sections: list, cpus: int) -> str:
    info = results["machine"]
    out = ["## Inference: the same network in every form, same run", "",
           f"Machine: {common.machine_line(info)}. `python benchmarks/inference.py` "
           f"({results['rounds']} round-robin rounds per setting, ~{results['budget_s_per_candidate_round']} s per "
           f"candidate per round{'; QUICK smoke run, not for quoting' if results['quick'] else ''}).", "",
           "Every form runs in a plain `onnxruntime.InferenceSession` (CPU provider, ORT_ENABLE_ALL, sequential "
           "execution, nothing rcdeploy-specific at load). Settings: batch 1 or 64 with 1 intra-op thread (`1t`) or "
           f"all {cpus} cores (`all`) with onnxruntime's default spinning thread pool, and `nospin` = "
           "`session.intra_op.allow_spinning=0`. Latency: median over rounds of each round's median, in ms, with the "
           "p25-p75 of single runs; `x fp32`: median over rounds of the per-round ratio fp32/model (>1 = faster than "
           "fp32). Weights are random (latency and size do not depend on training). Peers: `fp32` = "
           "torch.onnx.export; `ort qs` = onnxruntime `quantize_static` with its defaults (S8S8 QDQ) and at its best "
           "(quant_pre_process + U8S8 QDQ), per-tensor, calibrated on random images, and `ort qs U8S8 rr` = the "
           "same with reduce_range=True (7-bit weights, onnxruntime's advice for x86 without VNNI); `exact w/o VNNI`: "
           "rcdeploy's static int16 pair-sum proof on onnxruntime's optimized graph (`no`: some u8 x s8 pair can "
           "saturate, so the file computes something else on x86 CPUs without VNNI: AVX2, AVX-512 without VNNI; "
           "latency measured on such a CPU would time a wrong model); `brevitas QCDQ` = "
           "`brevitas.export.export_onnx_qcdq` of the same 8-bit model as is (its input is fixed at batch 1, so its "
           "b64 columns are 64 batch-1 calls). `rcdeploy w8/w7/w4` = rcdeploy's integer QDQ export (w4: packed INT4 "
           "weights, read by plain onnxruntime; first and last layers at 8 bits, except w7 where every layer is 7-bit). "
           "Weight forms (exact on every CPU, see the exactness section): layers of 7 bits or fewer are int8 with "
           "|w| <= 64 (u8 x s8 kernels, VNNI-fast); 8-bit layers are uint8 with zero point 128 (u8 x u8 kernels: "
           "onnxruntime has no VNNI u8 x u8 kernel, so an all-8-bit network runs near fp32 speed here; on AVX2 "
           "u8 x u8 widens to 16 bits and, by reasoning, runs at about half the u8 x s8 rate). For speed, train "
           "8-bit-class layers at 7 bits (`--bits 7`, `--first-last-bits 7`), as w7 does; `-50%ch`: half of every prunable channel group zeroed and "
           "physically removed (rcdeploy.export.shrink). Second table: integer MAC share, MACs/image and kernel "
           "time shares from onnxruntime's profiler on its optimized graph (b64, all threads, the goal's spin setting); "
           "GMAC/s and its share of the int8 limit: a 1024x1024x1024 `MatMulInteger` (uint8 x int8 -> int32) timed "
           "in the same rounds at the same thread count (per-round ratio). Goals are read at "
           f"{GOAL_B1} and, for b64 on all cores, at whichever of spinning on/off gave the int8 GEMM probe the "
           "higher rate in the run (spinning threads lose their slices when other processes load the machine; "
           "the probe, not a candidate's own figure, picks the setting); the other settings are shown beside it.",
           ""]
    for net, tables, res, prof, binfo in sections:
        out += [f"### {NETS[net]['label']} ({'x'.join(map(str, NETS[net]['shape']))})", ""]
        for headers, rows in tables:
            out.append(common.markdown_table(headers, rows))
        out.append("int8 limit in the same rounds: " + "; ".join(
            f"{s} {res[s]['int8_limit_gmacs']:.0f} GMAC/s" for s in res) + ".")
        for name, pr in binfo.get("pruning", {}).items():
            if name.startswith("rcdeploy w8"):
                out.append(f"{name}: {pr['channels'][0]} -> {pr['channels'][1]} prunable channels, "
                           f"{pr['macs'][0] / 1e6:.1f} -> {pr['macs'][1] / 1e6:.1f} MMAC/image.")
        for note in binfo["notes"]:
            out.append(f"Note: {note}.")
        out.append("")
        miss = misses(net, results["goals"]["figures"], res, prof, binfo)
        if miss:
            out += ["**Goals missed here, and what limits them:**", ""]
            out += [f"- {line}." for line in miss]
            out.append("")
        out += ["Measurements behind that (same run):", ""]
        out += [f"- {line}." for line in limits(net, res, prof, binfo)]
        out.append("")
    out += ["### Goals (reported, not asserted)", ""]
    out += [f"- {line}" for line in results["goals"]["lines"]]
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
