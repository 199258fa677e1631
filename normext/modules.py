"""nn.Module front-ends. Each subclasses its torch.nn counterpart, so parameters, buffers,
state_dict handling and isinstance checks stay torch's; forward takes an optional residual and
applies the fused activation: y = act(norm(x) + residual)."""

import warnings

import torch

from normext import functional as NF
from normext._ops import activation_code


class _FusedActivation:
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


class GroupNorm(_FusedActivation, torch.nn.GroupNorm):
    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, activation=None, negative_slope=0.01,
                 device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self._init_activation(activation, negative_slope)

    def forward(self, input, residual=None):
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm: expected input with {self.num_channels} channels (num_channels) at dim=1, "
                f"got shape {tuple(input.shape)}"
            )
        return NF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                             self.negative_slope, residual)

    def extra_repr(self):
        return super().extra_repr() + self._activation_repr()


class _InstanceNormMixin(_FusedActivation):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False,
                 activation=None, negative_slope=0.01, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._init_activation(activation, negative_slope)

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
        out = NF.instance_norm(
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
