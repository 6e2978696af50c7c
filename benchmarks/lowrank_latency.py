"""Latency of a dense vs a CSTAR-factorized integer model at equal bits, in onnxruntime on this CPU.

    python benchmarks/lowrank_latency.py [--rounds 20] [--configs resnet20:1:4:8,...] [--profile resnet20:1:4:8]
                                         [--quick] [--no-write]

A configuration is `model:width:ratio:channel_multiple`. For each, both models have random weights
(latency does not depend on accuracy) with activations calibrated on uniform images; the factorized one
has the ranks `rcdeploy.train.lowrank.allocate` picks for the dense weights at `ratio` in steps of
`channel_multiple` (a ratio it cannot reach at that multiple is recorded as skipped). Both are written by
rcdeploy.export.qdq.build_qdq (4-bit packed weights, 8-bit activations) and timed interleaved
(common.interleave), one onnxruntime thread, at batch 1 and 64; the speed-up is the median over rounds of
dense time / factorized time in the same round. The `--profile` configuration is then run under
onnxruntime's profiler at batch 64 (common.profile_model, dense and factorized alternately) to show where
the time goes: QLinearConv time and GMAC/s by the weight's output channels, and the non-conv nodes.

Writes the `lowrank-latency` section of BENCHMARKS.md and benchmarks/results.json (not with --no-write);
`--quick` is a smoke run (3 rounds, the first configuration only, which is also the one profiled).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from rcdeploy.errors import UsageError  # noqa: E402
from rcdeploy.export.qdq import build_qdq  # noqa: E402
from rcdeploy.models import create_model  # noqa: E402
from rcdeploy.quant.calibrate import calibrate_activations  # noqa: E402
from rcdeploy.quant.spec import QuantSpec  # noqa: E402
from rcdeploy.runtime.session import open_session, widen_low_bit_initializers  # noqa: E402
from rcdeploy.train.lowrank import allocate, candidate_layers  # noqa: E402

KEY = "lowrank-latency"
DEFAULT_CONFIGS = "resnet20:1:4:1,resnet20:1:4:8,resnet20:1:4:16,resnet20:1:8:8,resnet20:4:8:8"
DEFAULT_PROFILE = "resnet20:1:4:8"
FORMS = ("tucker", "folded", "folded-out", "dense")
BATCHES = (1, 64)
RUNS_PER_ROUND = {1: 10, 64: 1}  # timed calls per candidate per round
PROFILE_BATCH = 64
CHANNEL_GROUPS = ((0, 16, "<= 16"), (17, 32, "17-32"), (33, 1 << 30, "> 32"))
MINOR_SHARE = 0.02  # a non-conv op below this share of both models' time is lumped into "other"
LABELS = ("dense", "factorized")


# ----------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Config:
    model: str
    width: float
    ratio: float
    multiple: int

    @classmethod
    def parse(cls, spec: str) -> Config:
        parts = spec.strip().split(":")
        if len(parts) != 4:
            raise SystemExit(f"--configs: {spec!r} is not model:width:ratio:channel_multiple")
        return cls(parts[0], float(parts[1]), float(parts[2]), int(parts[3]))

    @property
    def spec(self) -> str:
        return f"{self.model}:{self.width:g}:{self.ratio:g}:{self.multiple}"


@dataclass
class Built:
    """The two exported models of one configuration (INT4 widened, as open_session runs them) and their figures."""

    models: dict[str, onnx.ModelProto]
    stats: dict[str, Any]


def build(cfg: Config) -> Built:
    """Dense and factorized models as before: random weights, uniform-image calibration, build_qdq 4/8-bit."""
    torch.manual_seed(0)
    kw = dict(num_classes=10, in_chans=3, mean=[0.5] * 3, std=[0.25] * 3, input_size=32, width=cfg.width)
    quant = QuantSpec(bits=4)
    dense = create_model(cfg.model, quant=quant, **kw)
    alloc = allocate({n: m.weight.detach() for n, m in candidate_layers(dense)}, cfg.ratio, cfg.multiple)
    factorized = create_model(cfg.model, quant=quant, low_rank=alloc.structure(), **kw)
    calib = [torch.rand(16, 3, 32, 32) for _ in range(2)]
    stats: dict[str, Any] = {"ratio_asked": cfg.ratio, "ratio": alloc.ratio, "notes": list(alloc.notes),
                             "forms": {f: sum(p.form == f for p in alloc.plans.values()) for f in FORMS}}
    models: dict[str, onnx.ModelProto] = {}
    for label, m in zip(LABELS, (dense, factorized)):
        calibrate_activations(m, calib)
        ex = build_qdq(m.eval(), (3, 32, 32))
        stats[label] = {"macs": sum(x.macs for x in ex.layers), "params": sum(x.params for x in ex.layers),
                        "bytes": len(ex.to_bytes()), "conv_layers": len(ex.layers)}
        models[label] = widen_low_bit_initializers(ex.model)
    return Built(models, stats)


# ----------------------------------------------------------------------------------------- timing


def time_batch(sessions: dict[str, Any], batch: int, rounds: int) -> dict[str, Any]:
    """Dense and factorized interleaved at one batch size: medians (ms) and the per-round speed-up."""
    x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)

    def call(sess: Any) -> Any:
        feed = {sess.get_inputs()[0].name: x}
        return lambda: sess.run(None, feed)

    t = common.interleave({k: call(s) for k, s in sessions.items()}, rounds=rounds, runs=RUNS_PER_ROUND[batch])
    return {"ms": {k: 1e3 * v.median for k, v in t.items()},
            "spread_ms": {k: {q: 1e3 * v.summary()[q] for q in ("p25", "p75")} for k, v in t.items()},
            "speedup": common.round_ratio(t["dense"], t["factorized"])}


def time_files(paths: list[Path], rounds: int) -> dict[str, Any]:
    """Trained, exported files (the first is the dense peer) timed interleaved like the configurations, with
    MACs and stored parameters from each file's model.json."""
    sessions, figures = {}, {}
    for path in paths:
        sessions[path.stem] = open_session(str(path), threads=1)
        card = json.loads(path.with_suffix(".json").read_text())
        figures[path.stem] = {"file": str(path), "macs": card.get("macs"),
                              "params": sum(int(x["params"]) for x in card.get("layers", []))}
    dense = paths[0].stem
    out: dict[str, Any] = {"dense": dense, "files": figures}
    for b in BATCHES:
        x = np.random.default_rng(0).random((b, 3, 32, 32), dtype=np.float32)
        calls = {k: (lambda s=s, x=x: s.run(None, {s.get_inputs()[0].name: x})) for k, s in sessions.items()}
        t = common.interleave(calls, rounds=rounds, runs=RUNS_PER_ROUND[b])
        out[f"batch{b}"] = {"ms": {k: 1e3 * v.median for k, v in t.items()},
                            "speedup": {k: common.round_ratio(t[dense], v) for k, v in t.items()}}
    return out


def files_table(r: dict[str, Any]) -> str:
    rows = []
    for k, f in r["files"].items():
        row = [f"`{k}`", f"{f['macs'] / 1e6:.1f}" if f.get("macs") else "-", f"{f['params']:,}"]
        for b in BATCHES:
            t = r[f"batch{b}"]
            sp = t["speedup"][k]
            row += [f"{t['ms'][k]:.3g}", "1" if k == r["dense"] else
                    f"**{sp['median']:.2f}x** ({sp['min']:.2f}-{sp['max']:.2f})"]
        rows.append(row)
    return common.markdown_table(["file", "MMACs/img", "stored params", "batch 1 ms", "batch 1 speed-up (range)",
                                  "batch 64 ms", "batch 64 speed-up (range)"], rows)


def run_config(cfg: Config, rounds: int) -> tuple[dict[str, Any], Built | None]:
    try:
        built = build(cfg)
    except UsageError as e:
        print(f"{cfg.spec}: skipped: {e}", flush=True)
        return {"skipped": str(e)}, None
    sessions = {k: open_session(built.models[k], threads=1, widen=False) for k in LABELS}
    out = {**built.stats, **{f"batch{b}": time_batch(sessions, b, rounds) for b in BATCHES}}
    print(f"{cfg.spec}: ratio {out['ratio']:.2f}x, "
          + ", ".join(f"batch {b} {out[f'batch{b}']['ms']['dense']:.3g} / {out[f'batch{b}']['ms']['factorized']:.3g}"
                      f" ms ({out[f'batch{b}']['speedup']['median']:.2f}x)" for b in BATCHES), flush=True)
    return out, built


# ----------------------------------------------------------------------------------------- profile


def group_of(out_channels: int | None, op: str) -> str:
    if op != "QLinearConv" or out_channels is None:
        return f"other conv/GEMM ({op})"
    return next(f"QLinearConv, out ch {name}" for lo, hi, name in CHANNEL_GROUPS if lo <= out_channels <= hi)


def summarize_profile(p: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Seconds, MACs per image and node count per conv group and per non-conv op type, for one profile."""
    return common.profile_groups(p, lambda info: group_of(info.get("out_channels"), info["op"]),
                                 total="total (kernel time)")


def profile(built: Built, repeats: int, runs: int) -> dict[str, Any]:
    x = np.random.default_rng(0).random((PROFILE_BATCH, 3, 32, 32), dtype=np.float32)
    raw: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in LABELS}
    for _ in range(repeats):  # dense and factorized alternately: same load for both
        for k in LABELS:
            p = common.profile_model(built.models[k].SerializeToString(), x, threads=1, runs=runs)
            raw[k].append(summarize_profile(p))
    return {"batch": PROFILE_BATCH, "repeats": repeats, "runs": runs,
            "groups": {k: common.median_groups(v) for k, v in raw.items()}}


# ----------------------------------------------------------------------------------------- markdown


def _pair(a: str, b: str) -> str:
    return f"{a} / {b}"


def _forms(forms: dict[str, int]) -> str:
    return ", ".join(f"{f} {n}" for f, n in forms.items() if n) or "-"


def config_row(spec: str, r: dict[str, Any]) -> list[str]:
    d, f = r["dense"], r["factorized"]
    row = [f"`{spec}`", _forms(r["forms"]), f"{r['ratio_asked']:g}x / {r['ratio']:.2f}x",
           _pair(f"{d['macs'] / 1e6:.1f}", f"{f['macs'] / 1e6:.1f}"),
           _pair(f"{d['params'] / 1e3:.1f}k", f"{f['params'] / 1e3:.1f}k"),
           _pair(f"{d['bytes'] / 1e3:.1f}k", f"{f['bytes'] / 1e3:.1f}k")]
    for b in BATCHES:
        t = r[f"batch{b}"]
        s = t["speedup"]
        row += [_pair(f"{t['ms']['dense']:.3g}", f"{t['ms']['factorized']:.3g}"),
                f"**{s['median']:.2f}x** ({s['min']:.2f}-{s['max']:.2f})"]
    return row


def config_table(results: dict[str, Any]) -> str:
    headers = ["config (model:width:ratio:multiple)", "factorized layers by form", "ratio asked / achieved",
               "MMACs/img dense / fact.", "stored params", "file bytes"]
    for b in BATCHES:
        headers += [f"batch {b} ms dense / fact.", f"batch {b} speed-up (range)"]
    rows = [config_row(s, r) for s, r in results["configs"].items() if "skipped" not in r]
    return common.markdown_table(headers, rows, "ll" + "r" * (len(headers) - 2))


def profile_rows(prof: dict[str, Any]) -> list[list[str]]:
    d, f = prof["groups"]["dense"], prof["groups"]["factorized"]
    total = {k: v["total (kernel time)"] for k, v in prof["groups"].items()}
    order = [group_of(hi, "QLinearConv") for _, hi, _ in CHANNEL_GROUPS]
    conv = [g for g in order if g in d or g in f]
    conv += sorted(g for g in set(d) | set(f) if g.startswith("other conv"))
    other = sorted(g for g in set(d) | set(f) if g not in conv and not g.startswith("total"))
    major = [g for g in other if max(m.get(g, {}).get("s", 0) / total[k]["s"]
                                     for k, m in prof["groups"].items()) >= MINOR_SHARE]
    minor = [g for g in other if g not in major]

    def cells(label: str, names: list[str]) -> list[str]:
        row = [label]
        stats = [{k: sum(m.get(g, {}).get(k, 0.0) for g in names) for k in ("s", "macs", "nodes")} for m in (d, f)]
        tot = [total["dense"], total["factorized"]]
        row.append(_pair(*(f"{s['nodes']:.0f}" if s["nodes"] else "-" for s in stats)))
        row.append(_pair(*(_k_range([m.get(g, {}) for g in names]) for m in (d, f))))
        row.append(_pair(*(f"{1e3 * s['s']:.2f}" for s in stats)))
        row.append(_pair(*(f"{100 * s['s'] / t['s']:.0f}%" for s, t in zip(stats, tot))))
        row.append(_pair(*(f"{100 * s['macs'] / t['macs']:.0f}%" if s["macs"] else "-" for s, t in zip(stats, tot))))
        row.append(_pair(*(f"{s['macs'] * PROFILE_BATCH / s['s'] / 1e9:.1f}" if s["macs"] and s["s"] else "-"
                           for s in stats)))
        return row

    rows = [cells(g, [g]) for g in conv + major]
    if minor:
        rows.append(cells(f"other non-conv ({', '.join(minor)})", minor))
    rows.append(cells("non-conv nodes, all", other))
    rows.append(cells("all nodes (kernel time)", ["total (kernel time)"]))
    return rows


def _k_range(groups: list[dict[str, float]]) -> str:
    """min-max reduction length (in channels x kernel area) of the conv/GEMM nodes in `groups`."""
    ks = [(g["k_min"], g["k_max"]) for g in groups if "k_min" in g]
    if not ks:
        return "-"
    lo, hi = min(k[0] for k in ks), max(k[1] for k in ks)
    return f"{lo:.0f}" if lo == hi else f"{lo:.0f}-{hi:.0f}"


def profile_table(prof: dict[str, Any]) -> str:
    headers = ["node group", "nodes", "K (reduction)", "ms", "time share", "MAC share", "GMAC/s"]
    return common.markdown_table(headers, profile_rows(prof))


def _names(specs: list[str]) -> str:
    return ", ".join(f"`{s}`" for s in specs) or "none"


def speed_sentence(results: dict[str, Any]) -> str:
    done = {s: r for s, r in results["configs"].items() if "skipped" not in r}
    parts = []
    for b in BATCHES:
        x = {s: r[f"batch{b}"]["speedup"]["median"] for s, r in done.items()}
        faster = [s for s, v in x.items() if v > 1.0]
        slower = [s for s, v in x.items() if v <= 1.0]
        lo, hi = (min(x, key=x.get), max(x, key=x.get)) if x else (None, None)
        parts.append(f"at batch {b} the factorized model is faster in {len(faster)} of {len(x)} configurations "
                     f"({_names(faster)}) and not faster in {len(slower)} ({_names(slower)})"
                     + (f", speed-ups from {x[lo]:.2f}x (`{lo}`) to {x[hi]:.2f}x (`{hi}`)" if len(x) > 1 else ""))
    return "In this run, " + "; ".join(parts) + "."


def profile_sentence(prof: dict[str, Any]) -> str:
    g = prof["groups"]
    conv = {k: [n for n in v if n.startswith(("QLinearConv", "other conv"))] for k, v in g.items()}
    s = {k: sum(g[k][n]["s"] for n in conv[k]) for k in LABELS}
    macs = {k: sum(g[k][n]["macs"] for n in conv[k]) for k in LABELS}
    nodes = {k: sum(g[k][n]["nodes"] for n in conv[k]) for k in LABELS}
    rate = {k: macs[k] * PROFILE_BATCH / s[k] / 1e9 for k in LABELS}
    non = {k: g[k]["total (kernel time)"]["s"] - s[k] for k in LABELS}
    narrow = g["factorized"].get(group_of(CHANNEL_GROUPS[0][1], "QLinearConv"), {})
    narrow_rate = narrow["macs"] * PROFILE_BATCH / narrow["s"] / 1e9 if narrow.get("s") else float("nan")
    mac_x, time_x = macs["dense"] / macs["factorized"], s["dense"] / s["factorized"]
    return (f"Profile of `{prof['spec']}` at batch {PROFILE_BATCH} (per-node medians of {prof['runs']} runs, median "
            f"of {prof['repeats']} alternating profiles): the factorized model's conv/GEMM nodes do {mac_x:.2f}x "
            f"fewer MACs in {nodes['factorized']:.0f} nodes instead of {nodes['dense']:.0f}, but run at "
            f"{rate['factorized']:.1f} GMAC/s against {rate['dense']:.1f} GMAC/s for the dense ones (its QLinearConv "
            f"nodes with {CHANNEL_GROUPS[0][2]} output channels: {narrow_rate:.1f} GMAC/s), so their time changes by "
            f"{time_x:.2f}x (dense / factorized) instead of {mac_x:.2f}x; the non-conv nodes take "
            f"{1e3 * non['dense']:.2f} ms dense and {1e3 * non['factorized']:.2f} ms factorized.")


def command(results: dict[str, Any]) -> str:
    st = results["settings"]
    return (f"python benchmarks/lowrank_latency.py --rounds {st['rounds']} --configs {','.join(results['configs'])} "
            f"--profile {st['profile']}{' --quick' if st['quick'] else ''}"
            + (f" --files {','.join(f['file'] for f in results['trained']['files'].values())}"
               if results.get("trained") else ""))


def markdown(results: dict[str, Any]) -> str:
    quick = results["settings"]["quick"]
    lines = ["## Low rank (CSTAR): dense vs factorized integer latency at equal bits", "",
             f"Machine: {common.machine_line(results['machine'])}. `{command(results)}`"
             f"{' (smoke run, not for quoting)' if quick else ''}.", "",
             "Is the CSTAR-factorized integer model faster than the dense one in onnxruntime on this CPU? Both "
             "models have random weights, 4-bit weights and 8-bit activations (build_qdq), one onnxruntime thread; "
             "the factorized one has `allocate`'s ranks at the configuration's ratio and channel multiple. Times "
             f"are medians over {results['settings']['rounds']} interleaved rounds "
             f"({RUNS_PER_ROUND[1]} calls per round at batch 1, {RUNS_PER_ROUND[64]} at batch 64); the speed-up is "
             "dense / factorized per round (>1: factorized faster), median and range over rounds. MACs, stored "
             "parameters and bytes are the exported files' (whole model); the ratio is allocate's, over the "
             "factorizable layers.", ""]
    done = [r for r in results["configs"].values() if "skipped" not in r]
    lines += [config_table(results)] if done else []
    notes = []
    for spec, r in results["configs"].items():
        notes += [f"- `{spec}`: skipped: {r['skipped']}"] if "skipped" in r else []
        notes += [f"- `{spec}`: {note}" for note in r.get("notes", [])]
    lines += [*notes, ""] if notes else []
    lines += [speed_sentence(results), ""] if done else []
    prof = results.get("profile")
    if prof and "groups" in prof:
        lines += [f"Where the time goes, `{prof['spec']}` at batch {PROFILE_BATCH} (onnxruntime profiler; every cell "
                  "is dense / factorized; conv nodes grouped by their weight's output channels; MAC share of the "
                  "model's conv/GEMM MACs; K = input channels x kernel area per output value, the GEMM's reduction "
                  "length; GMAC/s = the group's MACs at this batch over its kernel time):", "",
                  profile_table(prof), profile_sentence(prof)]
    elif prof:
        lines.append(f"Profile of `{prof['spec']}`: skipped: {prof.get('skipped')}")
    trained = results.get("trained")
    if trained:
        names = ", ".join(f"`{f['file']}`" for f in trained["files"].values())
        lines += ["", f"Trained files (`--files`: {names}; "
                  f"speed-up = `{trained['dense']}` time / the file's, per round, interleaved as above):", "",
                  files_table(trained)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds per batch size (default 20)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of model:width:ratio:channel_multiple")
    ap.add_argument("--profile", default=DEFAULT_PROFILE,
                    help=f"configuration to profile at batch {PROFILE_BATCH} (default {DEFAULT_PROFILE})")
    ap.add_argument("--files", help="comma list of exported .onnx files to time too, the first being the dense peer "
                    "(e.g. the compression table's w4.onnx,cstar.onnx,cstar16.onnx)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, first configuration only")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and results.json")
    args = ap.parse_args(argv)
    configs = [Config.parse(s) for s in args.configs.split(",") if s.strip()]
    if not configs:
        ap.error("--configs is empty")
    if args.quick:
        args.rounds, configs = min(args.rounds, 3), configs[:1]
        args.profile = configs[0].spec
    args.config_list, args.profile_config = configs, Config.parse(args.profile)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {"machine": common.machine_info(), "configs": {},
                               "settings": {"rounds": args.rounds, "quick": args.quick,
                                            "profile": args.profile_config.spec,
                                            "runs_per_round": RUNS_PER_ROUND}}
    print(common.machine_line(results["machine"]), flush=True)
    builds: dict[str, Built | None] = {}
    for cfg in args.config_list:
        results["configs"][cfg.spec], builds[cfg.spec] = run_config(cfg, args.rounds)
    spec = args.profile_config.spec
    try:
        built = builds[spec] if spec in builds else build(args.profile_config)
    except UsageError as e:
        built, results["profile"] = None, {"spec": spec, "skipped": str(e)}
    if built is not None:
        repeats, runs = (1, 3) if args.quick else (3, 5)
        results["profile"] = {"spec": spec, **profile(built, repeats=repeats, runs=runs)}
    elif "profile" not in results:
        results["profile"] = {"spec": spec, "skipped": results["configs"][spec]["skipped"]}
    if args.files:
        results["trained"] = time_files([Path(f) for f in args.files.split(",") if f.strip()], args.rounds)
    text = markdown(results)
    print(text)
    if not args.no_write:
        common.update_results(KEY, results)
        common.write_section(KEY, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
