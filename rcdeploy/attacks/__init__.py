"""Attacks: one module, one class; `attack(model, x, y) -> x_adv`, L-inf, in [0, 1] image units.

Used by training (adversarial objectives, every batch) and by `rcdeploy bench` (a differentiable
twin of an ONNX file, or onnxruntime itself for Square). Names on the command line:
`fgsm`, `ifgsmN`, `pgdN`, `cwN`, `apgd-ceN`, `apgd-tN`, `fab-tN` (N steps) and `squareN` (N queries);
a white-box name + `@smooth` asks the caller for the smooth surrogate as the model (bench has it);
presets expand to a list (`autoattack`, `autoattack-fast`).
"""

from __future__ import annotations

import re
from typing import Any

from rcdeploy.attacks.apgd import APGD, APGDCE, APGDT
from rcdeploy.attacks.base import ATTACKS, DEFAULT_STEP_FRACTION, Attack, Model, attack_mode, margin
from rcdeploy.attacks.cw import CW
from rcdeploy.attacks.fab import FABT
from rcdeploy.attacks.fgsm import FGSM
from rcdeploy.attacks.ifgsm import IFGSM
from rcdeploy.attacks.pgd import PGD
from rcdeploy.attacks.square import Square
from rcdeploy.errors import UsageError

__all__ = [
    "APGD",
    "APGDCE",
    "APGDT",
    "ATTACKS",
    "CW",
    "DEFAULT_STEP_FRACTION",
    "FABT",
    "FGSM",
    "IFGSM",
    "PGD",
    "Attack",
    "Model",
    "GRADIENT_SOURCES",
    "PRESETS",
    "Square",
    "attack_mode",
    "attack_names",
    "margin",
    "parse_attack",
    "parse_attacks",
]

# Named attack lists, expanded where a comma list is parsed (so bench, training and the API agree).
# AutoAttack's standard set (Croce & Hein 2020: APGD-CE, APGD-T with 9 targets, FAB-T, Square 5000),
# each white-box attack run on both gradient sources; the fast one for CI-sized checks. The order is
# AutoAttack's: reports credit each image to the first attack in it that broke the image.
PRESETS = {
    "autoattack": "apgd-ce100,apgd-ce100@smooth,apgd-t100,apgd-t100@smooth,fab-t100,fab-t100@smooth,square5000",
    "autoattack-fast": "apgd-ce50,apgd-ce50@smooth,apgd-t50,square1000",
}
#: Where white-box attacks take gradients: the straight-through twin of the graph (rounding forward,
#: identity backward) or its smooth surrogate (no rounding: BPDA-style transfer to the real graph).
GRADIENT_SOURCES = ("ste", "smooth")
_FORMS = ("fgsm, ifgsmN, pgdN, cwN, apgd-ceN, apgd-tN, fab-tN (N steps), squareN (N queries), a white-box name + "
          "'@smooth' (gradients of the smooth surrogate), presets autoattack, autoattack-fast; "
          "e.g. ifgsm20,pgd20,apgd-ce50@smooth,square1000")
_SPEC = re.compile(r"([a-z]+(?:-[a-z]+)?)(\d*)")  # family (letters, one optional -suffix), then the count


def attack_names() -> list[str]:
    """The name forms, for CLI help: `fgsm`, `ifgsmN`, ..."""
    return [name if not ATTACKS.get(name).counted else f"{name}N" for name in ATTACKS.names()]


def parse_attack(
    spec: str,
    *,
    eps: float,
    step: float | None = None,
    restarts: int = 1,
    eot: int = 1,
    seed: int | None = None,
) -> Attack:
    """One attack from its name, e.g. `pgd10` (10 steps), `square1000` (1000 queries) or `apgd-ce100@smooth`
    (the suffix names the gradient source, GRADIENT_SOURCES; the caller hands the attack that model).

    step: None keeps the family's default (eps * DEFAULT_STEP_FRACTION for ifgsm/pgd/cw); FGSM's
    step is eps and Square's is its vertex value, so both ignore it. restarts only reach the
    randomized families (pgd, cw, square, apgd): FGSM and IFGSM would repeat the same run.
    """
    text, at, source = spec.strip().lower().partition("@")
    source = source if at else "ste"
    if source not in GRADIENT_SOURCES:
        raise UsageError(f"attack {spec!r}: unknown gradient source {source!r}; write NAME@smooth for the smooth "
                         f"surrogate, or NAME alone for the straight-through twin (known: {', '.join(GRADIENT_SOURCES)})")
    attack = _parse_family(spec, text, eps=eps, step=step, restarts=restarts, eot=eot, seed=seed)
    if source != "ste" and attack.black_box:
        raise UsageError(f"attack {spec!r}: {attack.family} queries outputs only and takes no gradients; "
                         f"drop '@{source}'")
    attack.gradients = source
    return attack


def _parse_family(spec: str, text: str, **kw: Any) -> Attack:
    """The attack a name without its gradient source names (`pgd10`, `square1000`)."""
    eps, step, restarts, eot, seed = kw["eps"], kw["step"], kw["restarts"], kw["eot"], kw["seed"]
    match = _SPEC.fullmatch(text)
    if match is None or match[1] not in ATTACKS:
        raise UsageError(f"unknown attack {spec!r}; known forms: {_FORMS}")
    family, digits = match[1], match[2]
    cls = ATTACKS.get(family)
    if not cls.counted:
        if digits:
            raise UsageError(f"attack {spec!r} takes no number; write {family!r} (known forms: {_FORMS})")
        return cls(eps, restarts=1, eot=eot, seed=seed)
    if not digits or int(digits) < 1:
        unit = "queries" if family == "square" else "steps"
        raise UsageError(f"attack {spec!r} needs its number of {unit} >= 1, e.g. {family}20 (known forms: {_FORMS})")
    if not cls.uses_step:  # square (queries) and apgd (its own schedule) take no step
        return cls(eps, int(digits), restarts=restarts, eot=eot, seed=seed)
    if family == "ifgsm":
        restarts = 1
    return cls(eps, step, int(digits), restarts=restarts, eot=eot, seed=seed)


def parse_attacks(
    specs: str,
    *,
    eps: float,
    step: float | None = None,
    restarts: int = 1,
    eot: int = 1,
    seed: int | None = None,
) -> list[Attack]:
    """Comma-separated names, e.g. `ifgsm20,pgd20,square1000`, each parsed by `parse_attack`; a preset
    name (`autoattack-fast`) stands for its list."""
    names = [n for s in specs.split(",") if s.strip() for n in PRESETS.get(s.strip().lower(), s).split(",")]
    if not names:
        raise UsageError(f"no attack named in {specs!r}; known forms: {_FORMS}")
    return [parse_attack(s, eps=eps, step=step, restarts=restarts, eot=eot, seed=seed) for s in names]
