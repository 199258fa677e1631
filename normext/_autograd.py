"""The one autograd path of every norm op (register_norm_autograd) and the building blocks of the norms
written in differentiable torch ops: a backward runs the fused kernels, or, while its own graph is being
built (double backward, create_graph=True), autograd.grad through the family's torch-ops forward. It also
holds memory_efficient for every family: an op called with FROM_OUTPUT in its activation code keeps its
output y for backward instead of its input x, and the backward kernels recover x̂ from y."""

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from normext._ops import (
    IDENTITY,
    base_activation,
    from_output,
    invertible,
    not_invertible_error,
    sign_readable,
    stat_dtype,
)

# The differentiable arguments of the norm ops, by schema name (RMSNorm has no beta); all others are
# constants for autograd.
_GRAD_ARGS = ("X", "gamma", "beta", "residual")
_lib = torch.library.Library("normext", "IMPL")


def building_graph(*tensors):
    """True in a backward whose result must itself be differentiable: the fused backward kernels are not, so
    the gradient is then taken through the torch-ops forward instead."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_recoverable(gamma):
    """x̂ = (act⁻¹(y) − β)/γ needs 1/γ finite in float32 in every channel: a weight element of exactly 0 (or
    so small its reciprocal overflows) makes y independent of x̂ there, so the exact gradient cannot be
    recovered; refuse it rather than give a wrong one. A check in the backward: on CUDA it is the backward
    that waits for it, never the forward."""
    if gamma is None:
        return
    ok = torch.isfinite(gamma.float().reciprocal()).all()
    message = (
        "memory_efficient=True: the weight has an element equal to 0 (or too small to invert), so x̂ "
        "cannot be recovered from the output and the gradients would be wrong; use "
        "memory_efficient=False for this layer (or keep the weight away from 0)"
    )
    # A traced backward cannot branch on data: the same check as an assertion in the graph. torch 2.11's
    # AOT autograd traces the backward with is_compiling() false, on fake tensors: hence both tests.
    if torch.compiler.is_compiling() or is_fake(ok):
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise RuntimeError(message)


def _free_of_xhat(gamma, beta, act, slope, needs_grad):
    """Whether a backward with constant statistics needs nothing but y: no parameter needs a gradient (so no
    x̂ is used) and act'(z) can be read off y's sign."""
    return (
        sign_readable(act, slope)
        and not (gamma is not None and needs_grad[1])
        and not (beta is not None and needs_grad[2])
    )


def register_norm_autograd(qualname, fused_grads, reference, stats_args=(), graph_from_output=None):
    """Autograd for a norm op with arguments X, gamma, beta (RMSNorm: none), residual, eps, act, slope (by
    name, among others) that returns Y first.

    fused_grads(dY, X, residual, stats, gamma, beta, args, mask) -> (dX, dgamma, dbeta, dresidual) runs the
    backward kernels; mask selects the outputs as the *_bwd ops' output_mask does (dresidual is only asked
    for when the activation is not the identity: else it is dY). reference(X, gamma, beta, residual, stats,
    args) -> Y is the same norm in differentiable torch ops. args holds the op's non-tensor arguments; stats
    are the op's other outputs (mean, rstd), or the inputs named in stats_args (statistics given to the op,
    constants for autograd).

    memory_efficient: an op called with act | FROM_OUTPUT runs its forward with act and keeps Y (and the
    residual, which x̂'s recovery subtracts) in place of X; fused_grads then gets Y as X and the flag in
    args["act"], which the backward ops take as "X holds the output". With constant statistics (stats_args)
    and no parameter gradient wanted, Y alone is kept whenever act'(z) can be read off y (relu included),
    memory_efficient or not: dx = γ·rstd·dz needs no x̂. graph_from_output(dY, Y, gamma, stats, args, need)
    gives the differentiable gradients for that case (double backward); elsewhere double backward with
    memory_efficient is refused, as x is gone."""
    op = torch._library.utils.lookup_op(qualname)
    names = [a.name for a in op._schema.arguments]
    positions = [names.index(n) if n in names else None for n in _GRAD_ARGS]
    i_x, i_gamma, i_beta, i_res = positions
    i_act, i_slope = names.index("act"), names.index("slope")
    i_stats = [names.index(n) for n in stats_args]
    constants = [(a.name, i) for i, a in enumerate(op._schema.arguments) if "Tensor" not in str(a.type)]
    no_grads = (None,) * len(names)

    # Runs on every forward that records a graph: the inputs are read by position, with no dict built.
    def setup_context(ctx, inputs, output):
        act, slope = inputs[i_act], inputs[i_slope]
        gamma = inputs[i_gamma]
        beta = inputs[i_beta] if i_beta is not None else None
        stats = [inputs[i] for i in i_stats] if stats_args else output[1:]
        if not from_output(act):
            # The residual only changes the gradients through a non-identity activation.
            residual, ctx.recovers_xhat = (inputs[i_res] if act != IDENTITY else None), False
            kept = inputs[i_x]
        else:
            needs = [i is not None and ctx.needs_input_grad[i] for i in positions]
            if graph_from_output is not None and _free_of_xhat(gamma, beta, act, slope, needs):
                residual, ctx.recovers_xhat = None, False
            elif not invertible(act, slope):
                raise not_invertible_error(
                    qualname, act, slope, "with a weight or bias that needs a gradient"
                )
            else:
                residual, ctx.recovers_xhat = inputs[i_res], True
            kept = output if isinstance(output, torch.Tensor) else output[0]
        ctx.save_for_backward(kept, gamma, beta, residual, *stats)
        ctx.args = {n: inputs[i] for n, i in constants}
        if not stats_args:
            ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, dY, *_):
        if dY is None:  # Y did not reach the loss (grads are not materialized: see _autograd_kernel)
            return no_grads
        X, gamma, beta, residual, *stats = ctx.saved_tensors
        need = [i is not None and ctx.needs_input_grad[i] for i in positions]
        if ctx.recovers_xhat:
            check_recoverable(gamma)
        graph = None
        if ctx.recovers_xhat:
            graph = _no_graph_from_output
        elif from_output(ctx.args["act"]):
            graph = graph_from_output
        grads = norm_backward(
            fused_grads, reference, dY, X, gamma, beta, residual, stats, ctx.args, need, graph
        )
        out = [None] * len(names)
        for i, g in zip(positions, grads, strict=True):
            if i is not None:
                out[i] = g
        return tuple(out)

    _lib.impl(
        qualname.split("::")[1],
        _autograd_kernel(op, names.index("act"), setup_context, backward),
        "Autograd",
        with_keyset=True,
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
        need = ctx.needs_input_grad
        need_s = need[i_x] or need[i_r]
        # A None gradient: that output did not reach the loss (see _autograd_kernel). Without dY the norm
        # contributes nothing, and dX = dR = dS.
        grads = [None] * 3
        if dY is not None:
            S, gamma, beta, *stats = ctx.saved_tensors
            if building_graph(dY, dS, S, gamma, beta):
                # The torch-ops gradient would be taken at S, this node's own output, and autograd then
                # re-enters this backward without end (memory grows until the process dies): refuse it.
                raise RuntimeError(
                    f"{qualname}: double backward (create_graph=True) is not supported; for gradient "
                    "penalties add the residual and call layer_norm / rms_norm instead"
                )
            wanted = [need_s, need[i_g], i_b is not None and need[i_b], False]
            dY = dY.to(S.dtype)
            grads = norm_backward(fused_grads, reference, dY, S, gamma, beta, None, stats, ctx.args, wanted)
        out = [None] * len(names)
        total = grads[0]
        if dS is not None:
            total = dS if total is None else total + dS
        if need_s and total is not None:
            out[i_x] = total.to(ctx.dtypes[0]) if need[i_x] else None
            out[i_r] = total.to(ctx.dtypes[1]) if need[i_r] else None
        out[i_g] = grads[1]
        if i_b is not None:
            out[i_b] = grads[2]
        return tuple(out)

    _lib.impl(
        qualname.split("::")[1],
        _autograd_kernel(op, None, setup_context, backward),
        "Autograd",
        with_keyset=True,
    )


def _no_graph_from_output(*_):
    raise RuntimeError(
        "memory_efficient=True: double backward (create_graph=True) is not supported, as the input is not "
        "kept; use memory_efficient=False for gradient penalties and Hessian-vector products"
    )


# Per op, for run_op's paths around the dispatcher: the activation argument's position, and the
# autograd.Function its Autograd kernel applies.
_ACT_POSITION = {}
_FUNCTION = {}
_C = torch._C


def _plain_eager(args):
    """Whether nothing but autograd stands between a call and the kernels: no Dynamo trace, jit trace,
    functorch transform, autocast region, or __torch_function__ override (mode or subclass), all of which
    must see the op itself. Dispatch modes (FakeTensorMode, make_fx) sit below autograd and still do."""
    return not (
        torch.compiler.is_compiling()
        or _C._get_tracing_state()
        or _C._are_functorch_transforms_active()
        or _C._is_any_autocast_enabled()
        or _C._has_torch_function(args)
    )


def run_op(op, *args):
    """op(*args) for a norm op (an OpOverload) registered here, without the dispatcher's round trip through
    Python where nothing but autograd needs it (see _plain_eager): with no graph to record, straight to the
    kernels below the Autograd key (a 1×32×2×2 GroupNorm forward: 22 µs through the Python Autograd kernel,
    13 µs so, torch's own 10.5; thread CPU time, one thread); with one, straight to the op's autograd.Function
    (a 2×256×7×7 BatchNorm training step, forward and backward, one thread, best of 7 × 200: 148-156 → 135-138
    µs in alternating runs, torch's 98)."""
    if not _plain_eager(args):
        return op(*args)
    if torch.is_grad_enabled() and _C._any_requires_grad(*args):
        return _FUNCTION[op].apply(*args, None)
    with _C._AutoDispatchBelowAutograd():
        return op(*_forward_args(args, _ACT_POSITION[op]))


def _autograd_kernel(op, i_act, setup_context, backward):
    """The op's Autograd-key kernel: what torch.library.register_autograd registers, for a mutating op as
    well (it refuses batch_norm_fwd, whose running statistics never take a gradient), so every norm is on
    one path that Dynamo traces as an op (an autograd.Function breaks the graph when one tensor is passed
    twice, residual=x). Without register_autograd's per-call re-reading of the schema (tens of us)."""
    below = _C._after_autograd_keyset
    _ACT_POSITION[op] = i_act

    # keyset: the dispatcher's, or None from run_op, which calls the Function itself.
    def forward(ctx, *args):
        *args, keyset = args
        with _C._AutoDispatchBelowAutograd():
            if keyset is None:
                output = op(*_forward_args(args, i_act))
            else:
                output = op.redispatch(keyset & below, *_forward_args(args, i_act))
        setup_context(ctx, args, output)
        # The statistics outputs never take a gradient: rather than zeros made for them on every backward, an
        # output's gradient is None when it does not reach the loss.
        ctx.set_materialize_grads(False)
        return output

    def backward_with_keyset(ctx, *grads):
        return (*backward(ctx, *grads), None)  # and none for the keyset, the last input

    # Built with type() so that the grad_fn is named after the op (normext_group_norm_fwdBackward).
    Function = type(
        f"normext_{op._opname}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(backward_with_keyset)},
    )
    _FUNCTION[op] = Function

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and _C._any_requires_grad(*args):
            return Function.apply(*args, keyset)
        with _C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below, *_forward_args(args, i_act))

    return kernel


def _forward_args(args, i_act):
    """The op's arguments for its forward kernels: the activation (at i_act; None: the op has none, as
    add_*_norm) without FROM_OUTPUT (what to keep for backward is the autograd layer's business)."""
    if i_act is None or not from_output(args[i_act]):
        return args
    return (*args[:i_act], base_activation(args[i_act]), *args[i_act + 1 :])


def norm_backward(fused_grads, reference, dY, X, gamma, beta, residual, stats, args, need, graph=None):
    """[dX, dgamma, dbeta, dresidual], each None unless need (four bools) asks for it: from fused_grads, or
    from reference while the backward's graph is being built (see register_norm_autograd); for a node that
    kept its output (memory_efficient), from graph(dY, Y, gamma, stats, args, need) then."""
    identity = base_activation(args["act"]) == IDENTITY
    if building_graph(dY, X, gamma, beta, residual):
        if graph is not None:
            grads = graph(dY, X, gamma, stats, args, need)
        else:
            grads = _graph_grads(reference, dY, X, gamma, beta, residual, stats, args, need)
    else:
        mask = [need[0], need[1] and gamma is not None, need[2] and beta is not None]
        mask.append(need[3] and not identity)
        dX, dgamma, dbeta, dres = fused_grads(dY, X, residual, stats, gamma, beta, args, mask)
        grads = [
            dX if mask[0] else None,
            _as_dtype(dgamma, gamma) if mask[1] else None,
            _as_dtype(dbeta, beta) if mask[2] else None,
            dres if mask[3] else None,
        ]
    if need[3] and identity:
        grads[3] = dY
    return grads


def _as_dtype(grad, param):
    """grad in param's dtype. The kernels' parameter gradients are float32, as the parameters usually are,
    and a Tensor.to that changes nothing still parses its arguments: 2.5 us per call under cProfile, in a
    2x256x7x7 BatchNorm backward of ~100 us."""
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


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
