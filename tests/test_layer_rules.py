"""One rule per layer type: every registered rule is used by the channel tracer, shrink and the integer
writer, and a module type without a rule is refused by all three with their own messages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from brevitas import nn as qnn
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.export.qdq import build_qdq
from rcdeploy.export.shrink import shrink_model, zero_channels
from rcdeploy.models.channels import ChannelTraceError, trace_channels
from rcdeploy.models.common import Normalize
from rcdeploy.models.layer_rules import LAYER_RULES, LayerRule, rule_for
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.spec import QuantSpec

C = 4  # channels of the body
SHAPE = (1, 8, 8)


class Net(nn.Module):
    """normalize -> quantize -> conv/BN/QuantReLU -> [mid] -> pool -> quantize -> flatten -> linear.
    Every rule's type appears in it once one of `mid`, `pool`, `flatten` is chosen."""

    def __init__(self, mid: nn.Module | None = None, pool: nn.Module | None = None,
                 flatten: nn.Module | None = None) -> None:
        super().__init__()
        q = QuantSpec(bits=4)
        self.norm = Normalize((0.5,), (0.25,))
        self.quant_in = q.act_signed()
        self.conv = q.conv(1, C, 3)
        self.bn = nn.BatchNorm2d(C)
        self.relu = q.relu()
        self.mid = mid
        self.pool = pool or nn.AdaptiveAvgPool2d(1)
        self.quant_out = q.act_unsigned()
        self.flatten = flatten
        self.fc = q.linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(self.quant_in(self.norm(x)))))
        if self.mid is not None:
            x = self.mid(x)
        x = self.quant_out(self.pool(x))
        x = self.flatten(x) if self.flatten is not None else torch.flatten(x, 1)
        return self.fc(x)


# A model holding each registered type: a new rule adds its line here (test_every_rule_has_a_sample).
SAMPLES: dict[type[nn.Module], Callable[[], Net]] = {
    qnn.QuantConv2d: lambda: Net(mid=QuantSpec(bits=4).conv(C, C, 3)),
    qnn.QuantLinear: Net,
    qnn.QuantReLU: Net,
    qnn.QuantIdentity: Net,
    nn.BatchNorm2d: Net,
    Normalize: Net,
    nn.ReLU: lambda: Net(mid=nn.ReLU()),
    nn.ReLU6: lambda: Net(mid=nn.ReLU6()),
    nn.Dropout: lambda: Net(mid=nn.Dropout()),
    nn.Identity: lambda: Net(mid=nn.Identity()),
    nn.MaxPool2d: lambda: Net(mid=nn.MaxPool2d(2)),
    nn.AvgPool2d: lambda: Net(mid=nn.AvgPool2d(2)),
    nn.AdaptiveAvgPool2d: Net,
    nn.AdaptiveMaxPool2d: lambda: Net(pool=nn.AdaptiveMaxPool2d(1)),
    nn.Flatten: lambda: Net(flatten=nn.Flatten()),
}


def calibrated(net: Net) -> Net:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    calibrate_activations(net, [torch.rand(16, *SHAPE) for _ in range(2)])
    return net.eval()


class Spy:
    """Counts the calls of one method of one rule instance (the instance attribute shadows the class's)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, rule: LayerRule, method: str) -> None:
        self.calls = 0
        real = getattr(rule, method)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(rule, method, counted, raising=False)


def maps_to_integers(rule: LayerRule) -> bool:
    return type(rule).emit is not LayerRule.emit


def test_every_rule_has_a_sample() -> None:
    assert set(SAMPLES) == set(LAYER_RULES)


@pytest.mark.parametrize("layer_type", list(SAMPLES), ids=lambda t: t.__name__)
def test_rule_is_used_by_tracer_shrink_and_writer(layer_type: type[nn.Module], monkeypatch) -> None:
    rule = LAYER_RULES[layer_type]
    model = calibrated(SAMPLES[layer_type]())
    assert any(rule_for(m) is rule for m in model.modules())
    spies = {method: Spy(monkeypatch, rule, method) for method in ("channels", "slice", "emit")}

    graph = trace_channels(model)
    assert spies["channels"].calls >= 1
    assert graph.group_of("conv").prunable

    zero_channels(model, {"conv": [0]}, graph)
    small, report = shrink_model(model, input_shape=SHAPE)
    assert (spies["slice"].calls >= 1) == rule.indexed
    assert report.channels_after < report.channels_before
    x = torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x))

    if maps_to_integers(rule):
        build_qdq(model, SHAPE)
        assert spies["emit"].calls >= 1
    else:  # the tracer passes it through, the integer graph has no mapping: refused like an unknown type
        with pytest.raises(UsageError, match=rf"\({layer_type.__name__}\) has no integer-ONNX mapping"):
            build_qdq(model, SHAPE)
        assert spies["emit"].calls == 1


def test_unknown_layer_type_is_refused_by_each_consumer() -> None:
    model = calibrated(Net(mid=nn.Tanh()))
    assert rule_for(model.mid) is None
    message = r"node 'mid' \(call_module mid\): unknown module type Tanh"
    with pytest.raises(ChannelTraceError, match=message):
        trace_channels(model)
    with pytest.raises(ChannelTraceError, match=message):
        shrink_model(model)
    with pytest.raises(UsageError, match=r"module mid \(Tanh\) has no integer-ONNX mapping; export with --format qonnx"):
        build_qdq(model, SHAPE)


def test_a_subclass_finds_its_parents_rule() -> None:
    class MyReLU(qnn.QuantReLU):
        pass

    assert rule_for(MyReLU()) is LAYER_RULES[qnn.QuantReLU]
