"""Functional API mirroring torch.nn.functional: every norm with optional fused residual and
activation, y = act(norm(x) + residual)."""

import torch
import torch.nn.functional as F

from normext import _group_norm  # noqa: F401  (fake impls + autograd for group_norm_fwd)
from normext._ops import activation_code


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, activation=None, negative_slope=0.01,
               residual=None):
    """torch.nn.functional.group_norm, with y = act(group_norm(x) + residual) fused."""
    act = activation_code(activation)
    return torch.ops.normext.group_norm_fwd(input, weight, bias, residual, num_groups, eps, act,
                                            negative_slope)[0]


def _activation(z, act, slope):
    return {
        0: lambda: z,
        1: lambda: F.relu(z),
        2: lambda: F.leaky_relu(z, slope),
        3: lambda: F.silu(z),
        4: lambda: F.gelu(z),
        5: lambda: F.gelu(z, approximate="tanh"),
    }[act]()


def _normalize_with_running_stats(input, running_mean, running_var, weight, bias, eps, act, slope, residual):
    shape = (1, -1) + (1,) * (input.dim() - 2)
    scale = torch.rsqrt(running_var.float() + eps)
    if weight is not None:
        scale = scale * weight.float()
    z = (input.float() - running_mean.float().view(shape)) * scale.view(shape)
    if bias is not None:
        z = z + bias.float().view(shape)
    if residual is not None:
        z = z + residual.float()
    return _activation(z, act, slope).to(input.dtype)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5, activation=None, negative_slope=0.01, residual=None):
    """torch.nn.functional.instance_norm, with y = act(instance_norm(x) + residual) fused."""
    act = activation_code(activation)
    if input.dim() < 2:
        raise ValueError(f"instance_norm: expected an input of shape (N, C, *), got {tuple(input.shape)}")
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm: use_input_stats=False needs running_mean and running_var")
        return _normalize_with_running_stats(input, running_mean, running_var, weight, bias, eps, act,
                                             negative_slope, residual)
    spatial = input[0, 0].numel() if input.shape[0] * input.shape[1] > 0 else 0
    if spatial == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {list(input.shape)}")
    C = input.shape[1]
    Y, mean, rstd = torch.ops.normext.group_norm_fwd(input, weight, bias, residual, C, eps, act, negative_slope)
    if running_mean is not None or running_var is not None:
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.mean(0).to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                var = rstd.double().pow(-2).sub_(eps).clamp_min_(0).mul_(spatial / (spatial - 1))
                running_var.mul_(1 - momentum).add_(var.mean(0).to(running_var.dtype), alpha=momentum)
    return Y
