"""`train --bits auto --size-budget B`: Lipschitz-guided per-layer weight bits, then adversarial fine-tuning.

The flow (our design; the paper, Song, Ranjan, Li, arXiv 2110.12308, is public only as an abstract):

1. build the model with 8-bit weights in every layer (user `bit_overrides` pin their layers at their
   bits throughout) and calibrate it as any run;
2. train it adversarially for `auto_bits_epochs` epochs (the run's objective, learning rate on a cosine
   over these epochs): the errors are measured on a model that already fits the data, and at 8 bits
   the float weights stay close to what a float model would learn;
3. measure (`rcdeploy.quant.lipschitz`): each layer's BN-folded operator norm L_l, the downstream
   amplification A_l, and for each candidate setting (bits b, clip ratio c of max |w|) the output error
   on PGD-adversarial activations of MEASURE_IMAGES training images (never validation or test), attack =
   the training attack (PGD, the run's eps, steps and step size); e_l(b) = the least over c;
4. allocate (`rcdeploy.quant.allocate`): minimize sum_l A_l e_l(b_l) within the budget. A_l is a worst-case
   bound and grows geometrically with depth (on ResNet-20 it overstates the measured logit change by up
   to 10^4 in the first layers), so `auto_bits_amplification: measured` offers the measured gain instead
   (logit change with only that layer quantized at 4 bits / its own output change; not a bound);
5. rebuild every allocated layer at its bits (float weights kept), its scale set to c * max |w| /
   (2^(b-1) - 1) per output channel with the c that won at that b, and hand the model to the ordinary
   loop: `epochs` epochs of adversarial fine-tuning at those bits (scales keep learning).

The pre-training epochs are not checkpointed (an interruption during them restarts the run); the model
spec in every checkpoint holds the chosen bits as per-layer overrides, so resume and export rebuild
exactly the allocated model. The figures are kept in the checkpoint (`bit_allocation`) and model.json.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import math
import time
from typing import Any

import torch
from torch import nn

from rcdeploy.attacks import parse_attack
from rcdeploy.config import TrainConfig
from rcdeploy.data import Dataset, augment
from rcdeploy.errors import UsageError
from rcdeploy.quant.allocate import CANDIDATE_BITS, LayerOptions, allocate, layer_bytes
from rcdeploy.quant.calibrate import init_weight_scales
from rcdeploy.quant.lipschitz import CLIP_RATIOS, measure
from rcdeploy.quant.spec import QuantSpec, layer_bits, rebuild_with_bits, set_module, weight_layers
from rcdeploy.units import format_size, parse_size

BASELINE_BITS = 8      # weight bits of the pre-training phase
MEASURE_IMAGES = 256   # training images whose adversarial activations the errors are measured on
BYTES_DEFINITION = ("per weight layer: ceil(weights * bits / 8) + 8 bytes per output channel (float32 scale, "
                    "int32 bias); ONNX framing and activation parameters not counted")


def _pinned(model: nn.Module, overrides: dict[str, Any]) -> dict[str, int]:
    """Layers a user override names, with the bits they were built at."""
    return {name: layer_bits(m) for name, m in weight_layers(model)
            if any(fnmatch.fnmatchcase(name, p) for p in overrides)}


def _options(model: nn.Module, pinned: dict[str, int], errors: dict[str, dict[int, float]] | None) -> list[LayerOptions]:
    """One LayerOptions per weight layer: pinned layers have their one option (error 0)."""
    out = []
    for name, m in weight_layers(model):
        d = {pinned[name]: 0.0} if name in pinned else (errors or {}).get(name, {b: 0.0 for b in CANDIDATE_BITS})
        out.append(LayerOptions(name=name, weights=int(m.weight.numel()), out_channels=int(m.weight.shape[0]),
                                errors=dict(d)))
    return out


def check_budget(model: nn.Module, pinned: dict[str, int], budget: int) -> None:
    """Before any training: a budget below every layer at its fewest bits is refused."""
    least = sum(o.bytes(o.bits[0]) for o in _options(model, pinned, None))
    if budget < least:
        raise UsageError(f"--size-budget {format_size(budget)} is below the smallest this model can be: "
                         f"{format_size(least)} with every layer at {CANDIDATE_BITS[0]} bits (ternary); "
                         f"bytes count {BYTES_DEFINITION}")


def _pretrain(cfg: TrainConfig, model: nn.Module, data: Dataset, device: torch.device, settings: Any,
              objective: Any, reporter: Any) -> dict[str, Any]:
    """`auto_bits_epochs` adversarial epochs at the baseline bits (own optimizer, cosine over these epochs)."""
    from rcdeploy.train.loop import batch_generator, lr_at, make_optimizer

    epochs = int(cfg.auto_bits_epochs)
    if epochs == 0:
        return {"epochs": 0, "bits": BASELINE_BITS}
    short = dataclasses.replace(cfg, epochs=epochs, warmup_epochs=0.0)
    optimizer = make_optimizer(cfg, model)
    batches = math.ceil(len(data.train) / cfg.batch_size)
    loss_sum = correct = seen = 0
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.seed * 7919 - epoch - 1))
        order = order.to(device)
        reporter.start_epoch(epoch, epochs, batches)
        loss_sum = correct = seen = 0
        for b in range(batches):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            gen = batch_generator(cfg.seed, -(epoch + 1), b, device)  # draws apart from the fine-tune epochs'
            x, y = augment(data.train.x[idx], data.meta, gen), data.train.y[idx]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(short, epoch + b / batches, batches)
            loss, logits = objective(model, x, y, settings, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            reporter.batch(float(loss.detach()), len(y))
    return {"epochs": epochs, "bits": BASELINE_BITS, "train_loss": loss_sum / max(1, seen),
            "train_acc": 100.0 * correct / max(1, seen), "seconds": time.perf_counter() - t0}


def _adversarial_images(cfg: TrainConfig, model: nn.Module, data: Dataset, settings: Any) -> torch.Tensor:
    """PGD images of MEASURE_IMAGES seeded training images (the training attack, eval mode)."""
    g = torch.Generator().manual_seed(cfg.seed * 31 + 5)
    idx = torch.randperm(len(data.train), generator=g)[:MEASURE_IMAGES].to(data.train.x.device)
    x, y = data.train.x[idx], data.train.y[idx]
    attack = parse_attack(f"pgd{settings.steps}", eps=settings.eps, step=settings.step_size, seed=cfg.seed)
    model.eval()
    try:
        return attack(model, x, y).detach()
    finally:
        model.train()


def auto_bits_model(cfg: TrainConfig, data: Dataset, device: torch.device, settings: Any, objective: Any,
                    reporter: Any) -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
    """Steps 1-5 of the module docstring: (model spec with the chosen bits, the model, the record)."""
    from rcdeploy.train.loop import _new_model

    budget = parse_size(cfg.size_budget, "size-budget")
    base = dataclasses.replace(cfg, bits=BASELINE_BITS, first_last_bits=None)
    spec, model = _new_model(base, data, device)
    pinned = _pinned(model, cfg.bit_overrides)
    check_budget(model, pinned, budget)
    pretrain = _pretrain(cfg, model, data, device, settings, objective, reporter)
    x_adv = _adversarial_images(cfg, model, data, settings)
    free = [name for name, _ in weight_layers(model) if name not in pinned]
    stats = {s.name: s for s in measure(model, x_adv, CANDIDATE_BITS, clips=CLIP_RATIOS, layers=free)}
    weight = {n: _weight(stats[n], cfg.auto_bits_amplification) for n in free}
    amplified = {n: {b: weight[n] * e for b, e in stats[n].errors.items()} for n in free}
    allocation = allocate(_options(model, pinned, amplified), budget)

    quant = QuantSpec(bits=max(allocation.bits.values()), act_bits=cfg.act_bits, first_last_bits=None,
                      overrides={glob.escape(n): b for n, b in allocation.bits.items()})
    requantize_layers(model, {n: (allocation.bits[n], stats[n].clips[allocation.bits[n]]) for n in free})
    spec = {**spec, "quant": quant.to_dict()}
    layers = []
    for name, _ in weight_layers(model):
        s = stats[name]
        bits = allocation.bits[name]
        layers.append({"name": name, "bits": bits, "pinned": name in pinned, "kind": s.kind, "weights": s.weights,
                       "out_channels": s.out_channels,
                       "bytes": layer_bytes(s.weights, s.out_channels, bits), "input_shape": s.input_shape,
                       "bn_folded": s.bn_folded, "norm": s.norm, "amplification": s.amplification,
                       "measured_gain": s.gain,
                       "clip": s.clips.get(bits, 1.0), "errors": {str(b): e for b, e in s.errors.items()},
                       "clips": {str(b): c for b, c in s.clips.items()},
                       "unclipped_errors": {str(b): e for b, e in s.unclipped.items()},
                       "amplified_errors": {str(b): d for b, d in amplified.get(name, {}).items()}})
    record = {"method": "lipschitz", "amplification": cfg.auto_bits_amplification,
              "candidates": list(CANDIDATE_BITS), "clip_ratios": list(CLIP_RATIOS),
              "bytes_definition": BYTES_DEFINITION,
              **allocation.to_dict(), "pretrain": pretrain,
              "measured_on": {"split": "train", "images": len(x_adv), "attack": f"pgd{settings.steps}",
                              "eps": settings.eps, "step_size": settings.step_size},
              "layers": layers}
    return spec, model, record


def _weight(stats: Any, kind: str) -> float:
    """What multiplies a layer's error: A_l (the bound), or its measured gain (A_l where none was measured)."""
    return stats.gain if kind == "measured" and stats.gain is not None else stats.amplification


def requantize_layers(model: nn.Module, chosen: dict[str, tuple[int, float]]) -> None:
    """Rebuild each layer at its (bits, clip): float weights kept, scale clip * max|w| / (2^(bits-1) - 1)
    per output channel (the grid its errors were measured on); fine-tuning then learns the scales on."""
    layers = dict(weight_layers(model))
    for name, (bits, _) in chosen.items():
        set_module(model, name, rebuild_with_bits(layers[name], bits))  # every one: fresh max-|w| scales
    init_weight_scales(model)
    layers = dict(weight_layers(model))
    with torch.no_grad():
        for name, (_, clip) in chosen.items():
            if clip != 1.0:
                layers[name].weight_quant.tensor_quant.scaling_impl.value.mul_(clip)


def summary_line(record: dict[str, Any]) -> str:
    """One line for the terminal: the bits chosen and the bytes against the budget."""
    bits = ", ".join(f"{r['name']} {r['bits']}" for r in record["layers"])
    return (f"bits auto: {bits}; {format_size(record['bytes'])} of the {format_size(record['budget'])} budget "
            f"(after {record['pretrain']['epochs']} epoch(s) at {BASELINE_BITS} bits)")
