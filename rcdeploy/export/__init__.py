"""Export: checkpoint -> verified integer ONNX (+ QONNX, .ort) and the model card.

Callable: `rcdeploy.export(...)` is `rcdeploy.api.export` (see there).
"""

from rcdeploy.api import _callable_stage, export

_callable_stage(__name__, export)
