"""LayerNorm and channel LayerNorm2d: fake impls of the ops for torch.compile/FakeTensor, the one autograd
path of each (torch.library.register_autograd over normext::layer_norm_fwd / layer_norm_2d_fwd), the
functionals and the modules."""

import math
import numbers

import torch

from normext._ops import IDENTITY, FusedActivation, activation_code, empty_in_native_layout, stat_dtype


@torch.library.register_fake("normext::layer_norm_fwd")
def _layer_norm_fwd_fake(X, gamma, beta, residual, normalized_shape, eps, act, slope):
    stats = X.new_empty(X.shape[: X.dim() - len(normalized_shape)], dtype=stat_dtype(X))
    return X.new_empty(X.shape), stats, torch.empty_like(stats)


@torch.library.register_fake("normext::layer_norm_2d_fwd")
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


@torch.library.register_fake("normext::layer_norm_bwd")
def _layer_norm_bwd_fake(dY, X, residual, mean, rstd, gamma, beta, normalized_shape, act, slope, output_mask):
    return _grads_fake(X, tuple(normalized_shape), output_mask, lambda t: t.new_empty(t.shape))


@torch.library.register_fake("normext::layer_norm_2d_bwd")
def _layer_norm_2d_bwd_fake(dY, X, residual, mean, rstd, gamma, beta, act, slope, output_mask):
    return _grads_fake(X, (X.shape[1],), output_mask, empty_in_native_layout)


def _register_autograd(fwd_name, bwd_op):
    """Autograd for a forward op whose inputs are (X, gamma, beta, residual, *shape_args, eps, act, slope)
    and whose backward op takes (dY, X, residual, mean, rstd, gamma, beta, *shape_args, act, slope, mask)."""

    def setup_context(ctx, inputs, output):
        X, gamma, beta, residual, *config = inputs
        *shape_args, _eps, act, slope = config
        _, mean, rstd = output
        # The residual is only needed to recompute the pre-activation for a non-identity activation.
        ctx.save_for_backward(X, gamma, beta, residual if act != IDENTITY else None, mean, rstd)
        ctx.shape_args, ctx.act, ctx.slope, ctx.num_inputs = shape_args, act, slope, len(inputs)
        ctx.param_dtypes = (None if gamma is None else gamma.dtype, None if beta is None else beta.dtype)
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, dY, _dmean, _drstd):
        X, gamma, beta, residual, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        mask = [
            need_x,
            gamma is not None and need_w,
            beta is not None and need_b,
            need_r and ctx.act != IDENTITY,
        ]
        dX, dgamma, dbeta, dres = bwd_op(
            dY, X, residual, mean, rstd, gamma, beta, *ctx.shape_args, ctx.act, ctx.slope, mask
        )
        if need_r and ctx.act == IDENTITY:
            dres = dY
        return (
            dX if mask[0] else None,
            dgamma.to(ctx.param_dtypes[0]) if mask[1] else None,
            dbeta.to(ctx.param_dtypes[1]) if mask[2] else None,
            dres if need_r else None,
            *([None] * (ctx.num_inputs - 4)),
        )

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


_register_autograd("normext::layer_norm_fwd", torch.ops.normext.layer_norm_bwd)
_register_autograd("normext::layer_norm_2d_fwd", torch.ops.normext.layer_norm_2d_bwd)


def layer_norm(
    input,
    normalized_shape,
    weight=None,
    bias=None,
    eps=1e-5,
    activation=None,
    negative_slope=0.01,
    residual=None,
):
    """torch.nn.functional.layer_norm, with y = act(layer_norm(x) + residual) fused."""
    act = activation_code(activation)
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    return torch.ops.normext.layer_norm_fwd(
        input, weight, bias, residual, list(normalized_shape), eps, act, negative_slope
    )[0]


def layer_norm_2d(
    input, weight=None, bias=None, eps=1e-6, activation=None, negative_slope=0.01, residual=None
):
    """LayerNorm over the channels of an (N, C, *) input at every (n, position), per-channel weight/bias
    (ConvNeXt / ViTDet LayerNorm2d), with y = act(norm(x) + residual) fused. Same result as
    permute(C last) -> F.layer_norm -> permute back, without the permutes; keeps the memory format."""
    act = activation_code(activation)
    return torch.ops.normext.layer_norm_2d_fwd(input, weight, bias, residual, eps, act, negative_slope)[0]


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
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self._init_activation(activation, negative_slope)

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
    ):
        super().__init__(num_channels, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.num_channels = num_channels
        self._init_activation(activation, negative_slope)

    def forward(self, input, residual=None):
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"LayerNorm2d: expected input with {self.num_channels} channels (num_channels) at dim=1, "
                f"got shape {tuple(input.shape)}"
            )
        return layer_norm_2d(
            input, self.weight, self.bias, self.eps, self.activation, self.negative_slope, residual
        )

    def extra_repr(self):
        return super().extra_repr() + self._activation_repr()
