"""A differentiable twin of an ONNX classifier: a torch interpreter of the graph onnxruntime runs.

Robust accuracy is measured on the file that ships (DESIGN.md): adversarial images are made with
gradients of this twin, rebuilt from the ONNX graph itself, then scored by onnxruntime. The twin
computes what onnxruntime computes, node by node:

- QuantizeLinear is saturate(round_half_to_even(x / scale) + zero_point); with `ste=True` the
  rounding passes gradients straight through (1 inside the representable range, 0 where the
  value saturates), with `ste=False` it is plain rounding and the gradient is zero, as a
  literal reading of the integer graph would give.
- DequantizeLinear is (q - zero_point) * scale, per-tensor, per-axis or blocked.
- Integer tensors travel as float tensors that hold integer values, so gradients flow through
  them; int32 constants (biases) are kept in float64, where every int32 is exact.
- The QOperator forms onnxruntime's quantizer writes (QLinearConv, QGemm, QLinearAdd, ...) are
  computed as dequantize -> float op -> quantize, which is what their integer kernels compute
  up to float rounding of the requantization scale.
- `isa="avx2"` adds what x86 CPUs without VNNI compute differently: the int16 saturation of
  neighbouring u8 x s8 product pairs (`rcdeploy.runtime.u8s8`), in every kernel onnxruntime runs
  that way: QOperator nodes directly, QDQ nodes where onnxruntime's optimized graph fuses them into
  such a kernel. The saturation error is added as a constant for the gradient (the gradient is the
  exact op's). The default is what this CPU does, so the twin matches onnxruntime here.

Why not onnx2torch: version 1.5.15 (checked by installing it into a scratch directory) converts
none of QuantizeLinear, DequantizeLinear, QLinearConv, QLinearMatMul, MatMulInteger,
ConvInteger, the com.microsoft QLinear*/QGemm ops or RandomNormalLike, and has no notion of a
straight-through estimator: the quantized graphs this twin exists for would not convert.

Layout, one module per op family (as onnx2torch): `registry` (the `(domain, op) -> function` table
each family fills with `@_op`), `tensors` (carriers and (de)quantization arithmetic), `quantization`,
`qoperator` (QLinear*, QGemm, *Integer), `conv_pool`, `linalg_elementwise`, `shape_ops`, `noise_ops`,
`saturation` (the AVX2 u8 x s8 emulation) and `core` (`OnnxTwin`, `build_twin`).
"""

from __future__ import annotations

from rcdeploy.deploy.twin.core import OnnxTwin, build_twin
from rcdeploy.deploy.twin.registry import supported_ops

__all__ = ["OnnxTwin", "build_twin", "supported_ops"]
