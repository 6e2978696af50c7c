"""Bench section 3: the `Scorer`, what scores images and what the attacks take gradients from.

Images are scored by onnxruntime (or OpenVINO) on this CPU, or by the differentiable twin when it
emulates another --isa; white-box attacks step on the twin's straight-through gradients or on its
smooth surrogate's, Square queries whatever scores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnx

from rcdeploy import validate as V
from rcdeploy.deploy.bench_inputs import BenchImages, BenchSettings
from rcdeploy.errors import UsageError

EVAL_BATCH = 256  # images per onnxruntime call when scoring
TINY_PIXELS = 32 * 32  # C*H*W at or below this: torch and the scoring session use 1 thread by default
_STOCHASTIC_OPS = {"RandomNormalLike", "RandomUniformLike", "RandomNormal", "RandomUniform", "Multinomial"}


def _is_stochastic(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in _STOCHASTIC_OPS for n in proto.graph.node)


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


class Scorer:
    """What scores images: onnxruntime (or OpenVINO) on this CPU, or the twin emulating --isa; and the
    twin the white-box attacks take their gradients from (None when it cannot be built)."""

    def __init__(self, s: BenchSettings, session: Any, twin: Any, twin_error: UsageError | None,
                 twin_build_s: float, draws: int, work_threads: int | None) -> None:
        self.s, self.session, self.twin, self.twin_error = s, session, twin, twin_error
        self.twin_build_s, self.draws, self.work_threads = twin_build_s, draws, work_threads
        self.stochastic = _is_stochastic(s.proto)
        self.classes = 0  # logits per image, set when the clean images are scored
        self.clean_preds = np.empty((0, 0), dtype=np.int64)  # [draws, N] top-1 on clean images
        self.attack_list: list[Any] = []  # the attacks run, set by evaluate
        self._surrogate: Any = None  # the smooth surrogate, built when an `@smooth` attack first needs it

    @classmethod
    def open(cls, s: BenchSettings, images: BenchImages) -> Scorer:
        from rcdeploy.runtime.session import open_runtime_session

        stochastic = _is_stochastic(s.proto)
        draws = s.eot if stochastic else 1
        if s.eot > 1 and not stochastic:
            s.notes.append(f"--eot {s.eot} ignored: the graph has no random ops, one draw is exact")
        if stochastic and s.eot == 1:  # RobustBench's rule for randomized defenses: expectation over draws
            s.notes.append("the graph draws noise and --eot is 1: attacks step on one draw's gradient and every "
                           "accuracy is one draw; pass --eot N (e.g. 20) for EOT figures")
        if stochastic and s.runtime != "onnxruntime" and not s.emulated:
            s.notes.append(f"the graph draws noise and {s.runtime} takes no seed: its figures vary from run to run "
                           "(and with --nproc), and cached chunks keep the draws they were scored with")
        pixels = int(np.prod(images.x.shape[1:]))
        if s.threads is not None:
            work_threads = s.threads
        elif pixels <= TINY_PIXELS:
            work_threads = 1
        else:  # ranks share the cores
            work_threads = max(1, (os.cpu_count() or 1) // s.world.size) if s.world.distributed else None
        # Scoring uses every core whatever the target (mobile's one thread is a latency setting only).
        session = open_runtime_session(s.path, runtime=s.runtime, target=s.profile.name,
                                       threads=work_threads or os.cpu_count() or 1)
        twin, twin_error, build_s = _build_twin(s)
        return cls(s, session, twin, twin_error, build_s, draws, work_threads)

    def reseed(self, seed: int) -> None:
        """Before a chunk: a stochastic graph's onnxruntime noise restarts from `seed` (a new session takes
        onnxruntime's global seed), so the chunk's draws do not depend on the chunks scored before it."""
        if not (self.stochastic and self.s.runtime == "onnxruntime" and not self.s.emulated):
            return
        import onnxruntime as ort

        from rcdeploy.runtime.session import open_runtime_session

        ort.set_seed(seed)
        self.session = open_runtime_session(self.s.path, runtime=self.s.runtime, target=self.s.profile.name,
                                            threads=self.work_threads or os.cpu_count() or 1)

    def preds(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """Top-1 predictions [draws, N]: onnxruntime on this CPU, or the twin emulating --isa."""
        import torch

        if not self.s.emulated:
            return _ort_preds(self.session, x, self.draws)
        with _torch_threads(self.work_threads), torch.no_grad():
            preds = [_twin_preds(self.twin, torch.from_numpy(x)) for _ in range(self.draws)]
        return np.stack(preds), int(self.twin(torch.from_numpy(x[:1])).shape[1])

    def runtime_preds(self, x: np.ndarray, scored: np.ndarray) -> np.ndarray:
        """The runtime's own predictions (one draw): `scored` unless the twin scored in its place."""
        return _ort_preds(self.session, x, self.draws)[0] if self.s.emulated else scored[0]

    def black_box(self, x: Any) -> Any:
        """The black-box model Square queries: what scores the images (onnxruntime, or the emulation)."""
        import torch

        if self.s.emulated:
            with torch.no_grad():
                return self.twin(x.detach())
        from rcdeploy.runtime.session import run_logits

        return torch.from_numpy(run_logits(self.session, x.detach().cpu().numpy(), batch_size=EVAL_BATCH))

    def gradient_model(self, atk: Any) -> Any:
        """The model an attack is handed: the runtime's outputs (black box), the straight-through twin,
        or the smooth surrogate of the same graph (`@smooth`)."""
        if atk.black_box:
            return self.black_box
        if atk.gradients != "smooth":
            return self.twin
        if self._surrogate is None:
            from rcdeploy.deploy.twin import build_twin

            self._surrogate = build_twin(self.s.proto, ste=True, noise=True, smooth=True)
        return self._surrogate

    def twin_agreement(self, x: Any, runtime_preds: np.ndarray) -> np.ndarray:
        return _twin_preds(self.twin, x) == runtime_preds


def _build_twin(s: BenchSettings) -> tuple[Any, UsageError | None, float]:
    try:
        from rcdeploy.deploy.twin import build_twin

        t = time.perf_counter()
        twin = build_twin(s.proto, ste=True, noise=True, isa=s.isa)
        build_s = time.perf_counter() - t
    except UsageError as e:
        twin, twin_error, build_s = None, e, 0.0
    else:
        twin_error = None
    if s.emulated and twin is None:
        raise UsageError(f"{s.path}: --isa {s.isa} differs from this CPU ({s.cpu.isa}) and needs the differentiable "
                         f"twin to emulate it, which cannot be built ({twin_error})")
    return twin, twin_error, build_s
