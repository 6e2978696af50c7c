"""Training: the fit loop, adversarial objectives, sparsity methods, checkpoints."""

# Registers `rvsm` and `admm` in the sparsity registry next to the channel methods, so that
# `create_sparsity` finds them whichever module of this package is imported first.
from rcdeploy.train import unstructured  # noqa: F401  (registration)
