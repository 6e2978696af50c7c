"""Attacks: one module, one class; `attack(model, x, y) -> x_adv`, L-inf, in [0, 1] image units.

Used by training (adversarial objectives, every batch) and by `rcdeploy bench` (a differentiable
twin of an ONNX file, or onnxruntime itself for Square). Names on the command line:
`fgsm`, `ifgsmN`, `pgdN`, `cwN`, `apgd-ceN`, `apgd-tN` (N steps) and `squareN` (N queries), and
presets that expand to a list (`autoattack-fast`).
"""

from __future__ import annotations

import re

from rcdeploy.attacks.apgd import APGD, APGDCE, APGDT
from rcdeploy.attacks.base import ATTACKS, DEFAULT_STEP_FRACTION, Attack, Model, attack_mode, margin
from rcdeploy.attacks.cw import CW
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
    "FGSM",
    "IFGSM",
    "PGD",
    "Attack",
    "Model",
    "PRESETS",
    "Square",
    "attack_mode",
    "attack_names",
    "margin",
    "parse_attack",
    "parse_attacks",
]

# Named attack lists, expanded where a comma list is parsed (so bench, training and the API agree).
PRESETS = {"autoattack-fast": "apgd-ce50,apgd-t50,square1000"}
_FORMS = ("fgsm, ifgsmN, pgdN, cwN, apgd-ceN, apgd-tN (N steps), squareN (N queries), autoattack-fast; "
          "e.g. ifgsm20,pgd20,square1000")
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
    """One attack from its name, e.g. `pgd10` (10 steps) or `square1000` (1000 queries).

    step: None keeps the family's default (eps * DEFAULT_STEP_FRACTION for ifgsm/pgd/cw); FGSM's
    step is eps and Square's is its vertex value, so both ignore it. restarts only reach the
    randomized families (pgd, cw, square, apgd): FGSM and IFGSM would repeat the same run.
    """
    text = spec.strip().lower()
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
