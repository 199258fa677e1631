"""Functional API mirroring torch.nn.functional: every norm with an optional fused residual and
activation, y = act(norm(x) + residual). Each norm family lives in its own normext/_<family>.py."""

from normext._batch_norm import batch_norm
from normext._group_norm import group_norm, instance_norm
from normext._layer_norm import layer_norm, layer_norm_2d
from normext._rms_norm import add_layer_norm, add_rms_norm, rms_norm, rms_norm_2d

__all__ = [
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "layer_norm_2d",
    "rms_norm",
    "rms_norm_2d",
]
