"""Channel tracing and physical channel removal: the shrunk model computes what the masked one did."""

from __future__ import annotations

import brevitas.nn as qnn
import pytest
import torch
from torch import nn

from rcdeploy.errors import UsageError
from rcdeploy.export.shrink import keep_indices, shrink_model, zero_channels
from rcdeploy.models import create_model
from rcdeploy.models.channels import ChannelTraceError, channel_groups, trace_channels
from rcdeploy.quant.calibrate import calibrate_activations
from rcdeploy.quant.spec import QuantSpec

# (model, constructor kwargs, input size): widths and inputs as small as the architectures allow
MODELS = [
    ("small_cnn", {"width": 0.5}, 8),
    ("resnet20", {"width": 0.5}, 16),
    ("preact_resnet18", {"width": 0.25}, 16),
    ("mobilenetv2", {"width": 0.25}, 8),
]


def build(name: str, kwargs: dict, size: int, bits: int, seed: int = 0) -> nn.Module:
    """A calibrated model with random BN statistics and affine parameters (so no BN is an identity)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3,
                         quant=QuantSpec(bits=bits, act_bits=8 if bits == 1 else bits), input_size=size, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    calibrate_activations(model, [torch.rand(16, 3, size, size) for _ in range(2)])
    return model.eval()


def run_with_acts(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the output of every quantized activation."""
    acts: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: acts.__setitem__(n, o))
             for n, m in model.named_modules() if isinstance(m, (qnn.QuantReLU, qnn.QuantIdentity))]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    return y, acts


def independent_counts(model: nn.Module, size: int) -> tuple[int, int]:
    """Params (conv/linear/BN weight+bias) and MACs counted from the module shapes with a real forward."""
    params = macs = 0
    out_hw: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: out_hw.__setitem__(n, tuple(o.shape[-2:])))
             for n, m in model.named_modules() if isinstance(m, qnn.QuantConv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    for n, m in model.named_modules():
        if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear, nn.BatchNorm2d)):
            params += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        if isinstance(m, qnn.QuantConv2d):
            h, w = out_hw[n]
            macs += h * w * m.weight.numel()
        elif isinstance(m, qnn.QuantLinear):
            macs += m.weight.numel()
    return params, macs


@pytest.mark.parametrize("bits", [32, 4], ids=["float", "int4"])
@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=[m[0] for m in MODELS])
def test_random_masks_shrink_to_identical_outputs(name, kwargs, size, bits):
    model = build(name, kwargs, size, bits)
    graph = trace_channels(model)
    groups = graph.prunable()
    coupled = [g for g in groups if len(g.producers) > 1]
    assert bool(coupled) == (name != "small_cnn"), "residual / depthwise models have coupled groups"
    gen = torch.Generator().manual_seed(1)
    masks = {g.index: torch.rand(g.size, generator=gen) < 0.5 for g in groups}
    zero_channels(model, masks, graph)
    # Channels zeroed on only some producers of a coupled group: they still carry values and must stay.
    partial: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for g in coupled:
            live = (~masks[g.index]).nonzero().flatten()[:2]
            p = g.producers[0]
            model.get_submodule(p.name).weight[live] = 0
            if p.bn is not None:
                model.get_submodule(p.bn).weight[live] = 0
                model.get_submodule(p.bn).bias[live] = 0
            partial[g.index] = live
    for g in groups:
        alive = g.alive(model)
        assert torch.equal(alive, ~masks[g.index]), g.label
        assert alive[partial.get(g.index, torch.tensor([], dtype=torch.long))].all()

    small, report = shrink_model(model, input_shape=(3, size, size))
    small.eval()
    keeps = [keep_indices(model, g) if g.prunable else torch.arange(g.size) for g in graph.groups]
    assert report.channels_after == sum(int((~masks[g.index]).sum()) for g in groups)
    assert report.channels_after < report.channels_before

    x = torch.rand(64, 3, size, size, generator=gen)
    y_ref, acts_ref = run_with_acts(model, x)
    y, acts = run_with_acts(small, x)
    assert (y - y_ref).abs().max().item() <= 1e-5
    assert torch.equal(y.argmax(1), y_ref.argmax(1))
    if bits != 32:
        # Identical integer outputs: every quantized activation (kept channels) holds the same codes, and
        # removed channels were exactly zero.
        for n, a_ref in acts_ref.items():
            keep = keeps[graph.outputs[n]]
            dead = torch.ones(a_ref.shape[1], dtype=torch.bool)
            dead[keep] = False
            assert torch.equal(acts[n], a_ref[:, keep]), n
            assert (a_ref[:, dead] == 0).all(), n
        # ... and the classifier's integer accumulators (int inputs x int weights) are identical.
        fc_ref, fc = model.head.fc, small.head.fc
        head_in = graph.layers["head.fc"].in_group
        q_in_ref = torch.round(acts_ref["head.quant"].flatten(1) / model.head.quant.act_quant.scale()).long()
        q_in = torch.round(acts["head.quant"].flatten(1) / small.head.quant.act_quant.scale()).long()
        acc_ref = q_in_ref @ fc_ref.quant_weight().int().long().t()
        acc = q_in @ fc.quant_weight().int().long().t()
        assert torch.equal(acc, acc_ref)
        assert torch.equal(fc.quant_weight().scale, fc_ref.quant_weight().scale)
        assert len(keeps[head_in]) == fc.in_features

    params, macs = independent_counts(small, size)
    assert report.params_after == params
    assert report.macs_after == macs
    params0, macs0 = independent_counts(model, size)
    assert (report.params_before, report.macs_before) == (params0, macs0)
    assert report.params_after < report.params_before and report.macs_after < report.macs_before


def test_per_channel_weight_scales_are_sliced_not_recomputed():
    model = build("resnet20", {"width": 0.5}, 16, bits=4)
    graph = trace_channels(model)
    g = graph.group_of("blocks.0.conv1.0")
    zero_channels(model, {g.index: [0, 3]}, graph)
    producer, consumer = model.get_submodule("blocks.0.conv1.0"), model.get_submodule("blocks.0.conv2.0")
    # Learned scales that no statistic of the weights would reproduce: recomputing them would show.
    with torch.no_grad():
        for layer, f in ((producer, 1.3), (consumer, 1.7)):
            layer.weight_quant.tensor_quant.scaling_impl.value.mul_(f)
    small, _ = shrink_model(model)
    keep = [c for c in range(g.size) if c not in (0, 3)]
    s_prod = small.get_submodule("blocks.0.conv1.0").quant_weight().scale
    s_cons = small.get_submodule("blocks.0.conv2.0").quant_weight().scale
    assert s_prod.shape[0] == len(keep) and torch.equal(s_prod, producer.quant_weight().scale[keep])
    assert torch.equal(s_cons, consumer.quant_weight().scale)
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max().item() <= 1e-5


def test_report_totals_hand_checked():
    """small_cnn width 1/8 (4-8-16 channels) on 1x8x8 inputs, figures worked out by hand."""
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_chans=1, mean=(0.5,), std=(0.25,),
                         quant=QuantSpec(bits=32, act_bits=32), input_size=8, width=0.125).eval()
    zero_channels(model, {"features.0.0": [0], "features.1.0": [1, 2, 3], "features.3.0": list(range(8))})
    small, report = shrink_model(model, input_shape=(1, 8, 8))
    # before: conv 1->4 (36 w, 8*8*4*9 MACs), bn 4 (8), conv 4->8 (288, 64*8*4*9), bn 8 (16),
    # pool to 4x4, conv 8->16 (1152, 16*16*8*9), bn 16 (32), fc 16->10 (160 + 10 bias, 160 MACs)
    assert report.params_before == 36 + 8 + 288 + 16 + 1152 + 32 + 170 == 1702
    assert report.macs_before == 2304 + 18432 + 18432 + 160 == 39328
    # after: 3, 5 and 8 channels: conv 1->3 (27, 64*3*9), bn (6), conv 3->5 (135, 64*5*3*9), bn (10),
    # conv 5->8 (360, 16*8*5*9), bn (16), fc 8->10 (80 + 10)
    assert report.params_after == 27 + 6 + 135 + 10 + 360 + 16 + 90 == 644
    assert report.macs_after == 1728 + 8640 + 5760 + 80 == 16208
    assert (report.channels_before, report.channels_after) == (28, 16)
    rows = {r.name: r for r in report.layers}
    assert (rows["features.1.0"].in_after, rows["features.1.0"].out_after) == (3, 5)
    assert (rows["head.fc"].in_after, rows["head.fc"].out_after) == (8, 10)
    d = report.to_dict()
    assert d["totals"]["macs_after"] == 16208 and len(d["layers"]) == 7
    assert "16,208" in _render(report)
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max().item() <= 1e-5

    # Kept counts rounded up to a multiple of 4 by keeping dead channels: still the same outputs.
    small4, report4 = shrink_model(model, channel_multiple=4, input_shape=(1, 8, 8))
    rows4 = {r.name: r for r in report4.layers}
    assert [rows4[n].out_after for n in ("features.0.0", "features.1.0", "features.3.0")] == [4, 8, 8]
    with torch.no_grad():
        assert (small4(x) - model(x)).abs().max().item() <= 1e-5


def _render(report) -> str:
    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(report)
    return console.export_text()


def test_preact_consumer_bn_must_be_zeroed_too():
    """PreAct: a residual channel zero on every producer still becomes beta - gamma*mu/sigma after the next
    block's BN; it is removable only once those BNs are zeroed as well."""
    model = build("preact_resnet18", {"width": 0.25}, 16, bits=32)
    graph = trace_channels(model)
    g = graph.group_of("stem.1")
    assert all(p.bn is None for p in g.producers) and g.bns == ["blocks.0.bn1", "blocks.1.bn1", "blocks.2.bn1"]
    with torch.no_grad():
        for p in g.producers:
            model.get_submodule(p.name).weight[5] = 0
    assert g.alive(model)[5]
    small, report = shrink_model(model)
    assert report.channels_after == report.channels_before  # nothing removable yet
    zero_channels(model, {"stem.1": [5]}, graph)
    assert not g.alive(model)[5]
    small, report = shrink_model(model)
    assert report.channels_after == report.channels_before - 1
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max().item() <= 1e-5


def test_binary_producer_without_bn_is_never_removable():
    """A binary quantizer maps a zero row to +-scale: PreAct's residual producers (no BN of their own) at
    1 bit can never zero a channel, while conv->BN channels still can."""
    model = build("preact_resnet18", {"width": 0.25}, 16, bits=1)
    graph = trace_channels(model)
    residual, inner = graph.group_of("stem.1"), graph.group_of("blocks.0.conv1")
    zero_channels(model, {residual.index: [0, 1], inner.index: [0, 1]}, graph)
    assert residual.alive(model).all()
    assert not inner.alive(model)[:2].any()
    small, report = shrink_model(model)
    assert report.channels_after == report.channels_before - 2
    x = torch.rand(16, 3, 16, 16)
    y_ref, acts_ref = run_with_acts(model, x)
    y, acts = run_with_acts(small, x)
    assert (y - y_ref).abs().max().item() <= 1e-5
    assert torch.equal(acts["blocks.0.relu2"], acts_ref["blocks.0.relu2"][:, 2:])


class _Mul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        q = QuantSpec(bits=32, act_bits=32)
        self.conv = q.conv(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = q.linear(8, 2)

    def forward(self, x):
        y = self.bn(self.conv(x)) * 2  # an op the tracer does not know: may rescale channels
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


class _PlainConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x)


def test_unknown_ops_are_refused_naming_the_node():
    with pytest.raises(ChannelTraceError, match="node 'mul'"):
        channel_groups(_Mul())
    with pytest.raises(ChannelTraceError, match="unknown module type Conv2d"):
        shrink_model(_PlainConv())
    assert issubclass(ChannelTraceError, UsageError)


def test_groups_of_known_architectures():
    """The coupling the tracer finds, checked against the architectures' definitions."""
    q = QuantSpec(bits=32, act_bits=32)
    kw = dict(num_classes=10, in_chans=3, mean=(0.5,) * 3, std=(0.25,) * 3, quant=q)
    resnet = trace_channels(create_model("resnet20", width=0.5, **kw))
    stage1 = resnet.group_of("stem.1.0")
    assert [p.name for p in stage1.producers] == ["stem.1.0"] + [f"blocks.{i}.conv2.0" for i in range(3)]
    assert "blocks.3.shortcut.0" in stage1.consumers
    assert len(resnet.prunable()) == 12 and not resnet.groups[0].prunable  # 3 residual + 9 inner groups
    mbv2 = trace_channels(create_model("mobilenetv2", width=0.25, **kw))
    hidden = mbv2.group_of("features.1.conv.0.0")
    assert [(p.name, p.depthwise) for p in hidden.producers] == [("features.1.conv.0.0", False),
                                                                  ("features.1.conv.1.0", True)]
    assert hidden.consumers == ["features.1.conv.2.0"]
    assert mbv2.layers["features.1.conv.1.0"].in_group == mbv2.layers["features.1.conv.1.0"].out_group
    out = mbv2.groups[mbv2.layers["head.fc"].out_group]
    assert not out.prunable and out.reason == "network output"
