"""`--adv ard`: adversarially robust distillation (Goldblum et al. 2020) from a frozen teacher checkpoint.

The loss is the reference formula on the examples its crafting function returns; the attack stays in the
eps ball and raises what it maximizes; a 4-bit student distills a float teacher end to end, the teacher is
never changed nor saved with the student, resume is bit-exact and refuses a changed teacher file; bad input
is one line and exit 2, with no run folder left."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from rcdeploy.config import make_config
from rcdeploy.errors import UsageError
from rcdeploy.train.checkpoint import FORMAT, VERSION, atomic_save, build_model, load_model, model_spec
from rcdeploy.train.loop import fit
from rcdeploy.train.objectives import AdvSettings, ard, ard_examples, distillation_kl
from tests._cli import run_cli

BASE: dict[str, Any] = {"dataset": "digits", "model": "small_cnn", "width": 0.5, "epochs": 2, "batch_size": 64,
                        "train_samples": 256, "val_samples": 64, "val_attack": "fgsm", "lr": 0.05, "threads": 1,
                        "eps": 0.1, "steps": 2}
TIMING = ("img_per_s", "train_time_s")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float teacher trained cleanly on digits (2 short epochs): its run folder."""
    out = tmp_path_factory.mktemp("teacher")
    fit(make_config(None, {**BASE, "train_samples": 384, "adv": "none", "bits": "float", "act_bits": "float",
                           "first_last_bits": "float", "out": str(out), "name": "t"}))
    return out / "t"


@pytest.fixture(scope="module")
def batch(teacher_run: Path) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(4-bit student, frozen teacher, 32 digits, labels): the student calibrated, in train mode."""
    from rcdeploy.data import load_dataset
    from rcdeploy.models import create_model
    from rcdeploy.quant.calibrate import calibrate_activations
    from rcdeploy.quant.spec import QuantSpec

    data = load_dataset("digits")
    x, y = data.train.x[:32], data.train.y[:32]
    torch.manual_seed(0)
    student = create_model("small_cnn", num_classes=10, in_chans=1, mean=list(data.meta.mean),
                           std=list(data.meta.std), quant=QuantSpec(bits=4), input_size=8, width=0.5)
    calibrate_activations(student, [x])
    teacher, _ = load_model(teacher_run / "best.pt")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student.train(), teacher, x, y


def settings(teacher: torch.nn.Module, alpha: float, temperature: float) -> AdvSettings:
    return AdvSettings(eps=0.1, steps=3, step_size=0.04, beta=0.0, alpha=alpha, temperature=temperature,
                       teacher=teacher)


# -- the objective ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha, temperature", [(0.7, 30.0), (0.5, 4.0), (1.0, 30.0)])
def test_loss_is_the_ard_formula_on_the_crafted_examples(batch, alpha, temperature):
    student, teacher, x, y = batch
    s = settings(teacher, alpha, temperature)
    x_adv = ard_examples(student, x, y, s, torch.Generator().manual_seed(3))  # before the loss's BN updates
    student.zero_grad()
    loss, logits = ard(student, x, y, s, torch.Generator().manual_seed(3))
    loss.backward()
    with torch.no_grad():
        z_adv, z_clean, z_teacher = student(x_adv), student(x), teacher(x)
    p_t = F.softmax(z_teacher / temperature, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(z_adv / temperature, dim=1))).sum(1).mean()
    hand = alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(z_clean, y)
    assert abs(loss.item() - hand.item()) < 1e-5, (loss.item(), hand.item())
    assert torch.allclose(logits, z_adv, atol=1e-6)  # the logits returned are the student's on x_adv
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_crafted_examples_stay_in_the_ball_and_raise_what_they_maximize(batch):
    student, teacher, x, y = batch
    s = settings(teacher, 0.5, 30.0)
    x_adv = ard_examples(student, x, y, s, torch.Generator().manual_seed(5))
    assert float((x_adv - x).abs().max()) <= s.eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert student.training  # the attack runs in eval mode and puts the mode back
    student.eval()
    try:
        with torch.no_grad():
            z_adv, z_clean, z_teacher = student(x_adv), student(x), teacher(x)
    finally:
        student.train()
    # The reference's inner maximization is the student's cross-entropy; the distillation term rises with it.
    assert F.cross_entropy(z_adv, y) > F.cross_entropy(z_clean, y)
    assert distillation_kl(z_adv, z_teacher, 30.0) > distillation_kl(z_clean, z_teacher, 30.0)


def test_ard_without_a_teacher_or_with_a_bad_alpha_is_refused(batch):
    student, teacher, x, y = batch
    with pytest.raises(UsageError, match="--teacher"):
        ard(student, x, y, settings(None, 0.5, 30.0), torch.Generator())
    with pytest.raises(UsageError, match="outside"):
        ard(student, x, y, settings(teacher, 1.5, 30.0), torch.Generator())


# -- end to end -----------------------------------------------------------------------------------------------

def test_a_4bit_student_distills_the_float_teacher_which_stays_untouched(tmp_path, capsys, monkeypatch,
                                                                          teacher_run):
    import rcdeploy.train.loop as loop

    loaded: list[torch.nn.Module] = []

    def capture(*args: Any) -> Any:
        loaded.append(real(*args))
        return loaded[-1]

    real = loop.load_teacher
    monkeypatch.setattr(loop, "load_teacher", capture)
    teacher_file = teacher_run / "best.pt"
    before = sha256(teacher_file)
    out = tmp_path / "runs"
    code, _, err = run_cli(["train", "--adv", "ard", "--teacher", teacher_run, "--distill-temperature", "20",
                            "--alpha", "0.8", "--bits", "4", "--width", "0.5", "--epochs", "2", "--steps", "2",
                            "--eps", "0.1", "--batch-size", "64", "--train-samples", "256",
                            "--val-attack", "fgsm", "--out", out, "--name", "s", "--threads", "1"], capsys)
    assert code == 0, err
    assert sha256(teacher_file) == before and len(loaded) == 1
    teacher = loaded[0]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    on_file, _ = load_model(teacher_file)
    for (k, v), (k2, w) in zip(teacher.state_dict().items(), on_file.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, w), k
    cfg = make_config(out / "s" / "config.yaml")
    assert cfg.teacher == str(teacher_file.resolve()) and cfg.teacher_sha256 == before
    assert cfg.distill_temperature == 20.0 and cfg.alpha == 0.8 and str(cfg.bits) == "4"
    student = torch.load(out / "s" / "best.pt", weights_only=True)
    assert student["config"]["teacher_sha256"] == before
    rebuilt, _ = load_model(out / "s" / "best.pt")  # strict load: every tensor is one of the student's
    assert set(student["state_dict"]) == set(rebuilt.state_dict())
    assert not any("teacher" in k for k in [*student, *student["state_dict"]] if k != "config")


def test_resume_is_bit_exact_and_refuses_a_changed_teacher(tmp_path, teacher_run):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher_run / "best.pt", teacher)
    base = {**BASE, "adv": "ard", "bits": 4, "teacher": str(teacher), "alpha": 0.7, "prune_channels": 0.5}
    whole = fit(make_config(None, {**base, "out": str(tmp_path / "a"), "name": "r"}))
    stopped = fit(make_config(None, {**base, "out": str(tmp_path / "b"), "name": "r"}), stop_at=(1, 1))
    assert stopped.interrupted
    last = tmp_path / "b" / "r" / "last.pt"
    saved = last.read_bytes()
    raw = torch.load(teacher, weights_only=True)
    key = next(k for k in raw["state_dict"] if k.endswith("weight"))
    raw["state_dict"][key] = raw["state_dict"][key] * 0.5
    atomic_save(raw, teacher)  # another teacher at the same path
    with pytest.raises(UsageError, match="changed"):
        fit(None, resume=tmp_path / "b" / "r")
    assert last.read_bytes() == saved
    shutil.copy(teacher_run / "best.pt", teacher)
    resumed = fit(None, resume=tmp_path / "b" / "r")
    strip = [{k: v for k, v in m.items() if k not in TIMING} for m in whole.metrics]
    assert [{k: v for k, v in m.items() if k not in TIMING} for m in resumed.metrics] == strip
    a = torch.load(tmp_path / "a" / "r" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


# -- bad input ---------------------------------------------------------------------------------------------------

def foreign_teacher(path: Path, num_classes: int, in_chans: int) -> Path:
    """A checkpoint of an untrained small_cnn for another task (classes or input channels), written directly."""
    from rcdeploy.quant.spec import QuantSpec

    spec = model_spec("small_cnn", QuantSpec(bits="float", act_bits="float", first_last_bits=None),
                      num_classes=num_classes, in_chans=in_chans, mean=[0.5] * in_chans, std=[0.25] * in_chans,
                      input_size=8, width=0.5)
    atomic_save({"format": FORMAT, "version": VERSION, "model": spec, "state_dict": build_model(spec).state_dict(),
                 "config": {}, "dataset": {"name": "other", "num_classes": num_classes,
                                           "shape": [in_chans, 8, 8]}}, path)
    return path


def _bad_teacher(kind: str, tmp: Path, teacher_run: Path) -> list[Any]:
    if kind == "classes":
        return ["--adv", "ard", "--teacher", foreign_teacher(tmp / "five.pt", 5, 1)]
    if kind == "channels":
        return ["--adv", "ard", "--teacher", foreign_teacher(tmp / "rgb.pt", 10, 3)]
    if kind == "corrupt":
        (tmp / "junk.pt").write_bytes(b"not a checkpoint")
        return ["--adv", "ard", "--teacher", tmp / "junk.pt"]
    if kind == "folder":
        (tmp / "empty").mkdir()
        return ["--adv", "ard", "--teacher", tmp / "empty"]
    return {"none": ["--adv", "ard"], "other-adv": ["--adv", "pgd", "--teacher", teacher_run / "best.pt"],
            "missing": ["--adv", "ard", "--teacher", tmp / "nope.pt"],
            "temperature": ["--adv", "ard", "--teacher", teacher_run, "--distill-temperature", "0"]}[kind]


@pytest.mark.parametrize("kind, needle", [
    ("none", "pass --teacher"), ("other-adv", "--adv pgd takes none"), ("classes", "5 classes"),
    ("channels", "inputs 3x8x8"), ("missing", "not found"), ("corrupt", "not a readable"),
    ("folder", "no best.pt"), ("temperature", "distill-temperature"),
])
def test_bad_distillation_input_is_one_line_and_exit_2(tmp_path, capsys, teacher_run, kind, needle):
    out = tmp_path / "runs"
    args = _bad_teacher(kind, tmp_path, teacher_run)
    code, _, err = run_cli(["train", "--out", out, "--epochs", "1", "--threads", "1", "--train-samples", "64",
                            *args], capsys)
    assert code == 2 and err.startswith("error:") and needle in err, err
    assert len(err.strip().splitlines()) == 1 and not (out.exists() and any(out.iterdir()))
    if kind in ("classes", "channels"):
        assert "digits (10 classes, inputs 1x8x8)" in err, err  # both tasks named
