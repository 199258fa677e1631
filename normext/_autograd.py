"""The one autograd path of every norm op (register_norm_autograd) and the building blocks of the norms
written in differentiable torch ops: a backward runs the fused kernels, or, while its own graph is being
built (double backward, create_graph=True), autograd.grad through the family's torch-ops forward."""

import torch
import torch.nn.functional as F

from normext._ops import IDENTITY, stat_dtype

# The differentiable arguments of the norm ops, by schema name (RMSNorm has no beta); all others are
# constants for autograd.
_GRAD_ARGS = ("X", "gamma", "beta", "residual")
_lib = torch.library.Library("normext", "IMPL")


def building_graph(*tensors):
    """True in a backward whose result must itself be differentiable: the fused backward kernels are not, so
    the gradient is then taken through the torch-ops forward instead."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def register_norm_autograd(qualname, fused_grads, reference, stats_args=()):
    """Autograd for a norm op with arguments X, gamma, beta (RMSNorm: none), residual, eps, act, slope (by
    name, among others) that returns Y first.

    fused_grads(dY, X, residual, stats, gamma, beta, args, mask) -> (dX, dgamma, dbeta, dresidual) runs the
    backward kernels; mask selects the outputs as the *_bwd ops' output_mask does (dresidual is only asked
    for when the activation is not the identity: else it is dY). reference(X, gamma, beta, residual, stats,
    args) -> Y is the same norm in differentiable torch ops. args holds the op's non-tensor arguments; stats
    are the op's other outputs (mean, rstd), or the inputs named in stats_args (statistics given to the op,
    constants for autograd)."""
    op = torch._library.utils.lookup_op(qualname)
    names = [a.name for a in op._schema.arguments]
    positions = [names.index(n) if n in names else None for n in _GRAD_ARGS]
    constants = [a.name for a in op._schema.arguments if "Tensor" not in str(a.type)]

    def setup_context(ctx, inputs, output):
        a = dict(zip(names, inputs, strict=True))
        stats = [a[n] for n in stats_args] if stats_args else output[1:]
        # The residual only changes the gradients through a non-identity activation.
        residual = a["residual"] if a["act"] != IDENTITY else None
        ctx.save_for_backward(a["X"], a["gamma"], a.get("beta"), residual, *stats)
        ctx.args = {n: a[n] for n in constants}
        if not stats_args:
            ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, dY, *_):
        X, gamma, beta, residual, *stats = ctx.saved_tensors
        need = [i is not None and ctx.needs_input_grad[i] for i in positions]
        grads = norm_backward(fused_grads, reference, dY, X, gamma, beta, residual, stats, ctx.args, need)
        out = [None] * len(names)
        for i, g in zip(positions, grads, strict=True):
            if i is not None:
                out[i] = g
        return tuple(out)

    _lib.impl(
        qualname.split("::")[1], _autograd_kernel(op, setup_context, backward), "Autograd", with_keyset=True
    )


def register_add_norm_autograd(qualname, fused_grads, reference):
    """Autograd for a pre-norm add op (X, R, gamma[, beta], ..., eps, residual_dtype) -> (Y, S, *stats) with
    S = X + R and Y = norm(S): the norm's gradient at S is norm_backward's (fused_grads and reference as for
    register_norm_autograd, S the norm's input, no activation), and dX = dR = dS + that, in X's and R's
    dtypes. A float32 S beside a 16-bit Y takes dY in float32."""
    op = torch._library.utils.lookup_op(qualname)
    names = [a.name for a in op._schema.arguments]
    i_x, i_r, i_g = names.index("X"), names.index("R"), names.index("gamma")
    i_b = names.index("beta") if "beta" in names else None
    constants = [a.name for a in op._schema.arguments if "Tensor" not in str(a.type)]

    def setup_context(ctx, inputs, output):
        a = dict(zip(names, inputs, strict=True))
        ctx.save_for_backward(output[1], a["gamma"], a.get("beta"), *output[2:])
        ctx.args = {n: a[n] for n in constants} | {"act": IDENTITY, "slope": 0.0}
        ctx.dtypes = (a["X"].dtype, a["R"].dtype)
        ctx.mark_non_differentiable(*output[2:])

    def backward(ctx, dY, dS, *_):
        S, gamma, beta, *stats = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_s = need[i_x] or need[i_r]
        wanted = [need_s, need[i_g], i_b is not None and need[i_b], False]
        dY = dY.to(S.dtype)
        grads = norm_backward(fused_grads, reference, dY, S, gamma, beta, None, stats, ctx.args, wanted)
        out = [None] * len(names)
        if need_s:
            total = grads[0] + dS
            out[i_x] = total.to(ctx.dtypes[0]) if need[i_x] else None
            out[i_r] = total.to(ctx.dtypes[1]) if need[i_r] else None
        out[i_g] = grads[1]
        if i_b is not None:
            out[i_b] = grads[2]
        return tuple(out)

    _lib.impl(
        qualname.split("::")[1], _autograd_kernel(op, setup_context, backward), "Autograd", with_keyset=True
    )


def _autograd_kernel(op, setup_context, backward):
    """The op's Autograd-key kernel: what torch.library.register_autograd registers, for a mutating op as
    well (it refuses batch_norm_fwd, whose running statistics never take a gradient), so every norm is on
    one path that Dynamo traces as an op (an autograd.Function breaks the graph when one tensor is passed
    twice, residual=x). Without register_autograd's per-call re-reading of the schema (tens of us)."""
    below = torch._C._after_autograd_keyset

    def forward(ctx, *args):
        *args, keyset = args
        with torch._C._AutoDispatchBelowAutograd():
            output = op.redispatch(keyset & below, *args)
        setup_context(ctx, args, output)
        return output

    def backward_with_keyset(ctx, *grads):
        return (*backward(ctx, *grads), None)  # and none for the keyset, the last input

    # Built with type() so that the grad_fn is named after the op (normext_group_norm_fwdBackward).
    Function = type(
        f"normext_{op._opname}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_with_keyset)},
    )

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return Function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below, *args)

    return kernel


def norm_backward(fused_grads, reference, dY, X, gamma, beta, residual, stats, args, need):
    """[dX, dgamma, dbeta, dresidual], each None unless need (four bools) asks for it: from fused_grads, or
    from reference while the backward's graph is being built (see register_norm_autograd)."""
    identity = args["act"] == IDENTITY
    if building_graph(dY, X, gamma, beta, residual):
        grads = _graph_grads(reference, dY, X, gamma, beta, residual, stats, args, need)
    else:
        mask = [need[0], need[1] and gamma is not None, need[2] and beta is not None]
        mask.append(need[3] and not identity)
        dX, dgamma, dbeta, dres = fused_grads(dY, X, residual, stats, gamma, beta, args, mask)
        grads = [
            dX if mask[0] else None,
            dgamma.to(gamma.dtype) if mask[1] else None,
            dbeta.to(beta.dtype) if mask[2] else None,
            dres if mask[3] else None,
        ]
    if need[3] and identity:
        grads[3] = dY
    return grads


def _graph_grads(reference, dY, X, gamma, beta, residual, stats, args, need):
    """The gradients as differentiable functions of dY and the inputs: autograd.grad with create_graph through
    the torch-ops forward, recomputed from the saved inputs (so the statistics are functions of X again)."""
    inputs = (X, gamma, beta, residual)
    wrt = [i for i in range(3 + (args["act"] != IDENTITY)) if need[i] and inputs[i] is not None]
    grads = [None] * 4
    if wrt:
        Y = reference(X, gamma, beta, residual, stats, args)
        got = torch.autograd.grad(
            Y, [inputs[i] for i in wrt], dY, create_graph=True, allow_unused=True, materialize_grads=True
        )
        for i, g in zip(wrt, got, strict=True):
            grads[i] = g
    return grads


# ------------------------------------------------------------------------------ norms in torch ops


def inv_std(var, eps):
    """1 / sqrt(var + eps); 0 where var + eps == 0 (eps = 0 and a constant slice), as torch's batch and
    instance norm take it, which also keeps that slice's gradient finite."""
    if eps > 0:
        return torch.rsqrt(var + eps)
    zero = var == 0
    return torch.rsqrt(torch.where(zero, 1.0, var)) * ~zero


def normalize(x, dims, eps):
    """x̂ = (x - mean) * inv_std(biased variance) over dims, in the accumulation dtype (as the kernels)."""
    x = x.to(stat_dtype(x))
    mean = x.mean(dims, keepdim=True)
    centred = x - mean
    return centred * inv_std(centred.square().mean(dims, keepdim=True), eps)


def rms_normalize(x, dims, eps):
    """x̂ = x * rsqrt(mean(x²) + eps) over dims, in the accumulation dtype (RMSNorm, as the kernels)."""
    x = x.to(stat_dtype(x))
    return x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)


def channel_view(p, ndim):
    """A per-channel (dim 1) tensor of C elements shaped to broadcast against an (N, C, *) tensor."""
    return p.reshape(-1, *([1] * (ndim - 2)))


def activation(z, act, slope):
    """normext::Activation `act` (normext._ops.ACTIVATIONS codes) in torch ops."""
    if act == IDENTITY:
        return z
    return (
        None,
        F.relu,
        lambda t: F.leaky_relu(t, slope),
        F.silu,
        F.gelu,
        lambda t: F.gelu(t, approximate="tanh"),
    )[act](z)


def affine_act(xhat, gamma, beta, residual, args, dtype, per_channel=True):
    """act(x̂ * gamma + beta + residual) in dtype; gamma/beta per channel (dim 1) or, with per_channel=False,
    shaped like the trailing dims (LayerNorm)."""
    view = (lambda p: channel_view(p, xhat.dim())) if per_channel else (lambda p: p)
    z = xhat
    if gamma is not None:
        z = z * view(gamma)
    if beta is not None:
        z = z + view(beta)
    if residual is not None:
        z = z + residual
    return activation(z, args["act"], args["slope"]).to(dtype)
