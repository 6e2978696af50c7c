"""Latency of a channel-pruned integer ResNet-20 against its MACs, by kept-channel multiple, in onnxruntime.

    python benchmarks/pruned_latency.py [--rounds 15] [--multiples 1,4,8,16] [--bits 4|7] [--threads 1,2]
                                        [--no-measured] [--quick] [--no-write]

ResNet-20 (width 1, CIFAR input 3x32x32, random weights: latency does not depend on training) at `--bits`
(4: 4-bit weights with 8-bit first/last layers; 7: every layer 7-bit), built by benchmarks/inference.py's
make_model. The pruned model zeroes 50% of every prunable channel group the removable way
(make_model(prune=0.5)); rcdeploy.export.shrink.shrink_model then removes them physically, rounding each
group's kept count up to `channel_multiple` m (so a larger m removes fewer channels). Multiples that keep
the same channels give the same file and share one row. A "measured" variant picks each stage's kept count
by measurement instead: two chained c->c 3x3 QLinearConv at the stage's spatial size are profiled at batch
64 for every c from the pruned count to the full width in steps of 4, and the smallest c within 3% of the
fastest per-conv time is kept (built only when that differs from every multiple's file).

Every file is written by rcdeploy.export.qdq.build_qdq (4-bit weights packed as INT4), passed through
rcdeploy.runtime.session.widen_low_bit_initializers as open_session does, and run in a plain onnxruntime
CPU session (which folds the weights to int8 and fuses QLinearConv). All files are timed interleaved
(common.interleave) at batch 1 and 64 with 1 thread (and batch 64 with each other `--threads` count);
speed-up = unpruned / pruned time per round (median and range over rounds), MAC ratio = unpruned / pruned
MACs, MAC efficiency = speed-up / MAC ratio. `--no-measured` skips the measured variant.
The unpruned, multiple-1, fastest-multiple (and measured) files are then profiled at batch 64, 1 thread
(common.profile_model): QLinearConv time and GMAC/s by output channels, and the non-conv nodes.

Writes the `pruned-latency` section of BENCHMARKS.md and benchmarks/results.json (not with --no-write);
`--quick` is a smoke run (3 rounds, multiples 1 and 16, 1 thread only, one profile of each file).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from inference import make_model  # noqa: E402

from rcdeploy.export.qdq import build_qdq  # noqa: E402
from rcdeploy.export.shrink import ShrinkReport, shrink_model, zero_channels  # noqa: E402
from rcdeploy.models.channels import trace_channels  # noqa: E402
from rcdeploy.quant.calibrate import calibrate_activations  # noqa: E402
from rcdeploy.runtime.session import widen_low_bit_initializers  # noqa: E402

KEY = "pruned-latency"
TITLE = "## Pruned ResNet-20: latency against MACs, by kept-channel multiple"
NET = "resnet20"
SHAPE = (3, 32, 32)
PRUNE = 0.5
SEED = 0
# ResNet-20 at 32x32: (full width, spatial side) of each stage; a prunable group's size names its stage.
STAGES = ((16, 32), (32, 16), (64, 8))
BATCHES = (1, 64)
RUNS_PER_ROUND = {1: 10, 64: 3}  # timed calls per candidate per round
PROFILE_BATCH = 64
GOAL = 2.0  # issue 16 item 4: the 50%-channel file at least 2x faster than the unpruned one at batch 64
CHANNEL_GROUPS = ((0, 8, "<= 8"), (9, 16, "9-16"), (17, 32, "17-32"), (33, 1 << 30, "> 32"))
STEM_K = SHAPE[0] * 9  # reduction length of the stem conv (3 input channels x 3x3): slow for its K, not its width
MEASURE_STEP = 4  # candidate kept counts of the measured variant: pruned count, +4, ..., full width
MEASURE_TIE = 1.03  # the smallest count within 3% of the fastest per-conv time is chosen
MEASURE_QUICK, MEASURE_FULL = (5, 5), (15, 5)  # (alternating profiles, runs each) of every candidate conv pair
MINOR_SHARE = 0.03  # a non-conv op below this share of every profiled file's kernel time is lumped together
UNPRUNED = "unpruned"
STEM = f"stem QLinearConv (K = {STEM_K})"
MEASURED = "measured"


# ----------------------------------------------------------------------------------------- models


@dataclass
class Variant:
    """One exported file: its label, the multiples that give it, kept channels per stage and figures."""

    label: str
    data: bytes  # as timed: after widen_low_bit_initializers (as open_session runs the file)
    kept: dict[int, list[int]]  # stage full width -> kept counts of that stage's groups (sorted, distinct)
    macs: int
    file_bytes: int  # the packed file as written (INT4 weights)
    multiples: list[int] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        return {"multiples": self.multiples, "kept": {str(w): k for w, k in self.kept.items()},
                "macs": self.macs, "file_bytes": self.file_bytes}


def first_last_bits(bits: int) -> int:
    return 7 if bits == 7 else 8


def export(model: torch.nn.Module) -> tuple[bytes, int, int]:
    """(widened bytes, MACs per image, packed file bytes) of rcdeploy's integer QDQ export."""
    ex = build_qdq(model.eval(), SHAPE, storage="packed")
    macs = sum(layer.macs for layer in ex.layers)
    return widen_low_bit_initializers(ex.model).SerializeToString(), int(macs), len(ex.to_bytes())


def kept_by_stage(report: ShrinkReport | None) -> dict[int, list[int]]:
    """Kept output channels of the convs, grouped by the stage (the conv's full width)."""
    if report is None:
        return {w: [w] for w, _ in STAGES}
    kept: dict[int, set[int]] = {}
    for layer in report.layers:
        if layer.kind == "conv":
            kept.setdefault(layer.out_before, set()).add(layer.out_after)
    return {w: sorted(kept.get(w, {w})) for w, _ in STAGES}


def unpruned_variant(bits: int) -> Variant:
    data, macs, size = export(make_model(NET, bits, seed=SEED, first_last_bits=first_last_bits(bits)))
    return Variant(UNPRUNED, data, kept_by_stage(None), macs, size)


def multiple_variants(bits: int, multiples: Sequence[int]) -> list[Variant]:
    """The 50%-pruned model shrunk at each multiple; multiples keeping the same channels share one file."""
    pruned = make_model(NET, bits, seed=SEED, prune=PRUNE, first_last_bits=first_last_bits(bits))
    out: dict[str, Variant] = {}
    for m in multiples:
        small, report = shrink_model(pruned, input_shape=SHAPE, channel_multiple=m)
        kept = kept_by_stage(report)
        key = kept_label(kept)
        if key in out:
            out[key].multiples.append(m)
            continue
        data, macs, size = export(small)
        out[key] = Variant(f"x{m}", data, kept, macs, size, [m])
    for v in out.values():
        v.label = "x" + "=x".join(map(str, v.multiples))
    return list(out.values())


def measured_variant(bits: int, keep: dict[int, int]) -> Variant:
    """`keep[w]` channels kept in every group of stage w: a prefix of make_model(prune)'s random order zeroed.

    make_model zeroes the first int(size * PRUNE) channels of one seeded permutation per group; here the
    first size - keep[size] of the same permutations are zeroed, then activations are recalibrated.
    """
    model = make_model(NET, bits, seed=SEED, first_last_bits=first_last_bits(bits))
    graph = trace_channels(model)
    pgen = torch.Generator().manual_seed(SEED + 1)
    masks = {g.index: torch.randperm(g.size, generator=pgen)[: g.size - keep.get(g.size, g.size)]
             for g in graph.prunable() if g.size > 1}
    zero_channels(model, {k: v for k, v in masks.items() if len(v)}, graph)
    gen = torch.Generator().manual_seed(SEED + 2)
    calibrate_activations(model, [torch.rand(64, *SHAPE, generator=gen) for _ in range(2)])
    small, report = shrink_model(model.eval(), input_shape=SHAPE, channel_multiple=1)
    data, macs, size = export(small)
    return Variant(MEASURED, data, kept_by_stage(report), macs, size)


def kept_label(kept: dict[int, list[int]]) -> str:
    return "/".join("-".join(map(str, kept[w])) for w, _ in STAGES)


# ----------------------------------------------------------------------------------------- measured choice


def conv_pair_model(channels: int, side: int) -> bytes:
    """float [N, c, side, side] -> QuantizeLinear -> two c->c 3x3 QLinearConv (int8 weights, zero point 0,
    per-channel scales, as rcdeploy writes sub-8-bit layers) -> DequantizeLinear."""
    rng = np.random.default_rng(channels * 1000 + side)
    inits = [numpy_helper.from_array(np.array(1 / 64, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.uint8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "s", "zp"], ["q0"])]
    for i in (1, 2):
        w = rng.integers(-64, 65, (channels, channels, 3, 3), dtype=np.int8)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(np.full(channels, 1e-3, np.float32), f"ws{i}"),
                  numpy_helper.from_array(np.zeros(channels, np.int8), f"wz{i}"),
                  numpy_helper.from_array(np.zeros(channels, np.int32), f"b{i}")]
        nodes.append(helper.make_node("QLinearConv", [f"q{i - 1}", "s", "zp", f"w{i}", f"ws{i}", f"wz{i}", "s", "zp",
                                                      f"b{i}"], [f"q{i}"], pads=[1, 1, 1, 1]))
    nodes.append(helper.make_node("DequantizeLinear", ["q2", "s", "zp"], ["out"]))
    shape = ["N", channels, side, side]
    graph = helper.make_graph(nodes, "conv_pair", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def conv_seconds(data: bytes, channels: int, side: int, runs: int) -> float:
    """Median-of-runs kernel seconds per QLinearConv of a conv-pair model at PROFILE_BATCH, 1 thread."""
    x = np.random.default_rng(0).random((PROFILE_BATCH, channels, side, side), dtype=np.float32)
    p = common.profile_model(data, x, threads=1, runs=runs)
    convs = [n["s"] for n in p["conv_gemm_nodes"].values() if n["op"] == "QLinearConv" and "s" in n]
    return sum(convs) / len(convs) if convs else float("nan")


def measure_stages(repeats: int, runs: int) -> dict[str, Any]:
    """Per stage: every candidate kept count's per-conv time, the minimum over `repeats` profiles taken with the
    candidates alternating (other load on the machine only adds time, so the minimum is the kernel's speed)."""
    cands = {(w, side, c): conv_pair_model(c, side) for w, side in STAGES
             for c in sorted({*range(int(w * PRUNE), w + 1, MEASURE_STEP), w})}
    raw: dict[tuple[int, int, int], list[float]] = {k: [] for k in cands}
    for _ in range(repeats):
        for (w, side, c), data in cands.items():
            raw[(w, side, c)].append(conv_seconds(data, c, side, runs))
    stages: dict[str, Any] = {}
    for w, side in STAGES:
        rows = {c: min(v) for (ww, _, c), v in raw.items() if ww == w}
        best = min(rows.values())
        chosen = min(c for c, s in rows.items() if s <= MEASURE_TIE * best)
        macs = {c: c * c * 9 * side * side for c in rows}
        stages[str(w)] = {"side": side, "pruned": int(w * PRUNE), "chosen": chosen,
                          "ms_per_conv": {str(c): 1e3 * s for c, s in rows.items()},
                          "gmacs": {str(c): macs[c] * PROFILE_BATCH / s / 1e9 for c, s in rows.items()}}
    return {"batch": PROFILE_BATCH, "repeats": repeats, "runs": runs, "stages": stages}


# ----------------------------------------------------------------------------------------- timing


def settings(threads: Sequence[int]) -> list[tuple[str, int, int]]:
    """(label, batch, threads): batch 1 and 64 at 1 thread, batch 64 at every other thread count."""
    out = [(f"b{b}/1t", b, 1) for b in BATCHES]
    return out + [(f"b{PROFILE_BATCH}/{t}t", PROFILE_BATCH, t) for t in threads if t != 1]


def runner(sess: Any, x: np.ndarray) -> Callable[[], Any]:
    feed = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feed)


def time_setting(variants: list[Variant], batch: int, threads: int, rounds: int) -> dict[str, Any]:
    """Every file interleaved at one (batch, threads): medians (ms), p25-p75, speed-up over the unpruned file."""
    x = np.random.default_rng(0).random((batch, *SHAPE), dtype=np.float32)
    fns = {v.label: runner(common.ort_session(v.data, threads), x) for v in variants}
    t = common.interleave(fns, rounds=rounds, runs=RUNS_PER_ROUND[batch])
    return {"batch": batch, "threads": threads, "ms": {k: 1e3 * v.median for k, v in t.items()},
            "spread_ms": {k: {q: 1e3 * v.summary()[q] for q in ("p25", "p75")} for k, v in t.items()},
            "speedup": {k: common.round_ratio(t[UNPRUNED], v) for k, v in t.items() if k != UNPRUNED}}


# ----------------------------------------------------------------------------------------- profile


def group_of(info: dict[str, Any]) -> str:
    if info["op"] != "QLinearConv" or info.get("out_channels") is None:
        return f"other conv/GEMM ({info['op']})"
    if info["k"] == STEM_K:
        return STEM
    oc = info["out_channels"]
    return next(f"QLinearConv, out ch {name}" for lo, hi, name in CHANNEL_GROUPS if lo <= oc <= hi)


def summarize_profile(p: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Seconds, MACs per image and node count per conv group, per non-conv op type, and in total."""
    return common.profile_groups(p, group_of, other=lambda op: f"non-conv: {op}")


def profile(variants: list[Variant], repeats: int, runs: int) -> dict[str, Any]:
    """Profiles of `variants` at PROFILE_BATCH, 1 thread, alternating (same load), per-group medians."""
    x = np.random.default_rng(0).random((PROFILE_BATCH, *SHAPE), dtype=np.float32)
    raw: dict[str, list[dict[str, dict[str, float]]]] = {v.label: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            raw[v.label].append(summarize_profile(common.profile_model(v.data, x, threads=1, runs=runs)))
    return {"batch": PROFILE_BATCH, "threads": 1, "repeats": repeats, "runs": runs,
            "groups": {k: common.median_groups(r) for k, r in raw.items()}}


def to_profile(variants: list[Variant], timing: dict[str, Any]) -> list[Variant]:
    """Unpruned, multiple 1 (or the smallest multiple), the fastest multiple at b64/1t, and the measured file."""
    by = {v.label: v for v in variants}
    multiples = [v for v in variants if v.multiples]
    fastest = best_label(timing, [v.label for v in multiples])
    chosen = [by[UNPRUNED], multiples[0], by[fastest]]
    chosen += [by[MEASURED]] if MEASURED in by else []
    return list({v.label: v for v in chosen}.values())


def best_label(timing: dict[str, Any], labels: list[str], setting: str = f"b{PROFILE_BATCH}/1t") -> str:
    return max(labels, key=lambda k: timing[setting]["speedup"][k]["median"])


# ----------------------------------------------------------------------------------------- markdown


def gmacs(macs: float, s: float) -> float:
    return macs * PROFILE_BATCH / s / 1e9 if s > 0 else float("nan")


def variant_table(results: dict[str, Any]) -> str:
    labels = results["settings"]["timed"]
    headers = ["file (channel multiple)", "kept channels, stages 16/32/64", "MMAC/img", "MAC ratio"]
    for s in labels:
        headers += [f"{s} ms (p25-p75)", f"{s} speed-up (range)", f"{s} MAC eff."]
    rows = []
    base = results["variants"][UNPRUNED]["macs"]
    for label, v in results["variants"].items():
        ratio = base / v["macs"]
        row = [f"`{label}`", "/".join("-".join(map(str, v["kept"][str(w)])) for w, _ in STAGES),
               f"{v['macs'] / 1e6:.2f}", f"{ratio:.2f}x"]
        for s in labels:
            t = results["timing"][s]
            spread = t["spread_ms"][label]
            row.append(f"{t['ms'][label]:.3g} ({spread['p25']:.3g}-{spread['p75']:.3g})")
            sp = t["speedup"].get(label)
            row += (["1", "-"] if sp is None else
                    [f"**{sp['median']:.2f}x** ({sp['min']:.2f}-{sp['max']:.2f})", f"{sp['median'] / ratio:.2f}"])
        rows.append(row)
    return common.markdown_table(headers, rows, "ll" + "r" * (len(headers) - 2))


def measured_table(m: dict[str, Any]) -> str:
    rows = []
    for w, st in m["stages"].items():
        for c, ms in st["ms_per_conv"].items():
            mark = " (chosen)" if int(c) == st["chosen"] else ""
            rows.append([f"{w} ch at {st['side']}x{st['side']}", f"{c}{mark}", f"{1e3 * ms:.0f}",
                         f"{st['gmacs'][c]:.0f}"])
    headers = ["stage (full width, side)", "kept channels", f"us per conv at batch {m['batch']}", "GMAC/s"]
    return common.markdown_table(headers, rows, "lrrr")


def profile_rows(prof: dict[str, Any]) -> list[list[str]]:
    g = prof["groups"]
    labels = list(g)
    conv_order = [STEM] + [f"QLinearConv, out ch {name}" for _, _, name in CHANNEL_GROUPS]
    names = {n for m in g.values() for n in m}
    conv = [n for n in conv_order if n in names] + sorted(n for n in names if n.startswith("other conv"))
    non = sorted(n for n in names if n.startswith("non-conv"))
    major = [n for n in non if any(g[k].get(n, {}).get("s", 0) >= MINOR_SHARE * g[k]["total"]["s"] for k in labels)]
    minor = [n for n in non if n not in major]

    def cells(title: str, members: list[str]) -> list[str]:
        row = [title]
        for k in labels:
            s = sum(g[k].get(n, {}).get("s", 0.0) for n in members)
            macs = sum(g[k].get(n, {}).get("macs", 0.0) for n in members)
            nodes = sum(g[k].get(n, {}).get("nodes", 0) for n in members)
            if not nodes and not s:
                row.append("-")
                continue
            rate = f", {gmacs(macs, s):.0f} GMAC/s" if macs and s else ""
            row.append(f"{1e3 * s:.2f} ms ({100 * s / g[k]['total']['s']:.0f}%){rate}, {nodes:.0f} "
                       f"node{'' if nodes == 1 else 's'}")
        return row

    rows = [cells(n, [n]) for n in conv + major]
    if minor:
        rows.append(cells(f"non-conv, other ({', '.join(n.split(': ', 1)[1] for n in minor)})", minor))
    rows.append(cells("non-conv nodes, all", non))
    rows.append(cells("all nodes (kernel time)", ["total"]))
    return rows


def profile_table(prof: dict[str, Any]) -> str:
    headers = ["node group"] + [f"`{k}`" for k in prof["groups"]]
    return common.markdown_table(headers, profile_rows(prof))


def verdict_sentence(results: dict[str, Any]) -> str:
    t = results["timing"][f"b{PROFILE_BATCH}/1t"]
    v = results["variants"]
    base = v[UNPRUNED]["macs"]
    mult = [k for k in v if v[k]["multiples"]]
    best = best_label(results["timing"], mult)
    sp = t["speedup"][best]["median"]
    ratio = base / v[best]["macs"]
    one = mult[0]
    text = (f"At batch {PROFILE_BATCH} with 1 thread the fastest multiple is `{best}` (kept "
            f"{kept_text(v[best])}): {sp:.2f}x the unpruned file's speed for {ratio:.2f}x fewer MACs (MAC efficiency "
            f"{sp / ratio:.2f}), {'reaching' if sp >= GOAL else 'short of'} the {GOAL:g}x goal"
            + ("" if sp >= GOAL else f" ({100 * sp / GOAL:.0f}% of it)"))
    if one != best:
        s1, r1 = t["speedup"][one]["median"], base / v[one]["macs"]
        text += (f"; `{one}` (kept {kept_text(v[one])}) removes the most, {r1:.2f}x fewer MACs, but runs at "
                 f"only {s1:.2f}x the unpruned file's speed (MAC efficiency {s1 / r1:.2f})")
    if MEASURED in t["speedup"]:
        sm, rm = t["speedup"][MEASURED]["median"], base / v[MEASURED]["macs"]
        text += (f"; the measured choice (kept {kept_text(v[MEASURED])}) runs at {sm:.2f}x the unpruned file's "
                 f"speed for {rm:.2f}x fewer MACs")
    text += ". " + " ".join(other_settings(results, mult))
    if ratio < GOAL:
        text += (f" `{best}` does only {ratio:.2f}x fewer MACs than the unpruned file: even a time proportional to MACs "
                 f"would leave it short of {GOAL:g}x.")
    return text.rstrip()


def other_settings(results: dict[str, Any], mult: list[str]) -> list[str]:
    out = []
    for s, t in results["timing"].items():
        if s == f"b{PROFILE_BATCH}/1t":
            continue
        best = best_label(results["timing"], mult, s)
        out.append(f"At {s} the fastest multiple is `{best}`, {t['speedup'][best]['median']:.2f}x the unpruned file.")
    return out


def kept_text(v: dict[str, Any]) -> str:
    return "/".join("-".join(map(str, v["kept"][str(w)])) for w, _ in STAGES)


def profile_sentence(prof: dict[str, Any], variants: dict[str, Any]) -> str:
    g = prof["groups"]
    narrow = "QLinearConv, out ch <= 8"
    labels = list(g)
    parts = []
    for k in labels:
        conv = {n: m for n, m in g[k].items() if "QLinearConv" in n or n.startswith("other conv")}
        s = sum(m["s"] for m in conv.values())
        macs = sum(m["macs"] for m in conv.values())
        non = g[k]["total"]["s"] - s
        part = (f"`{k}`: conv/GEMM nodes {1e3 * s:.2f} ms at {gmacs(macs, s):.0f} GMAC/s, non-conv nodes "
                f"{1e3 * non:.2f} ms ({100 * non / g[k]['total']['s']:.0f}% of kernel time)")
        if narrow in g[k]:
            n = g[k][narrow]
            part += (f", of which convs with <= 8 output channels {1e3 * n['s']:.2f} ms at {gmacs(n['macs'], n['s']):.0f}"
                     f" GMAC/s ({100 * n['s'] / g[k]['total']['s']:.0f}% of kernel time for "
                     f"{100 * n['macs'] / g[k]['total']['macs']:.0f}% of the MACs)")
        parts.append(part)
    return (f"Profile at batch {PROFILE_BATCH}, 1 thread (per-node medians of {prof['runs']} runs, median of "
            f"{prof['repeats']} alternating profiles): " + "; ".join(parts) + "." + stage1_bound(prof, variants))


def stage1_bound(prof: dict[str, Any], variants: dict[str, Any]) -> str:
    """For profiled files that keep the first stage whole: the speed-up left if every other node cost nothing."""
    width = STAGES[0][0]
    whole = [k for k in prof["groups"] if k != UNPRUNED and variants[k]["kept"][str(width)] == [width]]
    base = prof["groups"][UNPRUNED]
    first = [STEM] + [f"QLinearConv, out ch {name}" for lo, hi, name in CHANNEL_GROUPS if hi <= width]
    t1 = sum(base.get(n, {}).get("s", 0.0) for n in first)
    if not whole or not t1:
        return ""
    share = t1 / base["total"]["s"]
    return (f" {', '.join(f'`{k}`' for k in whole)} keep{'s' if len(whole) == 1 else ''} the first stage whole "
            f"({width} channels): in the unpruned profile its stem and its convs with <= {width} output channels take "
            f"{100 * share:.0f}% of kernel time, so keeping them bounds the kernel-time speed-up at {1 / share:.2f}x "
            "even if every other node cost nothing.")


def measured_sentence(m: dict[str, Any]) -> str:
    parts = []
    for w, st in m["stages"].items():
        ms = {int(c): v for c, v in st["ms_per_conv"].items()}
        p = st["pruned"]
        parts.append(f"stage {w}: {p} channels {1e3 * ms[p]:.0f} us per conv ({st['gmacs'][str(p)]:.0f} GMAC/s), "
                     f"{w} channels {1e3 * ms[int(w)]:.0f} us ({st['gmacs'][str(w)]:.0f} GMAC/s), chosen {st['chosen']}")
    chosen = "/".join(str(st["chosen"]) for st in m["stages"].values())
    if m.get("same_as"):
        tail = f" The measured choice {chosen} is the file `{m['same_as']}` above."
    else:
        tail = f" The measured choice {chosen} is the `{MEASURED}` row above."
    odd = [f"{st['chosen']} (stage {w})" for w, st in m["stages"].items() if st["chosen"] >= 16 and st["chosen"] % 8]
    if odd:
        tail += (f" Not a multiple of 8: {', '.join(odd)}; by the MLAS rule below such a count takes the fast conv "
                 "path on AVX-512 but the slow one on AVX2.")
    narrow = [f"{st['chosen']} (stage {w})" for w, st in m["stages"].items() if st["chosen"] < 16]
    if narrow:
        tail += f" Below 16: {', '.join(narrow)}; by the MLAS rule below such a count takes the slow path on any x86."
    return ("Kept counts chosen by measurement (two chained c->c 3x3 QLinearConv at each stage's size, batch "
            f"{m['batch']}, 1 thread, per-conv kernel time: minimum over {m['repeats']} alternating profiles of "
            f"{m['runs']} runs each; the smallest count within "
            f"{100 * (MEASURE_TIE - 1):.0f}% of the fastest): " + "; ".join(parts) + "." + tail)


MLAS_REASONING = (
    "Why narrow convs are slow (reasoning from onnxruntime's source, not measured here): onnxruntime's "
    "QLinearConv takes MLAS's symmetric indirect-conv kernel (requantization fused, no im2col buffer) only for "
    "int8 weights with zero point 0 (rcdeploy's form for layers of 7 bits or fewer) and only when "
    "`MlasConvSymPackWSize` accepts the shape: at least 16 output channels (FilterOutputChannelPackCount = 16, "
    "filters packed in groups of 16 output channels) on every x86 dispatch, input channels a multiple of 4, and "
    "output channels a multiple of 8 on AVX2 and AVX-VNNI or of 4 on AVX-512 "
    "(`onnxruntime/core/mlas/lib/convsym.cpp`, `MlasConvSymDispatchAvx2` / `MlasConvSymDispatchAvx512Vnni`; "
    "`TryConvSymPrepack` in `onnxruntime/core/providers/cpu/quantization/qlinearconv.cc`; x86 sets no "
    "symmetric-GEMM dispatch in `platform.cpp`). Any other conv runs im2col, the generic u8 x s8 GEMM into an "
    "int32 buffer, and a separate requantization pass. So on AVX2-only x86 the same 16-output-channel threshold "
    "applies (8-channel convs take the slow path there too), and a kept count that is a multiple of 16 also "
    "meets AVX2's multiple-of-8 rule; this is from the MLAS source (main branch), not timed on an AVX2-only CPU.")


def command(results: dict[str, Any]) -> str:
    st = results["settings"]
    return (f"python benchmarks/pruned_latency.py --rounds {st['rounds']} --multiples "
            f"{','.join(map(str, st['multiples']))} --bits {st['bits']} --threads {','.join(map(str, st['threads']))}"
            f"{' --quick' if st['quick'] else ''}")


def intro(results: dict[str, Any]) -> str:
    st = results["settings"]
    bits = "4-bit weights with 8-bit first and last layers" if st["bits"] == 4 else f"{st['bits']}-bit weights"
    storage = "packed INT4 weights" if st["bits"] == 4 else "int8 weights"
    return (f"ResNet-20 (width 1, 3x32x32, random weights; {bits}, 8-bit activations; rcdeploy's integer QDQ "
            f"export with {storage}, opened as `rcdeploy.runtime.open_session` opens it; onnxruntime folds the "
            "weights to int8 and fuses QLinearConv) "
            f"unpruned, and with {100 * PRUNE:.0f}% of every prunable channel group removed "
            "(`shrink_model(channel_multiple=m)`, which rounds each group's kept count up to a multiple of m). "
            "Plain onnxruntime CPU sessions, all files interleaved; times are medians over "
            f"{st['rounds']} rounds ({RUNS_PER_ROUND[1]} calls per round at batch 1, {RUNS_PER_ROUND[64]} at batch "
            "64); speed-up = unpruned / pruned time per round (median, range over rounds); MAC ratio = unpruned / "
            "pruned MACs per image; MAC efficiency = speed-up / MAC ratio (1 = as fast as the MACs say). "
            "Multiples that keep the same channels give the same file and share a row.")


def markdown(results: dict[str, Any]) -> str:
    quick = results["settings"]["quick"]
    lines = [TITLE, "", f"Machine: {common.machine_line(results['machine'])}. `{command(results)}`"
             f"{' (smoke run, not for quoting)' if quick else ''}.", "", intro(results), "",
             variant_table(results), verdict_sentence(results), ""]
    m = results.get("measured_choice")
    if m:
        lines += [measured_table(m), measured_sentence(m), ""]
    prof = results.get("profile")
    if prof:
        lines += [f"Where the time goes at batch {PROFILE_BATCH}, 1 thread (onnxruntime profiler; QLinearConv nodes "
                  "grouped by their weight's output channels, the stem conv apart; each cell: kernel ms (share of "
                  "the file's kernel time), GMAC/s = the group's MACs at this batch over its kernel time, node "
                  "count):", "", profile_table(prof), profile_sentence(prof, results["variants"]), ""]
    lines.append(MLAS_REASONING)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds per setting (default 15)")
    ap.add_argument("--multiples", type=int_list, default=[1, 4, 8, 16],
                    help="comma list of shrink_model channel multiples (default 1,4,8,16)")
    ap.add_argument("--bits", type=int, choices=(4, 7), default=4,
                    help="4: 4-bit weights, 8-bit first/last layers (default); 7: every layer 7-bit")
    ap.add_argument("--threads", type=int_list, default=[1, 2],
                    help="thread counts; 1 is always timed at batch 1 and 64, others at batch 64 (default 1,2)")
    ap.add_argument("--no-measured", action="store_true", help="skip the per-stage kept counts chosen by measurement")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, multiples 1,16, 1 thread")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.multiples, args.threads = min(args.rounds, 3), [1, 16], [1]
    if not args.multiples or min(args.multiples) < 1:
        ap.error("--multiples needs positive integers")
    if not args.threads or min(args.threads) < 1:
        ap.error("--threads needs positive integers")
    args.multiples = sorted(set(args.multiples))
    args.threads = sorted(set(args.threads) | {1})
    return args


def build_all(args: argparse.Namespace, measured: dict[str, Any] | None) -> list[Variant]:
    variants = [unpruned_variant(args.bits), *multiple_variants(args.bits, args.multiples)]
    if measured:
        keep = {int(w): st["chosen"] for w, st in measured["stages"].items()}
        same = [v.label for v in variants if v.multiples and v.kept == {w: [k] for w, k in keep.items()}]
        measured["same_as"] = same[0] if same else None
        if not same:
            variants.append(measured_variant(args.bits, keep))
    for v in variants:
        print(f"{v.label}: kept {kept_label(v.kept)}, {v.macs / 1e6:.2f} MMAC/img, {v.file_bytes} bytes", flush=True)
    return variants


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, time and profile every file; the results dict that markdown() renders."""
    timed = settings(args.threads)
    results: dict[str, Any] = {"machine": common.machine_info(),
                               "settings": {"rounds": args.rounds, "multiples": args.multiples, "bits": args.bits,
                                            "threads": args.threads, "quick": args.quick, "prune": PRUNE,
                                            "runs_per_round": RUNS_PER_ROUND, "timed": [s for s, _, _ in timed]}}
    print(common.machine_line(results["machine"]), flush=True)
    repeats, runs = (1, 3) if args.quick else (5, 5)
    measured = None if args.no_measured else measure_stages(*(MEASURE_QUICK if args.quick else MEASURE_FULL))
    results["measured_choice"] = measured
    variants = build_all(args, measured)
    results["variants"] = {v.label: v.stats() for v in variants}
    results["timing"] = {}
    for label, batch, threads in timed:
        results["timing"][label] = t = time_setting(variants, batch, threads, args.rounds)
        print(f"{label}: " + ", ".join(f"{k} {ms:.3g} ms" for k, ms in t["ms"].items()), flush=True)
    results["profile"] = profile(to_profile(variants, results["timing"]), repeats, runs)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    results = run(args)
    text = markdown(results)
    print(text)
    if not args.no_write:
        common.update_results(KEY, results)
        common.write_section(KEY, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
