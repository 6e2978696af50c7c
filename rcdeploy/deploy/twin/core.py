"""`OnnxTwin`: parses the graph, folds its constants, and runs the live nodes through the op registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

# The op families register their ops on import: every op must be known before a graph is parsed.
from rcdeploy.deploy.twin import conv_pool, linalg_elementwise, noise_ops, qoperator, quantization, shape_ops  # noqa: F401
from rcdeploy.deploy.twin.registry import _OPS, _STD, _Node
from rcdeploy.deploy.twin.saturation import _IntWeight, _qdq_saturating_nodes, _QdqSaturation
from rcdeploy.deploy.twin.tensors import _tensor_from_proto
from rcdeploy.errors import UsageError
from rcdeploy.runtime.cpu import resolve_isa
from rcdeploy.runtime.session import load_model_proto

# Ops whose output is not a function of their inputs: never folded into constants.
_NO_FOLD = {"RandomNormalLike", "RandomUniformLike"}


def _topological(nodes: list[_Node], available: set[str]) -> list[_Node]:
    """Nodes in an order where every input is produced first (Kahn's algorithm, stable)."""
    producers = {o: i for i, n in enumerate(nodes) for o in n.outputs if o}
    deps = [{producers[x] for x in n.inputs if x and x in producers and x not in available} for n in nodes]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    ready = [i for i, d in enumerate(deps) if not d]
    order: list[int] = []
    remaining = [len(d) for d in deps]
    while ready:
        i = ready.pop(0)
        order.append(i)
        for u in users.get(i, []):
            remaining[u] -= 1
            if remaining[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise UsageError("the ONNX graph has a cycle; it is not a valid model")
    return [nodes[i] for i in order]


def _single_input(graph: onnx.GraphProto, consts: dict[str, torch.Tensor]) -> str:
    inputs = [vi.name for vi in graph.input if vi.name not in consts]
    if len(inputs) != 1:
        raise UsageError(
            f"the twin takes models with exactly one input; this one has {len(inputs)}: {inputs}"
        )
    return inputs[0]


def _parse_node(n: onnx.NodeProto) -> _Node:
    """One graph node, refused here when no op family registered its type."""
    node = _Node(
        n.name,
        n.op_type,
        "" if n.domain in ("", "ai.onnx") else n.domain,
        list(n.input),
        list(n.output),
        {a.name: helper.get_attribute_value(a) for a in n.attribute},
    )
    if (node.domain, node.op) not in _OPS:
        where = f"{node.domain}:{node.op}" if node.domain else node.op
        raise UsageError(
            f"op {where} (node {n.name!r}) is not supported by the differentiable twin "
            f"(it interprets the {len(_OPS)} ops listed by rcdeploy.deploy.twin.supported_ops())"
        )
    return node


def _checked_nodes(graph: onnx.GraphProto, available: set[str]) -> list[_Node]:
    """The graph's nodes, each of a supported op, in an order where every input is produced first."""
    nodes = _topological([_parse_node(n) for n in graph.node], available)
    known = available | {o for n in nodes for o in n.outputs}
    for node in nodes:
        missing = [x for x in node.inputs if x and x not in known]
        if missing:
            raise UsageError(
                f"{node.where()} reads {missing[0]!r}, which no node, input or initializer provides"
            )
    return nodes


class OnnxTwin(nn.Module):
    """A torch module that computes what onnxruntime computes for an ONNX classifier.

    Takes one float input (any batch size, on any device the module is moved to) and returns
    the first graph output, differentiable with respect to the input. Initializers and folded
    constants are buffers. `ste` selects straight-through rounding in QuantizeLinear (see the
    module docstring); `noise=False` replaces RandomNormalLike / RandomUniformLike by their
    mean, for a deterministic twin of a noise-injecting model.

    `smooth=True` builds the smooth surrogate instead: the same graph and the weights as stored
    (constants are folded with exact rounding first), but every activation (re)quantization keeps
    its scale, zero point and saturation and drops the rounding, so the function itself is smooth
    where the straight-through twin is piecewise constant. Attacks that step on its gradients see
    through quantization masking (BPDA-style transfer); their images are then scored on the real
    graph. It emulates no int16 saturation: it computes nothing anybody runs, only a direction.
    """

    def __init__(self, model: onnx.ModelProto | str | Path, *, ste: bool = True, noise: bool = True,
                 isa: str | None = None, smooth: bool = False) -> None:
        super().__init__()
        if not isinstance(model, onnx.ModelProto):
            model = load_model_proto(model)  # the one place files are parsed and checked
        self.ste, self.noise = ste, noise
        self.smooth = False  # constants (weights, biases) fold with the graph's own rounding
        self.isa = resolve_isa(isa)
        opsets = {imp.domain or _STD: imp.version for imp in model.opset_import}
        self.opset = int(opsets.get(_STD, opsets.get("ai.onnx", 21)))
        self._types: dict[str, int] = {}  # ONNX element type of every constant whose type is known
        consts = self._read_initializers(model.graph)
        self.input_name = _single_input(model.graph, consts)
        self.output_names = [o.name for o in model.graph.output]
        nodes = _checked_nodes(model.graph, set(consts) | {self.input_name})
        live, weights = self._fold_constants(nodes, consts)
        self._nodes = live
        self._qdq_saturation: dict[int, _QdqSaturation] = {}
        if self.isa == "avx2" and not smooth:
            self._qdq_saturation = _qdq_saturating_nodes(model, live, weights, self._types, consts)
        self._register_constants(consts, live)
        self.smooth = smooth

    @property
    def rounding(self) -> str:
        """How QuantizeLinear rounds: "smooth" (no rounding), "ste" (straight through) or "exact"."""
        return "smooth" if self.smooth else ("ste" if self.ste else "exact")

    def _read_initializers(self, graph: onnx.GraphProto) -> dict[str, torch.Tensor]:
        consts: dict[str, torch.Tensor] = {}
        for t in graph.initializer:
            consts[t.name], self._types[t.name] = _tensor_from_proto(t)
        for t in graph.sparse_initializer:
            raise UsageError(f"sparse initializer {t.values.name!r} is not supported by the twin")
        return consts

    def _fold_constants(self, nodes: list[_Node], consts: dict[str, torch.Tensor]
                        ) -> tuple[list[_Node], dict[str, _IntWeight]]:
        """Run every node whose inputs are all constants (weight dequantization, Constant, shape
        arithmetic on constants) once, here: the forward pass then runs only what depends on x.

        Returns the live nodes and the folded int8 DequantizeLinear outputs (for the AVX2 emulation).
        """
        live: list[_Node] = []
        weights: dict[str, _IntWeight] = {}  # folded DequantizeLinear outputs -> their integers and scale
        with torch.no_grad():
            for node in nodes:
                if node.op in _NO_FOLD or not all(not x or x in consts for x in node.inputs):
                    live.append(node)
                    continue
                outs = self._run_node(node, [consts[x] if x else None for x in node.inputs])
                for name, value in zip(node.outputs, outs):
                    if name:
                        consts[name] = value
                if node.op == "DequantizeLinear" and self._types.get(node.inputs[0]) == TensorProto.INT8:
                    weights[node.outputs[0]] = _IntWeight(consts[node.inputs[0]], consts[node.inputs[1]],
                                                          int(node.attrs.get("axis", 1)))
                self._note_folded_type(node)
        return live, weights

    def _note_folded_type(self, node: _Node) -> None:
        """Carry the element type through folded Constant / Identity / Cast nodes: QuantizeLinear and the
        QLinear ops read their output type from their zero point's."""
        if node.op == "Constant" and "value" in node.attrs:
            self._types[node.outputs[0]] = node.attrs["value"].data_type
        elif node.op in ("Identity", "Cast") and node.inputs[0] in self._types:
            to = node.attrs.get("to", self._types[node.inputs[0]])
            self._types[node.outputs[0]] = int(to)

    def _register_constants(self, consts: dict[str, torch.Tensor], live: list[_Node]) -> None:
        """The constants the live nodes read become buffers, so the twin moves with `.to(device)`."""
        needed = {x for n in live for x in n.inputs if x} | set(self.output_names)
        self._const_attr: dict[str, str] = {}
        for i, (name, value) in enumerate(consts.items()):
            if name in needed:
                attr = f"const_{i}"
                self.register_buffer(attr, value)
                self._const_attr[name] = attr

    def _run_node(self, node: _Node, ins: list) -> list:
        out = _OPS[(node.domain, node.op)](self, node, ins)
        return list(out) if isinstance(out, tuple) else [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (the first graph output) for a float input batch."""
        env: dict[str, torch.Tensor] = {name: getattr(self, attr) for name, attr in self._const_attr.items()}
        env[self.input_name] = x.float()
        for i, node in enumerate(self._nodes):
            outs = self._run_node(node, [env[n] if n else None for n in node.inputs])
            sat = self._qdq_saturation.get(i)
            if sat is not None:
                outs[0] = sat.apply(node, env[sat.codes], outs[0])
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
        return env[self.output_names[0]]


def build_twin(path_or_proto: onnx.ModelProto | str | Path, **kw: Any) -> OnnxTwin:
    """An `OnnxTwin` in eval mode for a file or proto; `kw` go to the constructor (ste, noise, isa)."""
    return OnnxTwin(path_or_proto, **kw).eval()
