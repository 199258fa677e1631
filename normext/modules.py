"""nn.Module front-ends (each subclasses its torch.nn counterpart, so parameters, buffers,
state_dict handling and isinstance checks stay torch's). Each norm family lives in normext/_<family>.py."""

from normext._batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, FrozenBatchNorm2d, SyncBatchNorm
from normext._group_norm import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normext._layer_norm import LayerNorm, LayerNorm2d
from normext._rms_norm import RMSNorm, RMSNorm2d

__all__ = [
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
]
