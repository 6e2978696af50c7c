"""Bench reports for people and scripts: rich tables, a CSV row per run, and `compare` with a Pareto plot.

The report is a `rcdeploy.artifacts.BenchReport`; this module reads its figures through that class,
so a report written by an older run compares the same way as a fresh one.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path
from typing import Any

from rcdeploy.artifacts.bench_report import BenchReport
from rcdeploy.errors import UsageError

__all__ = [
    "CSV_COLUMNS",
    "append_csv",
    "compare_reports",
    "csv_row",
    "pareto_front",
    "render_bench",
    "render_compare",
    "render_inspect",
]

CSV_COLUMNS = [
    "created", "model", "file_sha256", "dataset", "target", "samples", "eps", "step", "attacks",
    "file_bytes", "params", "macs", "integer_mac_share_pct", "threads", "session_load_ms",
    "session_peak_rss_delta_bytes", "latency_batch", "p50_ms", "p90_ms", "p99_ms", "img_per_s", "max_img_per_s",
    "clean_acc_pct", "worst_case_acc_pct", "robust_acc_pct", "twin_clean_agreement_pct",
    "twin_adversarial_agreement_pct", "flags",
]


# --------------------------------------------------------------------------------------- formatting


def fmt_eps(v: float | None) -> str:
    """0.0313725... -> '8/255' (when it is one), else a short decimal."""
    if v is None:
        return "-"
    k = v * 255
    if abs(k - round(k)) < 1e-4 and round(k) > 0:
        return f"{round(k)}/255"
    frac = Fraction(v).limit_denominator(1000)
    return f"{v:.4g}" if abs(float(frac) - v) > 1e-9 else f"{float(frac):g}"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}%"


def _table(**kw: Any) -> Any:
    """A compact rich table (fits 80 columns): simple header rule, one space between columns."""
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0), title_justify="left",
                 title_style="bold", **kw)


# ----------------------------------------------------------------------------------------- bench


def render_bench(report: BenchReport | dict[str, Any], console: Any) -> None:
    """The report as rich tables (size, latency, accuracy), then flags and notes."""
    report = report.to_dict() if isinstance(report, BenchReport) else report
    s, m, size, lat, acc = (report.get(k) or {} for k in ("settings", "model", "size", "latency", "accuracy"))
    console.print(f"[bold]rcdeploy bench[/] {m.get('path')}: {s.get('dataset')}, {s.get('samples')} test images, "
                  f"eps {fmt_eps(s.get('eps'))} ({s.get('eps_source')}), target {s.get('target')}"
                  + (" [yellow](stochastic graph)[/]" if m.get("stochastic") else ""))
    if (s.get("cpu") or {}).get("description"):
        console.print(f"[dim]CPU: {s['cpu']['description']}[/]")
    _render_size(size, s, console)
    if lat:
        _render_latency(lat, console)
    _render_accuracy(acc, s, console)
    for flag in acc.get("flags", []):
        console.print(f"[bold red]warning:[/] {flag}")
    for note in report.get("notes", []):
        console.print(f"[dim]note: {note}[/]")


def _render_size(size: dict[str, Any], s: dict[str, Any], console: Any) -> None:
    by_dtype = ", ".join(f"{k} {_bytes(v)}" for k, v in (size.get("bytes_by_dtype") or {}).items())
    t = _table(title="size")
    for col in ("file", "params", "MACs / image", "in integer kernels"):
        t.add_column(col, justify="right")
    t.add_row(_bytes(size.get("file_bytes")), _count(size.get("params")), _count(size.get("macs")),
              _pct(size.get("integer_mac_share_pct")))
    console.print(t)
    console.print(f"[dim]initializers: {by_dtype}[/]")
    pairs = size.get("int16_pairs") or {}
    if pairs.get("kernels"):
        state = (f"none of {pairs['kernels']} integer kernels can saturate on any CPU" if pairs.get("saturation_free")
                 else f"[bold red]{len(pairs.get('can_saturate') or [])} of {pairs['kernels']} integer kernels can "
                 "saturate on x86 without VNNI[/]")
        console.print(f"int16 pair sums: {state}; accuracy as computed on: {s.get('isa')}")


def _render_latency(lat: dict[str, Any], console: Any) -> None:
    mode = f", {lat['execution_mode']} execution" if lat.get("execution_mode") else ""
    caption = (f"{lat.get('description')}; intra-op threads {lat.get('intra_op_threads')} of "
               f"{lat.get('cpu_count')} cores{mode}; session load "
               f"{_ms(1e3 * lat['session_load_s'])} ms; peak RSS +{_bytes(lat.get('session_peak_rss_delta_bytes'))} "
               f"over {_bytes(lat.get('baseline_rss_bytes'))} ({lat.get('memory_method')})")
    engine = (f"openvino {lat.get('openvino', '')}" if lat.get("runtime") == "openvino"
              else f"onnxruntime {lat.get('onnxruntime', '')}")
    t = _table(title=f"latency, target {lat.get('target')}, {engine}")
    for col in ("batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "runs"):
        t.add_column(col, justify="right")
    for b in lat.get("batches", []):
        ips = b.get("img_per_s")
        t.add_row(str(b["batch_size"]), _ms(b["p50_ms"]), _ms(b["p90_ms"]), _ms(b["p99_ms"]),
                  f"{ips:,.0f}" if ips else "-", f"{b['repeats']}" + ("" if b.get("stable") else " (unstable)"))
    console.print(t)
    console.print(f"[dim]{caption}[/]")
    ov = lat.get("int8_layers")
    if ov:
        floats = ov.get("float") or []
        console.print(f"OpenVINO runs {ov['int8']} of {ov['layers']} conv/matmul layers as int8 kernels"
                      + (f"; in float: {', '.join(floats[:6])}{' ...' if len(floats) > 6 else ''}" if floats else ""))


def _render_accuracy(acc: dict[str, Any], s: dict[str, Any], console: Any) -> None:
    twin = acc.get("twin") or {}
    scorer = s.get("scored_by") or "onnxruntime on the file"
    broken = acc.get("first_broken_by") or {}
    first, only = broken.get("first", {}), broken.get("only", {})
    t = _table(title=f"accuracy, scored by {scorer}")
    for col in ("images", "accuracy", "twin", "max|dx|/eps", "valid", "s", "1st/only"):
        t.add_column(col, justify="right" if col != "images" else "left", no_wrap=True)
    t.add_row("clean", _pct(acc.get("clean_acc_pct")), _pct(twin.get("clean_agreement_pct")), "-", "-", "-",
              _count(first.get("clean")))
    for r in acc.get("robust", []):
        ok = r.get("within_eps") and r.get("in_unit_range")
        label = r["name"] + (" (no grad)" if r.get("family") == "square" else "")
        credit = f"{_count(first.get(r['name']))}/{_count(only.get(r['name']))}" if first else "-"
        t.add_row(label, _pct(r["robust_acc_pct"]), _pct(r.get("twin_agreement_pct")),
                  f"{r['max_perturbation']:.3g}/{fmt_eps(r['eps'])}", "yes" if ok else "[red]NO[/]",
                  f"{r['time_s']:.1f}", credit)
    if acc.get("worst_case_acc_pct") is not None:
        t.add_row("[bold]worst case[/]", f"[bold]{_pct(acc['worst_case_acc_pct'])}[/]",
                  _pct(twin.get("adversarial_agreement_pct")), "", "", "",
                  f"{_count(first.get('robust'))} held" if first else "")
    console.print(t)
    console.print(f"[dim]twin: top-1 agreement of the differentiable twin with {s.get('runtime') or 'onnxruntime'} on "
                  "this CPU; max|dx|: max |x_adv - x|; valid: every adversarial image within eps of its original "
                  "and in [0, 1]; s: attack seconds; 1st/only: images this attack was the first (in run order) to "
                  "bring to their worst score / that no other attack brought as low; @smooth: gradients of the smooth "
                  "surrogate, images scored on the file[/]")


def _as_report(report: BenchReport | dict[str, Any]) -> BenchReport:
    return report if isinstance(report, BenchReport) else BenchReport.from_dict(report)


def csv_row(report: BenchReport | dict[str, Any]) -> dict[str, Any]:
    """The report's headline figures as one flat row (CSV_COLUMNS)."""
    r = _as_report(report)
    lat = r.latency or {}
    first = r.first_batch
    twin = r.twin
    ips = [b.get("img_per_s") for b in r.latency_batches if b.get("img_per_s")]
    return {
        "created": r.created,
        "model": r.model_path,
        "file_sha256": r.file_sha256,
        "dataset": r.dataset,
        "target": r.target,
        "samples": r.samples,
        "eps": r.eps,
        "step": r.step,
        "attacks": ",".join(r.attack_names) or "none",
        "file_bytes": r.file_bytes,
        "params": r.params,
        "macs": r.macs,
        "integer_mac_share_pct": r.integer_mac_share_pct,
        "threads": lat.get("intra_op_threads"),
        "session_load_ms": 1e3 * lat["session_load_s"] if lat.get("session_load_s") is not None else None,
        "session_peak_rss_delta_bytes": lat.get("session_peak_rss_delta_bytes"),
        "latency_batch": first.get("batch_size"),
        "p50_ms": first.get("p50_ms"),
        "p90_ms": first.get("p90_ms"),
        "p99_ms": first.get("p99_ms"),
        "img_per_s": first.get("img_per_s"),
        "max_img_per_s": max(ips) if ips else None,
        "clean_acc_pct": r.clean_acc_pct,
        "worst_case_acc_pct": r.worst_case_acc_pct,
        "robust_acc_pct": ";".join(f"{row['name']}={row['robust_acc_pct']:.2f}" for row in r.robust),
        "twin_clean_agreement_pct": twin.get("clean_agreement_pct"),
        "twin_adversarial_agreement_pct": twin.get("adversarial_agreement_pct"),
        "flags": " | ".join(r.flags),
    }


def append_csv(path: str | Path, report: BenchReport | dict[str, Any], label: str = "--csv") -> Path:
    """Append the report's row to `path` (header when new), atomically; only to a CSV with CSV_COLUMNS.

    A file with another first line (another tool's CSV, a JSON sidecar, an older column set) is
    refused rather than written in columns it does not have: earlier rows are never rewritten or lost.
    """
    from rcdeploy.io import append_csv_row

    return append_csv_row(path, CSV_COLUMNS, csv_row(report), label)


def csv_pending(path: str | Path, report: BenchReport | dict[str, Any], label: str = "--csv") -> Any:
    """The CSV row as a pending output (`rcdeploy.io.deliver`): rescued as a one-row CSV if it cannot be written."""
    from rcdeploy.io import Pending, csv_text

    rescue = csv_text(CSV_COLUMNS, [csv_row(report)], with_header=True).encode()
    return Pending(label, Path(path), lambda: append_csv(path, report, label), rescue)


# --------------------------------------------------------------------------------------- compare


def pareto_front(points: list[tuple[float, ...]], maximize: tuple[bool, ...]) -> list[bool]:
    """For each point, whether no other point is at least as good in every coordinate and better in one."""
    def key(p: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(v if mx else -v for v, mx in zip(p, maximize))

    keyed = [key(p) for p in points]
    out = []
    for i, a in enumerate(keyed):
        dominated = any(all(bv >= av for av, bv in zip(a, b)) and any(bv > av for av, bv in zip(a, b))
                        for j, b in enumerate(keyed) if j != i)
        out.append(not dominated)
    return out


# Pareto objectives: (row key, maximize?)
_OBJECTIVES = (("file_bytes", False), ("latency_ms", False), ("clean_acc_pct", True), ("robust_acc_pct", True))


def _plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install 'rcdeploy[plot]')") from None


def compare_reports(paths: list[str], plot: str | None = None) -> dict[str, Any]:
    """One row per bench report, each marked on the Pareto front (size, latency, clean, robust) or not.

    Latency is the p50 of each report's first (smallest) batch size; robust accuracy is the
    per-image worst case over the attacks each report ran. With `plot`, also writes a 2 x 2
    figure (clean / robust accuracy against file size / latency) with each panel's front marked.
    """
    if not paths:
        raise UsageError("compare needs at least one report: rcdeploy compare A.json B.json ...")
    if plot is not None:
        _plot_available()  # before any work: a missing library is a usage problem, not a crash
        if Path(plot).is_dir():
            raise UsageError(f"--plot {plot} is a folder; pass a file name, e.g. --plot pareto.png")
    rows = [_compare_row(path, BenchReport.load(path)) for path in paths]
    names = [row["model"] for row in rows]
    if len(set(names)) < len(names):  # one model benched twice, or same names in different folders
        stems = [Path(row["report"]).stem for row in rows]
        for row, stem in zip(rows, stems):
            row["model"] = stem if len(set(stems)) == len(stems) else row["report"]
    objectives = [(k, mx) for k, mx in _OBJECTIVES if all(row[k] is not None for row in rows)]
    front = pareto_front([tuple(float(row[k]) for k, _ in objectives) for row in rows],
                         tuple(mx for _, mx in objectives)) if objectives else [True] * len(rows)
    for row, on in zip(rows, front):
        row["pareto"] = on
    notes = []
    for key, what in (("dataset", "datasets"), ("eps", "eps"), ("attacks", "attacks"), ("target", "targets"),
                      ("samples", "sample counts"), ("latency_batch", "latency batch sizes")):
        values = {str(row[key]) for row in rows}
        if len(values) > 1:
            notes.append(f"reports differ in {what} ({', '.join(sorted(values))}): compare those figures with care")
    table = {"rows": rows, "pareto_objectives": [f"{'max' if mx else 'min'} {k}" for k, mx in objectives],
             "notes": notes, "plot": None}
    if plot is not None:
        table["plot"] = str(write_pareto_plot(rows, plot))
    return table


def _compare_row(path: str, r: BenchReport) -> dict[str, Any]:
    first = r.first_batch
    return {
        "report": str(path),
        "model": r.model_name or Path(str(r.model_path)).stem,
        "dataset": r.dataset,
        "target": r.target,
        "eps": r.eps,
        "attacks": ",".join(r.attack_names) or "none",
        "samples": r.samples,
        "file_bytes": r.file_bytes,
        "params": r.params,
        "macs": r.macs,
        "integer_mac_share_pct": r.integer_mac_share_pct,
        "latency_batch": first.get("batch_size"),
        "latency_ms": first.get("p50_ms"),
        "img_per_s": first.get("img_per_s"),
        "clean_acc_pct": r.clean_acc_pct,
        "robust_acc_pct": r.worst_case_acc_pct,
    }


def write_pareto_plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Clean and robust accuracy against file size and latency; each panel's 2-D front marked."""
    _plot_available()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rcdeploy.io import atomic_write_bytes

    fig = Figure(figsize=(11, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [("file_bytes", "file size (KiB)", 1 / 1024), ("latency_ms", "latency p50 (ms)", 1.0)]
    for col, (xkey, xlabel, xscale) in enumerate(panels):
        for row_i, (ykey, ylabel) in enumerate((("clean_acc_pct", "clean accuracy (%)"),
                                                ("robust_acc_pct", "robust accuracy, worst case (%)"))):
            ax = axes[row_i][col]
            pts = [(r[xkey] * xscale, r[ykey], r["model"]) for r in rows if r[xkey] is not None and r[ykey] is not None]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if not pts:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                continue
            on = pareto_front([(x, y) for x, y, _ in pts], (False, True))
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.scatter(xs, ys, c=["tab:red" if o else "tab:gray" for o in on], zorder=3)
            for x, y, label in pts:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            front = sorted((x, y) for (x, y, _), o in zip(pts, on) if o)
            if len(front) > 1:
                ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red",
                        alpha=0.6, label="Pareto front")
                ax.legend(loc="best", fontsize=8)
            ax.margins(0.15)  # room for the labels of points at the edges
            if min(xs) > 0 and max(xs) / min(xs) > 20:
                ax.set_xscale("log")
    fig.suptitle("rcdeploy compare: accuracy vs size and latency (red: Pareto front)")
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())


def render_compare(table: dict[str, Any], console: Any) -> None:
    """The comparison as one rich table; Pareto-front rows starred. Shared settings go in the caption."""
    rows = table["rows"]
    shared = []
    for key in ("dataset", "attacks", "target", "eps"):
        values = {str(r[key]) for r in rows}
        if len(values) == 1:
            shared.append(f"{key} {fmt_eps(rows[0][key]) if key == 'eps' else rows[0][key]}")
    # attacks differ often and read badly in a narrow column: they go in the notes (compare_reports)
    varying = [k for k in ("dataset", "target", "eps") if len({str(r[k]) for r in rows}) > 1]
    t = _table(title="rcdeploy compare: * on the Pareto front ("
               + ", ".join(table.get("pareto_objectives", [])) + ")")
    t.add_column("model", no_wrap=True)
    for k in varying:
        t.add_column(k, no_wrap=True)
    for c in ("file", "MACs", "int", "p50 ms", "img/s", "clean", "robust"):
        t.add_column(c, justify="right", no_wrap=True)
    for r in rows:
        extra = [fmt_eps(r[k]) if k == "eps" else str(r[k]) for k in varying]
        share = r["integer_mac_share_pct"]
        t.add_row(("* " if r.get("pareto") else "  ") + str(r["model"]), *extra, _bytes(r["file_bytes"]),
                  _count(r["macs"]), "-" if share is None else f"{share:.0f}%",
                  _ms(r["latency_ms"]) + (f" (b{r['latency_batch']})" if r.get("latency_batch") not in (None, 1) else ""),
                  _count(r.get("img_per_s")),
                  _pct(r["clean_acc_pct"]), _pct(r["robust_acc_pct"]))
    console.print(t)
    console.print("[dim]" + "; ".join([*shared, "robust = worst case per image"]) + "[/]")
    for note in table.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    if table.get("plot"):
        console.print(f"plot: {table['plot']}")


# --------------------------------------------------------------------------------------- inspect


def render_inspect(report: Any, console: Any) -> None:
    """A `GraphReport` (or its dict) as rich tables: totals, ops as stored vs as run, bytes by dtype."""

    d = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    t = _table(title="model")
    for c in ("file", "params", "MACs / image", "integer-kernel MACs", "MAC shapes from"):
        t.add_column(c, justify="right")
    t.add_row(_bytes(d.get("file_bytes")), _count(d.get("params")), _count(d.get("macs_total")),
              f"{100 * d.get('integer_mac_share', 0.0):.1f}% ({_count(d.get('macs_integer'))})",
              str(d.get("shapes_from")))
    console.print(t)
    stored, run = d.get("op_histogram") or {}, d.get("optimized_op_histogram") or {}
    t = _table(title="ops: in the file / as onnxruntime runs them")
    t.add_column("op")
    t.add_column("file", justify="right")
    t.add_column("onnxruntime", justify="right")
    for op in sorted(set(stored) | set(run), key=lambda o: (-(run.get(o, 0) + stored.get(o, 0)), o)):
        t.add_row(op, str(stored.get(op, "")), str(run.get(op, "")))
    console.print(t)
    t = _table(title="initializer bytes by dtype")
    t.add_column("dtype")
    t.add_column("bytes", justify="right")
    for k, v in (d.get("bytes_by_dtype") or {}).items():
        t.add_row(k, f"{v:,}")
    console.print(t)
    render_int16_pairs(d.get("int16_pairs") or {}, d.get("cpu") or {}, console)


def render_int16_pairs(pairs: dict[str, Any], cpu: dict[str, Any], console: Any) -> None:
    """The static int16 pair-sum proof in a few lines: exact everywhere, or which kernels can saturate."""
    if not pairs or not pairs.get("kernels"):
        return
    forms = ", ".join(f"{n} {f}" for f, n in (pairs.get("forms") or {}).items())
    worst = pairs.get("worst_pair")
    worst_text = f"; worst u8 x s8 pair sum {worst:,} of {pairs.get('limit', 32767):,}" if worst is not None else ""
    if pairs.get("saturation_free"):
        console.print(f"int16 pair sums: {pairs['kernels']} integer kernels ({forms}) cannot saturate on any CPU"
                      f"{worst_text}")
    else:
        bad = pairs.get("can_saturate") or []
        console.print(f"[bold red]int16 pair sums: {len(bad)} of {pairs['kernels']} integer kernels can saturate on "
                      f"x86 CPUs without VNNI (AVX2, AVX-512 without VNNI){worst_text}:[/]")
        for row in (r for r in pairs.get("per_kernel") or [] if r.get("can_saturate")):
            pair = f"{row['worst_pair']:,}" if row.get("worst_pair") is not None else "unbounded"
            console.print(f"  {row.get('layer') or row['node']} ({row['op']}, {row['form']}): worst pair {pair}, "
                          f"{row.get('channels_over', 0)} output channel(s) over")
    if cpu:
        console.print(f"[dim]this CPU: {cpu.get('description')}[/]")
