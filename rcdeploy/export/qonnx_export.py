"""QONNX (for FINN / FPGA flows): Brevitas' exporter, then checked with the `qonnx` package itself.

The check is the one a FINN user's flow starts with: `ModelWrapper` + `cleanup_model`, then
`qonnx.core.onnx_exec.execute_onnx` on a few images, compared with the PyTorch model.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from rcdeploy.errors import UsageError, VerificationError
from rcdeploy.export.verify import compare_logits, torch_logits

# onnxruntime 1.31 reads IR versions up to 13; torch's exporter and qonnx write what onnx offers.
MAX_IR_VERSION = 10


@contextlib.contextmanager
def _ort_readable_single_node_models() -> Iterator[None]:
    """qonnx 1.0 runs each standard node as a one-node model made with onnx's newest IR version (14 with
    onnx 1.23), which onnxruntime 1.31 refuses; cap that IR version while its executor runs."""
    import qonnx.core.onnx_exec as onnx_exec

    original = onnx_exec.qonnx_make_model

    def make_model(graph: onnx.GraphProto, **kwargs: Any) -> onnx.ModelProto:
        model = original(graph, **kwargs)
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        return model

    onnx_exec.qonnx_make_model = make_model
    try:
        yield
    finally:
        onnx_exec.qonnx_make_model = original


def export_qonnx_bytes(model: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
    """QONNX bytes of an eval-mode Brevitas model (batch 1, as Brevitas exports it)."""
    from brevitas.export import export_qonnx

    model = model.eval()
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="rcdeploy-qonnx-") as tmp:
        path = Path(tmp) / "model.qonnx.onnx"
        # TorchScript exporter (dynamo=False): 4x faster here than the dynamo one and what Brevitas' QONNX
        # handlers target; its chatter goes nowhere (the CLI owns the terminal).
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                export_qonnx(model, torch.rand(1, *input_shape, device=device), export_path=str(path), dynamo=False)
            except Exception as e:  # Brevitas/torch raise many types for unsupported layers
                raise UsageError(f"Brevitas cannot export this model to QONNX ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto.SerializeToString()


def check_qonnx(qonnx_bytes: bytes, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Clean up with qonnx and execute with its executor, image by image; compare with PyTorch.

    Raises VerificationError if a top-1 class differs or outputs are not finite.
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    wrapper = cleanup_model(ModelWrapper(onnx.load_from_string(qonnx_bytes)))
    in_name, out_name = wrapper.graph.input[0].name, wrapper.graph.output[0].name
    xs = x.detach().cpu().numpy().astype(np.float32)
    outs = []
    with _ort_readable_single_node_models():
        for i in range(len(xs)):
            outs.append(np.asarray(execute_onnx(wrapper, {in_name: xs[i:i + 1]})[out_name]).reshape(1, -1))
    got = np.concatenate(outs)
    ref = torch_logits(model, x)
    report = compare_logits(ref, got)
    report["executor"] = "qonnx.core.onnx_exec.execute_onnx after qonnx.util.cleanup.cleanup_model"
    if not report["finite"] or report["top1_agreement"] < 1.0:
        raise VerificationError(
            f"the QONNX file, run by qonnx's executor, disagrees with PyTorch on "
            f"{1 - report['top1_agreement']:.0%} of {len(xs)} images (max logit difference "
            f"{report['max_abs_logit_diff']:.4g}); nothing was written")
    return report
