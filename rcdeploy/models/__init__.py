"""Models built from Brevitas quant layers; all take [0, 1] images (normalization is inside)."""

from rcdeploy.models import enresnet, mobilenetv2, preact_resnet, resnet_cifar, small_cnn  # noqa: F401  (registration)
from rcdeploy.models.registry import MODELS, create_model, register_model

__all__ = ["MODELS", "create_model", "register_model"]
