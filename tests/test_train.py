"""Training: a short real run, exact resume, signals, every adversary, bad input at the CLI."""

from __future__ import annotations

import json
import os
import pickle
import signal
import threading
from pathlib import Path

import pytest
import torch

from rcdeploy.cli import main
from rcdeploy.config import default_recipe, load_recipe, make_config, recipe_path
from rcdeploy.errors import UsageError
from rcdeploy.train.checkpoint import atomic_save, load_checkpoint, load_model
from rcdeploy.train.loop import Reporter, fit

TINY = {"dataset": "digits", "model": "small_cnn", "width": 0.25, "bits": 4, "adv": "pgd", "steps": 2,
        "epochs": 2, "batch_size": 128, "lr": 0.05, "val_samples": 64, "val_attack": "pgd5", "threads": 1}


def tiny_config(tmp_path: Path, **kw):
    return make_config(None, {**TINY, "out": str(tmp_path / "runs"), **kw})


def test_short_run_writes_a_complete_run_folder(tmp_path):
    result = fit(tiny_config(tmp_path, epochs=3))
    run = result.run_dir
    assert {p.name for p in run.iterdir()} >= {"best.pt", "last.pt", "metrics.jsonl", "config.yaml"}
    assert (run.parent / "latest").resolve() == run.resolve()
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for m in lines:
        assert 0 <= m["val_robust_acc"] <= m["val_clean_acc"] <= 100
        assert m["img_per_s"] > 0
    # three epochs of a quarter-width CNN already learn digits (chance is 10%)
    assert lines[-1]["val_clean_acc"] > 40
    model, ckpt = load_model(run / "best.pt")
    assert ckpt["config"]["adv"] == "pgd" and ckpt["dataset"]["name"] == "digits"
    assert result.best["val_robust_acc"] == max(m["val_robust_acc"] for m in lines)
    x = torch.rand(2, 1, 8, 8)
    assert model(x).shape == (2, 10)


def test_validation_by_an_attack_list_picks_best_on_val(tmp_path):
    """val_attack may name APGD, a list or a preset: robust accuracy is per image the worst over them, on the
    validation split (never test), and best.pt is the epoch with the highest such figure."""
    result = fit(tiny_config(tmp_path, epochs=3, val_attack="apgd-ce5,square20"))
    lines = [json.loads(s) for s in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(m["val_attack"] == "apgd-ce5,square20" for m in lines)
    assert result.best["val_robust_acc"] == max(m["val_robust_acc"] for m in lines)
    model, _ = load_model(result.run_dir / "best.pt")
    from rcdeploy.data import load_dataset
    from rcdeploy.train.loop import evaluate

    val = load_dataset("digits").val
    x, y = val.x[:64], val.y[:64]
    eps = lines[0]["eps"]
    both = evaluate(model, x, y, "apgd-ce5,square20", eps)
    alone = [evaluate(model, x, y, name, eps)["robust_acc"] for name in ("apgd-ce5", "square20")]
    assert both["robust_acc"] <= min(alone)  # the per-image worst case, not the mean of the two
    assert both["robust_acc"] == pytest.approx(result.best["val_robust_acc"])  # best.pt is the epoch it says


def _strip_times(history):
    return [{k: v for k, v in m.items() if k not in ("img_per_s", "train_time_s")} for m in history]


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    full = fit(tiny_config(tmp_path / "a"))
    cut = fit(tiny_config(tmp_path / "b"), stop_at=(1, 5))
    assert cut.interrupted and load_checkpoint(cut.run_dir / "last.pt")["position"] == [1, 5]
    resumed = fit(tiny_config(tmp_path / "b"), resume=cut.run_dir)
    assert not resumed.interrupted
    a = load_checkpoint(full.run_dir / "last.pt")["state_dict"]
    b = load_checkpoint(resumed.run_dir / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _strip_times(full.metrics) == _strip_times(resumed.metrics)


class _SignalAt(Reporter):
    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0

    def batch(self, loss: float, images: int) -> None:
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_and_stops_cleanly(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    result = fit(tiny_config(tmp_path), reporter=_SignalAt(3))
    assert result.interrupted
    ckpt = load_checkpoint(result.run_dir / "last.pt")
    assert ckpt["position"] == [0, 3]
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored


@pytest.mark.parametrize("adv", ["none", "fgsm-rs", "pgd", "trades"])
def test_every_adversary_trains(tmp_path, adv):
    result = fit(tiny_config(tmp_path, adv=adv, epochs=3, width=0.5))
    first, last = result.metrics[0], result.metrics[-1]
    assert torch.isfinite(torch.tensor(last["train_loss"]))
    assert last["train_loss"] < first["train_loss"]
    assert last["val_clean_acc"] > 25  # chance is 10%


def test_every_recipe_parses():
    names = [p.stem for p in recipe_path("quickstart").parent.glob("*.yaml")]
    assert {"quickstart", "mnist", "cifar10-resnet20-w8", "cifar10-resnet20-w4"} <= set(names)
    for name in names:
        cfg = make_config(name)
        assert cfg.epochs >= 1
    quick = load_recipe("quickstart")
    assert quick["dataset"] == "digits" and quick["adv"] == "pgd" and quick["bits"] == 4
    assert quick["prune_channels"] == 0.5


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"a": torch.ones(2)}, path)
    with pytest.raises((pickle.PicklingError, TypeError, AttributeError)):
        atomic_save({"a": threading.Lock()}, path)  # not picklable: fails mid-save
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    return exit_info.value.code, err


@pytest.mark.parametrize("args, needle", [
    (["--model", "resnet999"], "unknown model"),
    (["--dataset", "imagenet22k"], "unknown dataset"),
    (["--adv", "magic"], "unknown adversary"),
    (["--eps", "2"], "outside (0, 1]"),
    (["--eps", "0"], "outside (0, 1]"),
    (["--eps", "eight"], "not a number"),
    (["--bits", "9"], "not supported"),
    (["--sparsity", "nonesuch", "--prune-channels", "0.5"], "unknown"),
    (["--config", "no-such-recipe"], "not found"),
    (["--val-attack", "apgd-xx"], "unknown attack 'apgd-xx'"),
    (["--val-attack", "apgd-ce5@smooth"], "only bench has"),
])
def test_bad_train_input_is_one_line_and_exit_2(tmp_path, capsys, args, needle):
    out = tmp_path / "runs"
    code, err = _cli(["train", "--out", str(out), "--epochs", "1", *args], capsys)
    assert code == 2
    assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_unwritable_out_is_exit_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _cli(["train", "--out", str(blocker / "runs"), "--epochs", "1", "--threads", "1"], capsys)
    assert code == 2 and "cannot write to --out" in err and blocker.read_text() == "x"


def test_bad_resume_files(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, needle in [(corrupt, "not a readable"), (foreign, "not an rcdeploy checkpoint"),
                         (tmp_path / "missing.pt", "not found")]:
        code, err = _cli(["train", "--resume", str(path)], capsys)
        assert code == 2 and needle in err, err
    assert corrupt.read_bytes().startswith(b"\x80\x02not")  # untouched
    with pytest.raises(UsageError):
        load_checkpoint(foreign)


def test_cifar_models_train_a_step_on_real_cifar_images(shared_data):
    """The CIFAR-10 recipe's model and data fit together (a full run is too long for a test)."""
    from rcdeploy.data import load_dataset
    from rcdeploy.models import create_model
    from rcdeploy.quant.calibrate import calibrate_activations
    from rcdeploy.quant.spec import QuantSpec
    from rcdeploy.train.objectives import OBJECTIVES, AdvSettings

    data = load_dataset("cifar10", shared_data / "cifar10-slice")
    assert data.meta.shape == (3, 32, 32) and len(data.test) == 932
    model = create_model("resnet20", num_classes=10, in_chans=3, mean=data.meta.mean, std=data.meta.std,
                         quant=QuantSpec(bits=4))
    x, y = data.train.x[:16], data.train.y[:16]
    calibrate_activations(model, [x])
    model.train()
    loss, logits = OBJECTIVES["pgd"](model, x, y, AdvSettings(8 / 255, 2, 2 / 255, 6.0), torch.Generator())
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (16, 10)
    assert model.stem[1][0].weight.grad.abs().sum() > 0


def test_quickstart_base_only_for_the_quickstart_task():
    """`--dataset cifar10` must not inherit the digits quick-start's pruning or epochs."""
    quick = make_config(default_recipe({}), {})
    assert quick.prune_channels == 0.5 and quick.epochs == load_recipe("quickstart")["epochs"]
    assert default_recipe({"epochs": 3}) == "quickstart"
    cifar = {"dataset": "cifar10", "model": "resnet20"}
    cfg = make_config(default_recipe(cifar), cifar)
    assert cfg.prune_channels == 0 and cfg.eps is None and cfg.dataset == "cifar10"
