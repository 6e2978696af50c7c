"""The differentiable twin computes what onnxruntime computes, and its gradients are usable.

Real models only: a small residual CNN trained on digits, exported by torch.onnx.export and
quantized by onnxruntime's own quantizer (QDQ U8S8 / S8S8, QOperator) or rewritten to packed
INT4 weights; every comparison runs a real onnxruntime session.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from _deploy_models import build_all, digits, export_fp32, quantize
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from rcdeploy.deploy.twin import OnnxTwin, build_twin, supported_ops
from rcdeploy.errors import UsageError
from rcdeploy.runtime.session import open_session, run_logits

VARIANTS = ["fp32", "qdq_u8s8", "qdq_s8s8", "qop_u8s8", "qdq_int4"]
QUANTIZED = VARIANTS[1:]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors: a second intra-op thread only contends on the shared CI cores (seen 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_all(tmp_path_factory.mktemp("twin_models"))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x, y = digits()
    return x[:300], y[:300]


def output_scale(path) -> float | None:
    """Scale of the DequantizeLinear that produces the graph output (None for a float output)."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.output[0] == m.graph.output[0].name:
            return float(numpy_helper.to_array(inits[n.input[1]]))
    return None


def tolerance(path) -> float:
    """Float graphs: 1e-4. Quantized: 3 steps of the output scale (requantization may round
    differently by one step at exact float ties, and a step early on moves the logits by a step)."""
    s = output_scale(path)
    return 1e-4 if s is None else 3 * s


def sign_gradient_attack(
    twin: nn.Module, x: np.ndarray, y: np.ndarray, eps: float = 0.1, step: float = 0.03, steps: int = 5
) -> np.ndarray:
    """A few steps of L-inf sign-gradient ascent on the twin's cross-entropy, kept in [0, 1]."""
    x0 = torch.from_numpy(x)
    target = torch.from_numpy(y)
    xa = x0.clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = F.cross_entropy(twin(xa), target)
        (grad,) = torch.autograd.grad(loss, xa)
        xa = (x0 + (xa.detach() + step * grad.sign() - x0).clamp(-eps, eps)).clamp(0.0, 1.0)
    return xa.numpy()


@pytest.mark.parametrize("variant", VARIANTS)
def test_twin_matches_onnxruntime_clean_and_adversarial(models: dict, data: tuple, variant: str) -> None:
    path = models[variant]
    x, y = data
    session = open_session(path)
    twin = build_twin(path)
    tol = tolerance(path)

    ort_clean = run_logits(session, x)
    with torch.no_grad():
        twin_clean = twin(torch.from_numpy(x)).numpy()
    with torch.no_grad():  # a real classifier in exact arithmetic (on x86 without VNNI the U8S8 files saturate)
        exact_clean = build_twin(path, isa="exact")(torch.from_numpy(x)).numpy()
    assert (exact_clean.argmax(1) == y).mean() > 0.9
    assert (ort_clean.argmax(1) == twin_clean.argmax(1)).mean() >= 0.99
    assert np.abs(ort_clean - twin_clean).max() <= tol

    x_adv = sign_gradient_attack(twin, x, y)
    assert np.abs(x_adv - x).max() <= 0.1 + 1e-6 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    ort_adv = run_logits(session, x_adv)
    with torch.no_grad():
        twin_adv = twin(torch.from_numpy(x_adv)).numpy()
    # The twin's gradients transfer to the shipped file: onnxruntime's accuracy collapses.
    assert (ort_adv.argmax(1) == y).mean() < (ort_clean.argmax(1) == y).mean() - 0.3
    assert (ort_adv.argmax(1) == twin_adv.argmax(1)).mean() >= 0.99
    assert np.abs(ort_adv - twin_adv).max() <= tol


@pytest.mark.parametrize("variant", QUANTIZED)
def test_straight_through_gradients(models: dict, data: tuple, variant: str) -> None:
    x = torch.from_numpy(data[0][:64]).requires_grad_(True)
    y = torch.from_numpy(data[1][:64])
    (grad,) = torch.autograd.grad(F.cross_entropy(build_twin(models[variant])(x), y), x)
    assert torch.isfinite(grad).all()
    assert (grad != 0).float().mean() > 0.5

    # Without the STE the integer graph has zero gradient almost everywhere: what STE fixes.
    x2 = x.detach().clone().requires_grad_(True)
    out = build_twin(models[variant], ste=False)(x2)
    (grad_plain,) = torch.autograd.grad(F.cross_entropy(out, y), x2, allow_unused=True)
    assert grad_plain is None or (grad_plain == 0).all()


@pytest.mark.parametrize("variant", QUANTIZED)
def test_smooth_surrogate(models: dict, data: tuple, variant: str) -> None:
    """The surrogate keeps the graph and the stored weights but drops activation rounding: a continuous
    function close to the real one, with gradients that move images the real graph then misclassifies."""
    path = models[variant]
    x, y = torch.from_numpy(data[0][:128]), torch.from_numpy(data[1][:128])
    twin, smooth = build_twin(path, isa="exact"), build_twin(path, smooth=True)
    assert smooth.rounding == "smooth" and twin.rounding == "ste"
    # Weights fold with the file's own rounding: every constant the two read is identical.
    for name, attr in twin._const_attr.items():
        torch.testing.assert_close(getattr(smooth, smooth._const_attr[name]), getattr(twin, attr), rtol=0, atol=0)
    with torch.no_grad():
        real, soft = twin(x), smooth(x)
        # a nudge far below any quantization step (on random images: digits' k/16 pixels sit on rounding
        # ties): the integer graph rarely sees it, the surrogate always does
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 0.9 + 0.05
        assert (twin(u + 1e-6) != twin(u)).any(1).float().mean() < 0.2
        assert (smooth(u + 1e-6) != smooth(u)).any(1).all()
    assert (real.argmax(1) == soft.argmax(1)).float().mean() >= 0.95
    assert (real - soft).abs().amax() < 0.25 * real.abs().amax()
    # its gradients transfer: the real graph's accuracy collapses on the surrogate's adversarial images
    x_adv = torch.from_numpy(sign_gradient_attack(smooth, data[0][:128], data[1][:128]))
    assert (x_adv - x).abs().amax() <= 0.1 + 1e-6
    with torch.no_grad():
        assert (twin(x_adv).argmax(1) == y).float().mean() < (real.argmax(1) == y).float().mean() - 0.3


def test_twin_takes_any_batch_size(models: dict, data: tuple) -> None:
    twin = build_twin(models["qdq_u8s8"])
    x = torch.from_numpy(data[0][:9])
    with torch.no_grad():
        full = twin(x)
        parts = torch.cat([twin(x[:1]), twin(x[1:6]), twin(x[6:])])
    assert full.shape == (9, 10)
    torch.testing.assert_close(full, parts, rtol=0, atol=1e-5)


def test_int4_twin_reads_packed_weights(models: dict) -> None:
    m = onnx.load(str(models["qdq_int4"]))
    assert any(t.data_type == TensorProto.INT4 for t in m.graph.initializer)
    twin = build_twin(m)
    n_int4 = sum(t.data_type == TensorProto.INT4 and len(t.dims) > 1 for t in m.graph.initializer)
    assert n_int4 == 4  # three convs and the linear layer
    # The dequantized weights the twin folded hold at most 16 levels per output channel.
    folded = [b for b in twin.buffers() if b.dim() == 4 and b.is_floating_point()]
    assert folded and all(torch.unique(w[0]).numel() <= 16 for w in folded)


class OpsZoo(nn.Module):
    """Many ops a classifier export can contain, on a 3x12x12 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.deconv = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.proj = nn.Parameter(torch.randn(10, 10) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.pad(x, (1, 2, 0, 1))  # asymmetric Pad
        y = self.conv(y)
        y = F.leaky_relu(self.bn(torch.sigmoid(y) * 4 - 2), 0.1)  # standalone BatchNormalization
        y = self.deconv(y)  # ConvTranspose
        y = torch.clamp(self.dw(y), -1.0, 1.5) + torch.tanh(y)  # Clip
        y = F.avg_pool2d(y, 3, stride=2, padding=1, count_include_pad=False)
        y = F.max_pool2d(y, 2, ceil_mode=True)
        y = y.permute(0, 2, 3, 1) / 2.0 - 0.1  # Transpose, Div, Sub
        y = y.reshape(y.shape[0], -1)  # Shape/Gather/Unsqueeze/Concat/Reshape
        y = self.fc(y)
        y = y @ self.proj  # MatMul
        y = y + torch.softmax(y, dim=1).unsqueeze(2).squeeze(2)  # Softmax, Unsqueeze, Squeeze
        return torch.log_softmax(y, dim=1) + y.mean(dim=1, keepdim=True)  # ReduceMean


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """OpsZoo as fp32, static QDQ U8S8, static QOperator and dynamic (ConvInteger/MatMulInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(1)
    model = OpsZoo().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(0).random((32, 3, 12, 12), dtype=np.float32)
    fp32 = export_fp32(model, root / "zoo.onnx", (3, 12, 12))
    paths = {"fp32": fp32}
    paths["qdq"] = quantize(fp32, root / "zoo_qdq.onnx", x, activations="u8")
    paths["qop"] = quantize(fp32, root / "zoo_qop.onnx", x, fmt="qop", activations="u8")
    quantize_dynamic(str(root / "zoo_qdq.pre.onnx"), str(root / "zoo_dyn.onnx"), weight_type=QuantType.QInt8)
    paths["dynamic"] = root / "zoo_dyn.onnx"
    return {"x": x, **paths}


# Ops each zoo variant must contain, so the comparison below really exercises them.
ZOO_OPS = {
    "fp32": {
        "Pad",
        "BatchNormalization",
        "ConvTranspose",
        "Clip",
        "AveragePool",
        "MaxPool",
        "Transpose",
        "Shape",
        "Gather",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Reshape",
        "MatMul",
        "ReduceMean",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Softmax",
        "LogSoftmax",
        "Div",
        "Sub",
        "Gemm",
    },
    "qdq": {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul", "AveragePool"},
    "qop": {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearAveragePool",
    },
    "dynamic": {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "Cast"},
}


@pytest.mark.parametrize("variant", list(ZOO_OPS))
def test_ops_zoo_matches_onnxruntime(zoo: dict, variant: str) -> None:
    path, x = zoo[variant], zoo["x"]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ZOO_OPS[variant] <= ops, ZOO_OPS[variant] - ops
    ref = run_logits(open_session(path), x)
    with torch.no_grad():
        got = build_twin(path)(torch.from_numpy(x)).numpy()
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.99
    assert np.abs(ref - got).max() <= tolerance(path)


@pytest.mark.parametrize(
    "qtype, zp",
    [(TensorProto.UINT8, 128), (TensorProto.INT8, -3), (TensorProto.INT4, 1), (TensorProto.UINT4, 0)],
)
def test_quantize_dequantize_match_onnxruntime_on_ties_and_saturation(qtype: int, zp: int) -> None:
    """Exact ties (x / scale = k + 0.5) round half to even; out-of-range values saturate."""
    scales = np.array([0.5, 0.25, 2.0], np.float32)  # per-axis (axis 1), exact in binary
    inits = [
        numpy_helper.from_array(scales, "s"),
        helper.make_tensor("zp", qtype, [3], [zp] * 3),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], axis=1),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    k = np.arange(-300, 300, dtype=np.float32) + 0.5
    x = np.stack([k * s for s in scales], axis=1).astype(np.float32)  # every value a tie
    ref = open_session(model).run(None, {"x": x})[0]
    got = build_twin(model)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_array_equal(got, ref)
    assert len(np.unique(ref[:, 0])) < len(x)  # saturation really happened


def _tiny_graph(node: onnx.NodeProto, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_unsupported_op_is_a_usage_error_naming_op_and_node() -> None:
    model = _tiny_graph(helper.make_node("Hardmax", ["x"], ["y"], name="the_hardmax"))
    with pytest.raises(UsageError, match=r"Hardmax.*the_hardmax"):
        OnnxTwin(model)
    assert "QuantizeLinear" in supported_ops() and "com.microsoft:QGemm" in supported_ops()


def test_noise_ops_follow_the_noise_flag() -> None:
    noise = helper.make_node("RandomNormalLike", ["x"], ["n"], scale=0.5)
    add = helper.make_node("Add", ["x", "n"], ["y"])
    graph = helper.make_graph(
        [noise, add],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = torch.rand(2000, 4)
    torch.testing.assert_close(build_twin(model, noise=False)(x), x)
    torch.manual_seed(0)
    diff = build_twin(model)(x) - x
    assert 0.45 < diff.std().item() < 0.55


def test_bad_files_are_usage_errors(tmp_path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a protobuf\n" * 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UsageError, match="notes.onnx"):
            build_twin(text)
    with pytest.raises(UsageError, match="does not exist"):
        build_twin(tmp_path / "missing.onnx")
