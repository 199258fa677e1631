"""RMSNorm, channel RMSNorm2d and the pre-norm add&norm ops (add_layer_norm, add_rms_norm), all on the
LayerNorm kernels: fake impls, autograd (register_norm_autograd / register_add_norm_autograd), the
functionals and the modules."""

import math
import numbers

import torch

from normext._autograd import (
    affine_act,
    register_add_norm_autograd,
    register_norm_autograd,
    rms_normalize,
    run_op,
)
from normext._layer_norm import _layer_norm_grads, _layer_norm_reference
from normext._ops import FusedActivation, empty_in_native_layout, op_activation, register_fake, stat_dtype


def _as_shape(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral):
        return [normalized_shape]
    return list(normalized_shape)


def _eps_for(input, eps, dtype=None):
    """torch.nn.RMSNorm's default: eps=None is the machine epsilon of the normalized tensor's dtype (dtype,
    default the input's; an input that is not floating point is left to the op's check, which names it)."""
    if eps is not None or not input.is_floating_point():
        return eps or 0.0
    return torch.finfo(dtype or input.dtype).eps


@register_fake("normext::rms_norm_fwd")
def _rms_norm_fwd_fake(X, gamma, residual, normalized_shape, eps, act, slope):
    return X.new_empty(X.shape), X.new_empty(X.shape[: X.dim() - len(normalized_shape)], dtype=stat_dtype(X))


@register_fake("normext::rms_norm_2d_fwd")
def _rms_norm_2d_fwd_fake(X, gamma, residual, eps, act, slope):
    rstd = X.new_empty((X.shape[0], math.prod(X.shape[2:])), dtype=stat_dtype(X))
    return empty_in_native_layout(X), rstd


def _rms_grads_fake(X, param_shape, output_mask, like):
    acc = stat_dtype(X)
    return (
        like(X) if output_mask[0] else X.new_empty((0,)),
        X.new_empty(param_shape, dtype=acc) if output_mask[1] else X.new_empty((0,), dtype=acc),
        like(X) if output_mask[2] else X.new_empty((0,)),
    )


@register_fake("normext::rms_norm_bwd")
def _rms_norm_bwd_fake(dY, X, residual, rstd, gamma, normalized_shape, act, slope, output_mask):
    return _rms_grads_fake(X, tuple(normalized_shape), output_mask, lambda t: t.new_empty(t.shape))


@register_fake("normext::rms_norm_2d_bwd")
def _rms_norm_2d_bwd_fake(dY, X, residual, rstd, gamma, act, slope, output_mask):
    return _rms_grads_fake(X, (X.shape[1],), output_mask, empty_in_native_layout)


def _add_fake(X, R, normalized_shape, residual_dtype):
    stats = X.new_empty(X.shape[: X.dim() - len(normalized_shape)], dtype=stat_dtype(X))
    return X.new_empty(X.shape), X.new_empty(X.shape, dtype=residual_dtype or X.dtype), stats


@register_fake("normext::add_layer_norm_fwd")
def _add_layer_norm_fwd_fake(X, R, gamma, beta, normalized_shape, eps, residual_dtype):
    Y, S, stats = _add_fake(X, R, normalized_shape, residual_dtype)
    return Y, S, stats, torch.empty_like(stats)


@register_fake("normext::add_rms_norm_fwd")
def _add_rms_norm_fwd_fake(X, R, gamma, normalized_shape, eps, residual_dtype):
    return _add_fake(X, R, normalized_shape, residual_dtype)


# The fused backwards as norm_backward calls them ((dX, dgamma, dbeta, dresidual) from a 4-entry mask);
# RMSNorm has no beta, so its ops take and return the other three.
def _rms_norm_grads(dY, X, residual, stats, gamma, beta, args, mask):
    dX, dgamma, dres = torch.ops.normext.rms_norm_bwd(
        dY, X, residual, *stats, gamma, args["normalized_shape"], args["act"], args["slope"],
        [mask[0], mask[1], mask[3]],
    )  # fmt: skip
    return dX, dgamma, None, dres


def _rms_norm_reference(X, gamma, beta, residual, stats, args):
    """RMSNorm in differentiable torch ops (double backward)."""
    xhat = rms_normalize(X, tuple(range(-len(args["normalized_shape"]), 0)), args["eps"])
    return affine_act(xhat, gamma, None, residual, args, X.dtype, per_channel=False)


def _rms_norm_2d_grads(dY, X, residual, stats, gamma, beta, args, mask):
    dX, dgamma, dres = torch.ops.normext.rms_norm_2d_bwd(
        dY, X, residual, *stats, gamma, args["act"], args["slope"], [mask[0], mask[1], mask[3]]
    )
    return dX, dgamma, None, dres


def _rms_norm_2d_reference(X, gamma, beta, residual, stats, args):
    """RMSNorm2d in differentiable torch ops (double backward)."""
    return affine_act(rms_normalize(X, 1, args["eps"]), gamma, None, residual, args, X.dtype)


register_norm_autograd("normext::rms_norm_fwd", _rms_norm_grads, _rms_norm_reference)
register_norm_autograd("normext::rms_norm_2d_fwd", _rms_norm_2d_grads, _rms_norm_2d_reference)
register_add_norm_autograd("normext::add_layer_norm_fwd", _layer_norm_grads, _layer_norm_reference)
register_add_norm_autograd("normext::add_rms_norm_fwd", _rms_norm_grads, _rms_norm_reference)


def rms_norm(
    input,
    normalized_shape,
    weight=None,
    eps=None,
    activation=None,
    negative_slope=0.01,
    residual=None,
    memory_efficient=False,
):
    """torch.nn.functional.rms_norm, with y = act(rms_norm(x) + residual) fused; memory_efficient keeps y
    instead of x for backward."""
    act = op_activation(activation, negative_slope, memory_efficient, "rms_norm")
    return run_op(
        torch.ops.normext.rms_norm_fwd.default,
        input,
        weight,
        residual,
        _as_shape(normalized_shape),
        _eps_for(input, eps),
        act,
        negative_slope,
    )[0]


def rms_norm_2d(
    input, weight=None, eps=1e-6, activation=None, negative_slope=0.01, residual=None, memory_efficient=False
):
    """RMSNorm over the channels of an (N, C, *) input at every (n, position), per-channel weight (timm's
    RmsNorm2d), with y = act(norm(x) + residual) fused; keeps the memory format (NCHW or channels-last)."""
    act = op_activation(activation, negative_slope, memory_efficient, "rms_norm_2d")
    return run_op(
        torch.ops.normext.rms_norm_2d_fwd.default,
        input,
        weight,
        residual,
        _eps_for(input, eps),
        act,
        negative_slope,
    )[0]


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5, residual_dtype=None):
    """Pre-norm residual block: s = input + residual (summed in float32, stored as residual_dtype, default
    input's dtype), out = layer_norm(s) in input's dtype; returns (out, s). One pass reads input and
    residual once and writes both outputs; gradients from both flow into both inputs."""
    out, s, _, _ = run_op(
        torch.ops.normext.add_layer_norm_fwd.default,
        input,
        residual,
        weight,
        bias,
        _as_shape(normalized_shape),
        eps,
        residual_dtype,
    )
    return out, s


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, residual_dtype=None):
    """add_layer_norm with RMSNorm. eps=None: the machine epsilon of s's dtype (residual_dtype), as
    torch.nn.RMSNorm applied to s takes it."""
    eps = _eps_for(input, eps, residual_dtype)
    out, s, _ = run_op(
        torch.ops.normext.add_rms_norm_fwd.default,
        input,
        residual,
        weight,
        _as_shape(normalized_shape),
        eps,
        residual_dtype,
    )
    return out, s


class RMSNorm(FusedActivation, torch.nn.RMSNorm):
    def __init__(
        self,
        normalized_shape,
        eps=None,
        elementwise_affine=True,
        activation=None,
        negative_slope=0.01,
        device=None,
        dtype=None,
        memory_efficient=False,
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self._init_activation(activation, negative_slope, memory_efficient)

    def forward(self, x, residual=None):
        return rms_norm(
            x,
            self.normalized_shape,
            self.weight,
            self.eps,
            self.activation,
            self.negative_slope,
            residual,
            self.memory_efficient,
        )

    def extra_repr(self):
        return super().extra_repr() + self._activation_repr()


class RMSNorm2d(FusedActivation, torch.nn.RMSNorm):
    """Channel RMSNorm of (N, C, *) inputs (timm's RmsNorm2d). A torch.nn.RMSNorm with normalized_shape
    (num_channels,), so state_dicts (weight) of timm RmsNorm2d modules load unchanged."""

    def __init__(
        self,
        num_channels,
        eps=1e-6,
        affine=True,
        activation=None,
        negative_slope=0.01,
        device=None,
        dtype=None,
        memory_efficient=False,
    ):
        super().__init__(num_channels, eps, affine, device=device, dtype=dtype)
        self.num_channels = num_channels
        self._init_activation(activation, negative_slope, memory_efficient)

    def forward(self, x, residual=None):
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"RMSNorm2d: expected input with {self.num_channels} channels (num_channels) at dim=1, "
                f"got shape {tuple(x.shape)}"
            )
        return rms_norm_2d(
            x, self.weight, self.eps, self.activation, self.negative_slope, residual, self.memory_efficient
        )

    def extra_repr(self):
        return super().extra_repr() + self._activation_repr()
