"""GroupNorm and InstanceNorm: fake impls of the ops for torch.compile/FakeTensor, their autograd (the fused
backward and the torch-ops forward that normext._autograd.register_norm_autograd wires up), the functionals
and the modules."""

import math
import warnings

import torch

from normext._autograd import affine_act, normalize, register_norm_autograd, run_op
from normext._batch_norm import normalize_with_stats
from normext._ops import (
    FusedActivation,
    base_activation,
    check_devices,
    check_running_stats,
    empty_channel_grads,
    empty_in_native_layout,
    op_activation,
    register_fake,
    stat_dtype,
)
from normext._optional_bias import OptionalBias


@register_fake("normext::group_norm_fwd")
def _group_norm_fwd_fake(X, gamma, beta, residual, G, eps, act, slope):
    N = X.shape[0]
    stats = X.new_empty((N, G), dtype=stat_dtype(X))
    return empty_in_native_layout(X), stats, torch.empty_like(stats)


@register_fake("normext::group_norm_bwd")
def _group_norm_bwd_fake(dY, X, residual, mean, rstd, gamma, beta, G, act, slope, output_mask):
    return empty_channel_grads(X, output_mask)


def _fused_grads(dY, X, residual, stats, gamma, beta, args, mask):
    mean, rstd = stats
    return torch.ops.normext.group_norm_bwd(
        dY, X, residual, mean, rstd, gamma, beta, args["G"], args["act"], args["slope"], mask
    )


def _reference(X, gamma, beta, residual, stats, args):
    """GroupNorm in differentiable torch ops (double backward; InstanceNorm with eps = 0)."""
    N, C, G = X.shape[0], X.shape[1], args["G"]
    groups = X.reshape(N, G, C // G * math.prod(X.shape[2:]))
    xhat = normalize(groups, -1, args["eps"]).reshape(X.shape)
    return affine_act(xhat, gamma, beta, residual, args, X.dtype)


register_norm_autograd("normext::group_norm_fwd", _fused_grads, _reference)


def group_norm(
    input,
    num_groups,
    weight=None,
    bias=None,
    eps=1e-5,
    activation=None,
    negative_slope=0.01,
    residual=None,
    memory_efficient=False,
):
    """torch.nn.functional.group_norm, with y = act(group_norm(x) + residual) fused; memory_efficient keeps y
    instead of x for backward."""
    act = op_activation(activation, negative_slope, memory_efficient, "group_norm")
    return run_op(
        torch.ops.normext.group_norm_fwd.default,
        input,
        weight,
        bias,
        residual,
        num_groups,
        eps,
        act,
        negative_slope,
    )[0]


def instance_norm(
    input,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats=True,
    momentum=0.1,
    eps=1e-5,
    activation=None,
    negative_slope=0.01,
    residual=None,
    memory_efficient=False,
):
    """torch.nn.functional.instance_norm, with y = act(instance_norm(x) + residual) fused; memory_efficient
    keeps y instead of x for backward."""
    act = op_activation(
        activation, negative_slope, memory_efficient, "instance_norm", constant_stats=not use_input_stats
    )
    if input.dim() < 2:
        raise ValueError(f"instance_norm: expected an input of shape (N, C, *), got {tuple(input.shape)}")
    C = input.shape[1]
    # Checked here, before the in-place update below (the op never sees the running statistics).
    check_devices("instance_norm", input, running_mean=running_mean, running_var=running_var)
    check_running_stats("instance_norm", C, running_mean, running_var)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm: use_input_stats=False needs running_mean and running_var")
        return normalize_with_stats(
            input, running_mean, running_var, weight, bias, eps, act, negative_slope, residual
        )
    spatial = input[0, 0].numel() if input.shape[0] * C > 0 else 0
    if spatial == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {list(input.shape)}"
        )
    # C = 0 gives an empty output, as in torch: one group of no channels passes the ops' num_groups check.
    G = max(C, 1)
    op_args = (input, weight, bias, residual, G, eps, act, negative_slope)
    if eps == 0.0:
        # torch normalizes a constant instance (var + eps == 0) to its bias, where the kernels' 1/sqrt(0)
        # gives NaN. eps = 0 is rare, so it runs in torch ops, which follow torch's rule; the op still checks
        # the arguments and gives the statistics (and keeps x for backward, memory_efficient or not).
        with torch.no_grad():
            _, mean, rstd = torch.ops.normext.group_norm_fwd(*op_args)
        args = dict(G=G, eps=eps, act=base_activation(act), slope=negative_slope)
        Y = _reference(input, weight, bias, residual, (), args)
    else:
        Y, mean, rstd = run_op(torch.ops.normext.group_norm_fwd.default, *op_args)
    # An empty input leaves the running statistics alone, as BatchNorm does (torch writes NaN into them).
    if (running_mean is not None or running_var is not None) and input.numel() > 0:
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.mean(0).to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                var = rstd.double().pow(-2).sub_(eps).clamp_min_(0).mul_(spatial / (spatial - 1))
                running_var.mul_(1 - momentum).add_(var.mean(0).to(running_var.dtype), alpha=momentum)
    return Y


class GroupNorm(FusedActivation, OptionalBias, torch.nn.GroupNorm):
    def __init__(
        self,
        num_groups,
        num_channels,
        eps=1e-5,
        affine=True,
        activation=None,
        negative_slope=0.01,
        device=None,
        dtype=None,
        *,
        bias=True,
        memory_efficient=False,
    ):
        self._init_torch_norm(num_groups, num_channels, eps, affine, device=device, dtype=dtype, bias=bias)
        self._init_activation(activation, negative_slope, memory_efficient)

    def forward(self, input, residual=None):
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm: expected input with {self.num_channels} channels (num_channels) at dim=1, "
                f"got shape {tuple(input.shape)}"
            )
        return group_norm(
            input,
            self.num_groups,
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


class _InstanceNormMixin(FusedActivation, OptionalBias):
    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=False,
        track_running_stats=False,
        activation=None,
        negative_slope=0.01,
        device=None,
        dtype=None,
        *,
        bias=True,
        memory_efficient=False,
    ):
        self._init_torch_norm(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self._init_activation(activation, negative_slope, memory_efficient)

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        feature_dim = input.dim() - self._get_no_batch_dim()
        if input.size(feature_dim) != self.num_features:
            message = (
                f"{type(self).__name__}: expected input with {self.num_features} channels (num_features) "
                f"at dim={feature_dim}, got {input.size(feature_dim)}"
            )
            if self.affine:
                raise ValueError(message)
            warnings.warn(message + "; num_features is unused because affine=False", stacklevel=2)
        unbatched = input.dim() == self._get_no_batch_dim()
        if unbatched:
            input = input.unsqueeze(0)
            residual = None if residual is None else residual.unsqueeze(0)
        out = instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            self.activation,
            self.negative_slope,
            residual,
            self.memory_efficient,
        )
        return out.squeeze(0) if unbatched else out

    def extra_repr(self):
        return super().extra_repr() + self._activation_repr()


class InstanceNorm1d(_InstanceNormMixin, torch.nn.InstanceNorm1d):
    pass


class InstanceNorm2d(_InstanceNormMixin, torch.nn.InstanceNorm2d):
    pass


class InstanceNorm3d(_InstanceNormMixin, torch.nn.InstanceNorm3d):
    pass
