"""Integer exports are exact on every CPU, and the twin predicts what CPUs of the other kind compute.

x86 without VNNI (AVX2, AVX-512 without VNNI) adds neighbouring uint8 x int8 products in int16 with
saturation; VNNI / AMX / ARM do not. Nothing here assumes which kind this machine is: the static
proof (rcdeploy.runtime.u8s8) and the twin's emulation carry the other kind into every test, and
where `qemu-x86_64` is installed, onnxruntime itself runs on an emulated AVX2 CPU (Haswell, no VNNI)
to check the emulation bit for bit on a VNNI machine too.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _deploy_models import digits as digits_arrays
from _deploy_models import export_fp32, quantize, train_digits
from test_export import make_checkpoint

from rcdeploy.cli import main
from rcdeploy.data import load_dataset
from rcdeploy.deploy.twin import build_twin
from rcdeploy.errors import UsageError, VerificationError
from rcdeploy.export.api import export_checkpoint
from rcdeploy.export.verify import compare_logits, judge
from rcdeploy.runtime.cpu import cpu_kind, resolve_isa
from rcdeploy.runtime.u8s8 import INT16_MAX, conv_pair_saturation, pair_saturation, worst_pair_sums

HERE = cpu_kind().isa
QEMU = shutil.which("qemu-x86_64")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """onnxruntime's own quantize_static U8S8 model (per-channel int8 weights up to +-127): it saturates."""
    root = tmp_path_factory.mktemp("foreign")
    x, _ = digits_arrays()
    fp32 = export_fp32(train_digits(), root / "fp32.onnx", (1, 8, 8))
    return quantize(fp32, root / "u8s8.onnx", x[:256], activations="u8")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits) -> dict[str, Path]:
    """rcdeploy exports: 4-bit ResNet-20 (8-bit first and last layers) and an all-8-bit ResNet-20."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for key, bits, width in (("r4", 4, 0.5), ("r8", 8, 0.5)):
        ckpt = make_checkpoint(root / f"{key}.pt", digits, "resnet20", bits, width=width)
        out[key] = root / f"{key}.onnx"
        export_checkpoint(ckpt, output=out[key])
    return out


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _assert_same_but_ties(twin: np.ndarray, ort_logits: np.ndarray) -> None:
    """Equal, except where a requantization lands on a rounding tie that the twin's float32 math (its
    kernels differ by CPU) resolves the other way: one output step on at most 0.5% of the logits.
    Measured on this project's VNNI machine against onnxruntime under qemu: 0 of 2,000 logits differ."""
    off = np.abs(twin - ort_logits) > 1e-4
    assert off.mean() <= 0.005, f"{off.sum()} of {off.size} logits differ (max {np.abs(twin - ort_logits).max():.4g})"
    assert (twin.argmax(1) == ort_logits.argmax(1)).mean() >= 0.99


def _twin_logits(path: Path, x: np.ndarray, isa: str) -> np.ndarray:
    with torch.no_grad():
        return build_twin(path, isa=isa)(torch.from_numpy(x)).numpy()


# --------------------------------------------------------------------------------------- CPU kind
@pytest.mark.parametrize("flags,machine,isa", [
    ("fpu sse4_1 avx avx2 fma", "x86_64", "avx2"),
    ("avx2 avx512f avx512bw", "x86_64", "avx2"),  # Skylake-SP: AVX-512 without VNNI still saturates
    ("avx2 avx512f avx512_vnni", "x86_64", "exact"),
    ("avx2 avx_vnni", "x86_64", "exact"),
    ("avx2 amx_int8 amx_tile", "x86_64", "exact"),
    ("fp asimd asimddp", "aarch64", "exact"),
])
def test_cpu_kind_from_cpuinfo_flags(flags: str, machine: str, isa: str) -> None:
    key = "Features" if machine == "aarch64" else "flags"
    kind = cpu_kind(f"processor\t: 0\nmodel name\t: Some CPU\n{key}\t\t: {flags}\n", machine=machine)
    assert kind.isa == isa
    assert kind.model == "Some CPU" and ("saturate" in kind.describe()) == (isa == "avx2")


def test_isa_names() -> None:
    assert resolve_isa(None) == HERE == resolve_isa("native")
    assert resolve_isa("AVX2") == "avx2" and resolve_isa("exact") == "exact"
    with pytest.raises(UsageError, match="unknown --isa 'foo'"):
        resolve_isa("foo")


# --------------------------------------------------------------------------------- the static bound
def test_worst_pair_sums_known_answers() -> None:
    rows = np.array([[127, 127, 0], [127, -127, 3], [64, 64, -64], [-64, -65, 1], [1, 0, 0]])
    got = worst_pair_sums(rows)
    assert got.tolist() == [255 * 254, 255 * 130, 255 * 128, 255 * 129, 255]
    assert (got <= INT16_MAX).tolist() == [False, False, True, False, True]


def _pairwise_reference(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A literal loop: sum over K pairs (0,1), (2,3), ... of each product pair clamped to int16."""
    n, k = a.shape
    out = np.zeros((n, len(w)), np.int64)
    for i in range(n):
        for m in range(len(w)):
            for j in range(0, k, 2):
                p = int(a[i, j]) * int(w[m, j]) + (int(a[i, j + 1]) * int(w[m, j + 1]) if j + 1 < k else 0)
                out[i, m] += min(max(p, -32768), 32767)
    return out


def test_pair_saturation_equals_a_literal_loop() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 37))  # odd K: the last pair is padded with a zero
    w = rng.integers(-127, 128, (5, 37))
    exact = a @ w.T
    err = pair_saturation(torch.tensor(a, dtype=torch.float64)[:, :, None], torch.tensor(w, dtype=torch.float64))
    assert err is not None and err.abs().sum() > 0
    np.testing.assert_array_equal(exact + err[:, :, 0].numpy().astype(np.int64), _pairwise_reference(a, w))
    assert pair_saturation(torch.tensor(a, dtype=torch.float64)[:, :, None],
                           torch.tensor(np.clip(w, -64, 64), dtype=torch.float64)) is None  # |w| <= 64: exact


def test_conv_pairs_follow_nhwc_im2col_order() -> None:
    """K runs (ky, kx, c) as in onnxruntime's NHWC im2col; padded pixels hold the zero point."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 3, 5, 5))
    w = rng.integers(-127, 128, (4, 3, 3, 3))
    zp = 128
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=zp)
    cols = np.stack([xp[:, :, i:i + 3, j:j + 3].transpose(0, 2, 3, 1).reshape(2, -1)
                     for i in range(5) for j in range(5)], axis=1)  # [N, L, (ky, kx, c)]
    rows = w.transpose(0, 2, 3, 1).reshape(4, -1)
    want = np.stack([_pairwise_reference(cols[:, pos], rows) - (cols[:, pos] @ rows.T) for pos in range(25)], -1)
    err = conv_pair_saturation(torch.tensor(x, dtype=torch.float64), zp, torch.tensor(w, dtype=torch.float64),
                               strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=1)
    assert err is not None
    np.testing.assert_array_equal(err.numpy().reshape(2, 4, 25).astype(np.int64), want)
    depthwise = conv_pair_saturation(torch.tensor(x, dtype=torch.float64), 0, torch.tensor(w[:3, :1]),
                                     strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=3)
    assert depthwise is None  # onnxruntime's depthwise kernel accumulates exactly


# ---------------------------------------------------------------------------- rcdeploy's exports
def test_exports_are_saturation_free_and_the_same_on_both_kinds(exported, digits) -> None:
    x = torch.cat([digits.val.x, digits.test.x])[:300].numpy()
    for key, path in exported.items():
        card = json.loads(path.with_suffix(".json").read_text())
        pairs = card["kernels"]["int16_pairs"]
        assert pairs["saturation_free"] and pairs["kernels"] == 22 and not pairs["can_saturate"]
        assert all(r["layer"] for r in pairs["per_kernel"])  # every kernel traced to its layer
        layers = {layer["name"]: layer for layer in card["layers"]}
        assert layers["stem.1.0"]["kernel_form"] == layers["head.fc"]["kernel_form"] == "u8u8"  # 8-bit layers
        for layer in layers.values():
            assert layer["kernel_form"] == "u8u8" or layer["worst_pair"] <= INT16_MAX
        if key == "r4":  # 4-bit layers keep the fast int8 kernels, spread to |w| <= 63
            assert {layers[n]["kernel_form"] for n in layers if n.startswith("blocks")} == {"u8s8"}
            assert {layers[n]["weight_spread"] for n in layers if n.startswith("blocks")} == {9}
        assert card["exported_on"]["isa"] == HERE
        # What a CPU of each kind computes is the same (onnxruntime here agrees with the twin up to the
        # rounding ties of requantization, as in tests/test_twin.py).
        exact, avx2 = _twin_logits(path, x, "exact"), _twin_logits(path, x, "avx2")
        np.testing.assert_array_equal(exact, avx2)
        assert (_ort_logits(path, x).argmax(1) == exact.argmax(1)).mean() >= 0.99


def test_export_that_could_saturate_fails_and_writes_nothing(digits, tmp_path, monkeypatch) -> None:
    """With the old spreading (8-bit layers int8 up to +-127), the static proof names the layer."""
    import rcdeploy.export.qdq as qdq

    ckpt = make_checkpoint(tmp_path / "s.pt", digits, "small_cnn", 8)
    monkeypatch.setattr(qdq, "SAFE_WEIGHT", 127)
    out = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match=r"layer \S+ \((QLinearConv|QGemm)\) can saturate int16 pair sums"):
        export_checkpoint(ckpt, output=out)
    assert sorted(os.listdir(tmp_path)) == ["s.pt"]


# -------------------------------------------------------------------- foreign saturating models
def test_twin_emulates_this_cpu_and_the_other_kind(foreign) -> None:
    x, _ = digits_arrays()
    x = x[:400]
    here = _ort_logits(foreign, x)
    _assert_same_but_ties(_twin_logits(foreign, x, HERE), here)
    exact, avx2 = _twin_logits(foreign, x, "exact"), _twin_logits(foreign, x, "avx2")
    assert np.abs(exact - avx2).max() > 0.5  # the pairs do saturate on AVX2 CPUs
    assert (exact.argmax(1) != avx2.argmax(1)).sum() > 0


def test_inspect_names_the_saturating_layers(foreign, tmp_path, capsys) -> None:
    report = tmp_path / "r.json"
    main(["inspect", str(foreign), "--json", str(report)])
    printed = capsys.readouterr().out
    pairs = json.loads(report.read_text())["int16_pairs"]
    assert not pairs["saturation_free"] and pairs["worst_pair"] > INT16_MAX
    assert len(pairs["can_saturate"]) == 4  # three convs and the classifier
    assert all(name in printed for name in pairs["can_saturate"])
    assert "can saturate on x86 CPUs without VNNI" in printed


def test_bench_scores_the_other_kind_with_the_emulating_twin(foreign, tmp_path) -> None:
    test = load_dataset("digits").test
    reports = {}
    for isa in ("exact", "avx2"):
        out = tmp_path / f"{isa}.json"
        main(["bench", str(foreign), "--dataset", "digits", "--attack", "none", "--no-latency", "--samples", "1000",
              "--isa", isa, "--json", str(out)])
        reports[isa] = json.loads(out.read_text())
    for isa, rep in reports.items():
        s = rep["settings"]
        assert s["isa"] == isa and s["cpu"]["isa"] == HERE and s["samples"] == len(test)
        assert s["scored_by"].startswith("onnxruntime" if isa == HERE else "differentiable twin emulating")
        assert any("can saturate int16 pair sums" in f for f in rep["accuracy"]["flags"])
        # onnxruntime here, or the emulation for the other kind: either way what that kind computes.
        want = 100 * float((_twin_logits(foreign, test.x.numpy(), isa).argmax(1) == test.y.numpy()).mean())
        assert rep["accuracy"]["clean_acc_pct"] == pytest.approx(want, abs=1e-9)
    assert reports["avx2"]["accuracy"]["clean_acc_pct"] < reports["exact"]["accuracy"]["clean_acc_pct"] - 1


@pytest.mark.parametrize("args", [["--isa", "foo"]])
def test_bad_isa_is_one_line_exit_2(foreign, args) -> None:
    r = subprocess.run([sys.executable, "-m", "rcdeploy.cli", "bench", str(foreign), "--dataset", "digits", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: unknown --isa 'foo'")
    assert "Traceback" not in r.stderr


# ------------------------------------------------------ onnxruntime itself on an emulated AVX2 CPU
_QEMU_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, onnxruntime as ort
    x = np.load(sys.argv[1])
    so = ort.SessionOptions(); so.log_severity_level = 3
    for path in sys.argv[2:]:
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        np.save(path + ".avx2.npy", s.run(None, {s.get_inputs()[0].name: x})[0])
""")


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                    reason="qemu-x86_64 (Debian: qemu-user) is not installed: no emulated AVX2 CPU to run onnxruntime on")
def test_onnxruntime_on_an_emulated_avx2_cpu_matches_the_twin(foreign, exported, tmp_path) -> None:
    """onnxruntime under `qemu-x86_64 -cpu Haswell` (AVX2, no VNNI): the foreign file's logits equal the
    twin's AVX2 emulation bit for bit, and rcdeploy's exports compute what they compute here."""
    x = np.ascontiguousarray(digits_arrays()[0][:200])
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "run.py"
    script.write_text(_QEMU_SCRIPT)
    paths = [foreign, exported["r4"], exported["r8"]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS")}
    r = subprocess.run([QEMU, "-cpu", "Haswell-v4", sys.executable, str(script), str(tmp_path / "x.npy"),
                        *map(str, paths)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    avx2 = {p: np.load(str(p) + ".avx2.npy") for p in paths}
    _assert_same_but_ties(_twin_logits(foreign, x, "avx2"), avx2[foreign])
    assert np.abs(avx2[foreign] - _twin_logits(foreign, x, "exact")).max() > 0.5
    for p in paths[1:]:
        np.testing.assert_array_equal(avx2[p], _ort_logits(p, x))


# -------------------------------------------------------------------------- faithful verification
def test_verification_passes_near_ties_and_fails_real_mismatches() -> None:
    rng = np.random.default_rng(0)
    step = 0.01
    ref = rng.normal(0, 3, (1000, 10))
    ref[:20, 1] = ref[:20, 0] = ref[:20].max(1) + 1.0  # 20 exact ties: any rounding decides them
    ref[:20, 1] -= 0.5 * step
    rounding = ref + rng.uniform(-2 * step, 2 * step, ref.shape)  # a faithful export: a few steps off
    rep = compare_logits(ref, rounding, step)
    assert rep["top1_agreement"] < 0.995  # plain top-1 would fail it on the near-ties ...
    assert judge(rep) is None and rep["decisive_top1_agreement"] == 1.0  # ... a faithful export passes
    broken = ref + rng.normal(0, 300 * step, ref.shape)  # saturating kernels: hundreds of steps off
    assert "within" in judge(compare_logits(ref, broken, step))
    swapped = np.roll(ref, 1, axis=1)  # a wrong graph
    assert judge(compare_logits(ref, swapped, step)) is not None
    assert judge(compare_logits(ref, swapped, None)) is not None  # no step (foreign): plain top-1 rule


# ------------------------------------------------------------------------------------------ OpenVINO
@pytest.fixture(scope="module")
def ov_exports(tmp_path_factory, digits) -> dict[str, Path]:
    """4-bit small CNN exported for OpenVINO with the first and last layers at 8 and at 7 bits."""
    pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("ov")
    out = {}
    for fl in (8, 7):
        ckpt = make_checkpoint(root / f"fl{fl}.pt", digits, "small_cnn", 4, first_last_bits=fl)
        out[fl] = root / f"fl{fl}.onnx"
        export_checkpoint(ckpt, output=out[fl], runtime="openvino")
    return out


def test_export_for_openvino_keeps_int8_kernels_and_exactness(ov_exports) -> None:
    """int8 storage (OpenVINO runs the packed INT4 chain in float); 7-bit first/last layers run int8 there
    too, and every kernel stays within the int16 pair bound, so OpenVINO on AVX2 is exact as well."""
    cards = {fl: json.loads(p.with_suffix(".json").read_text()) for fl, p in ov_exports.items()}
    for card in cards.values():
        assert card["runtime"] == "openvino" and card["storage"] == "int8"
        assert card["kernels"]["int16_pairs"]["saturation_free"]
        ov = card["openvino"]
        assert ov["verification"]["within_tolerance"] >= 0.995 and ov["verification"]["top1_agreement"] >= 0.98
        assert ov["int8_layers"]["layers"] == 4
    assert {layer["kernel_form"] for layer in cards[7]["layers"]} == {"u8s8"}
    assert cards[7]["openvino"]["int8_layers"]["int8"] == 4
    # 8-bit first/last layers are uint8 (exact in every runtime): OpenVINO runs those two in float, and says so.
    assert cards[8]["openvino"]["int8_layers"]["int8"] == 2
    assert any("--first-last-bits 7" in n for n in cards[8]["notes"])


def test_bench_in_openvino(ov_exports, tmp_path) -> None:
    out = tmp_path / "ov.json"
    main(["bench", str(ov_exports[7]), "--runtime", "openvino", "--attack", "ifgsm5", "--batch-sizes", "1",
          "--latency-seconds", "0.05", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rep["settings"]["runtime"] == "openvino" and rep["settings"]["scored_by"].startswith("openvino")
    assert rep["latency"]["runtime"] == "openvino" and rep["latency"]["int8_layers"]["int8"] == 4
    assert rep["versions"]["openvino"]
    acc = rep["accuracy"]
    assert acc["twin"]["clean_agreement_pct"] >= 99.0  # the onnxruntime-semantics twin predicts OpenVINO too
    assert acc["robust"][0]["within_eps"] and acc["robust"][0]["robust_acc_pct"] < acc["clean_acc_pct"]
    ort_out = tmp_path / "ort.json"
    main(["bench", str(ov_exports[7]), "--attack", "none", "--no-latency", "--json", str(ort_out)])
    assert abs(json.loads(ort_out.read_text())["accuracy"]["clean_acc_pct"] - acc["clean_acc_pct"]) <= 1.0


@pytest.mark.parametrize("args,message", [
    (["bench", "{m}", "--runtime", "foo"], "error: unknown --runtime 'foo'"),
    (["bench", "{m}", "--runtime", "openvino", "--isa", "{other}"], "error: --isa"),
    (["export", "missing.pt", "--runtime", "foo"], "error: unknown --runtime 'foo'"),
])
def test_bad_runtime_is_one_line_exit_2(foreign, tmp_path, args, message) -> None:
    other = "avx2" if HERE == "exact" else "exact"
    argv = [a.format(m=foreign, other=other) for a in args]
    r = subprocess.run([sys.executable, "-m", "rcdeploy.cli", *argv, *(["--dataset", "digits"] if argv[0] == "bench"
                        else [])], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith(message), r.stderr
