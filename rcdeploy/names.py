"""The names users pick from, declared in one light module (no torch, brevitas or onnxruntime).

Each registry's implementations live in heavy modules that register themselves (or are reached
through the declared "module:attr"), imported only when a name is used; this module only declares
the names, their kind and a few words of help, so that `rcdeploy --help`, recipe validation and
error messages know every name without importing any implementation. tests/test_registries.py keeps
declarations and implementations in step. Order of declaration is the order shown to users.
"""

from __future__ import annotations

from typing import Any

from rcdeploy.registry import Registry

# Adversarial training objectives (rcdeploy.train.objectives): `--adv`.
OBJECTIVES: Registry[Any] = Registry("adversary", ordered=True)
OBJECTIVES.declare("none", "rcdeploy.train.objectives:natural", help="clean cross-entropy")
OBJECTIVES.declare("fgsm-rs", "rcdeploy.train.objectives:fgsm_rs", help="fast AT: one step from a random start")
OBJECTIVES.declare("pgd", "rcdeploy.train.objectives:pgd", help="Madry et al.: PGD-K with a random start")
OBJECTIVES.declare("trades", "rcdeploy.train.objectives:trades", help="TRADES: CE + beta * KL(clean || adversarial)")
OBJECTIVES.declare("mixed", "rcdeploy.train.objectives:mixed",
                   help="(1 - alpha) CE(clean) + alpha CE(PGD adversarial)")
OBJECTIVES.declare("ard", "rcdeploy.train.objectives:ard",
                   help="robust distillation from --teacher: alpha T^2 KL(teacher || student(x_adv)) + (1 - alpha) CE")

# Sparsity methods (rcdeploy.train.sparsity, rcdeploy.train.unstructured): `--sparsity`. Kind "channels"
# removes whole channels (`--prune-channels`, `export --prune-channels`); "weights" zeroes single weights.
CHANNELS, WEIGHTS = "channels", "weights"
SPARSITY: Registry[Any] = Registry("sparsity method", ordered=True)
SPARSITY.declare("group-lasso", "rcdeploy.train.sparsity:GroupLasso", kind=CHANNELS, help="proximal group lasso")
SPARSITY.declare("rgsm", "rcdeploy.train.sparsity:RGSM", kind=CHANNELS, help="relaxed group-sparse splitting")
SPARSITY.declare("slimming", "rcdeploy.train.sparsity:Slimming", kind=CHANNELS, help="network slimming (L1 on BN)")
SPARSITY.declare("rvsm", "rcdeploy.train.unstructured:RVSM", kind=WEIGHTS, help="relaxed variable splitting")
SPARSITY.declare("admm", "rcdeploy.train.unstructured:ADMM", kind=WEIGHTS, help="ADMM to a weight budget")
SPARSITY.declare("atmc", "rcdeploy.train.atmc:ATMC", kind=WEIGHTS,
                 help="ATMC: one global weight budget + ADMM integer codebooks")

# Weight quantization training methods: `--quant`. "qat" is the plain Brevitas forward (no extra object).
QUANT_METHODS: Registry[Any] = Registry("quantization method", ordered=True)
QUANT_METHODS.declare("qat", None, help="quantization-aware training, straight-through")
QUANT_METHODS.declare("binary-relax", "rcdeploy.quant.binary_relax:BinaryRelax",
                      help="relaxed weights (w + lambda Q(w)) / (1 + lambda), then exact Q(w)")

# Learning-rate schedules and optimizers: implemented by name in rcdeploy.train.loop.
SCHEDULES: Registry[Any] = Registry("schedule", ordered=True)
for _name in ("cosine", "piecewise", "constant"):
    SCHEDULES.declare(_name)
SCHEDULES.declare("onecycle", help="torch's OneCycleLR: cosine up from lr/25 to lr over 30%, down to lr/25e4")
OPTIMIZERS: Registry[Any] = Registry("optimizer", ordered=True)
for _name in ("sgd", "adam"):
    OPTIMIZERS.declare(_name)

# Session profiles (rcdeploy.runtime.session): `bench --target`, `inspect --target`.
TARGETS: Registry[Any] = Registry("target", ordered=True)
TARGETS.declare("cpu", "rcdeploy.runtime.session:CPU", help="all cores, batched")
TARGETS.declare("mobile", "rcdeploy.runtime.session:MOBILE", help="1 thread, batch 1")

# Runtimes a deployed file is scored and timed in: `--runtime` (OpenVINO is an optional extra).
RUNTIMES: Registry[Any] = Registry("runtime", ordered=True)
RUNTIMES.declare("onnxruntime", "rcdeploy.runtime.session:open_session")
RUNTIMES.declare("openvino", "rcdeploy.runtime.ov_session:OpenVinoSession", help="int8 storage")

# Integer-kernel arithmetic (rcdeploy.runtime.cpu): `bench --isa`; the twin emulates either.
ISAS: Registry[Any] = Registry("isa", ordered=True)
ISAS.declare("exact", None, help="VNNI, AMX, ARM")
ISAS.declare("avx2", None, help="x86 without VNNI: u8 x s8 pair sums saturate at int16")

# Export formats (rcdeploy.export): `export --format`.
EXPORT_FORMATS: Registry[Any] = Registry("export format", ordered=True)
EXPORT_FORMATS.declare("qdq", "rcdeploy.export.qdq:build_qdq", help="integer QDQ ONNX for onnxruntime")
EXPORT_FORMATS.declare("qonnx", "rcdeploy.export.qonnx_export:export_qonnx_bytes", help="QONNX for FINN/FPGA")
EXPORT_FORMATS.declare("ort", "rcdeploy.export.ort_format:to_ort_format", help="onnxruntime's mobile format")

# How sub-8-bit weights are stored in the QDQ file (rcdeploy.export.qdq): `export --storage`.
STORAGES: Registry[Any] = Registry("storage", ordered=True)
STORAGES.declare("packed", None, help="INT4, half the bytes")
STORAGES.declare("int8", None, help="plain int8")

ALL: dict[str, Registry[Any]] = {
    "objectives": OBJECTIVES, "sparsity": SPARSITY, "quant_methods": QUANT_METHODS, "schedules": SCHEDULES,
    "optimizers": OPTIMIZERS, "targets": TARGETS, "runtimes": RUNTIMES, "isas": ISAS,
    "export_formats": EXPORT_FORMATS, "storages": STORAGES,
}


def listing(names: list[str], last: str = "or") -> str:
    """['a', 'b', 'c'] -> 'a, b or c' (for help texts)."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"
