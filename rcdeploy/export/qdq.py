"""Integer ONNX (QDQ, opset 21) written directly from the fx graph of a Brevitas model.

Why not Brevitas' own QCDQ export: measured on a ResNet-20 with onnxruntime 1.31 on x86, it runs 2x
slower than fp32, keeps every BatchNormalization as a float op, puts Clip nodes inside the Q/DQ pairs
(which stops onnxruntime from fusing them) and fixes the batch size at 1. Here every pattern is
emitted in the exact form onnxruntime's QDQ selectors fuse into integer kernels:

* activations are uint8: unsigned 8-bit with zero point 0, signed 8-bit with zero point 128;
  weights per-output-channel scale, axis 0, in one of two forms chosen per layer so that no kernel
  can saturate on any CPU (`rcdeploy.runtime.u8s8`: x86 without VNNI adds neighbouring u8 x s8
  products in int16 with saturation, so a pair must stay within 2 x 255 x 64 = 32,640):
  - layers whose integers fit |w| <= 64 (7 bits and fewer: 4-bit, ternary, binary...) are int8 (U8S8,
    the fastest x86 kernels, with or without VNNI), spread by k = 64 // max|w|;
  - layers with wider integers (8-bit weights, e.g. the first conv and the classifier) are uint8 with
    zero point 128 (U8U8): onnxruntime still fuses them into QLinearConv / QGemm and its u8 x u8
    kernels accumulate exactly everywhere. The integers are the trained ones: nothing is rounded
    to 7 bits behind the training's back;
* Conv -> BatchNorm is folded exactly: the integers stay, the per-channel scale absorbs |gamma/sigma|,
  the sign of gamma/sigma flips the integers (safe: narrow range is symmetric), and the bias
  beta - gamma*mu/sigma is stored as int32 at scale x_scale * w_scale;
* DQ(x), DQ(w), DQ(b) -> Conv -> Q fuses into QLinearConv; the unsigned output quantizer *is* the
  ReLU (QuantizeLinear saturates at zero point 0), so there is no Relu or Clip node;
* residual DQ + DQ -> Add -> Q fuses into QLinearAdd; DQ -> GlobalAveragePool -> Q into
  QLinearGlobalAveragePool; MaxPool runs on uint8 directly; the head DQ, DQ, DQ(int32) -> Gemm
  (no output Q) fuses into QGemm with float logits.

Weights of 4 bits or fewer (4, 3, ternary, binary) are stored as packed INT4 when
`storage="packed"` (two values per byte), feeding Cast(INT8) -> Mul(k) -> DequantizeLinear.
onnxruntime folds the Cast and Mul of constants at load and then fuses the DQ into QLinearConv as
for any int8 weight (checked on its optimized graph), so the 4-bit file is about half the 8-bit one
and still runs int8 kernels in plain onnxruntime, no special loader needed. (An INT4 initializer
read by DequantizeLinear directly is *not* fused: onnxruntime dequantizes it and runs a float Conv.)
`storage="int8"` stores the int8 values instead, for readers without INT4 support.

Noise injection (EnResNet's `FeynmanKacNoise`, any module whose class name ends in 'Noise' and has a
`coeff`) is written as it runs in training, in float between the Add it follows and the Q after it:
x + coeff * std(x per image, Bessel-corrected) * RandomNormalLike(x). Only ReduceSum / Mul / Sub / Sqrt /
Add / RandomNormalLike: the integer kernels around it fuse as before, and the file is stochastic.

Which ops a module becomes is its layer rule's `emit` (`rcdeploy.models.layer_rules`, shared with the
channel tracer and shrink); the rule asks this writer for the Q/DQ pairs, weight forms and folds.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx, nn

from rcdeploy.errors import UsageError
from rcdeploy.models.layer_rules import WeightRule, no_integer_mapping, rule_for
from rcdeploy.models.trace import QuantTracer
from rcdeploy.quant.presets import FLOAT
from rcdeploy.quant.spec import layer_bits
from rcdeploy.runtime.u8s8 import SAFE_WEIGHT, worst_pair_sums

OPSET = 21
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
STORAGES = ("packed", "int8")
_INT32 = np.iinfo(np.int32)


@dataclass
class LayerInfo:
    """One weight layer as exported (what the sidecar and reports need)."""

    name: str
    onnx_node: str  # name of its Conv/Gemm node in the exported graph
    op: str  # "conv" or "linear"
    weight_bits: int
    act_bits_in: int
    act_bits_out: int | None  # None: float output (the logits)
    in_channels: int
    out_channels: int
    kernel: list[int]
    stride: list[int]
    groups: int
    params: int  # weights + bias values after BatchNorm folding
    macs: int  # per image
    storage: str  # "int4", "int8" or "uint8"
    bn_folded: bool
    negative_bn_gains: int  # output channels whose integer signs were flipped by the fold
    kernel_form: str = "u8s8"  # "u8s8": int8 weights; "u8u8": uint8 weights with zero point 128
    weight_spread: int = 1  # k: the stored integers are the trained ones times k (scale / k)
    worst_pair: int = 0  # max |a_i w_i + a_j w_j| over the stored integers, a in [0, 255] (u8u8: 0, exact)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QDQExport:
    """The integer graph and what was learned while writing it."""

    model: onnx.ModelProto
    layers: list[LayerInfo]
    act_quantizers: dict[str, dict[str, Any]]  # module name -> bits, signed, scale, zero point
    logit_step: float  # change of a logit when one pooled feature moves one step through the largest weight
    float_affine_ops: list[str] = field(default_factory=list)  # BatchNorms that could not be folded
    noise: dict[str, float] = field(default_factory=dict)  # noise modules written (name -> coefficient)

    @property
    def stochastic(self) -> bool:
        """Whether the graph draws noise (RandomNormalLike) on every run."""
        return bool(self.noise)

    def to_bytes(self) -> bytes:
        return self.model.SerializeToString()

    @property
    def layer_macs(self) -> dict[str, int]:
        """MACs per image of each Conv/Gemm node, by ONNX node name (for `verify.kernel_report`)."""
        return {layer.onnx_node: layer.macs for layer in self.layers}


def is_noise_module(m: nn.Module) -> bool:
    """Noise injection (EnResNet's FeynmanKacNoise): by the class-name suffix `rcdeploy export` has always used."""
    return type(m).__name__.endswith("Noise")


class _ExportTracer(QuantTracer):
    """The shared tracer, with noise modules kept as leaves: channel tracing must not see them (they
    return x for a Proxy), the integer writer must."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_noise_module(m) or super().is_leaf_module(m, module_qualified_name)


def _trace_for_export(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, _ExportTracer().trace(model))


# -- values flowing through the fx graph ---------------------------------------------------------


@dataclass
class _Float:
    name: str


@dataclass
class _Quant:
    """A uint8 tensor in the ONNX graph: real value = (q - zero_point) * scale."""

    name: str
    scale: float  # float32-exact
    zero_point: int
    scale_init: str
    zp_init: str
    bits: int = 8


@dataclass
class _Pending:
    """A conv/linear whose output quantizer (and BatchNorm) is not known yet."""

    module_name: str
    module: nn.Module
    rule: WeightRule  # what kind of weight layer it is (Conv or Gemm, attributes, geometry)
    x: _Quant
    w_int: np.ndarray  # int8 values, shape of the weight
    w_scale: np.ndarray  # float64 [out]
    bias: np.ndarray  # float64 [out]
    bits: int
    users: int = 1  # consumers in the fx graph: a BN folds / an output Q fuses only into a sole consumer
    bn_folded: bool = False
    done: _Float | None = None  # float result once written (shared by several consumers)
    negative_gains: int = 0


class _Builder:
    """Nodes and initializers of the graph. Names are short counters (they are a visible share of a
    4-bit file); only the Conv/Gemm/Add/pool nodes carry a name, the module they come from."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0
        self._scalar_cache: dict[tuple, str] = {}

    def fresh(self, kind: str = "t") -> str:
        self._count += 1
        return f"{kind}{self._count}"

    def init(self, kind: str, array: np.ndarray) -> str:
        name = self.fresh(kind)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def scalar(self, value: float | int, dtype: type) -> str:
        """Scalar initializers are shared by value: a Q and the DQs reading it use one name."""
        arr = np.array(value, dtype=dtype)
        key = (np.dtype(dtype).str, arr.tobytes())
        if key not in self._scalar_cache:
            self._scalar_cache[key] = self.init("s", arr)
        return self._scalar_cache[key]

    def node(self, op: str, inputs: list[str], name: str | None = None, out: str | None = None, **attrs: Any) -> str:
        out = out or self.fresh()
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def dq(self, q: _Quant) -> str:
        """A fresh DequantizeLinear per consumer: QDQ node units must not share a DQ."""
        return self.node("DequantizeLinear", [q.name, q.scale_init, q.zp_init])

    def q(self, x: str, scale: float, zero_point: int, bits: int = 8) -> _Quant:
        scale_init = self.scalar(scale, np.float32)
        zp_init = self.scalar(zero_point, np.uint8)
        out = self.node("QuantizeLinear", [x, scale_init, zp_init])
        return _Quant(out, float(np.float32(scale)), zero_point, scale_init, zp_init, bits)


def _act_params(module: nn.Module, name: str) -> tuple[float, int, int, bool]:
    """(scale, uint8 zero point, bits, signed) of a Brevitas activation quantizer; refuses what needs a Clip."""
    proxy = module.act_quant
    if not proxy.is_quant_enabled:
        raise UsageError(f"activation {name} is not quantized; the integer ONNX needs every activation quantized "
                         "(export it with --format qonnx instead)")
    bits = int(proxy.bit_width())
    signed = bool(proxy.is_signed)
    if bits != 8:
        raise UsageError(f"activation {name} is {bits}-bit: onnxruntime's integer kernels take 8-bit activations, and "
                         "narrower ones would need a Clip inside every Q/DQ pair; export with --format qonnx "
                         "(or train with 8-bit activations)")
    if proxy.is_narrow_range:
        raise UsageError(f"activation {name} uses a narrow range, which uint8 QuantizeLinear cannot express "
                         "without a Clip; export with --format qonnx")
    zp = float(proxy.zero_point().detach().reshape(-1)[0])
    if zp != 0.0:
        raise UsageError(f"activation {name} has a non-zero zero point ({zp}); only symmetric activation "
                         "quantizers export to the integer graph (use --format qonnx)")
    scale = proxy.scale().detach().reshape(-1)
    if scale.numel() != 1:
        raise UsageError(f"activation {name} has per-channel scales; the integer graph needs per-tensor activation "
                         "scales (use --format qonnx)")
    return float(scale[0]), (128 if signed else 0), bits, signed


def _weight_ints(module: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer weights (int8 array), per-output-channel scale (float64 [out]) and bits of a Brevitas layer."""
    bits = layer_bits(module)
    if bits == FLOAT:
        raise UsageError(f"layer {name} has float weights; the integer ONNX needs quantized weights "
                         "(export with --bits 8, or use --format qonnx)")
    with torch.no_grad():
        qw = module.quant_weight()
        w_int = qw.int().detach().cpu().numpy().astype(np.int64)
        scale = qw.scale.detach().cpu().to(torch.float64)
        zp = qw.zero_point.detach().cpu()
    if torch.any(zp != 0):
        raise UsageError(f"layer {name} has asymmetric weights (non-zero zero point); only symmetric weights export")
    out = w_int.shape[0]
    if scale.numel() == 1:
        scale = scale.reshape(1).expand(out)
    elif scale.numel() != out:
        raise UsageError(f"layer {name}: weight scales are neither per-tensor nor per-output-channel")
    if w_int.min() < -127 or w_int.max() > 127:
        raise UsageError(f"layer {name}: weight integers exceed the symmetric int8 range [-127, 127]")
    return w_int.astype(np.int8), scale.reshape(out).numpy(), bits


def _fold_bn(p: _Pending, bn: nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the pending conv exactly (integers keep their magnitudes)."""
    mu = bn.running_mean.detach().double().cpu().numpy()
    sigma = np.sqrt(bn.running_var.detach().double().cpu().numpy() + bn.eps)
    gamma = bn.weight.detach().double().cpu().numpy() if bn.affine else np.ones_like(mu)
    beta = bn.bias.detach().double().cpu().numpy() if bn.affine else np.zeros_like(mu)
    g = gamma / sigma
    sign = np.sign(g)
    flat = p.w_int.reshape(len(g), -1).astype(np.int16)
    flat = flat * sign.astype(np.int16)[:, None]  # g == 0: the channel is the constant beta, weights 0
    p.w_int = flat.astype(np.int8).reshape(p.w_int.shape)
    # A zero gain leaves a positive scale (any value works: the integers are zero).
    p.w_scale = np.where(g != 0, p.w_scale * np.abs(g), p.w_scale)
    p.bias = beta + g * (p.bias - mu)
    p.bn_folded = True
    p.negative_gains = int((g < 0).sum())


_U8U8_ZERO_POINT = 128


def _weight_form(max_int: int, conv_integer: bool) -> tuple[str, int]:
    """("u8s8" | "u8u8", spread k) of a layer whose largest weight integer is `max_int`.

    u8s8: every stored |w * k| <= SAFE_WEIGHT (64), so no int16 pair sum can saturate on x86 without
    VNNI. Within that, the largest k: the int32 bias lives on the accumulator grid x_scale * w_scale / k,
    and a k-times finer grid rounds it k times more finely (k = 9 at 4 bits, 64 ternary): that rounding
    is the one error the integer graph adds to the PyTorch model. One k per layer: a scalar costs one
    byte in a packed file, a per-channel k a tensor. ConvInteger keeps k = 1 (its output is rescaled in
    float, so the bias grid does not matter). u8u8: integers above 64 (8-bit layers) as uint8 + 128.
    """
    if max_int > SAFE_WEIGHT:
        return "u8u8", 1
    return "u8s8", 1 if conv_integer else max(1, SAFE_WEIGHT // max(max_int, 1))


def _weight_tensor(b: _Builder, w_int: np.ndarray, k: int, bits: int, storage: str,
                   form: str = "u8s8") -> tuple[str, str]:
    """The weight tensor a DequantizeLinear reads: w_int * k per output channel (int8), or w_int + 128
    (uint8, form "u8u8").

    Packed (bits <= 4): an INT4 initializer (ml_dtypes.int4 arrays are written two values per byte by
    onnx.numpy_helper; a tensor built from a Python list is not), Cast to INT8 and multiplied by k.
    onnxruntime folds both at load, so the DequantizeLinear reads a constant int8 tensor and fuses
    into QLinearConv like any int8 weight: the file is small and plain onnxruntime still runs int8
    kernels. int8: the product stored as is (readers without INT4 support, e.g. onnxruntime < 1.20).
    """
    if form == "u8u8":
        return b.init("w", (w_int.astype(np.int16) + _U8U8_ZERO_POINT).astype(np.uint8)), "uint8"
    if storage == "packed" and bits <= 4:
        name = b.node("Cast", [b.init("w", w_int.astype(ml_dtypes.int4))], to=TensorProto.INT8)
        if k > 1:
            name = b.node("Mul", [name, b.scalar(k, np.int8)])
        return name, "int4"
    return b.init("w", (w_int.astype(np.int16) * k).astype(np.int8)), "int8"


class _Writer:
    """Walks the fx graph once; modules go to their layer rule, which writes through this writer."""

    def __init__(self, model: nn.Module, storage: str) -> None:
        self.model = model
        self.storage = storage
        self.b = _Builder()
        self.layers: list[LayerInfo] = []
        self.acts: dict[str, dict[str, Any]] = {}
        self.float_affine: list[str] = []
        self.logit_step = float("nan")
        self.out_shapes: dict[str, tuple[int, ...]] = {}  # weight layers' outputs, noise modules' inputs
        self.noise_modules: dict[str, float] = {}  # noise written into the graph: module name -> coefficient

    # -- materialization -------------------------------------------------------------------------
    def emit_linear(self, p: _Pending, out_q: tuple[float, int, int] | None, out_name: str | None = None
                    ) -> _Quant | _Float:
        """Write a pending conv/linear: QDQ form (fuses to QLinearConv / QGemm), or ConvInteger for a conv
        whose output stays float (PreAct blocks add the raw conv output to the shortcut)."""
        b = self.b
        base = p.module_name
        m, rule = p.module, p.rule
        conv_integer = rule.float_output_op is not None and out_q is None
        max_int = np.abs(p.w_int.astype(np.int64)).reshape(len(p.w_scale), -1).max(1)
        form, k = _weight_form(int(max_int.max()), conv_integer)
        w_scale32 = (p.w_scale / k).astype(np.float32)
        # Bias at the accumulator's scale, computed in float32 exactly as the integer kernel will.
        acc_scale32 = (np.float32(p.x.scale) * w_scale32).astype(np.float32)
        b_int = np.clip(np.round(p.bias / acc_scale32.astype(np.float64)), _INT32.min, _INT32.max).astype(np.int32)
        if conv_integer:
            # DQ -> Conv without an output Q does not fuse (onnxruntime keeps a float Conv); ConvInteger keeps
            # the MACs on integers and rescales the exact int32 sums per channel afterwards.
            w_name, stored = _weight_tensor(b, p.w_int, 1, p.bits, self.storage, form)
            w_zp = b.scalar(_U8U8_ZERO_POINT, np.uint8) if form == "u8u8" else b.scalar(0, np.int8)
            y = b.node(rule.float_output_op, [p.x.name, w_name, p.x.zp_init, w_zp], base,
                       **rule.onnx_attrs(m, base))
            y = b.node("Cast", [y], to=TensorProto.FLOAT)
            y = b.node("Mul", [y, b.init("as", acc_scale32.reshape(1, -1, 1, 1))])
            y = b.node("Add", [y, b.init("b", p.bias.astype(np.float32).reshape(1, -1, 1, 1))], out=out_name)
        else:
            x_dq = b.dq(p.x)
            w_name, stored = _weight_tensor(b, p.w_int, k, p.bits, self.storage, form)
            w_inputs = [w_name, b.init("ws", w_scale32)]
            if form == "u8u8":
                w_inputs.append(b.init("wz", np.full(len(w_scale32), _U8U8_ZERO_POINT, np.uint8)))
            elif rule.names_weight_zero_point:
                w_inputs.append(b.init("wz", np.zeros(len(w_scale32), np.int8)))
            w_dq = b.node("DequantizeLinear", w_inputs, axis=0)
            b_dq = b.node("DequantizeLinear", [b.init("b", b_int), b.init("bs", acc_scale32)], axis=0)
            y = b.node(rule.onnx_op, [x_dq, w_dq, b_dq], base, out=None if out_q else out_name,
                       **rule.onnx_attrs(m, base))
        spread = p.w_int.astype(np.int64).reshape(len(p.w_scale), -1) * k
        worst = 0 if form == "u8u8" else int(worst_pair_sums(spread).max(initial=0))
        op, kernel, stride, groups = rule.geometry(m)
        in_ch, out_ch = rule.widths(m)
        macs = rule.macs(m, tuple(self.out_shapes[base][2:]) if rule.macs_need_out_hw else None)
        self.layers.append(LayerInfo(
            name=base, onnx_node=base, op=op, weight_bits=p.bits, act_bits_in=p.x.bits,
            act_bits_out=out_q[2] if out_q else None, in_channels=in_ch, out_channels=out_ch, kernel=kernel,
            stride=stride, groups=groups, params=int(p.w_int.size + p.bias.size), macs=int(macs), storage=stored,
            bn_folded=p.bn_folded, negative_bn_gains=p.negative_gains, kernel_form=form, weight_spread=k,
            worst_pair=worst))
        if out_q is None:
            if not conv_integer:
                # One step of one input feature through the largest weight of the layer: the natural unit of
                # a float-output layer's disagreement.
                self.logit_step = float(p.x.scale * np.max(max_int * p.w_scale))
            return _Float(y)
        return b.q(y, out_q[0], out_q[1], out_q[2])

    def as_float(self, v: Any, base: str) -> _Float:
        if isinstance(v, _Float):
            return v
        if isinstance(v, _Quant):
            return _Float(self.b.dq(v))
        if isinstance(v, _Pending):
            if v.done is None:
                v.done = self.emit_linear(v, None)  # type: ignore[assignment]
            return v.done
        raise TypeError(type(v))

    # -- the walk --------------------------------------------------------------------------------
    def run(self, gm: fx.GraphModule) -> None:
        b = self.b
        env: dict[fx.Node, Any] = {}
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if env:
                    raise UsageError("the model takes more than one input; the integer export needs one image tensor")
                env[node] = _Float(INPUT_NAME)
            elif node.op == "call_module":
                env[node] = self.module_node(node, modules[node.target], env)
            elif node.op == "call_function":
                env[node] = self.function_node(node, env)
            elif node.op == "call_method":
                env[node] = self.method_node(node, env)
            elif node.op == "output":
                v = env[node.args[0]] if isinstance(node.args[0], fx.Node) else None
                if v is None:
                    raise UsageError("the model must return one logits tensor")
                if isinstance(v, _Pending) and v.done is None:
                    self.emit_linear(v, None, out_name=OUTPUT_NAME)
                else:
                    f = self.as_float(v, "out")
                    b.node("Identity", [f.name], out=OUTPUT_NAME)
            else:
                raise UsageError(f"unsupported fx node {node.op} {node.target} in the integer export")

    def module_node(self, node: fx.Node, m: nn.Module, env: dict) -> Any:
        name = str(node.target)
        args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
        if is_noise_module(m):
            return self.noise(name, m, args[0])
        rule = rule_for(m)
        if rule is None:
            raise no_integer_mapping(name, m)
        return rule.emit(self, name, m, args[0] if args else None, len(node.users))

    def noise(self, name: str, m: nn.Module, x: Any) -> Any:
        """x + coeff * std(x per image) * N(0, 1) in float ops, as `FeynmanKacNoise.forward` computes it.

        The std is written as sums (ReduceSum, Sub, Mul, Sqrt) with torch.std's Bessel correction; a shrunk
        module (`stat_channels` above its channel count) counts the removed channels as zeros, as its
        forward does. coeff^2 / (n - 1) is one constant under the Sqrt: sqrt(ss * c^2/(n-1)) = c * std.
        """
        coeff = getattr(m, "coeff", None)
        if not isinstance(coeff, (int, float)) or not isinstance(getattr(m, "enabled", None), bool):
            raise UsageError(f"noise module {name} ({type(m).__name__}) has no integer-ONNX mapping; export it "
                             "with --no-noise")
        if not m.enabled or coeff == 0:
            return x
        shape = self.out_shapes[name]
        self.noise_modules[name] = float(coeff)
        b = self.b
        per_channel = int(np.prod(shape[2:], dtype=np.int64))
        channels = max(int(shape[1]), int(getattr(m, "stat_channels", None) or 0))
        n = channels * per_channel
        missing = (channels - int(shape[1])) * per_channel
        f = self.as_float(x, name).name
        axes = b.init("ax", np.arange(1, len(shape), dtype=np.int64))
        mean = b.node("Mul", [b.node("ReduceSum", [f, axes], keepdims=1), b.scalar(1.0 / n, np.float32)])
        d = b.node("Sub", [f, mean])
        ss = b.node("ReduceSum", [b.node("Mul", [d, d]), axes], keepdims=1)
        if missing:  # the removed channels' zeros: each adds (0 - mean)^2
            ss = b.node("Add", [ss, b.node("Mul", [b.node("Mul", [mean, mean]), b.scalar(missing, np.float32)])])
        sigma = b.node("Sqrt", [b.node("Mul", [ss, b.scalar(coeff * coeff / max(n - 1, 1), np.float32)])])
        draw = b.node("RandomNormalLike", [f], name, dtype=TensorProto.FLOAT, mean=0.0, scale=1.0)
        return _Float(b.node("Add", [f, b.node("Mul", [sigma, draw])], f"{name}.add"))

    # -- what a layer rule may write (the `IntegerGraph` protocol) ----------------------------------
    def is_quantized(self, x: Any) -> bool:
        return isinstance(x, _Quant)

    def requantize(self, name: str, m: nn.Module, x: Any, *, relu: bool) -> Any:
        """An activation quantizer: the Q of a pending layer's output, or of any value."""
        scale, zp, bits, signed = _act_params(m, name)
        self.acts[name] = {"bits": bits, "signed": signed, "scale": float(np.float32(scale)), "zero_point": zp,
                           "relu": relu}
        if isinstance(x, _Pending) and x.users == 1 and x.done is None:
            return self.emit_linear(x, (scale, zp, bits))
        if isinstance(x, _Quant) and not relu and x.zero_point == zp and np.float32(x.scale) == np.float32(scale):
            return x  # re-quantizing onto the same grid is the identity
        # A QuantReLU on a float value: the unsigned quantizer (zero point 0) saturates at 0, i.e. is the ReLU.
        f = self.as_float(x, name)
        return self.b.q(f.name, scale, zp, bits)

    def weight_layer(self, name: str, m: nn.Module, x: Any, users: int, rule: WeightRule) -> _Pending:
        """A conv/linear on a uint8 input, held until its BatchNorm and output quantizer are known."""
        w_int, w_scale, bits = _weight_ints(m, name)
        bias = m.bias.detach().double().cpu().numpy() if m.bias is not None else np.zeros(w_int.shape[0], np.float64)
        return _Pending(name, m, rule, x, w_int, w_scale, bias, bits, users=users)

    def fold_batch_norm(self, x: Any, m: nn.BatchNorm2d, users: int) -> _Pending | None:
        """Fold `m` into the pending conv it alone reads, if it does; None otherwise."""
        if isinstance(x, _Pending) and x.users == 1 and not x.bn_folded:
            _fold_bn(x, m)
            x.users = users
            return x
        return None

    def float_ops(self, name: str, x: Any, steps: Sequence[tuple[str, str, np.ndarray, str]]) -> _Float:
        """Float ops applying a constant each, in order: (op, constant kind, constant, node name suffix)."""
        y = self.as_float(x, name).name
        for op, kind, const, suffix in steps:
            y = self.b.node(op, [y, self.b.init(kind, const)], f"{name}.{suffix}")
        return _Float(y)

    def mark_float_affine(self, name: str) -> None:
        self.float_affine.append(name)

    def unary(self, op: str, name: str, x: Any, *, on_uint8: bool, **attrs: Any) -> _Quant | _Float:
        """A one-input node; with `on_uint8`, a uint8 input stays uint8 on the same grid (layout ops, max)."""
        if on_uint8 and isinstance(x, _Quant):
            y = self.b.node(op, [x.name], name, **attrs)
            return _Quant(y, x.scale, x.zero_point, x.scale_init, x.zp_init, x.bits)
        return _Float(self.b.node(op, [self.as_float(x, name).name], name, **attrs))

    def flatten(self, v: Any, start: int, end: int, base: str) -> Any:
        if start != 1 or end != -1:
            raise UsageError(f"{base}: only flatten(x, 1) exports")
        return self.unary("Flatten", base, v, on_uint8=True, axis=1)  # a layout op: stays on the uint8 tensor

    def function_node(self, node: fx.Node, env: dict) -> Any:
        args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
        fn = node.target
        if fn in (operator.add, torch.add) and len(args) == 2 and not node.kwargs:
            x, y = (self.as_float(a, node.name) for a in args)
            return _Float(self.b.node("Add", [x.name, y.name], node.name))
        if fn is torch.flatten:
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(args[0], start, end, node.name)
        raise UsageError(f"operation {getattr(fn, '__name__', fn)} ({node.name}) has no integer-ONNX mapping; "
                         "export with --format qonnx")

    def method_node(self, node: fx.Node, env: dict) -> Any:
        args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
        if node.target == "flatten":
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(args[0], start, end, node.name)
        raise UsageError(f"tensor method .{node.target}() ({node.name}) has no integer-ONNX mapping; "
                         "export with --format qonnx")


def _output_shapes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """Output shape of every conv/linear for one image (for MAC counts), and the input shape of every
    noise module (the count its std divides by)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(rule_for(m), WeightRule):
            hooks.append(m.register_forward_hook(
                lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(torch.as_tensor(out).shape))))
        elif is_noise_module(m):
            hooks.append(m.register_forward_pre_hook(
                lambda _m, inputs, name=name: shapes.__setitem__(name, tuple(inputs[0].shape))))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def build_qdq(model: nn.Module, input_shape: tuple[int, int, int], *, storage: str = "packed",
              doc: str = "") -> QDQExport:
    """Write the integer QDQ graph of an eval-mode Brevitas model (input float [0,1] NCHW, dynamic batch)."""
    if storage not in STORAGES:
        raise UsageError(f"unknown storage {storage!r}; choose one of: {', '.join(STORAGES)}")
    model = model.eval()
    writer = _Writer(model, storage)
    writer.out_shapes = _output_shapes(model, input_shape)
    try:
        gm = _trace_for_export(model)
    except Exception as e:  # fx raises many types on data-dependent control flow
        raise UsageError(f"the model cannot be traced for export ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                         "use --format qonnx") from None
    writer.run(gm)
    b = writer.b
    c, h, w = input_shape
    x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", c, h, w])
    y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", None])
    graph = helper.make_graph(b.nodes, "rcdeploy_qdq", [x], [y], initializer=b.inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="rcdeploy", doc_string=doc)
    onnx_model.ir_version = 10  # opset 21 needs IR >= 10; onnxruntime 1.18+ reads it
    try:
        onnx.checker.check_model(onnx_model)
    except onnx.checker.ValidationError as e:  # a writer bug, not a user error
        raise RuntimeError(f"the integer ONNX graph written is invalid: {str(e).splitlines()[0]}") from e
    return QDQExport(onnx_model, writer.layers, writer.acts, writer.logit_step, writer.float_affine,
                     writer.noise_modules)


def bytes_by_dtype(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer payload bytes per element type (packed INT4 counts half a byte per value)."""
    out: dict[str, int] = {}
    for t in model.graph.initializer:
        dtype = TensorProto.DataType.Name(t.data_type).lower()
        n = len(t.raw_data) if t.HasField("raw_data") else numpy_helper.to_array(t).nbytes
        out[dtype] = out.get(dtype, 0) + n
    return out
