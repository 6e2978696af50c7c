"""Issue 17, "nothing lost, nothing silently changed": hostile inputs and faults at the real CLI.

Every case of the battery (`CASES`) runs `rcdeploy.cli.main` in-process on real files and asserts
the exit code, a single `error:` line on stderr with no traceback, the message, and that every file
that existed before is byte-identical after (and that no file appeared). The fault tests run the CLI
as a real subprocess where a process boundary is the point: signals, warnings at import, a second
training on a locked run folder, and a disk that fills up (a small tmpfs; skipped where mounting is
not allowed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from _cli import run_cli
from onnx import TensorProto, helper, numpy_helper

from rcdeploy.cli import main
from rcdeploy.train.checkpoint import load_checkpoint
from rcdeploy.train.loop import Reporter, fit

ROOT = Path(__file__).resolve().parents[1]
# A tiny run: quarter-width CNN on digits, 2 PGD steps; about a second per epoch on one thread.
TRAIN = ["--dataset", "digits", "--model", "small_cnn", "--width", "0.25", "--bits", "4", "--adv", "pgd",
         "--steps", "2", "--batch-size", "128", "--lr", "0.05", "--threads", "1",
         "--prune-channels", "0"]


# ------------------------------------------------------------------------------------------ helpers


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    return run_cli(argv, capsys)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file under root by relative path: bytes for files, the target for symlinks."""
    snap: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            snap[rel] = f"-> {os.readlink(p)}"
        elif p.is_file():
            snap[rel] = p.read_bytes()
        elif p.is_dir():
            snap[rel] = "<dir>"
    return snap


def assert_one_error_line(code: int, err: str, expected_code: int, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == expected_code, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and needle in lines[0], (needle, err)
    assert "Traceback" not in err


def subprocess_cli(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "rcdeploy.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _png(width: int, height: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _graph(path: Path, dims: list, features: int) -> Path:
    """Flatten -> MatMul: a float [N, C, H, W] classifier with `features` inputs and 10 logits."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(features, 10)).astype(np.float32), "w")
    nodes = [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _edit_checkpoint(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return dst


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every file the battery needs, made once: a trained run, hostile recipes, checkpoints, sidecars,
    reports, image folders, and a tiny ONNX classifier with its sidecar and a valid bench report."""
    root = tmp_path_factory.mktemp("faults")
    w: dict[str, Path] = {"root": root}
    from rcdeploy.config import make_config

    cfg = {"dataset": "digits", "model": "small_cnn", "width": 0.25, "bits": 4, "adv": "pgd", "steps": 2,
           "batch_size": 128, "lr": 0.05, "val_samples": 64, "threads": 1, "prune_channels": 0.0, "epochs": 2,
           "out": str(root / "runs"), "name": "done", "val_attack": "pgd5"}
    w["run"] = fit(make_config(None, cfg)).run_dir
    last = w["run"] / "last.pt"
    w["blocker"] = _write(root / "blocker", "a file, not a folder\n")

    recipes = {
        "epochs_abc": "epochs: abc\n", "epochs_list": "epochs: [1, 2]\n", "lr_abc": "lr: abc\n",
        "overrides_list": "bit_overrides: [1, 2]\n", "threads0": "threads: 0\n", "lr_nan": "lr: .nan\n",
        "not_mapping": "- 1\n- 2\n", "unknown": "epochz: 3\n", "broken": "epochs: [1,\n",
        "recursive": "milestones: &a [0.5, *a]\n",
        "bomb": "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else '0.5'}]\n" for i in range(7))
        + "milestones: [*l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6]\n",
    }
    for name, text in recipes.items():
        w[f"recipe_{name}"] = _write(root / "recipes" / f"{name}.yaml", text)
    w["recipe_binary"] = _write(root / "recipes" / "binary.yaml", b"\xff\xfe\x00epochs: 3\n")

    # checkpoints with the rcdeploy header but the wrong shape or types
    ck = root / "ckpt"
    w["ck_no_model"] = _edit_checkpoint(last, ck / "no_model.pt", lambda c: c.pop("model"))
    w["ck_kwargs"] = _edit_checkpoint(last, ck / "kwargs.pt", lambda c: c["model"]["kwargs"].update(bogus=1))
    w["ck_shape"] = _edit_checkpoint(last, ck / "shape.pt", lambda c: c["dataset"].update(shape="8x8"))
    w["ck_tensor"] = _edit_checkpoint(last, ck / "tensor.pt", lambda c: c["state_dict"].update(x="not a tensor"))
    w["ck_position"] = _edit_checkpoint(last, ck / "position" / "last.pt", lambda c: c.update(position="x"))
    w["ck_config"] = _edit_checkpoint(last, ck / "config" / "last.pt", lambda c: c["config"].update(epochs="abc"))
    w["ck_pickle"] = _write(ck / "payload.pt", b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")

    # image folders: one class only; a decompression bomb; a corrupt image
    img = np.zeros((8, 8), np.uint8)
    for i in range(3):
        np.save(_write(root / "one_class" / "a" / f"{i}.npy", b""), img)
        np.save(_write(root / "bomb" / "b" / f"{i}.npy", b""), img)
        np.save(_write(root / "corrupt" / "b" / f"{i}.npy", b""), img)
    _write(root / "bomb" / "a" / "big.png", _png(30_000, 30_000, zlib.compress(b"\0" * 30_001, 9)))
    _write(root / "corrupt" / "a" / "bad.png", b"\x89PNG\r\n\x1a\n garbage")
    w.update(one_class=root / "one_class", bomb=root / "bomb", corrupt=root / "corrupt")

    # a tiny ONNX classifier with a sidecar; variants whose sidecars are of the wrong shape
    m = root / "models"
    m.mkdir()
    w["model"] = _graph(m / "tiny.onnx", ["N", 1, 8, 8], 64)
    card = {"format": "rcdeploy-model-card", "dataset": {"name": "digits"}, "input": {"range": [0.0, 1.0]}}
    _write(m / "tiny.json", json.dumps(card))
    for name, bad in {"name5": {"dataset": {"name": 5}}, "oops": {"training": "oops"},
                      "range": {"input": {"range": "0..1"}}, "eps": {"training": {"eps": "lots"}}}.items():
        w[f"side_{name}"] = shutil.copy(w["model"], m / f"{name}.onnx")
        _write(m / f"{name}.json", json.dumps({**card, **bad, "dataset": {**card["dataset"],
                                                                           **bad.get("dataset", {})}}))
    w["symbolic"] = _graph(m / "symbolic.onnx", ["N", "C", "H", "W"], 48)  # wants 3x4x4 images
    w["other_csv"] = _write(root / "other.csv", "name,score\nx,1\n")
    w["half_csv"] = _write(root / "half.csv", "")

    # a valid bench report, then reports with a string where a mapping or a number belongs
    report = root / "reports" / "ok.json"
    report.parent.mkdir()
    try:
        main(["bench", str(w["model"]), "--attack", "none", "--no-latency", "--samples", "32", "--json", str(report),
              "--csv", str(root / "reports" / "ok.csv")])
    except SystemExit as e:
        assert not e.code, e.code
    from rcdeploy.deploy.report import CSV_COLUMNS

    _write(w["half_csv"], ",".join(CSV_COLUMNS) + "\r\n2026,half a ro")
    w["report"] = report
    data = json.loads(report.read_text())
    w["rep_settings"] = _write(root / "reports" / "settings.json", json.dumps({**data, "settings": "cifar"}))
    w["rep_acc"] = _write(root / "reports" / "acc.json",
                          json.dumps({**data, "accuracy": {"clean_acc_pct": "high"}}))
    w["rep_attacks"] = _write(root / "reports" / "attacks.json",
                              json.dumps({**data, "settings": {**data["settings"], "attacks": [5]}}))
    w["rep_text"] = _write(root / "reports" / "text.json", "not json {")
    w["rep_deep"] = _write(root / "reports" / "deep.json", "[" * 100_000 + "]" * 100_000)
    return w


# --------------------------------------------------------------------------------------- the battery

# (case id, argv with {placeholders} from `world`, exit code, a substring of the one error line)
CASES: list[tuple[str, list[str], int, str]] = [
    # recipes: types, ranges, parsing limits
    ("recipe epochs: abc", ["train", "--config", "{recipe_epochs_abc}"], 2, "epochs: expected an integer"),
    ("recipe epochs: [1,2]", ["train", "--config", "{recipe_epochs_list}"], 2, "epochs: expected an integer"),
    ("recipe lr: abc", ["train", "--config", "{recipe_lr_abc}"], 2, "lr: expected a finite number"),
    ("recipe bit_overrides: [1,2]", ["train", "--config", "{recipe_overrides_list}"], 2,
     "bit_overrides: expected a mapping"),
    ("recipe threads: 0", ["train", "--config", "{recipe_threads0}"], 2, "threads: must be >= 1"),
    ("recipe lr: .nan", ["train", "--config", "{recipe_lr_nan}"], 2, "lr: expected a finite number"),
    ("recipe not a mapping", ["train", "--config", "{recipe_not_mapping}"], 2, "a recipe is a mapping"),
    ("recipe unknown key", ["train", "--config", "{recipe_unknown}"], 2, "unknown setting(s) epochz"),
    ("recipe broken YAML", ["train", "--config", "{recipe_broken}"], 2, "not valid YAML"),
    ("recipe not UTF-8", ["train", "--config", "{recipe_binary}"], 2, "not UTF-8"),
    ("recipe alias bomb", ["train", "--config", "{recipe_bomb}"], 2, "expands to more than"),
    ("recipe recursive alias", ["train", "--config", "{recipe_recursive}"], 2, "refers to itself"),
    ("recipe is a folder", ["train", "--config", "{root}"], 2, "is a folder"),
    # train flags
    ("train --threads 0", ["train", "--threads", "0"], 2, "'--threads': 0 is not in the range"),
    ("train --threads -1", ["train", "--threads", "-1"], 2, "'--threads': -1 is not in the range"),
    ("train --seed -1", ["train", "--seed", "-1"], 2, "'--seed': -1 is not in the range"),
    ("train --epochs 0", ["train", "--epochs", "0"], 2, "'--epochs': 0 is not in the range"),
    ("train --lr nan", ["train", "--lr", "nan", "--out", "{root}/runs"], 2, "--lr: expected a finite number"),
    ("train --eps nan", ["train", "--eps", "nan", "--out", "{root}/runs"], 2, "--eps"),
    ("train --name ../x", ["train", "--name", "../escape", "--out", "{root}/runs"], 2, "one folder name"),
    ("train --name of an existing run", ["train", "--name", "done", "--out", "{root}/runs"], 2, "already exists"),
    ("train --out under a file", ["train", "--out", "{blocker}/runs"], 2, "cannot write to --out"),
    ("train --json under a file", ["train", "--json", "{blocker}/m.json", "--out", "{root}/runs"], 2,
     "cannot write --json"),
    ("train --model-arg bogus=1", ["train", *TRAIN, "--epochs", "1", "--model-arg", "bogus=1", "--out",
                                   "{root}/runs"], 2, "cannot be built"),
    ("train one-class dataset", ["train", *TRAIN, "--epochs", "1", "--dataset", "folder:{one_class}", "--out",
                                 "{root}/runs"], 2, "needs at least 2"),
    ("train PNG decompression bomb", ["train", *TRAIN, "--dataset", "folder:{bomb}", "--out", "{root}/runs"], 2,
     "pixels, more than"),
    ("train corrupt image (no --download hint)", ["train", *TRAIN, "--dataset", "folder:{corrupt}", "--out",
                                                  "{root}/runs"], 2, "replace or remove that file"),
    # resume keeps the run's settings
    ("resume --lr", ["train", "--resume", "{run}", "--lr", "0.5"], 2, "--lr cannot change a run on --resume"),
    ("resume --config", ["train", "--resume", "{run}", "--config", "quickstart"], 2, "--config cannot change"),
    ("resume a finished run", ["train", "--resume", "{run}"], 2, "already finished its 2 epoch"),
    ("resume --epochs below done", ["train", "--resume", "{run}", "--epochs", "1"], 2, "below the 2 epoch"),
    ("resume from best.pt", ["train", "--resume", "{run}/best.pt"], 2, "earlier point"),
    ("resume position: 'x'", ["train", "--resume", "{ck_position}"], 2, "position: expected a list"),
    ("resume config.epochs: abc", ["train", "--resume", "{ck_config}"], 2, "config: epochs: expected an integer"),
    ("resume a pickle payload", ["train", "--resume", "{ck_pickle}"], 2, "not a readable rcdeploy checkpoint"),
    # checkpoints with the header but the wrong shape (export)
    ("export checkpoint without model", ["export", "{ck_no_model}", "-o", "{root}/exp/m.onnx"], 2,
     "model: is missing"),
    ("export checkpoint bogus kwargs", ["export", "{ck_kwargs}", "-o", "{root}/exp/m.onnx"], 2, "cannot be built"),
    ("export checkpoint dataset.shape", ["export", "{ck_shape}", "-o", "{root}/exp/m.onnx"], 2,
     "dataset.shape: expected a list"),
    ("export checkpoint non-tensor weight", ["export", "{ck_tensor}", "-o", "{root}/exp/m.onnx"], 2,
     "state_dict.x: expected a tensor"),
    ("export -o under a file", ["export", "{run}/best.pt", "-o", "{blocker}/sub/m.onnx"], 2, "cannot write -o"),
    ("export -o not .onnx", ["export", "{run}/best.pt", "-o", "{root}/m.txt"], 2, "must be an .onnx"),
    ("export --verify-samples 0", ["export", "{run}/best.pt", "--verify-samples", "0"], 2, "--verify-samples"),
    # bench: outputs refused before the work, options, sidecars, runtime errors
    ("bench --csv into the sidecar", ["bench", "{model}", "--attack", "none", "--no-latency", "--csv",
                                      "{root}/models/tiny.json"], 2, "not a CSV with this command's columns"),
    ("bench --csv with another header", ["bench", "{model}", "--csv", "{other_csv}"], 2, "not a CSV"),
    ("bench --csv half-written row", ["bench", "{model}", "--csv", "{half_csv}"], 2, "incomplete row"),
    ("bench --json under a file", ["bench", "{model}", "--json", "{blocker}/r.json"], 2, "cannot write --json"),
    ("bench --json = --csv", ["bench", "{model}", "--json", "{root}/same", "--csv", "{root}/same"], 2,
     "both name"),
    ("bench --seed -1", ["bench", "{model}", "--seed", "-1"], 2, "'--seed': -1 is not in the range"),
    ("bench --latency-seconds nan", ["bench", "{model}", "--latency-seconds", "nan"], 2, "finite number"),
    ("bench --batch-sizes 1e11", ["bench", "{model}", "--batch-sizes", "100000000000"], 2,
     "batch sizes must be >= 1 and <= 4096"),
    ("bench --threads 0", ["bench", "{model}", "--threads", "0"], 2, "'--threads': 0 is not in the range"),
    ("bench sidecar dataset.name: 5", ["bench", "{side_name5}"], 2, "dataset.name: expected a string"),
    ("bench sidecar training: 'oops'", ["bench", "{side_oops}"], 2, "training: expected a mapping"),
    ("bench sidecar input.range: '0..1'", ["bench", "{side_range}"], 2, "input.range: expected a list"),
    ("bench sidecar training.eps: 'lots'", ["bench", "{side_eps}", "--attack", "none", "--no-latency"], 2,
     "training.eps: 'lots' is not a number"),
    ("bench symbolic model, wrong dataset", ["bench", "{symbolic}", "--dataset", "digits", "--attack", "none",
                                            "--no-latency", "--samples", "8"], 2, "cannot run the model"),
    # compare: reports of the wrong shape
    ("compare settings: 'cifar'", ["compare", "{rep_settings}"], 2, "settings: expected a mapping"),
    ("compare clean_acc_pct: 'high'", ["compare", "{rep_acc}"], 2, "accuracy.clean_acc_pct: expected a finite"),
    ("compare attacks: [5]", ["compare", "{rep_attacks}"], 2, "settings.attacks[0]: expected a mapping"),
    ("compare not JSON", ["compare", "{rep_text}"], 2, "is not JSON"),
    ("compare JSON nested 100000 deep", ["compare", "{rep_deep}"], 2, "is not JSON"),
    ("compare --plot under a file", ["compare", "{report}", "--plot", "{blocker}/p.png"], 2, "cannot write --plot"),
    ("inspect --json under a file", ["inspect", "{model}", "--json", "{blocker}/i.json"], 2, "cannot write --json"),
]


@pytest.mark.parametrize("case, argv, code, needle", CASES, ids=[c[0] for c in CASES])
def test_battery(world: dict[str, Path], capsys: pytest.CaptureFixture, case: str, argv: list[str], code: int,
                 needle: str) -> None:
    args = [a.format(**world) for a in argv]
    before = snapshot(world["root"])
    got, _, err = cli(args, capsys)
    assert_one_error_line(got, err, code, needle)
    assert snapshot(world["root"]) == before, f"{case}: files changed"


def test_battery_size() -> None:
    assert len(CASES) >= 40


# ---------------------------------------------------------------------------------------- the faults


def _interrupted_run(tmp: Path, name: str, epochs: int) -> tuple[subprocess.Popen, str]:
    """A real training process, SIGTERMed as soon as its first epoch line is in metrics.jsonl."""
    proc = subprocess_cli(["train", *TRAIN, "--epochs", str(epochs), "--out", "runs", "--name", name], tmp)
    metrics = tmp / "runs" / name / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc, err


def test_sigterm_then_resume_as_printed_equals_an_uninterrupted_run(tmp_path: Path, capsys) -> None:
    """The command the interrupted run prints continues it with its own settings (epochs, lr schedule):
    the final weights equal an uninterrupted run's bit for bit; metrics lines stay unique; stray temps go."""
    proc, err = _interrupted_run(tmp_path, "intr", epochs=4)
    assert proc.returncode == 130, err
    printed = re.search(r"continue with `rcdeploy train (--resume \S+)`", err)
    assert printed, err
    run = tmp_path / "runs" / "intr"
    assert load_checkpoint(run / "last.pt")["position"][0] < 4
    # what a kill mid-write leaves: temps of a dead writer (and of the old naming), a metrics line ahead
    _write(run / ".last.pt.999999999.abcd1234.tmp", b"half")
    _write(run / ".best.pt.k3j2h1.tmp", b"half")
    with open(run / "metrics.jsonl", "a") as f:
        f.write((run / "metrics.jsonl").read_text().splitlines()[-1] + "\n")

    resumed = subprocess_cli(["train", *printed.group(1).split()], tmp_path)
    out, err2 = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err2
    assert "note:" not in err2  # nothing overridden: the run's own settings

    code, _, err3 = cli(["train", *TRAIN, "--epochs", "4", "--out", tmp_path / "runs", "--name", "full"], capsys)
    assert code == 0, err3
    a = load_checkpoint(tmp_path / "runs" / "full" / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    drop = ("img_per_s", "train_time_s")
    strip = [{k: v for k, v in m.items() if k not in drop} for m in a["history"]]
    assert strip == [{k: v for k, v in m.items() if k not in drop} for m in b["history"]]
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3, 4]
    assert not list(run.glob(".*.tmp"))


def test_two_trainings_on_one_run_folder_the_second_refuses(tmp_path: Path, capsys) -> None:
    first = subprocess_cli(["train", *TRAIN, "--epochs", "50", "--out", "runs", "--name", "busy"], tmp_path)
    run = tmp_path / "runs" / "busy"
    deadline = time.monotonic() + 120
    try:
        while not (run / "last.pt").exists():  # the lock is held from the folder's creation on
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        before = snapshot(run)
        code, _, err = cli(["train", "--resume", run], capsys)
        assert_one_error_line(code, err, 2, f"is in use by another training (pid {first.pid})")
        code, _, err = cli(["train", *TRAIN, "--out", tmp_path / "runs", "--name", "busy"], capsys)
        assert_one_error_line(code, err, 2, "already exists")
        after = snapshot(run)
        assert {k: v for k, v in after.items() if k in before} .keys() >= {"config.yaml", ".lock"}
        assert after["config.yaml"] == before["config.yaml"]
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 130
    assert load_checkpoint(run / "last.pt")["config"]["epochs"] == 50  # the first run's, untouched


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler installed for `sig` (Linux: the SigCgt mask in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def test_sigterm_during_startup_exits_130_and_leaves_nothing(tmp_path: Path) -> None:
    proc = subprocess_cli(["train", *TRAIN, "--epochs", "1", "--out", "runs", "--name", "early"], tmp_path)
    # The CLI installs its handler before the heavy imports (torch, brevitas: seconds); a fixed sleep could fire
    # before the interpreter got there on a loaded machine (killed by the default action, -15), so wait for it.
    deadline = time.monotonic() + 60
    while not _catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.005)
    assert not (tmp_path / "runs" / "early").exists()  # still starting up
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "early").exists()


def test_train_error_after_the_heavy_imports_is_one_line(tmp_path: Path) -> None:
    """Brevitas warns at import about optional kernels; the user cannot act on it, so it is silenced."""
    proc = subprocess_cli(["train", *TRAIN, "--epochs", "1", "--model-arg", "bogus=1", "--out", "runs"], tmp_path)
    _, err = proc.communicate(timeout=120)
    assert_one_error_line(proc.returncode, err, 2, "cannot be built")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


class _LatestAtFirstBatch(Reporter):
    def __init__(self, latest: Path) -> None:
        self.latest, self.seen = latest, None

    def batch(self, loss: float, images: int) -> None:
        if self.seen is None:
            self.seen = self.latest.resolve()


def test_latest_moves_only_once_the_run_has_a_checkpoint_and_one_epoch_with_pruning_writes_best(
        tmp_path: Path) -> None:
    from rcdeploy.config import make_config

    out = tmp_path / "runs"
    cfg = {"width": 0.25, "adv": "none", "epochs": 1, "val_samples": 32, "threads": 1, "out": str(out),
           "prune_channels": 0.5}
    old = fit(make_config(None, {**cfg, "name": "old"})).run_dir
    # one epoch with pruning: no fine-tune epoch, so the mask is fixed after it and best.pt is written
    assert (old / "best.pt").exists()
    spy = _LatestAtFirstBatch(out / "latest")
    new = fit(make_config(None, {**cfg, "name": "new"}), reporter=spy).run_dir
    assert spy.seen == old.resolve()  # during the first batch: the new run had no checkpoint yet
    assert (out / "latest").resolve() == new.resolve()


def test_help_has_examples_and_every_default(capsys) -> None:
    for command in ("train", "export", "bench", "compare", "inspect"):
        code, out, _ = cli([command, "--help"], capsys)
        assert code == 0 and "Examples:" in out
        options = re.split(r"\n  (?=-)", out.split("Options:", 1)[1].split("Examples:")[0])
        for opt in options:
            if opt.strip() and not opt.lstrip().startswith("-h"):
                assert "default:" in " ".join(opt.split()), (command, opt)


# ----------------------------------------------------------------------------------------- disk full


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only, where mounting is allowed); the test fills it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> None:
    """Fill the disk to the last block (unbuffered: no pending bytes for close to fail on)."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


def test_disk_full_bench_keeps_files_whole_and_rescues_the_report(world: dict[str, Path], tiny_disk: Path,
                                                                    tmp_path: Path, capsys, monkeypatch) -> None:
    shutil.copy(world["root"] / "reports" / "ok.csv", tiny_disk / "runs.csv")
    _fill(tiny_disk)
    before = snapshot(tiny_disk)
    rescue = tmp_path / "rescue"
    rescue.mkdir()
    monkeypatch.setenv("RCDEPLOY_RESCUE_DIR", str(rescue))
    code, _, err = cli(["bench", world["model"], "--attack", "none", "--no-latency", "--samples", "16",
                        "--json", tiny_disk / "r.json", "--csv", tiny_disk / "runs.csv"], capsys)
    assert_one_error_line(code, err, 2, "No space left on device")
    assert "cannot write --json" in err and "cannot write --csv" in err
    assert snapshot(tiny_disk) == before  # no half row, no half report, no temp file
    saved = sorted(rescue.iterdir())
    assert len(saved) == 2 and all(str(p) in err for p in saved)
    report = json.loads(next(p for p in saved if p.name.endswith("r.json")).read_text())
    assert report["format"] == "rcdeploy-bench" and report["accuracy"]["clean_acc_pct"] is not None
    assert next(p for p in saved if p.name.endswith(".csv")).read_text().count("\n") == 2  # header + row


def test_disk_full_during_training_keeps_the_last_checkpoint(world: dict[str, Path], tiny_disk: Path,
                                                             capsys) -> None:
    run = tiny_disk / "runs" / "done"
    shutil.copytree(world["run"], run, symlinks=True)
    _fill(tiny_disk)
    before = snapshot(tiny_disk)
    code, _, err = cli(["train", "--resume", run, "--epochs", "3"], capsys)
    assert_one_error_line(code, err, 2, "No space left on device")
    after = snapshot(tiny_disk)
    for name in ("last.pt", "best.pt", "metrics.jsonl"):
        assert after[f"runs/done/{name}"] == before[f"runs/done/{name}"], name
    assert not [k for k in after if k.endswith(".tmp")]
    assert load_checkpoint(run / "last.pt")["position"] == [2, 0]


def test_read_only_output_folder_fails_before_the_work(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        ro.chmod(0o555)
    try:
        t0 = time.perf_counter()
        code, _, err = cli(["export", world["run"] / "best.pt", "-o", ro / "m.onnx"], capsys)
        assert_one_error_line(code, err, 2, "cannot write -o")
        code, _, err = cli(["bench", world["model"], "--json", ro / "r.json"], capsys)
        assert_one_error_line(code, err, 2, "cannot write --json")
        assert time.perf_counter() - t0 < 5  # refused before any verification or bench
        assert not any(ro.iterdir())
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(ro)], check=False)
        else:
            ro.chmod(0o755)


def test_stray_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    from rcdeploy.io import atomic_write_text

    dead_old = _write(tmp_path / ".model.onnx.999999999.ab12.tmp", b"half")
    dead_young = _write(tmp_path / ".model.json.999999998.cd34.tmp", b"half")
    live = _write(tmp_path / f".runs.csv.{os.getppid()}.ef56.tmp", b"being written")
    old = time.time() - 3600
    os.utime(dead_old, (old, old))
    os.utime(live, (old, old))
    atomic_write_text(tmp_path / "model.json", "{}\n")
    assert not dead_old.exists()  # its writer is gone: a kill mid-write left it
    assert dead_young.exists() and live.exists()  # maybe another machine's writer; a live writer's
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")) == ["model.json"]
