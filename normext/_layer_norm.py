"""LayerNorm and channel LayerNorm2d: fake impls of the ops for torch.compile/FakeTensor, their autograd (the
fused backward and the torch-ops forward that normext._autograd.register_norm_autograd wires up), the
functionals and the modules."""

import math
import numbers

import torch

from normext._autograd import affine_act, normalize, register_norm_autograd, run_op
from normext._ops import FusedActivation, empty_in_native_layout, op_activation, register_fake, stat_dtype


@register_fake("normext::layer_norm_fwd")
def _layer_norm_fwd_fake(X, gamma, beta, residual, normalized_shape, eps, act, slope):
    stats = X.new_empty(X.shape[: X.dim() - len(normalized_shape)], dtype=stat_dtype(X))
    return X.new_empty(X.shape), stats, torch.empty_like(stats)


@register_fake("normext::layer_norm_2d_fwd")
def _layer_norm_2d_fwd_fake(X, gamma, beta, residual, eps, act, slope):
    stats = X.new_empty((X.shape[0], math.prod(X.shape[2:])), dtype=stat_dtype(X))
    return empty_in_native_layout(X), stats, torch.empty_like(stats)


def _grads_fake(X, param_shape, output_mask, like):
    # Unselected outputs are (distinct) empty tensors, as the kernels return them.
    acc = stat_dtype(X)
    return (
        like(X) if output_mask[0] else X.new_empty((0,)),
        X.new_empty(param_shape, dtype=acc) if output_mask[1] else X.new_empty((0,), dtype=acc),
        X.new_empty(param_shape, dtype=acc) if output_mask[2] else X.new_empty((0,), dtype=acc),
        like(X) if output_mask[3] else X.new_empty((0,)),
    )


@register_fake("normext::layer_norm_bwd")
def _layer_norm_bwd_fake(dY, X, residual, mean, rstd, gamma, beta, normalized_shape, act, slope, output_mask):
    return _grads_fake(X, tuple(normalized_shape), output_mask, lambda t: t.new_empty(t.shape))


@register_fake("normext::layer_norm_2d_bwd")
def _layer_norm_2d_bwd_fake(dY, X, residual, mean, rstd, gamma, beta, act, slope, output_mask):
    return _grads_fake(X, (X.shape[1],), output_mask, empty_in_native_layout)


def _layer_norm_grads(dY, X, residual, stats, gamma, beta, args, mask):
    return torch.ops.normext.layer_norm_bwd(
        dY, X, residual, *stats, gamma, beta, args["normalized_shape"], args["act"], args["slope"], mask
    )


def _layer_norm_reference(X, gamma, beta, residual, stats, args):
    """LayerNorm in differentiable torch ops (double backward)."""
    dims = tuple(range(-len(args["normalized_shape"]), 0))
    xhat = normalize(X, dims, args["eps"])
    return affine_act(xhat, gamma, beta, residual, args, X.dtype, per_channel=False)


def _layer_norm_2d_grads(dY, X, residual, stats, gamma, beta, args, mask):
    return torch.ops.normext.layer_norm_2d_bwd(
        dY, X, residual, *stats, gamma, beta, args["act"], args["slope"], mask
    )


def _layer_norm_2d_reference(X, gamma, beta, residual, stats, args):
    """LayerNorm2d in differentiable torch ops (double backward)."""
    return affine_act(normalize(X, 1, args["eps"]), gamma, beta, residual, args, X.dtype)


register_norm_autograd("normext::layer_norm_fwd", _layer_norm_grads, _layer_norm_reference)
register_norm_autograd("normext::layer_norm_2d_fwd", _layer_norm_2d_grads, _layer_norm_2d_reference)


def layer_norm(
    input,
    normalized_shape,
    weight=None,
    bias=None,
    eps=1e-5,
    activation=None,
    negative_slope=0.01,
    residual=None,
    memory_efficient=False,
):
    """torch.nn.functional.layer_norm, with y = act(layer_norm(x) + residual) fused; memory_efficient keeps y
    instead of x for backward."""
    act = op_activation(activation, negative_slope, memory_efficient, "layer_norm")
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    return run_op(
        torch.ops.normext.layer_norm_fwd.default,
        input,
        weight,
        bias,
        residual,
        list(normalized_shape),
        eps,
        act,
        negative_slope,
    )[0]


def layer_norm_2d(
    input,
    weight=None,
    bias=None,
    eps=1e-6,
    activation=None,
    negative_slope=0.01,
    residual=None,
    memory_efficient=False,
):
    """LayerNorm over the channels of an (N, C, *) input at every (n, position), per-channel weight/bias
    (ConvNeXt / ViTDet LayerNorm2d), with y = act(norm(x) + residual) fused. Same result as
    permute(C last) -> F.layer_norm -> permute back, without the permutes; keeps the memory format."""
    act = op_activation(activation, negative_slope, memory_efficient, "layer_norm_2d")
    return run_op(
        torch.ops.normext.layer_norm_2d_fwd.default, input, weight, bias, residual, eps, act, negative_slope
    )[0]


class LayerNorm(FusedActivation, torch.nn.LayerNorm):
    def __init__(
        self,
        normalized_shape,
        eps=1e-5,
        elementwise_affine=True,
        bias=True,
        activation=None,
        negative_slope=0.01,
        device=None,
        dtype=None,
        memory_efficient=False,
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self._init_activation(activation, negative_slope, memory_efficient)

    def forward(self, input, residual=None):
        return layer_norm(
            input,
            self.normalized_shape,
            self.weight,
            self.bias,
            self.eps,
            self.activation,
            self.negative_slope,
            residual,
            self.memory_efficient,
        )

    def extra_repr(self):
        return super().extra_repr() + self._activation_repr()


class LayerNorm2d(FusedActivation, torch.nn.LayerNorm):
    """Channel LayerNorm of (N, C, *) inputs. A torch.nn.LayerNorm with normalized_shape (num_channels,), so
    state_dicts of timm / detectron2 LayerNorm2d modules (weight, bias) load unchanged."""

    def __init__(
        self,
        num_channels,
        eps=1e-6,
        elementwise_affine=True,
        bias=True,
        activation=None,
        negative_slope=0.01,
        device=None,
        dtype=None,
        memory_efficient=False,
    ):
        super().__init__(num_channels, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.num_channels = num_channels
        self._init_activation(activation, negative_slope, memory_efficient)

    def forward(self, input, residual=None):
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"LayerNorm2d: expected input with {self.num_channels} channels (num_channels) at dim=1, "
                f"got shape {tuple(input.shape)}"
            )
        return layer_norm_2d(
            input,
            self.weight,
            self.bias,
            self.eps,
            self.activation,
            self.negative_slope,
            residual,
            self.memory_efficient,
        )

    def extra_repr(self):
        return super().extra_repr() + self._activation_repr()
