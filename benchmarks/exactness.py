"""Does a file compute the same on x86 with and without VNNI? Measured, for rcdeploy's exports and the peers.

    python benchmarks/exactness.py [--images 256] [--no-write]

ResNet-20 (random weights, calibrated activations: `inference.make_model`) in each form; CIFAR-10 test
images from ../shared/data/cifar10-slice when present, else random images. For each form:

- the static proof (rcdeploy.runtime.u8s8 on onnxruntime's optimized graph): can any u8 x s8 int16 pair
  sum saturate, how many kernels, the worst pair;
- onnxruntime on this CPU, and onnxruntime on an AVX2 CPU without VNNI: `qemu-x86_64 -cpu Haswell-v4`
  (Debian's qemu-user) runs the same Python and onnxruntime with CPUID saying Haswell, so MLAS picks its
  AVX2 kernels. Figures: max |logit difference| and top-1 agreement between the two;
- the twin's emulation of that CPU (`build_twin(isa="avx2")`) against onnxruntime under qemu.

"rcdeploy w4, k=18 (before)" is the export as it was before this check existed (8-bit layers int8 up to
+-127, 4-bit layers spread to +-126): the failure the issue reported, reproduced.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import inference  # noqa: E402

SLICE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-slice"
_RUN = textwrap.dedent("""
    import sys, numpy as np, onnxruntime as ort
    x = np.load(sys.argv[1])
    so = ort.SessionOptions(); so.log_severity_level = 3; so.intra_op_num_threads = 1
    for path in sys.argv[2:]:
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        np.save(path + ".out.npy", s.run(None, {s.get_inputs()[0].name: x})[0])
""")


def images(n: int) -> tuple[np.ndarray, str]:
    if SLICE.is_dir():
        from rcdeploy.data import load_dataset

        test = load_dataset("cifar10", SLICE).test
        return test.x[:n].numpy().astype(np.float32), f"the first {n} CIFAR-10 test images of the slice"
    return np.random.default_rng(0).random((n, 3, 32, 32), dtype=np.float32), f"{n} random images"


def forms() -> list[tuple[str, bytes]]:
    import rcdeploy.export.qdq as qdq

    shape = inference.NETS["resnet20"]["shape"]
    fp32 = inference.fp32_onnx(inference.make_model("resnet20", 32), shape)
    out = [("fp32", fp32),
           ("ort qs S8S8 (default)", inference.ort_quantize_static(fp32, shape, best=False)),
           ("ort qs U8S8", inference.ort_quantize_static(fp32, shape, best=True)),
           ("ort qs U8S8 rr", inference.ort_quantize_static(fp32, shape, best=True, reduce_range=True))]
    w8, w4 = inference.make_model("resnet20", 8), inference.make_model("resnet20", 4)
    out.append(("rcdeploy w8", qdq.build_qdq(w8, shape).to_bytes()))
    out.append(("rcdeploy w4", qdq.build_qdq(w4, shape).to_bytes()))
    safe = qdq.SAFE_WEIGHT
    try:
        qdq.SAFE_WEIGHT = 127  # the spreading before the int16 proof: 8-bit layers int8, 4-bit spread by 18
        out.append(("rcdeploy w4, k=18 (before)", qdq.build_qdq(w4, shape).to_bytes()))
    finally:
        qdq.SAFE_WEIGHT = safe
    return out


def ort_here(paths: list[Path], x: np.ndarray) -> dict[Path, np.ndarray]:
    from rcdeploy.runtime.session import open_session, run_logits

    return {p: run_logits(open_session(p, threads=1), x) for p in paths}


def ort_on_avx2(paths: list[Path], x_path: Path, tmp: Path) -> dict[Path, np.ndarray] | None:
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        return None
    script = tmp / "run.py"
    script.write_text(_RUN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS")}
    r = subprocess.run([qemu, "-cpu", "Haswell-v4", sys.executable, str(script), str(x_path), *map(str, paths)],
                       capture_output=True, text=True, env=env, timeout=3000)
    if r.returncode != 0:
        raise RuntimeError(f"onnxruntime under qemu failed: {r.stderr.strip().splitlines()[-1:]}")
    return {p: np.load(str(p) + ".out.npy") for p in paths}


def run(n: int, write: bool) -> int:
    import torch

    from rcdeploy.deploy.twin import build_twin
    from rcdeploy.export.verify import saturation_report
    from rcdeploy.runtime.cpu import cpu_kind
    from rcdeploy.runtime.session import optimized_graph

    torch.set_num_threads(1)
    info = common.machine_info()
    kind = cpu_kind()
    x, what = images(n)
    rows, data = [], {}
    with tempfile.TemporaryDirectory(prefix="rcdeploy-exact-") as tmp_s:
        tmp = Path(tmp_s)
        np.save(tmp / "x.npy", x)
        paths = []
        for name, blob in forms():
            p = tmp / f"{len(paths)}.onnx"
            p.write_bytes(blob)
            paths.append((name, p))
        here = ort_here([p for _, p in paths], x)
        avx2 = ort_on_avx2([p for _, p in paths], tmp / "x.npy", tmp)
        for name, p in paths:
            rep = saturation_report(optimized_graph(p.read_bytes()))
            with torch.no_grad():
                twin = build_twin(p, isa="avx2")(torch.from_numpy(x)).numpy()
                twin_exact = build_twin(p, isa="exact")(torch.from_numpy(x)).numpy()
            row: dict[str, Any] = {"exact_by_proof": rep["saturation_free"], "kernels": rep["kernels"],
                                   "can_saturate": len(rep["can_saturate"]), "worst_pair": rep["worst_pair"],
                                   "twin_exact_vs_ort_here_max_diff": float(np.abs(twin_exact - here[p]).max())}
            if avx2 is not None:
                d = np.abs(here[p] - avx2[p])
                row.update({"max_logit_diff_here_vs_avx2": float(d.max()),
                            "top1_agreement_here_vs_avx2": float((here[p].argmax(1) == avx2[p].argmax(1)).mean()),
                            "twin_avx2_vs_ort_avx2_max_diff": float(np.abs(twin - avx2[p]).max()),
                            "twin_avx2_logits_equal_pct": 100 * float((np.abs(twin - avx2[p]) <= 1e-6).mean())})
            data[name] = row
            cells = [name, "yes" if row["exact_by_proof"] else "**no**",
                     f"{row['can_saturate']} / {row['kernels']}", f"{row['worst_pair']:,}" if row["worst_pair"] else "-"]
            if avx2 is not None:
                cells += [f"{row['max_logit_diff_here_vs_avx2']:.4g}", f"{100 * row['top1_agreement_here_vs_avx2']:.1f}%",
                          f"{row['twin_avx2_vs_ort_avx2_max_diff']:.3g} ({row['twin_avx2_logits_equal_pct']:.1f}% equal)",
                          f"{row['twin_exact_vs_ort_here_max_diff']:.3g}"]
            rows.append(cells)
    headers = ["form", "exact by proof", "kernels that can saturate", "worst pair (limit 32,767)"]
    if avx2 is not None:
        headers += ["max logit diff, this CPU vs AVX2", "top-1 agreement", "twin(avx2) vs onnxruntime on AVX2",
                    "twin(exact) vs onnxruntime here"]
    print(common.text_table(headers, rows))
    if write:
        where = ("onnxruntime under `qemu-x86_64 -cpu Haswell-v4` (AVX2, no VNNI; MLAS dispatches on CPUID)"
                 if avx2 is not None else "(qemu-x86_64 not installed: no AVX2 run; proof only)")
        md = ["## Exact on every CPU: the same file with and without VNNI", "",
              f"Machine: {common.machine_line(info)}; this CPU: {kind.describe()}. "
              f"`python benchmarks/exactness.py`, ResNet-20 (3x32x32, random weights, calibrated activations) on "
              f"{what}; the AVX2 CPU is {where}. `exact by proof`: rcdeploy's static int16 pair-sum check on "
              "onnxruntime's optimized graph; `twin(avx2)`: the differentiable twin emulating that CPU (max |logit "
              "difference|, share of logits equal to 1e-6); `twin(exact)`: the twin's own fidelity here, for scale "
              "(random weights leave many requantization ties, which the twin's float32 math may round the other "
              "way by one step).", "",
              common.markdown_table(headers, rows), ""]
        common.write_section("exactness", "\n".join(md))
        common.update_results("exactness", {"machine": info, "cpu": kind.to_dict(), "images": what, "forms": data})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="32 images")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    return run(32 if args.quick else args.images, not args.no_write)


if __name__ == "__main__":
    sys.exit(main())
