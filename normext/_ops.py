"""Loads the compiled operators (torch.ops.normext.*) and holds what every norm's Python side
shares: activation codes, the layout rule the C++ entry points apply to their inputs, the argument checks
that Python must make itself (fake impls, Python-side running-stat updates), and the one autocast rule
every op follows."""

import torch

from normext import _C  # noqa: F401  (loading the library registers torch.ops.normext.*)

# Codes of normext::Activation in csrc/include/normext/math.h.
ACTIVATIONS = {None: 0, "identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5}
IDENTITY = 0
RELU, LEAKY_RELU = 1, 2
# normext::kFromOutput (csrc/include/normext/xhat_source.h), or-ed into an activation code: a backward op then
# reads the forward's output y instead of x; a forward op called with it is memory_efficient (the autograd
# layer keeps y for backward and passes the forward kernels the activation alone).
FROM_OUTPUT = 8


def base_activation(act):
    return act & ~FROM_OUTPUT


def from_output(act):
    return bool(act & FROM_OUTPUT)


def activation_code(activation):
    """The kernel code of an activation name; ValueError for anything else."""
    try:
        return ACTIVATIONS[activation]
    except (KeyError, TypeError):
        names = ", ".join(repr(k) for k in ACTIVATIONS)
        raise ValueError(f"unknown activation {activation!r}; expected one of {names}") from None


def invertible(act, slope):
    """Whether x̂ can be recovered from y = act(z): the identity, or leaky_relu with a slope > 0."""
    base = base_activation(act)
    return base == IDENTITY or (base == LEAKY_RELU and slope > 0)


def sign_readable(act, slope):
    """Whether act'(z) can be read off y = act(z): the identity, relu, leaky_relu with a slope >= 0."""
    base = base_activation(act)
    return base in (IDENTITY, RELU) or (base == LEAKY_RELU and slope >= 0)


def not_invertible_error(where, act, slope, context=""):
    base = base_activation(act)
    name = {v: k for k, v in ACTIVATIONS.items() if k is not None}[base]
    why = f"leaky_relu with negative_slope={slope} is not" if base == LEAKY_RELU else f"{name!r} is not"
    return ValueError(
        f"{where}: memory_efficient=True recomputes the normalized input from the output, so the activation "
        f"must be invertible (None, 'identity', or 'leaky_relu' with negative_slope > 0); {why} invertible"
        + (f" ({context})" if context else "")
    )


def op_activation(activation, negative_slope, memory_efficient, where, constant_stats=False):
    """The activation code an op is called with: activation_code(activation), with FROM_OUTPUT when
    memory_efficient, which needs an activation that y can be inverted through (ValueError otherwise). With
    constant statistics and no parameter gradient (eval BatchNorm, FrozenBatchNorm2d) only dz is needed,
    which relu's output gives as well: constant_stats allows it, and the op refuses it if a parameter turns
    out to need a gradient."""
    act = activation_code(activation)
    if not memory_efficient:
        return act
    if invertible(act, negative_slope) or (constant_stats and sign_readable(act, negative_slope)):
        return act | FROM_OUTPUT
    raise not_invertible_error(where, act, negative_slope)


def check_devices(op, input, **tensors):
    """Every tensor argument on the input's device, each named in the error. The C++ entry points check
    this too, but a meta tensor among the arguments makes the Meta key win dispatch, so only the fake impls
    (and Python code that updates tensors itself) can see that case."""
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but the input is on {input.device}")


def check_running_stats(op, num_features, running_mean, running_var):
    """Running statistics of num_features elements, checked before anything updates them in place (with
    torch's message)."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.numel() != num_features:
            raise RuntimeError(f"{op}: {name} should contain {num_features} elements not {t.numel()}")


# Schema argument names as the C++ checks and the Python signatures call them.
_USER_NAMES = {"X": "input", "R": "residual", "gamma": "weight", "beta": "bias", "dY": "grad_output"}


def register_fake(qualname):
    """torch.library.register_fake, with check_devices on every tensor argument against the input X (for
    an op without one, against its first tensor argument)."""
    schema = torch._library.utils.lookup_op(qualname)._schema
    names = [_USER_NAMES.get(a.name, a.name) for a in schema.arguments]
    op = qualname.split("::")[1]

    def register(fake):
        def checked(*args):
            tensors = {n: a for n, a in zip(names, args, strict=True) if isinstance(a, torch.Tensor)}
            ref = "input" if "input" in tensors else next(iter(tensors))
            check_devices(op, tensors[ref], **{n: t for n, t in tensors.items() if n != ref})
            return fake(*args)

        torch.library.register_fake(qualname)(checked)
        return fake

    return register


def stat_dtype(x):
    """Saved statistics are float32, or float64 for float64 input (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _is_channels_last_dense(x):
    # Mirrors normext::is_channels_last_dense in csrc/include/normext/checks.h.
    if x.dim() < 3:
        return False
    expected = x.shape[1]
    if x.stride(1) != 1 and x.shape[1] != 1:
        return False
    for i in range(x.dim() - 1, 1, -1):
        if x.stride(i) != expected and x.shape[i] != 1:
            return False
        expected *= x.shape[i]
    return x.stride(0) == expected or x.shape[0] == 1


def empty_in_native_layout(x):
    """What the C++ entry points allocate for an output shaped like x: channels-last if x is dense
    channels-last (and not also contiguous), else contiguous. Used by the fake (meta) impls."""
    if not x.is_contiguous() and _is_channels_last_dense(x):
        return x.new_empty_strided(x.shape, x.stride())
    return x.new_empty(x.shape)


def empty_channel_grads(X, output_mask):
    """The fake (meta) outputs of a per-channel norm's backward op, (dX, dgamma, dbeta, dresidual) as
    output_mask selects them: unselected ones are distinct empty tensors, as the kernels return them (no
    aliasing); the parameter gradients are (C,) in the accumulation dtype."""
    C, acc = X.shape[1], stat_dtype(X)
    return (
        empty_in_native_layout(X) if output_mask[0] else X.new_empty((0,)),
        X.new_empty((C if output_mask[1] else 0,), dtype=acc),
        X.new_empty((C if output_mask[2] else 0,), dtype=acc),
        empty_in_native_layout(X) if output_mask[3] else X.new_empty((0,)),
    )


class FusedActivation:
    """Mixin of every normext module: validates the fused activation's name, adds it to the repr, and turns
    torch.jit.script away with one clear error."""

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is given (and their submodules) before compiling.
        raise RuntimeError(
            f"{type(self).__name__}: normext modules cannot be compiled by torch.jit.script (their ops are "
            "torch.ops.normext.* custom operators called from Python); use torch.compile, or torch.jit.trace"
        )

    def _init_activation(self, activation, negative_slope, memory_efficient=False):
        op_activation(activation, negative_slope, memory_efficient, type(self).__name__)
        self.activation = activation
        self.negative_slope = negative_slope
        self.memory_efficient = memory_efficient

    def _activation_repr(self):
        extra = ", memory_efficient=True" if getattr(self, "memory_efficient", False) else ""
        if self.activation in (None, "identity"):
            return extra
        if self.activation == "leaky_relu":
            return f", activation=leaky_relu, negative_slope={self.negative_slope}" + extra
        return f", activation={self.activation}" + extra


# Autocast policy, for every op at once. The norms run in the dtype of the activations they are given:
# autocast hands them the float16/bfloat16 outputs of the convs and linears before them, parameters and
# running statistics stay float32, statistics are accumulated in float32 and the output has the input's
# dtype (torch instead runs group_norm/layer_norm in float32 under CUDA autocast, which doubles the bytes
# moved). A float32 input is not cast down. The one cast: a floating-point `residual` of another dtype (e.g.
# a float32 skip connection added to a bfloat16 branch) is cast to the input's dtype, so that fused
# residuals work inside autocast regions; outside autocast a dtype mismatch stays an error, and so does an
# integer residual inside (autocast casts floating-point tensors only).
_autocast_lib = torch.library.Library("normext", "IMPL")


def _register_autocast(qualname, device_type):
    op = torch._library.utils.lookup_op(qualname)
    names = [a.name for a in op._schema.arguments]
    if "residual" not in names or "X" not in names:
        return
    i_res, i_x = names.index("residual"), names.index("X")
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    # Registered twice, as torch.library.register_autocast does: py_impl is what the Python dispatcher
    # (torch.compile's tracing) calls, the library kernel what eager dispatch calls.
    @op.py_impl(key)
    def cast_residual_and_run(*args):
        residual, x = args[i_res], args[i_x]
        if residual is not None and residual.is_floating_point() and residual.dtype != x.dtype:
            args = (*args[:i_res], residual.to(x.dtype), *args[i_res + 1 :])
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args)

    def kernel(_keyset, *args):
        return cast_residual_and_run(*args)

    _autocast_lib.impl(qualname.split("::")[1], kernel, key.name, with_keyset=True)


for _name in torch._C._dispatch_get_all_op_names():
    if _name.startswith("normext::"):
        for _device_type in ("cpu", "cuda"):
            _register_autocast(_name, _device_type)
