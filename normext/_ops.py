"""Loads the compiled operators (torch.ops.normext.*) and holds what every norm's Python side
shares: activation codes and the layout rule the C++ entry points apply to their inputs."""

import torch

from normext import _C  # noqa: F401  (loading the library registers torch.ops.normext.*)

# Codes of normext::Activation in csrc/include/normext/math.h.
ACTIVATIONS = {None: 0, "identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5}
IDENTITY = 0


def activation_code(activation):
    """The kernel code of an activation name; ValueError for anything else."""
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        names = ", ".join(repr(k) for k in ACTIVATIONS)
        raise ValueError(f"unknown activation {activation!r}; expected one of {names}") from None


def stat_dtype(x):
    """Saved statistics are float32, or float64 for float64 input (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _is_channels_last_dense(x):
    # Mirrors normext::is_channels_last_dense in csrc/include/normext/checks.h.
    if x.dim() < 3:
        return False
    expected = x.shape[1]
    if x.stride(1) != 1 and x.shape[1] != 1:
        return False
    for i in range(x.dim() - 1, 1, -1):
        if x.stride(i) != expected and x.shape[i] != 1:
            return False
        expected *= x.shape[i]
    return x.stride(0) == expected or x.shape[0] == 1


def empty_in_native_layout(x):
    """What the C++ entry points allocate for an output shaped like x: channels-last if x is dense
    channels-last (and not also contiguous), else contiguous. Used by the fake (meta) impls."""
    if not x.is_contiguous() and _is_channels_last_dense(x):
        return x.new_empty_strided(x.shape, x.stride())
    return x.new_empty(x.shape)


class FusedActivation:
    """Mixin for modules with a fused activation: validates the name and adds it to the repr."""

    def _init_activation(self, activation, negative_slope):
        activation_code(activation)
        self.activation = activation
        self.negative_slope = negative_slope

    def _activation_repr(self):
        if self.activation in (None, "identity"):
            return ""
        if self.activation == "leaky_relu":
            return f", activation=leaky_relu, negative_slope={self.negative_slope}"
        return f", activation={self.activation}"
