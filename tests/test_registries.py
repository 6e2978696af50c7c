"""The name registries (`rcdeploy.names`): declarations and implementations stay in step, the CLI and the
recipe checks read them without importing any implementation, and every declared name works."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys

import pytest
import torch

from rcdeploy import names as N
from rcdeploy.errors import UsageError
from rcdeploy.registry import Registry

DECLARATIONS = [(key, d) for key, reg in N.ALL.items() for d in reg.declarations()]
HEAVY = ("torch", "brevitas", "onnx", "onnxruntime", "openvino")


# --------------------------------------------------------------------------------- no drift
@pytest.mark.parametrize("key, decl", [(k, d) for k, d in DECLARATIONS if d.target],
                         ids=[f"{k}:{d.name}" for k, d in DECLARATIONS if d.target])
def test_every_declaration_resolves_to_what_it_names(key, decl):
    registry = N.ALL[key]
    module = importlib.import_module(decl.module)
    assert registry.get(decl.name) is getattr(module, decl.attr)


def _implementing_modules() -> None:
    for decl in (d for _, d in DECLARATIONS if d.target):
        importlib.import_module(decl.module)


@pytest.mark.parametrize("key", list(N.ALL))
def test_every_registered_implementation_is_declared(key):
    _implementing_modules()
    registry = N.ALL[key]
    declared = {d.name for d in registry.declarations()}
    assert set(registry.registered()) <= declared, "declare new entries in rcdeploy/names.py"
    assert registry.names() == [d.name for d in registry.declarations()]


def test_every_sparsity_class_is_registered_with_its_kind():
    from rcdeploy.train.sparsity import Sparsity
    from rcdeploy.train.unstructured import UNSTRUCTURED, _Unstructured

    def subclasses(cls: type) -> set[type]:
        return {c for s in cls.__subclasses__() for c in {s, *subclasses(s)}}

    concrete = {c for c in subclasses(Sparsity) if not c.__name__.startswith("_")
                and c.__module__.startswith("rcdeploy.")}
    assert concrete == {N.SPARSITY.get(n) for n in N.SPARSITY.names()}
    assert {d.kind for d in N.SPARSITY.declarations()} == {N.CHANNELS, N.WEIGHTS}
    for name in N.SPARSITY.names():
        weights = N.SPARSITY.declaration(name).kind == N.WEIGHTS
        assert issubclass(N.SPARSITY.get(name), _Unstructured) == weights, name
    assert UNSTRUCTURED == tuple(N.SPARSITY.names(kind=N.WEIGHTS))


def test_name_tuples_elsewhere_read_the_registries():
    from rcdeploy.export import api, qdq
    from rcdeploy.runtime import cpu, session

    assert api.FORMATS == tuple(N.EXPORT_FORMATS.names())
    assert qdq.STORAGES == tuple(N.STORAGES.names())
    assert cpu.ISAS == tuple(N.ISAS.names())
    assert session.RUNTIMES == tuple(N.RUNTIMES.names())
    assert list(session.TARGETS) == N.TARGETS.names()
    assert all(session.TARGETS[n].name == n for n in N.TARGETS.names())


# ----------------------------------------------------------------------- light and read by the CLI
def test_cli_and_names_import_nothing_heavy():
    code = ("import sys, rcdeploy.cli, rcdeploy.config, rcdeploy.names; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_choices_and_help_come_from_the_registries():
    from click.testing import CliRunner

    from rcdeploy.cli import cli

    def param(command: str, name: str):
        return next(p for p in cli.commands[command].params if p.name == name)

    assert list(param("bench", "target").type.choices) == N.TARGETS.names()
    assert list(param("inspect", "target").type.choices) == N.TARGETS.names()
    assert list(param("export", "storage").type.choices) == N.STORAGES.names()
    run = CliRunner()
    text = {c: " ".join(run.invoke(cli, [c, "--help"], terminal_width=200).output.split()) for c in cli.commands}
    for registry in (N.OBJECTIVES, N.SPARSITY, N.QUANT_METHODS, N.SCHEDULES, N.OPTIMIZERS):
        assert all(n in text["train"] for n in registry.names()), registry.kind
    channels, weights = ", ".join(N.SPARSITY.names(kind=N.CHANNELS)), ", ".join(N.SPARSITY.names(kind=N.WEIGHTS))
    assert f"{channels} (channels); {weights} (weights)" in text["train"]
    assert f"Comma list of {', '.join(N.EXPORT_FORMATS.names())}, or all" in text["export"]
    for registry in (N.TARGETS, N.ISAS, N.RUNTIMES):
        assert all(n in text["bench"] for n in registry.names()), registry.kind


# ------------------------------------------------------------------ config validates against them
@pytest.mark.parametrize("field, registry", [("adv", N.OBJECTIVES), ("quant_method", N.QUANT_METHODS),
                                             ("schedule", N.SCHEDULES), ("optimizer", N.OPTIMIZERS)])
def test_config_accepts_every_declared_name_and_lists_them_for_others(field, registry):
    from rcdeploy.config import make_config

    for name in registry.names():
        assert getattr(make_config(None, {field: name}), field) == name
    with pytest.raises(UsageError, match=f"unknown {registry.kind} 'nonesuch'; known: {', '.join(registry.names())}$"):
        make_config(None, {field: "nonesuch"})


# ------------------------------------------------------------------ every declared name works
@pytest.fixture(scope="module")
def tiny():
    from rcdeploy.models import create_model
    from rcdeploy.quant.calibrate import calibrate_activations
    from rcdeploy.quant.spec import QuantSpec

    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 10
    model = create_model("small_cnn", num_classes=10, in_chans=1, mean=(0.3,), std=(0.4,),
                         quant=QuantSpec(bits=4), input_size=8, width=0.5)
    calibrate_activations(model, [x])
    return model, x, y


@pytest.mark.parametrize("name", N.OBJECTIVES.names())
def test_every_objective_trains_a_step(name, tiny):
    from rcdeploy.train.objectives import AdvSettings

    model, x, y = tiny
    model.train()
    model.zero_grad()
    # distillation needs a teacher: a frozen copy of the student stands in (the loss still has the CE term)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if name == "ard" else None
    settings = AdvSettings(0.1, 2, 0.05, 6.0, teacher=teacher)
    loss, logits = N.OBJECTIVES.get(name)(model, x, y, settings, torch.Generator())
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (16, 10)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", N.SPARSITY.names())
def test_every_sparsity_method_builds(name, tiny):
    from rcdeploy.train.sparsity import create_sparsity

    model, *_ = tiny
    sp = create_sparsity(name, model, target=0.5, epochs=4)
    assert sp.stats(model)["method"] == name


def test_every_quant_method_and_schedule_and_optimizer_is_implemented(tiny):
    from rcdeploy.config import TrainConfig
    from rcdeploy.train.loop import lr_at, make_optimizer

    model, *_ = tiny
    assert N.QUANT_METHODS.get("qat") is None  # the plain Brevitas forward: nothing to build
    assert N.QUANT_METHODS.get("binary-relax")(model, epochs=4).name == "binary-relax"
    curves = {s: tuple(lr_at(TrainConfig(schedule=s, epochs=4), p) for p in (0.5, 2.5, 3.5)) for s in N.SCHEDULES}
    assert len(set(curves.values())) == len(curves)  # each schedule is its own curve, none falls through
    kinds = {type(make_optimizer(TrainConfig(optimizer=o), model)) for o in N.OPTIMIZERS}
    assert len(kinds) == len(N.OPTIMIZERS.names())


# ----------------------------------------------------------------------- the registry itself
def test_declared_names_are_known_before_import_and_resolved_on_first_use():
    reg: Registry[object] = Registry("widget", ordered=True)
    reg.declare("b", "json:dumps", kind="x", help="dumps")
    reg.declare("a", None)
    assert reg.names() == ["b", "a"] and reg.names(kind="x") == ["b"] and "a" in reg
    assert reg.registered() == []  # nothing imported yet
    assert reg.check("b") == "b" and reg.get("a") is None
    assert reg["b"] is importlib.import_module("json").dumps and reg.registered() == ["b"]
    with pytest.raises(UsageError, match="unknown widget 'c'; known: b, a$"):
        reg.get("c")
    with pytest.raises(ValueError, match="declared twice"):
        reg.declare("a")
    with pytest.raises(ValueError, match="module:attr"):
        reg.declare("d", "json")
    assert Registry("thing").names() == []
