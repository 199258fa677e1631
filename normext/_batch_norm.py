"""BatchNorm, SyncBatchNorm and FrozenBatchNorm2d: fake impls of the normext::batch_norm_* ops, their
autograd (normext._autograd.register_norm_autograd for the training and the apply op; an autograd.Function
for SyncBatchNorm's collectives), the functional and the modules."""

import torch
import torch.distributed as dist

from normext._autograd import (
    affine_act,
    channel_view,
    check_recoverable,
    inv_std,
    norm_backward,
    normalize,
    register_norm_autograd,
    run_op,
)
from normext._ops import (
    IDENTITY,
    LEAKY_RELU,
    FusedActivation,
    base_activation,
    check_devices,
    check_running_stats,
    empty_channel_grads,
    empty_in_native_layout,
    from_output,
    op_activation,
    register_fake,
    stat_dtype,
)
from normext._optional_bias import OptionalBias

_ops = torch.ops.normext


def _stat(X):
    return X.new_empty((X.shape[1],), dtype=stat_dtype(X))


@register_fake("normext::batch_norm_fwd")
def _batch_norm_fwd_fake(X, gamma, beta, residual, running_mean, running_var, momentum, eps, act, slope):
    return empty_in_native_layout(X), _stat(X), _stat(X)


@register_fake("normext::batch_norm_stats")
def _batch_norm_stats_fake(X):
    return _stat(X), _stat(X)


@register_fake("normext::batch_norm_merge")
def _batch_norm_merge_fake(counts, means, m2s, running_mean, running_var, momentum, eps):
    C = means.shape[1]
    return means.new_empty((C,)), means.new_empty((C,))


@register_fake("normext::batch_norm_apply")
def _batch_norm_apply_fake(X, mean, var, gamma, beta, residual, eps, act, slope):
    return empty_in_native_layout(X)


@register_fake("normext::batch_norm_bwd_reduce")
def _batch_norm_bwd_reduce_fake(dY, X, residual, mean, rstd, gamma, beta, act, slope):
    return _stat(X), _stat(X)


@register_fake("normext::batch_norm_bwd_elemt")
def _batch_norm_bwd_elemt_fake(
    dY, X, residual, mean, rstd, gamma, beta, sum_dz, sum_dzxhat, inv_count, act, slope, output_mask
):
    empty = X.new_empty((0,))
    return (
        empty_in_native_layout(X) if output_mask[0] else empty,
        empty_in_native_layout(X) if output_mask[1] else empty,
    )


@register_fake("normext::batch_norm_bwd")
def _batch_norm_bwd_fake(dY, X, residual, mean, rstd, gamma, beta, act, slope, output_mask):
    return empty_channel_grads(X, output_mask)


def _grads(dY, X, residual, mean, rstd, gamma, beta, act, slope, mask, reduced=None):
    """(dX, dgamma, dbeta, dresidual) from the backward ops as normext._autograd's fused_grads returns them.
    `reduced(sum_dz, sum_dzxhat)` returns the sums dX is built from and the 1 / count to scale them by
    (SyncBatchNorm all-reduces them there). Without `reduced` the statistics are constants (eval,
    frozen) and dX = gamma * rstd * dz."""
    need_x, need_w, need_b, need_r = mask
    dgamma = dbeta = dX = dres = None
    sums = (None, None, 1.0)
    if need_w or need_b or (need_x and reduced is not None):
        reduce = _ops.batch_norm_bwd_reduce.default
        dbeta, dgamma = reduce(dY, X, residual, mean, rstd, gamma, beta, act, slope)
        if need_x and reduced is not None:
            sums = reduced(dbeta, dgamma)
    if need_x or need_r:
        dX, dres = _ops.batch_norm_bwd_elemt.default(
            dY, X, residual, mean, rstd, gamma, beta, *sums, act, slope, [need_x, need_r]
        )
    return dX, dgamma, dbeta, dres


def _channel_dims(X):
    return (0, *range(2, X.dim()))


# ------------------------------------------------------------------ apply with given statistics


def _apply_grads(dY, X, residual, stats, gamma, beta, args, mask):
    mean, var = (s.to(stat_dtype(X)) for s in stats)
    rstd = torch.rsqrt(var + args["eps"])
    return _grads(dY, X, residual, mean, rstd, gamma, beta, args["act"], args["slope"], mask)


def _apply_reference(X, gamma, beta, residual, stats, args):
    """BatchNorm with given statistics (constants) in differentiable torch ops (double backward)."""
    mean, var = (channel_view(s.detach().to(stat_dtype(X)), X.dim()) for s in stats)
    xhat = (X.to(stat_dtype(X)) - mean) * inv_std(var, args["eps"])
    return affine_act(xhat, gamma, beta, residual, args, X.dtype)


def _apply_graph_from_output(dY, Y, gamma, stats, args, need):
    """[dX, None, None, dresidual] of BatchNorm with constant statistics from its output Y (no parameter
    needs a gradient), differentiable in dY (double backward): dz = dY·act'(z), act'(z) read off y, and
    dx = γ·rstd·dz."""
    base = base_activation(args["act"])
    dz = dY
    if base != IDENTITY:
        slope = args["slope"] if base == LEAKY_RELU else 0.0
        dz = dY * torch.where(Y > 0, 1.0, slope).to(dY.dtype)
    mean, var = (s.detach().to(stat_dtype(Y)) for s in stats)
    scale = inv_std(var, args["eps"]) if gamma is None else gamma.detach() * inv_std(var, args["eps"])
    dX = (dz * channel_view(scale, Y.dim())).to(Y.dtype) if need[0] else None
    return [dX, None, None, dz if need[3] and base != IDENTITY else None]


register_norm_autograd(
    "normext::batch_norm_apply",
    _apply_grads,
    _apply_reference,
    stats_args=("mean", "var"),
    graph_from_output=_apply_graph_from_output,
)


def normalize_with_stats(input, mean, var, weight, bias, eps, act, slope, residual):
    """y = act((x - mean) * rsqrt(var + eps) * weight + bias + residual) with given per-channel statistics
    (constants for autograd); shared by eval BatchNorm, FrozenBatchNorm2d and InstanceNorm."""
    return run_op(_ops.batch_norm_apply.default, input, mean, var, weight, bias, residual, eps, act, slope)


# ------------------------------------------------------------------------------------- training


def _train_grads(dY, X, residual, stats, gamma, beta, args, mask):
    return _ops.batch_norm_bwd.default(dY, X, residual, *stats, gamma, beta, args["act"], args["slope"], mask)


def _train_reference(X, gamma, beta, residual, stats, args):
    """BatchNorm with batch statistics in differentiable torch ops (double backward)."""
    return affine_act(normalize(X, _channel_dims(X), args["eps"]), gamma, beta, residual, args, X.dtype)


# Batch statistics with the in-place running-stat update, through the same autograd path as every norm.
register_norm_autograd("normext::batch_norm_fwd", _train_grads, _train_reference)


def _verify_batch_size(size):
    values = size[0]
    for s in size[2:]:
        values *= s
    if values == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    activation=None,
    negative_slope=0.01,
    residual=None,
    memory_efficient=False,
):
    """torch.nn.functional.batch_norm, with y = act(batch_norm(x) + residual) fused. In training the running
    statistics (when given) are updated in place with the unbiased batch variance. memory_efficient keeps y
    instead of x for backward (in eval, with a weight and bias that need no gradient, relu as well)."""
    act = op_activation(
        activation, negative_slope, memory_efficient, "batch_norm", constant_stats=not training
    )
    if input.dim() < 2:
        raise ValueError(f"batch_norm: expected an input of shape (N, C, *), got {tuple(input.shape)}")
    # The ops check them too, but eval passes them to batch_norm_apply as plain mean / var.
    check_running_stats("batch_norm", input.shape[1], running_mean, running_var)
    if training:
        _verify_batch_size(input.size())
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        return run_op(
            _ops.batch_norm_fwd.default,
            input,
            weight,
            bias,
            residual,
            running_mean,
            running_var,
            momentum,
            eps,
            act,
            negative_slope,
        )[0]
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if running_mean is None or running_var is None:
        raise ValueError("batch_norm: running_mean and running_var must be defined in evaluation mode")
    return normalize_with_stats(
        input, running_mean, running_var, weight, bias, eps, act, negative_slope, residual
    )


# -------------------------------------------------------------------------------------- modules


class _BatchNormMixin(FusedActivation, OptionalBias):
    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
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

    def _counts_batches(self):
        return self.training and self.track_running_stats and self.num_batches_tracked is not None

    def _momentum_factor(self):
        """torch's update rule: momentum, or 1 / num_batches_tracked (this batch counted) for None."""
        if self.momentum is not None:
            return self.momentum
        return 1.0 / (float(self.num_batches_tracked) + 1) if self._counts_batches() else 0.0

    def _count_batch(self, out):
        """Counts the batch once the op has taken it (a rejected input changes no state); returns out."""
        if self._counts_batches():
            self.num_batches_tracked.add_(1)
        return out

    def _uses_batch_stats(self):
        return self.training or (self.running_mean is None and self.running_var is None)

    def _running_stats(self):
        """The buffers to update (training) or normalize with (eval); None when they are not tracked."""
        if self.training and not self.track_running_stats:
            return None, None
        return self.running_mean, self.running_var

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        running_mean, running_var = self._running_stats()
        out = batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            self._uses_batch_stats(),
            self._momentum_factor(),
            self.eps,
            self.activation,
            self.negative_slope,
            residual,
            self.memory_efficient,
        )
        return self._count_batch(out)

    def extra_repr(self):
        return super().extra_repr() + self._activation_repr()


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    pass


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    pass


# -------------------------------------------------------------------------------- SyncBatchNorm


# torch 2.14 renamed all_gather_into_tensor (same semantics; gloo wants the flat output form).
_all_gather_single = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


class _SyncBatchNorm(torch.autograd.Function):
    """BatchNorm over the union of every rank's batch. Forward all-gathers each rank's (count, mean, M2)
    and merges them with Chan's formula in rank order (exact for unequal and empty batches); backward
    all-reduces sum(dz) and sum(dz * xhat). Parameter gradients stay local, as in torch.nn.SyncBatchNorm
    (data-parallel training sums them)."""

    @staticmethod
    def forward(ctx, X, gamma, beta, residual, running_mean, running_var, momentum, eps, act, slope, group):
        C = X.shape[1]
        mean, m2 = _ops.batch_norm_stats(X)
        local = torch.cat([mean.new_full((1,), X.numel() // C), mean, m2])
        world = dist.get_world_size(group)
        gathered = local.new_empty((world * (2 * C + 1),))
        _all_gather_single(gathered, local, group=group)
        gathered = gathered.view(world, 2 * C + 1)
        counts = gathered[:, 0]
        mean, var = _ops.batch_norm_merge(
            counts, gathered[:, 1 : C + 1], gathered[:, C + 1 :], running_mean, running_var, momentum, eps
        )
        Y = run_op(_ops.batch_norm_apply.default, X, mean, var, gamma, beta, residual, eps, act, slope)
        # memory_efficient (act | FROM_OUTPUT): Y and the residual in place of X, as in every other norm.
        kept = (Y, residual) if from_output(act) else (X, residual if act != IDENTITY else None)
        ctx.save_for_backward(*kept, gamma, beta, mean, torch.rsqrt(var + eps), counts.sum())
        ctx.args, ctx.group = dict(act=act, slope=slope), group
        return Y

    @staticmethod
    def backward(ctx, dY):
        X, residual, gamma, beta, mean, rstd, count = ctx.saved_tensors
        C = X.shape[1]
        if from_output(ctx.args["act"]):
            check_recoverable(gamma)

        def all_reduced(sum_dz, sum_dzx):
            sums = torch.cat([sum_dz, sum_dzx])
            dist.all_reduce(sums, group=ctx.group)
            sums = sums / count
            return sums[:C], sums[C:], 1.0

        # As in torch.nn.SyncBatchNorm the all-reduce runs when the input needs a gradient, which is the
        # same on every rank of a data-parallel model.
        def fused(dY, X, residual, stats, gamma, beta, args, mask):
            return _grads(dY, X, residual, *stats, gamma, beta, args["act"], args["slope"], mask, all_reduced)

        need = ctx.needs_input_grad[:4]
        stats = (mean, rstd)
        grads = norm_backward(fused, _no_sync_reference, dY, X, gamma, beta, residual, stats, ctx.args, need)
        return (*grads, *([None] * 7))


def _no_sync_reference(*_):
    raise RuntimeError(
        "SyncBatchNorm: double backward (create_graph=True) across ranks is not supported (nor by "
        "torch.nn.SyncBatchNorm); with one rank, or outside a distributed run, it is BatchNorm's"
    )


class SyncBatchNorm(_BatchNormMixin, torch.nn.SyncBatchNorm):
    """BatchNorm whose training statistics are those of the batch concatenated over the ranks of
    process_group (torch.distributed: NCCL on GPU, gloo on CPU). Outside a distributed run, with one
    rank, or in eval it is plain BatchNorm."""

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        process_group=None,
        activation=None,
        negative_slope=0.01,
        device=None,
        dtype=None,
        *,
        bias=True,
        memory_efficient=False,
    ):
        # Not _BatchNormMixin.__init__, which has no process_group.
        self._init_torch_norm(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            process_group,
            device=device,
            dtype=dtype,
            bias=bias,
        )
        self._init_activation(activation, negative_slope, memory_efficient)

    def _sync_group(self):
        """The process group to synchronize over, or None when plain BatchNorm is what to run."""
        if not (self._uses_batch_stats() and self.training):
            return None
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = self._momentum_factor()
        running_mean, running_var = self._running_stats()
        group = self._sync_group()
        if group is None:
            out = batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                self._uses_batch_stats(),
                factor,
                self.eps,
                self.activation,
                self.negative_slope,
                residual,
                self.memory_efficient,
            )
            return self._count_batch(out)
        if self.eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        # Checked before the collectives, so that a rank with a bad argument fails before the others wait.
        check_devices(
            "sync_batch_norm",
            input,
            weight=self.weight,
            bias=self.bias,
            residual=residual,
            running_mean=running_mean,
            running_var=running_var,
        )
        check_running_stats("sync_batch_norm", input.shape[1], running_mean, running_var)
        act = op_activation(self.activation, self.negative_slope, self.memory_efficient, "SyncBatchNorm")
        out = _SyncBatchNorm.apply(
            input,
            self.weight,
            self.bias,
            residual,
            running_mean,
            running_var,
            factor,
            self.eps,
            act,
            self.negative_slope,
            group,
        )
        return self._count_batch(out)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replaces every BatchNorm (torch.nn's or normext's, any dimensionality) in `module` by a
        normext.SyncBatchNorm sharing its parameters and buffers (and its fused activation, if any); returns
        the converted module, or a new SyncBatchNorm when `module` itself is a BatchNorm."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            out = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                activation=getattr(module, "activation", None),
                negative_slope=getattr(module, "negative_slope", 0.01),
                bias=module.bias is not None,
                memory_efficient=getattr(module, "memory_efficient", False),
            )
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out


# ---------------------------------------------------------------------------- FrozenBatchNorm2d


class FrozenBatchNorm2d(FusedActivation, torch.nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, as in torchvision), folded
    into one apply kernel with the activation and residual; gradients flow to the input only. Loads
    torchvision.ops.FrozenBatchNorm2d and torch.nn.BatchNorm2d state_dicts (num_batches_tracked ignored;
    the weight of ones and bias of zeros of a BatchNorm2d with affine=False or bias=False filled in)."""

    def __init__(self, num_features, eps=1e-5, activation=None, negative_slope=0.01, memory_efficient=False):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        # Its backward needs no x̂ (no parameter takes a gradient), so relu's output suffices as well.
        if memory_efficient:
            op_activation(activation, negative_slope, True, "FrozenBatchNorm2d", constant_stats=True)
        self._init_activation(activation, negative_slope)
        self.memory_efficient = memory_efficient
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if state_dict.pop(prefix + "num_batches_tracked", None) is not None:
            # A torch.nn.BatchNorm2d state_dict: one without weight or bias comes from affine=False or
            # bias=False, which normalize as a weight of ones and a bias of zeros.
            mean = state_dict.get(prefix + "running_mean")
            if mean is not None:
                state_dict.setdefault(prefix + "weight", torch.ones_like(mean))
                state_dict.setdefault(prefix + "bias", torch.zeros_like(mean))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input, residual=None):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        act = op_activation(
            self.activation,
            self.negative_slope,
            self.memory_efficient,
            "FrozenBatchNorm2d",
            constant_stats=True,
        )
        return normalize_with_stats(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.eps,
            act,
            self.negative_slope,
            residual,
        )

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}" + self._activation_repr()
