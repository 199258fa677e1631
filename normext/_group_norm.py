"""GroupNorm/InstanceNorm operators: fake impls for torch.compile/FakeTensor and the one autograd
path (torch.library.register_autograd over normext::group_norm_fwd)."""

import torch

from normext._ops import IDENTITY, empty_in_native_layout, stat_dtype


@torch.library.register_fake("normext::group_norm_fwd")
def _group_norm_fwd_fake(X, gamma, beta, residual, G, eps, act, slope):
    N = X.shape[0]
    stats = X.new_empty((N, G), dtype=stat_dtype(X))
    return empty_in_native_layout(X), stats, torch.empty_like(stats)


@torch.library.register_fake("normext::group_norm_bwd")
def _group_norm_bwd_fake(dY, X, residual, mean, rstd, gamma, beta, G, act, slope, output_mask):
    C = X.shape[1]
    empty = X.new_empty((0,))
    acc = X.new_empty((0,), dtype=stat_dtype(X))
    return (
        empty_in_native_layout(X) if output_mask[0] else empty,
        X.new_empty((C,), dtype=stat_dtype(X)) if output_mask[1] else acc,
        X.new_empty((C,), dtype=stat_dtype(X)) if output_mask[2] else acc,
        empty_in_native_layout(X) if output_mask[3] else empty,
    )


def _setup_context(ctx, inputs, output):
    X, gamma, beta, residual, G, eps, act, slope = inputs
    _, mean, rstd = output
    # The residual is only needed to recompute the pre-activation for a non-identity activation.
    ctx.save_for_backward(X, gamma, beta, residual if act != IDENTITY else None, mean, rstd)
    ctx.G, ctx.act, ctx.slope = G, act, slope
    ctx.param_dtypes = (None if gamma is None else gamma.dtype, None if beta is None else beta.dtype)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dY, _dmean, _drstd):
    X, gamma, beta, residual, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    mask = [need_x, gamma is not None and need_w, beta is not None and need_b, need_r and ctx.act != IDENTITY]
    dX, dgamma, dbeta, dres = torch.ops.normext.group_norm_bwd(
        dY, X, residual, mean, rstd, gamma, beta, ctx.G, ctx.act, ctx.slope, mask
    )
    if need_r and ctx.act == IDENTITY:
        dres = dY
    return (
        dX if mask[0] else None,
        dgamma.to(ctx.param_dtypes[0]) if mask[1] else None,
        dbeta.to(ctx.param_dtypes[1]) if mask[2] else None,
        dres if need_r else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("normext::group_norm_fwd", _backward, setup_context=_setup_context)
