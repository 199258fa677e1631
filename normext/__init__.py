"""normext: fused, layout-native normalization layers for PyTorch (CUDA and CPU kernels)."""

from normext import functional, integrations
from normext._ops import ACTIVATIONS
from normext.convert import convert_model
from normext.modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FrozenBatchNorm2d,
    GroupNorm,
    InstanceNorm1d,
    InstanceNorm2d,
    InstanceNorm3d,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    RMSNorm2d,
    SyncBatchNorm,
)

__all__ = [
    "ACTIVATIONS",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm2d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "RMSNorm2d",
    "SyncBatchNorm",
    "convert_model",
    "functional",
    "integrations",
]
