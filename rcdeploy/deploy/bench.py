"""`rcdeploy bench`: latency, size, clean and robust accuracy of the ONNX file that ships.

Reads nothing but the ONNX file and, when present, its sidecar (`model.json` next to
`model.onnx`), so it benches any ONNX image classifier with one float [N, C, H, W] input in
[0, 1] (normalization inside the graph), given `dataset`.

Robust accuracy is measured on the deployed artifact (DESIGN.md): white-box attacks take their
gradients from the differentiable twin (`rcdeploy.deploy.twin`), rebuilt from the graph itself
with straight-through rounding; every adversarial image is then scored by onnxruntime on the
real file, and the twin's top-1 agreement with onnxruntime is reported on clean and adversarial
images. Square runs against onnxruntime directly, with no gradients, as the check against
gradient masking. Per sample, the worst case over clean and every attack run is kept
(AutoAttack's robust accuracy).

Stochastic graphs (RandomNormalLike / RandomUniformLike): attacks average `eot` gradient (or
logit) draws, and every accuracy is the mean over `eot` onnxruntime evaluations.

The report is one JSON-able dict: keys carry their unit (`_ms`, `_s`, `_bytes`, `_pct`,
`_per_s`), and `settings` holds everything the figures depend on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from rcdeploy import validate as V
from rcdeploy.errors import UsageError

__all__ = [
    "ATTACK_BATCH",
    "DEFAULT_SAMPLES",
    "REPORT_FORMAT",
    "bench_model",
    "gradient_masking_flags",
    "parse_batch_sizes",
    "read_sidecar",
]

REPORT_FORMAT = "rcdeploy-bench"
REPORT_VERSION = 1
DEFAULT_SAMPLES = 1000  # test images used when --samples is not given (all of them if fewer)
SUBSET_SEED = 0  # fixed, never --seed: the same images are scored in every run, for every model
ATTACK_BATCH = 256  # images per attack call (twin autograd memory stays small at CIFAR size)
EVAL_BATCH = 256  # images per onnxruntime call when scoring
TINY_PIXELS = 32 * 32  # C*H*W at or below this: torch and the scoring session use 1 thread by default
EPS_SLACK = 1e-6  # float32 rounding allowed when checking that images stay in the eps ball
MIN_AGREEMENT_PCT = 99.0  # twin vs onnxruntime top-1 below this: white-box figures are suspect
MAX_LATENCY_BATCH = 4096  # images per timed batch: more measures memory bandwidth, and can exhaust it
MAX_SEED = 2**32 - 1
_STOCHASTIC_OPS = {"RandomNormalLike", "RandomUniformLike", "RandomNormal", "RandomUniform", "Multinomial"}


# ----------------------------------------------------------------------------------------- inputs


def _card_schema() -> V.Check:
    """The sidecar fields bench reads, with their types: a card that names a dataset must get them right."""
    fraction = V.one_of(V.number(0, 1, lo_open=True), V.text(max_len=64), expected="a number or a fraction like 8/255")
    return V.mapping({
        "dataset": V.mapping({"name": V.text(max_len=4096),
                              "shape": V.optional(V.list_of(V.integer(1, 65_536), min_len=3, max_len=3))},
                             required=("name",)),
        "input": V.optional(V.mapping({"range": V.optional(V.list_of(V.number(), min_len=2, max_len=2))})),
        "training": V.optional(V.mapping({"eps": V.optional(fraction),
                                          "config": V.optional(V.mapping({"data_dir": V.optional(V.text())}))})),
        "eps": V.optional(fraction),
        "model": V.optional(V.mapping({"name": V.optional(V.text())})),
    }, required=("dataset",))


def read_sidecar(model_path: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """The sidecar next to `model_path` (model.json for model.onnx) and a note when it was set aside.

    A missing sidecar is normal (foreign models); one that is not JSON, or names no dataset, is
    set aside with a note rather than failing, since `--dataset` can stand in for it. One that names
    a dataset is a model card, and its fields must have the right types (a UsageError names the field).
    """
    p = Path(model_path).with_suffix(".json")
    if not p.is_file():
        return None, None
    try:
        card = json.loads(V.read_text_file(p, "sidecar"))
    except (RecursionError, json.JSONDecodeError) as e:
        return None, f"sidecar {p} ignored: not readable JSON ({V.clip(str(e)) or type(e).__name__})"
    if not isinstance(card, dict) or not isinstance(card.get("dataset"), dict) or "name" not in card["dataset"]:
        return None, f"sidecar {p} ignored: it names no dataset (not an rcdeploy model card)"
    card = V.validate(card, _card_schema(), f"sidecar {p}")
    card["_path"] = str(p)
    return card, None


def parse_batch_sizes(spec: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """'1,64' -> [1, 64]; every size an integer >= 1, duplicates dropped, order kept."""
    items = [spec] if isinstance(spec, int) else (spec.split(",") if isinstance(spec, str) else list(spec))
    out: list[int] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            b = int(text)
        except ValueError:
            raise UsageError(f"--batch-sizes {spec!r}: {text!r} is not an integer; write e.g. 1,64") from None
        if not 1 <= b <= MAX_LATENCY_BATCH:
            raise UsageError(f"--batch-sizes {V.shown(spec)}: batch sizes must be >= 1 and <= {MAX_LATENCY_BATCH}")
        if b not in out:
            out.append(b)
    if not out:
        raise UsageError(f"--batch-sizes {spec!r} names no batch size; write e.g. 1,64")
    return out


def _fraction(value: float | str | None, what: str) -> float | None:
    if value is None:
        return None
    from rcdeploy.config import parse_fraction

    return parse_fraction(value, what)


def _image_input(proto: onnx.ModelProto, path: str) -> tuple[str, list[int | str | None]]:
    """The graph's one float [N, C, H, W] input; anything else is a UsageError."""
    inits = {t.name for t in proto.graph.initializer}
    inputs = [vi for vi in proto.graph.input if vi.name not in inits]
    if len(inputs) != 1:
        raise UsageError(f"{path}: bench needs a model with one image input, this one has {len(inputs)} "
                         f"({', '.join(v.name for v in inputs) or 'none'})")
    vi = inputs[0]
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or tt.elem_type != TensorProto.FLOAT:
        kind = TensorProto.DataType.Name(tt.elem_type).lower() if vi.type.HasField("tensor_type") else "non-tensor"
        raise UsageError(f"{path}: input {vi.name!r} is {kind}; bench needs float32 images [N, C, H, W] in [0, 1]")
    dims: list[int | str | None] = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
    ]
    if not tt.HasField("shape") or len(dims) != 4:
        raise UsageError(f"{path}: input {vi.name!r} has shape {dims if tt.HasField('shape') else 'unknown'}, "
                         "not an image batch [N, C, H, W]")
    return vi.name, dims


def _is_stochastic(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in _STOCHASTIC_OPS for n in proto.graph.node)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _subset(n: int, samples: int) -> np.ndarray:
    """Indices of `samples` test images: all of them, or a fixed random subset (classes mixed)."""
    if samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(SUBSET_SEED).permutation(n)[:samples])


# ------------------------------------------------------------------------------------------ scoring


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(previous)


def _ort_preds(session: Any, x: np.ndarray, draws: int) -> tuple[np.ndarray, int]:
    """Top-1 predictions [draws, N] of onnxruntime, and the number of logits per image."""
    from rcdeploy.runtime.session import run_logits

    preds, classes = [], 0
    for _ in range(draws):
        try:
            logits = run_logits(session, x, batch_size=EVAL_BATCH)
        except _runtime_errors() as e:  # the graph rejects these images (shapes it cannot take)
            raise UsageError(f"the runtime cannot run the model on images {list(x.shape[1:])} "
                             f"({V.clip(str(e), 120)}); pass the --dataset the model was trained on") from None
        if logits.ndim != 2:
            raise UsageError(f"the model's first output has shape {list(logits.shape)}; bench needs logits [N, classes]")
        if not np.isfinite(logits).all():
            raise UsageError("onnxruntime returned non-finite logits for test images; the model is broken")
        classes = logits.shape[1]
        preds.append(logits.argmax(1))
    return np.stack(preds), classes


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """What a runtime raises when a graph cannot run on given inputs (onnxruntime's are not RuntimeErrors)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (RuntimeError, ValueError, state.Fail, state.InvalidArgument, state.RuntimeException)


def _twin_preds(twin: Any, x: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.cat([twin(x[i : i + EVAL_BATCH]).argmax(1) for i in range(0, len(x), EVAL_BATCH)]).numpy()


def _pct(v: float) -> float:
    return 100.0 * float(v)


def _noise_pct(acc_pct: float, n: int) -> float:
    """Two binomial standard errors of an accuracy over n images, at least one image (in %)."""
    p = min(max(acc_pct / 100.0, 0.0), 1.0)
    return max(100.0 / n, 200.0 * math.sqrt(p * (1 - p) / n))


def gradient_masking_flags(robust: list[dict[str, Any]], samples: int) -> list[str]:
    """Warnings of likely gradient masking from per-attack results (`family`, `name`, `robust_acc_pct`).

    - a black-box attack (square) beats every white-box one by more than noise;
    - a one-step attack (fgsm) beats an iterative one (ifgsm, pgd) by more than noise.
    Noise is two binomial standard errors (at least one image) of the better white-box figure.
    """
    flags: list[str] = []
    white = [r for r in robust if r["family"] in ("fgsm", "ifgsm", "pgd", "cw")]
    black = [r for r in robust if r["family"] == "square"]
    if white and black:
        best_white = min(white, key=lambda r: r["robust_acc_pct"])
        tol = _noise_pct(best_white["robust_acc_pct"], samples)
        for r in black:
            gap = best_white["robust_acc_pct"] - r["robust_acc_pct"]
            if gap > tol:
                flags.append(f"likely gradient masking: black-box {r['name']} ({r['robust_acc_pct']:.1f}%) beats the "
                             f"best white-box attack {best_white['name']} ({best_white['robust_acc_pct']:.1f}%) by "
                             f"{gap:.1f} points (noise {tol:.1f})")
    for one in (r for r in robust if r["family"] == "fgsm"):
        for it in (r for r in robust if r["family"] in ("ifgsm", "pgd")):
            gap = it["robust_acc_pct"] - one["robust_acc_pct"]
            tol = _noise_pct(it["robust_acc_pct"], samples)
            if gap > tol:
                flags.append(f"likely gradient masking: one-step {one['name']} ({one['robust_acc_pct']:.1f}%) beats "
                             f"iterative {it['name']} ({it['robust_acc_pct']:.1f}%) by {gap:.1f} points "
                             f"(noise {tol:.1f})")
    return flags


class _ProgressSink:
    """A rich progress bar on stderr (or nothing): one task per attack (in images) and one for latency."""

    def __init__(self, enabled: bool | Any) -> None:
        self._progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = enabled if not isinstance(enabled, bool) else Console(stderr=True)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                      console=console, transient=False)

    def __enter__(self) -> _ProgressSink:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def task(self, description: str, total: int, unit: str = "img") -> Callable[..., None]:
        """A callback `update(advance=0, description=None)` for one task."""
        if self._progress is None:
            return lambda advance=0, description=None: None
        tid = self._progress.add_task(description, total=total, unit=unit)

        def update(advance: int = 0, description: str | None = None) -> None:
            self._progress.update(tid, advance=advance, **({"description": description} if description else {}))

        return update


# ------------------------------------------------------------------------------------------- bench


def bench_model(
    model: str | Path,
    *,
    attacks: str = "ifgsm20",
    dataset: str | None = None,
    data_dir: str | Path | None = None,
    samples: int | None = None,
    eps: float | str | None = None,
    step: float | str | None = None,
    restarts: int = 1,
    eot: int = 1,
    target: str = "cpu",
    batch_sizes: str | list[int] | None = None,
    seed: int = 0,
    threads: int | None = None,
    latency: bool = True,
    latency_seconds: float = 1.0,
    progress: bool | Any = True,
    isa: str | None = None,
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Bench the ONNX file `model`; returns the report (JSON-able, units in the key names).

    attacks: comma list (`fgsm`, `ifgsmN`, `pgdN`, `cwN`, `squareN`) or 'none'.
    dataset / data_dir / eps: default to the sidecar's (eps: its training eps, else the
    dataset's default_eps); step defaults to the attacks' own (eps / 4).
    samples: test images scored (default min(DEFAULT_SAMPLES, test split)).
    eot: gradient and evaluation draws for stochastic graphs (ignored for deterministic ones).
    target: 'cpu' or 'mobile' latency profile; batch_sizes default to 1,64 on cpu and 1 on
        mobile, which measures batch 1 only.
    threads: torch threads for the twin and onnxruntime threads for scoring (default 1 for
        inputs of at most TINY_PIXELS values, else the libraries' defaults); latency always
        uses the target profile's threads.
    latency: measure latency (in a child process, `latency_seconds` per batch size at least).
    progress: True for a rich progress bar on stderr, a rich Console to draw it on, or False.
    isa: what the integer kernels compute: 'exact' or 'avx2' (x86 without VNNI: u8 x s8 pair sums
        saturate at int16); default what this CPU does. When it is not what this CPU does, the twin
        emulates it and scores every image in place of onnxruntime (the report says so).
    runtime: 'onnxruntime' or 'openvino' (optional extra): the runtime that scores the images and is
        timed; the twin, the attacks' gradients and the static checks stay onnxruntime's graph semantics.
    """
    t_start = time.perf_counter()
    from rcdeploy.attacks import DEFAULT_STEP_FRACTION, parse_attacks
    from rcdeploy.runtime.cpu import cpu_kind, resolve_isa
    from rcdeploy.runtime.session import check_runtime, get_target, load_model_proto, open_runtime_session

    path = Path(model)
    profile = get_target(target)
    isa_v, here = resolve_isa(isa), cpu_kind()
    emulated = isa_v != here.isa
    runtime = check_runtime(runtime)
    if emulated and runtime != "onnxruntime":
        raise UsageError(f"--isa {isa_v} emulates onnxruntime's integer kernels; with --runtime {runtime} bench scores "
                         f"on this CPU only (here {here.isa}): drop --isa or use --runtime onnxruntime")
    proto = load_model_proto(path)  # not a file / not ONNX: UsageError
    input_name, dims = _image_input(proto, str(path))
    card, sidecar_note = read_sidecar(path)
    notes: list[str] = [sidecar_note] if sidecar_note else []
    sizes = parse_batch_sizes(batch_sizes if batch_sizes is not None else ("1" if target == "mobile" else "1,64"))
    if samples is not None and int(samples) < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if restarts < 1 or eot < 1:
        raise UsageError(f"--restarts and --eot must be >= 1, got {restarts} and {eot}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise UsageError(f"--seed must be >= 0 and <= {MAX_SEED}, got {seed}")
    if not (math.isfinite(latency_seconds) and 0 < latency_seconds <= 3600):
        raise UsageError(f"--latency-seconds must be a finite number in (0, 3600], got {latency_seconds}")
    spec = str(attacks or "none").strip()
    no_attacks = spec.lower() in ("", "none")
    if not no_attacks:  # unknown names fail before any data is loaded
        parse_attacks(spec, eps=0.5)
    eps_flag, step_v = _fraction(eps, "eps"), _fraction(step, "step")
    if eps_flag is not None and not 0 < eps_flag <= 1:
        raise UsageError(f"--eps {eps_flag:g} is outside (0, 1]: eps is in [0, 1] image units, e.g. 8/255")
    if step_v is not None and not 0 < step_v <= 1:
        raise UsageError(f"--step {step_v:g} is outside (0, 1]: step is in [0, 1] image units, e.g. 2/255")
    if card is not None:
        rng = (card.get("input") or {}).get("range")
        if rng is not None and rng != [0, 1] and rng != [0.0, 1.0]:
            raise UsageError(f"{card['_path']}: input range {rng} is not [0, 1]; bench attacks images in [0, 1]")

    # --- dataset ---------------------------------------------------------------------------------
    from rcdeploy.data import DatasetMeta, load_dataset

    card_meta = (card or {}).get("dataset") or {}
    name = dataset or card_meta.get("name")
    if not name:
        raise UsageError(f"{path}: no sidecar {path.with_suffix('.json').name} names the dataset; pass --dataset NAME")
    overridden = bool(dataset and card_meta.get("name") and dataset != card_meta["name"])
    if overridden:
        notes.append(f"--dataset {dataset} overrides the sidecar's {card_meta['name']}")
    from_card = card is not None and not overridden  # the sidecar's eps and data_dir belong to its dataset
    train_cfg = ((card or {}).get("training") or {}).get("config") or {}
    if data_dir is None and from_card and train_cfg.get("data_dir"):
        data_dir = train_cfg["data_dir"]
    data = load_dataset(name, data_dir)  # unknown dataset / missing files: UsageError
    meta: DatasetMeta = data.meta
    spatial = dims[1:]
    if any(isinstance(d, int) and d > 0 and d != m for d, m in zip(spatial, meta.shape)):
        raise UsageError(f"{path}: input {input_name!r} takes images {spatial}, dataset {meta.name!r} has {list(meta.shape)}; "
                         "pass the --dataset the model was trained on")
    test = data.test
    n_total = len(test)
    if n_total == 0:
        raise UsageError(f"dataset {meta.name!r} has no test images")
    n = min(int(samples) if samples is not None else DEFAULT_SAMPLES, n_total)
    if samples is not None and int(samples) > n_total:
        notes.append(f"--samples {samples}: the {meta.name} test split has {n_total} images, all used")
    idx = _subset(n_total, n)
    x_all = test.x[idx].cpu().float().contiguous()
    y_all = test.y[idx].cpu().long()
    x_np, y_np = x_all.numpy(), y_all.numpy()

    # --- eps, step, attacks ----------------------------------------------------------------------
    training = (card or {}).get("training") or {}
    card_eps = training.get("eps", (card or {}).get("eps"))
    if eps_flag is not None:
        eps_v, eps_source = eps_flag, "--eps"
    elif card_eps is not None and from_card:
        try:
            eps_v, eps_source = _fraction(card_eps, "eps"), "sidecar training eps"
        except UsageError:
            raise UsageError(f"sidecar {card['_path']}: training.eps: {V.shown(card_eps)} is not a number or "
                             "fraction like 8/255; fix it, or pass --eps") from None
    else:
        eps_v, eps_source = float(meta.default_eps), f"dataset {meta.name} default"
    if not 0 < eps_v <= 1:
        raise UsageError(f"eps {eps_v:g} ({eps_source}) is outside (0, 1]; pass --eps in [0, 1] image units, e.g. 8/255")
    stochastic = _is_stochastic(proto)
    draws = eot if stochastic else 1
    if eot > 1 and not stochastic:
        notes.append(f"--eot {eot} ignored: the graph has no random ops, one draw is exact")
    attack_list = [] if no_attacks else parse_attacks(spec, eps=eps_v, step=step_v, restarts=restarts,
                                                     eot=draws, seed=seed)
    white = [a for a in attack_list if a.family != "square"]
    pixels = int(np.prod(x_all.shape[1:]))
    work_threads = threads if threads is not None else (1 if pixels <= TINY_PIXELS else None)

    # --- clean accuracy on onnxruntime -----------------------------------------------------------
    # Scoring uses every core whatever the target (mobile's one thread is a latency setting only).
    session = open_runtime_session(path, runtime=runtime, target=target, threads=work_threads or os.cpu_count() or 1)
    twin_error = None
    try:
        from rcdeploy.deploy.twin import build_twin

        t_twin = time.perf_counter()
        twin = build_twin(proto, ste=True, noise=True, isa=isa_v)
        twin_build_s = time.perf_counter() - t_twin
    except UsageError as e:
        twin, twin_error = None, e
    if emulated and twin is None:
        raise UsageError(f"{path}: --isa {isa_v} differs from this CPU ({here.isa}) and needs the differentiable twin "
                         f"to emulate it, which cannot be built ({twin_error})")
    import torch

    def score_preds(x: np.ndarray) -> tuple[np.ndarray, int]:
        """Top-1 predictions [draws, N]: onnxruntime on this CPU, or the twin emulating --isa."""
        if not emulated:
            return _ort_preds(session, x, draws)
        with _torch_threads(work_threads), torch.no_grad():
            preds = [_twin_preds(twin, torch.from_numpy(x)) for _ in range(draws)]
        return np.stack(preds), int(twin(torch.from_numpy(x[:1])).shape[1])

    clean_preds, classes = score_preds(x_np)
    if classes < meta.num_classes:
        raise UsageError(f"{path}: the model outputs {classes} logits, dataset {meta.name!r} has "
                         f"{meta.num_classes} classes; pass the --dataset the model was trained on")
    clean_score = (clean_preds == y_np[None]).mean(0)  # per sample, mean over draws

    accuracy: dict[str, Any] = {
        "samples": n,
        "test_split_images": n_total,
        "subset": "all test images" if n == n_total else f"fixed random subset (seed {SUBSET_SEED}) of the test split",
        "evaluation_draws": draws,
        "clean_acc_pct": _pct(clean_score.mean()),
        "clean_acc_draws_pct": [_pct((p == y_np).mean()) for p in clean_preds],
    }

    robust: list[dict[str, Any]] = []
    flags: list[str] = []
    twin_info: dict[str, Any] = {"available": False}
    with _torch_threads(work_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if twin is not None:
            twin_info = {"available": True, "build_s": twin_build_s, "straight_through": True, "noise": stochastic,
                         "isa": isa_v}
        else:
            if white:
                raise UsageError(f"{path}: white-box attacks need the differentiable twin, which cannot be built "
                                 f"({twin_error}); run squareN only") from None
            twin_info = {"available": False, "reason": str(twin_error)}
            notes.append(f"twin unavailable ({twin_error}); no twin agreement reported")
        ort_clean = _ort_preds(session, x_np, draws)[0] if emulated else clean_preds
        if twin is not None:
            agree = _twin_preds(twin, x_all) == ort_clean[0]
            twin_info["clean_agreement_pct"] = _pct(agree.mean())
            if stochastic:
                notes.append("the graph draws noise: twin agreement compares one draw of each, so it is below "
                             "what a deterministic graph would give")

        def ort_model(x: torch.Tensor) -> torch.Tensor:
            """The black-box model Square queries: what scores the images (onnxruntime, or the emulation)."""
            if emulated:
                with torch.no_grad():
                    return twin(x.detach())
            from rcdeploy.runtime.session import run_logits

            return torch.from_numpy(run_logits(session, x.detach().cpu().numpy(), batch_size=EVAL_BATCH))

        scores = [clean_score]
        adv_agree_all: list[np.ndarray] = []
        with _ProgressSink(progress) as sink:
            for atk in attack_list:
                box = atk.family == "square"
                update = sink.task(f"{atk.name} ({runtime if box else 'twin gradients'})", n)
                t = time.perf_counter()
                advs = []
                queries = []
                for i in range(0, n, ATTACK_BATCH):
                    xb, yb = x_all[i : i + ATTACK_BATCH], y_all[i : i + ATTACK_BATCH]
                    advs.append(atk.attack(ort_model if box else twin, xb, yb))
                    if box and getattr(atk, "queries_used", None) is not None:
                        queries.append(atk.queries_used.float())
                    update(advance=len(xb))
                x_adv = torch.cat(advs)
                elapsed = time.perf_counter() - t
                delta = (x_adv - x_all).abs().amax().item()
                within = delta <= atk.eps + EPS_SLACK
                in_range = bool(x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0)
                preds, _ = score_preds(x_adv.numpy())
                score = (preds == y_np[None]).mean(0)
                scores.append(score)
                row = {"name": atk.name, "family": atk.family, "settings": atk.to_dict(), "gradients":
                       f"none ({runtime} queries)" if box else "differentiable twin, straight-through rounding",
                       "robust_acc_pct": _pct(score.mean()),
                       "robust_acc_draws_pct": [_pct((p == y_np).mean()) for p in preds],
                       "max_perturbation": delta, "eps": atk.eps, "within_eps": bool(within),
                       "in_unit_range": in_range, "time_s": elapsed, "img_per_s": n / elapsed if elapsed else None}
                if queries:
                    q = torch.cat(queries)
                    row["queries_mean"] = float(q.mean())
                    row["queries_max"] = int(q.max())
                if twin is not None:
                    ort_adv = _ort_preds(session, x_adv.numpy(), draws)[0] if emulated else preds
                    agree = _twin_preds(twin, x_adv) == ort_adv[0]
                    adv_agree_all.append(agree)
                    row["twin_agreement_pct"] = _pct(agree.mean())
                if not within or not in_range:
                    flags.append(f"{atk.name} produced images outside the eps ball or [0, 1] "
                                 f"(max |x_adv - x| = {delta:.6g}, eps {atk.eps:g}): its figure is invalid")
                robust.append(row)
    if twin is not None and adv_agree_all:
        twin_info["adversarial_agreement_pct"] = _pct(np.concatenate(adv_agree_all).mean())
    for what in ("clean_agreement_pct", "adversarial_agreement_pct"):
        v = twin_info.get(what)
        if v is not None and v < MIN_AGREEMENT_PCT and not stochastic and not emulated:
            flags.append(f"the twin agrees with onnxruntime on only {v:.1f}% of {what.split('_')[0]} images: "
                         "white-box gradients may not reflect the deployed model")
    flags += gradient_masking_flags(robust, n)
    accuracy["robust"] = robust
    if robust:
        worst = np.min(np.stack(scores), axis=0)
        accuracy["worst_case_acc_pct"] = _pct(worst.mean())
        accuracy["worst_case_over"] = ["clean", *(r["name"] for r in robust)]
    accuracy["twin"] = twin_info
    accuracy["flags"] = flags

    # --- size and what onnxruntime runs ----------------------------------------------------------
    from rcdeploy.deploy.inspect import inspect_model

    graph = inspect_model(path, target=target)
    pairs = graph.int16_pairs
    if pairs and not pairs.get("saturation_free"):
        flags.append(f"{len(pairs['can_saturate'])} integer kernel(s) can saturate int16 pair sums on x86 CPUs without "
                     f"VNNI (worst pair {pairs.get('worst_pair')} > {pairs.get('limit')}): the figures hold for --isa "
                     f"{isa_v} only; bench with --isa {'exact' if isa_v == 'avx2' else 'avx2'} for the other kind")
    size = {
        "file_bytes": graph.file_bytes,
        "params": graph.params,
        "macs": graph.macs_total,
        "macs_integer": graph.macs_integer,
        "integer_mac_share_pct": _pct(graph.integer_mac_share),
        "bytes_by_dtype": graph.bytes_by_dtype,
        "op_histogram": graph.op_histogram,
        "optimized_op_histogram": graph.optimized_op_histogram,
        "macs_counted_on": "onnxruntime's optimized graph at batch 1",
        "int16_pairs": {k: v for k, v in pairs.items() if k != "per_kernel"},
    }

    # --- latency -----------------------------------------------------------------------------------
    lat: dict[str, Any] | None = None
    errors: list[str] = []  # steps that failed after others finished: the report keeps what was measured
    if latency:
        from rcdeploy.deploy.latency import measure_in_subprocess

        lat_sizes = sizes
        if profile.name == "mobile" and sizes != [1]:
            notes.append(f"target mobile measures batch 1 only (asked for {sizes})")
            lat_sizes = [1]
        if isinstance(dims[0], int) and dims[0] > 0 and lat_sizes != [dims[0]]:
            notes.append(f"the model takes a fixed batch of {dims[0]}; latency measured at that batch only")
            lat_sizes = [dims[0]]
        with _ProgressSink(progress) as sink:
            update = sink.task(f"latency, target {profile.name}, {runtime}, batch {','.join(map(str, lat_sizes))}", 1,
                               unit="run")
            try:
                lat = measure_in_subprocess(path, target=target, batch_sizes=lat_sizes, min_seconds=latency_seconds,
                                            seed=seed, runtime=runtime)
            except (UsageError, RuntimeError, OSError, MemoryError) as e:
                # The accuracy results are done: keep them, and report the failure beside them.
                errors.append(f"latency measurement failed ({V.clip(str(e), 200) or type(e).__name__})")
                lat = None
            update(advance=1)
        if lat is not None:
            lat["integer_mac_share_pct"] = size["integer_mac_share_pct"]
            lat["optimized_op_histogram"] = graph.optimized_op_histogram

    import onnxruntime as ort

    import rcdeploy
    from rcdeploy.runtime.ov_session import openvino_version

    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "path": str(path),
            "name": path.stem if path.stem != "model" else f"{path.parent.name}/{path.name}",
            "file_sha256": _sha256(path),
            "sidecar": (card or {}).get("_path"),
            "architecture": ((card or {}).get("model") or {}).get("name"),
            "bits": (card or {}).get("bits"),
            "input_name": input_name,
            "input_shape": dims,
            "output_classes": classes,
            "stochastic": stochastic,
        },
        "settings": {
            "dataset": meta.name,
            "data_dir": str(data_dir) if data_dir is not None else None,
            "samples": n,
            "eps": eps_v,
            "eps_source": eps_source,
            # iterative attacks' step (fgsm steps by eps, square by its vertex value: see each attack's settings)
            "step": step_v if step_v is not None else eps_v * DEFAULT_STEP_FRACTION,
            "attacks": [a.to_dict() for a in attack_list],
            "restarts": restarts,
            "eot": eot,
            "evaluation_draws": draws,
            "target": profile.name,
            "batch_sizes": sizes,
            "seed": seed,
            "torch_threads": work_threads if work_threads is not None else torch.get_num_threads(),
            "scoring_ort_threads": work_threads or os.cpu_count() or 1,
            "latency_min_seconds": latency_seconds if latency else None,
            "norm": "Linf",
            "isa": isa_v,
            "runtime": runtime,
            "scored_by": (f"differentiable twin emulating {isa_v} (this CPU: {here.isa})" if emulated
                          else f"{runtime} on this CPU ({here.isa})"),
            "cpu": here.to_dict(),
        },
        "size": size,
        "latency": lat,
        "accuracy": accuracy,
        "notes": notes,
        "errors": errors,
        "units": {"_pct": "percent of scored test images", "_ms": "milliseconds", "_s": "seconds",
                  "_bytes": "bytes", "img_per_s": "images per second at the median latency",
                  "eps/step/max_perturbation": "L-inf, [0, 1] image units", "macs": "multiply-accumulates per image"},
        "versions": {"rcdeploy": rcdeploy.__version__, "onnxruntime": ort.__version__, "torch": torch.__version__,
                     "onnx": onnx.__version__, **({"openvino": openvino_version()} if runtime == "openvino" else {})},
        "time_s": time.perf_counter() - t_start,
    }
