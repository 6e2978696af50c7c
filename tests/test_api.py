"""The Python API: the README's researcher loop, run tiny (digits, small_cnn, 1 epoch), and the lazy import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import rcdeploy
from rcdeploy.artifacts import BenchReport, ModelCard


def test_import_stays_light() -> None:
    """`import rcdeploy` loads no torch, onnxruntime or brevitas: the API functions import on first use."""
    code = "import sys, rcdeploy; print(sorted(m for m in ('torch', 'onnxruntime', 'brevitas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_researcher_loop(tmp_path: Path) -> None:
    """The README's loop over settings (there: the quick-start's epochs; here one epoch, a tiny model)."""
    rows = []
    for adv in ("none", "pgd"):
        run = rcdeploy.train(dataset="digits", model="small_cnn", width=0.25, adv=adv, epochs=1, threads=1,
                             prune_channels=0.0, val_samples=64, val_attack="pgd5", out=str(tmp_path / "runs"),
                             name=adv)
        onnx_file = tmp_path / f"{adv}.onnx"
        exported = rcdeploy.export(run.run_dir / "last.pt", output=onnx_file, verify_samples=64)
        report = rcdeploy.bench(onnx_file, attacks="ifgsm10", samples=64, latency=False)
        rows.append((adv, report.clean_acc_pct, report.worst_case_acc_pct, exported.card.params))
        assert isinstance(exported.card, ModelCard) and isinstance(report, BenchReport)
        assert ModelCard.load(onnx_file.with_suffix(".json")).training["adv"] == adv
        assert report.dataset == "digits" and report.attack_names == ["ifgsm10"]
    assert all(0 <= clean <= 100 and worst <= clean for _, clean, worst, _ in rows)
    assert rows[0][3] == rows[1][3]  # same architecture, same parameter count


def test_stage_packages_stay_callable_after_submodule_imports() -> None:
    import rcdeploy.export.api  # noqa: F401  (the import system rebinds rcdeploy.export to the package)
    import rcdeploy.train.loop  # noqa: F401

    assert callable(rcdeploy.train) and callable(rcdeploy.export) and callable(rcdeploy.bench)
