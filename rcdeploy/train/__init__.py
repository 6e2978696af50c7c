"""Training: the fit loop, adversarial objectives, sparsity methods, checkpoints.

Callable: `rcdeploy.train(...)` is `rcdeploy.api.train` (see there).
"""

from rcdeploy.api import _callable_stage, train

# Registers `rvsm` and `admm` in the sparsity registry next to the channel methods, so that
# `create_sparsity` finds them whichever module of this package is imported first.
from rcdeploy.train import unstructured  # noqa: F401, E402  (registration)

_callable_stage(__name__, train)
