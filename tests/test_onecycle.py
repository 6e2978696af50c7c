"""The `onecycle` schedule: torch's OneCycleLR curve, step for step, and accepted by `rcdeploy train`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _cli import run_cli

from rcdeploy.config import TrainConfig
from rcdeploy.train.loop import lr_at, onecycle_lr


def torch_curve(peak: float, epochs: int, steps: int) -> list[float]:
    """The lr of every optimizer step under torch's OneCycleLR (its defaults, momentum not cycled)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peak, total_steps=epochs * steps, cycle_momentum=False)
    out = []
    for _ in range(epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("peak,epochs,steps", [(0.2, 30, 33), (0.1, 3, 5), (0.05, 1, 1), (0.2, 7, 2)])
def test_onecycle_matches_torch_step_for_step(peak, epochs, steps):
    cfg = TrainConfig(schedule="onecycle", lr=peak, epochs=epochs)
    ours = [lr_at(cfg, e + b / steps, steps) for e in range(epochs) for b in range(steps)]
    ref = torch_curve(peak, epochs, steps)
    assert max(abs(a - b) for a, b in zip(ours, ref)) < 1e-6


def test_onecycle_peaks_at_30_percent_and_ends_near_zero():
    peak, epochs, steps = 0.2, 30, 33
    cfg = TrainConfig(schedule="onecycle", lr=peak, epochs=epochs)
    curve = [lr_at(cfg, e + b / steps, steps) for e in range(epochs) for b in range(steps)]
    top = max(range(len(curve)), key=curve.__getitem__)
    assert top == round(0.3 * len(curve)) - 1 and curve[top] == pytest.approx(peak, rel=1e-9)
    assert curve[0] == pytest.approx(peak / 25)
    assert curve[-1] == pytest.approx(peak / 25 / 1e4) and curve[-1] < 1e-5
    assert all(a <= b for a, b in zip(curve[:top], curve[1:top + 1]))  # up, then down
    assert all(a >= b for a, b in zip(curve[top:], curve[top + 1:]))
    # Without the step count (the many-steps limit): the same shape in fractions of training.
    assert onecycle_lr(peak, 0.3 * epochs, epochs) == pytest.approx(peak)
    assert onecycle_lr(peak, 0.0, epochs) == pytest.approx(peak / 25)
    assert onecycle_lr(peak, epochs, epochs) == pytest.approx(peak / 25e4)
    assert onecycle_lr(peak, 0.65 * epochs, epochs) == pytest.approx((peak + peak / 25e4) / 2)


def test_other_schedules_unchanged():
    cos = TrainConfig(schedule="cosine", lr=0.1, epochs=10)
    pw = TrainConfig(schedule="piecewise", lr=0.1, epochs=10, milestones=[0.5, 0.75], gamma=0.1)
    for p in (0.0, 2.5, 5.0, 7.5, 9.9):
        for steps in (None, 7):
            assert lr_at(cos, p, steps) == 0.1 * 0.5 * (1 + math.cos(math.pi * p / 10))
            assert lr_at(pw, p, steps) == 0.1 * 0.1 ** sum(p / 10 >= m for m in (0.5, 0.75))
            assert lr_at(TrainConfig(schedule="constant", lr=0.1, epochs=10), p, steps) == 0.1


def test_train_accepts_schedule_onecycle(tmp_path, capsys):
    code, _, err = run_cli(["train", "--schedule", "onecycle", "--epochs", "1", "--train-samples", "64",
                            "--batch-size", "32", "--threads", "1", "--val-attack", "fgsm", "--prune-channels", "0",
                            "--lr", "0.1", "--out", tmp_path, "--name", "oc"], capsys)
    assert code == 0, err
    lines = (tmp_path / "oc" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    # 64 images minus none held out by --train-samples, batch 32: 2 steps; the last one's lr is torch's.
    assert last["lr"] == pytest.approx(torch_curve(0.1, 1, 2)[-1], abs=1e-9)
