"""normext: fused, layout-native normalization layers for PyTorch (CUDA and CPU kernels)."""

from normext import functional
from normext._ops import ACTIVATIONS
from normext.modules import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, LayerNorm, LayerNorm2d

__all__ = [
    "ACTIVATIONS",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "functional",
]
