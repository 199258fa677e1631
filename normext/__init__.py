"""normext: fused, layout-native normalization layers for PyTorch (CUDA and CPU kernels)."""

from normext import functional, integrations
from normext._ops import ACTIVATIONS
from normext.convert import convert_model
from normext.modules import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, LayerNorm2d

__all__ = [
    "ACTIVATIONS",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "convert_model",
    "functional",
    "integrations",
]
