# Hostile inputs: every case here once gave a silent wrong answer or left corrupted state. Tensors on another
# device (meta included), double backward, running statistics of the wrong size, aliased inputs under
# torch.compile, eps=0, TorchScript, C=0 and integer residuals under autocast. Add each new such case here.
import copy
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    FORMATS,
    assert_bwd_close,
    make_input,
    make_params,
    requires_cuda,
    residual_away_from_kink,
    to_format,
)
from reference import (
    batch_norm_ref,
    group_norm_ref,
    instance_norm_ref,
    layer_norm_2d_ref,
    layer_norm_ref,
    native_chain,
    permute_layer_norm_2d,
    rel_err,
)
from test_compile_autocast import CASES, _record, _RecordOps

import normext
import normext.functional as nxF

C = 4  # channels of every table case below
SLOPE = 0.2


def _device(param):
    return param.values[0] if hasattr(param, "values") else param


def _marks(param):
    return param.marks if hasattr(param, "marks") else ()


# (device of the input, device of the one tensor put elsewhere)
DEVICE_PAIRS = [
    *(pytest.param(_device(d), "meta", marks=_marks(d), id=f"{_device(d)}-meta") for d in DEVICES),
    *(
        pytest.param(_device(d), "cpu", marks=_marks(d), id=f"{_device(d)}-cpu")
        for d in DEVICES
        if _device(d) != "cpu"
    ),
    pytest.param("cpu", "cuda", marks=requires_cuda, id="cpu-cuda"),
]


def running(device, dtype=torch.float32):
    """Fixed running statistics of C channels away from (0, 1)."""
    rm = torch.linspace(-0.5, 0.5, C, dtype=torch.float64)
    rv = torch.linspace(0.5, 1.5, C, dtype=torch.float64)
    return rm.to(device, dtype), rv.to(device, dtype)


# ----------------------------------------------------------------------------------- the norms, three ways


@dataclass
class Norm:
    """One norm as normext computes it, as the float64 formula of tests/reference.py, and as torch.nn's ops
    (the native baseline), each f(x, w, b, residual, activation) -> y."""

    nx: object
    ref: object
    native: object
    param_shape: object = lambda x: (x.shape[1],)


def _stats_like(x):
    return running(x.device, x.dtype if x.dtype == torch.float64 else torch.float32)


NORMS = {
    "group_norm": Norm(
        lambda x, w, b, r, a: nxF.group_norm(x, 2, w, b, activation=a, negative_slope=SLOPE, residual=r),
        lambda x, w, b, r, a: group_norm_ref(x, 2, w, b, activation=a, slope=SLOPE, residual=r),
        lambda x, w, b, r, a: native_chain(F.group_norm(x, 2, w, b), r, a, SLOPE),
    ),
    "instance_norm": Norm(
        lambda x, w, b, r, a: nxF.instance_norm(
            x, None, None, w, b, activation=a, negative_slope=SLOPE, residual=r
        ),
        lambda x, w, b, r, a: instance_norm_ref(x, None, None, w, b, activation=a, slope=SLOPE, residual=r)[
            0
        ],
        lambda x, w, b, r, a: native_chain(F.instance_norm(x, None, None, w, b), r, a, SLOPE),
    ),
    "instance_norm_running": Norm(
        lambda x, w, b, r, a: nxF.instance_norm(
            x, *_stats_like(x), w, b, False, activation=a, negative_slope=SLOPE, residual=r
        ),
        lambda x, w, b, r, a: instance_norm_ref(
            x, *_stats_like(x), w, b, False, activation=a, slope=SLOPE, residual=r
        )[0],
        lambda x, w, b, r, a: native_chain(F.instance_norm(x, *_stats_like(x), w, b, False), r, a, SLOPE),
    ),
    "layer_norm": Norm(
        lambda x, w, b, r, a: nxF.layer_norm(
            x, x.shape[-2:], w, b, activation=a, negative_slope=SLOPE, residual=r
        ),
        lambda x, w, b, r, a: layer_norm_ref(x, x.shape[-2:], w, b, activation=a, slope=SLOPE, residual=r),
        lambda x, w, b, r, a: native_chain(F.layer_norm(x, x.shape[-2:], w, b), r, a, SLOPE),
        lambda x: tuple(x.shape[-2:]),
    ),
    "layer_norm_2d": Norm(
        lambda x, w, b, r, a: nxF.layer_norm_2d(x, w, b, activation=a, negative_slope=SLOPE, residual=r),
        lambda x, w, b, r, a: layer_norm_2d_ref(x, w, b, activation=a, slope=SLOPE, residual=r),
        lambda x, w, b, r, a: native_chain(permute_layer_norm_2d(x, w, b), r, a, SLOPE),
    ),
    "batch_norm_train": Norm(
        lambda x, w, b, r, a: nxF.batch_norm(
            x, *_stats_like(x), w, b, True, activation=a, negative_slope=SLOPE, residual=r
        ),
        lambda x, w, b, r, a: batch_norm_ref(
            x, None, None, w, b, True, activation=a, slope=SLOPE, residual=r
        )[0],
        lambda x, w, b, r, a: native_chain(F.batch_norm(x, None, None, w, b, True), r, a, SLOPE),
    ),
    "batch_norm_eval": Norm(
        lambda x, w, b, r, a: nxF.batch_norm(
            x, *_stats_like(x), w, b, False, activation=a, negative_slope=SLOPE, residual=r
        ),
        lambda x, w, b, r, a: batch_norm_ref(
            x, *_stats_like(x), w, b, False, activation=a, slope=SLOPE, residual=r
        )[0],
        lambda x, w, b, r, a: native_chain(F.batch_norm(x, *_stats_like(x), w, b, False), r, a, SLOPE),
    ),
}


def norm_params(norm, x, affine=True):
    """weight, bias of the norm's parameter shape (random, away from (1, 0)), or None, None."""
    if not affine:
        return None, None
    shape = norm.param_shape(x)
    w, b = make_params(int(torch.Size(shape).numel()), x.dtype, x.device)
    return w.reshape(shape), b.reshape(shape)


# ---------------------------------------------------------------------- 1. tensors on another device


def _moved(t, device):
    return t.detach().to(device)


def _names(func):
    names = {"X": "input", "gamma": "weight", "beta": "bias", "dY": "grad_output"}
    return [names.get(a.name, a.name) for a in func._schema.arguments]


@pytest.mark.parametrize("device, other", DEVICE_PAIRS)
@pytest.mark.parametrize("make", CASES)
def test_every_op_rejects_a_tensor_on_another_device(device, other, make):
    """Each tensor argument of each op call in turn on another device (meta: the Meta key then wins dispatch
    and runs the fake impl) is an error naming that argument (or the input, when the op compares the others
    against it), and no argument is modified."""
    tried = 0
    for func, args, kwargs, _phase in _record(make(device)):
        names = _names(func)
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if len(tensors) < 2:
            continue  # one tensor on one device is no mismatch (all-meta calls propagate shapes)
        for i in tensors:
            moved = list(args)
            moved[i] = _moved(args[i], other)
            before = [a.clone() if isinstance(a, torch.Tensor) else a for a in moved]
            # Named as the argument that moved, or, when the op compares against it, as the input.
            dev = torch.device(moved[i].device)
            # add_*_norm's schema calls its residual stream R; the messages say "residual".
            name = "(R|residual)" if names[i] == "R" else names[i]
            with pytest.raises(RuntimeError, match=f"({name} is on {dev}|the input is on {dev})"):
                func(*moved, **kwargs)
            for a, b in zip(moved, before, strict=True):
                if isinstance(a, torch.Tensor) and a.device.type != "meta":
                    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
            tried += 1
    assert tried > 0


def _meta_modules():
    """Modules whose parameters or buffers the forward reads, each (name, factory(device), train)."""
    IN = normext.InstanceNorm2d
    return [
        ("GroupNorm", lambda d: normext.GroupNorm(2, C, device=d), True),
        ("InstanceNorm2d-affine", lambda d: IN(C, affine=True, device=d), True),
        ("InstanceNorm2d-stats-train", lambda d: IN(C, track_running_stats=True, device=d), True),
        ("InstanceNorm2d-stats-eval", lambda d: IN(C, track_running_stats=True, device=d), False),
        ("LayerNorm", lambda d: normext.LayerNorm(5, device=d), True),
        ("LayerNorm2d", lambda d: normext.LayerNorm2d(C, device=d), True),
        ("BatchNorm2d-train", lambda d: normext.BatchNorm2d(C, device=d), True),
        ("BatchNorm2d-eval", lambda d: normext.BatchNorm2d(C, device=d), False),
        ("BatchNorm2d-noaffine", lambda d: normext.BatchNorm2d(C, affine=False, device=d), True),
        ("SyncBatchNorm", lambda d: normext.SyncBatchNorm(C, device=d), True),
        ("FrozenBatchNorm2d", lambda d: normext.FrozenBatchNorm2d(C).to(d), False),
    ]  # fmt: skip


META_MODULES = [pytest.param(make, train, id=name) for name, make, train in _meta_modules()]


@pytest.mark.parametrize("make, train", META_MODULES)
@pytest.mark.parametrize("device", DEVICES)
def test_module_left_on_meta_raises(device, make, train):
    """A module built on device="meta" and never materialized (to_empty / load_state_dict) is an error, not
    uninitialized memory; and a real module given a meta input is one too, its state left alone."""
    x = make_input((2, C, 3, 5), device=device)
    with pytest.raises(RuntimeError, match="is on meta"):
        make("meta").train(train)(x)
    real = make(device).train(train)
    state = copy.deepcopy(real.state_dict())
    with pytest.raises(RuntimeError, match="the input is on meta"):
        real(x.to("meta"))
    for k, v in real.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


@pytest.mark.parametrize("make, train", META_MODULES)
def test_all_meta_propagates_shapes(make, train):
    """Everything on meta is the legitimate use (shape inference): meta out, of the right shape."""
    x = make_input((2, C, 3, 5), fmt="channels_last").to("meta")
    y = make("meta").train(train)(x, residual=torch.empty_like(x))
    assert y.device.type == "meta" and y.shape == x.shape


@pytest.mark.parametrize("device, other", DEVICE_PAIRS)
def test_instance_norm_running_stats_elsewhere_rejected_before_update(device, other):
    """InstanceNorm updates its running statistics in Python: they are checked before the op runs."""
    x = make_input((2, C, 3, 5), device=device)
    for name in ("running_mean", "running_var"):
        stats = dict(zip(("running_mean", "running_var"), running(device), strict=True))
        stats[name] = stats[name].to(other)
        keep = {k: v.clone() for k, v in stats.items()}
        with pytest.raises(RuntimeError, match=f"{name} is on {torch.device(other)}"):
            nxF.instance_norm(x, stats["running_mean"], stats["running_var"])
        for k, v in stats.items():
            if v.device.type != "meta":
                assert torch.equal(v, keep[k])


# ------------------------------------------------------------------------------- 2. double backward

SMOOTH = ["identity", "leaky_relu", "silu", "gelu", "gelu_tanh"]


def _inputs64(norm, fmt, affine=True, residual=True):
    x = make_input((2, C, 3, 5), torch.float64, "cpu", fmt)
    w, b = norm_params(norm, x, affine)
    r = None
    if residual:
        # Pre-activations away from the leaky_relu kink, where the second derivative is not defined.
        r = to_format(residual_away_from_kink(norm.ref(x, w, b, None, None)), fmt)
    return [t if t is None else t.detach().requires_grad_() for t in (x, w, b, r)]


@pytest.mark.parametrize("act", SMOOTH)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", NORMS)
def test_gradgradcheck(name, fmt, act):
    """Second derivatives in float64 through every input (x, weight, bias, residual) and the upstream
    gradient, against finite differences of the first derivative (fast mode: random projections)."""
    norm = NORMS[name]
    inputs = _inputs64(norm, fmt)
    fn = lambda x, w, b, r: norm.nx(x, w, b, r, act)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("name", NORMS)
def test_gradgradcheck_full_jacobian_without_affine_or_residual(name):
    """Slow mode (the whole Jacobian of the backward) on the optional-argument corners."""
    norm = NORMS[name]
    x, _, _, _ = _inputs64(norm, "contiguous", affine=False, residual=False)
    assert torch.autograd.gradgradcheck(lambda x_: norm.nx(x_, None, None, None, "silu"), (x,))
    x, w, b, _ = _inputs64(norm, "channels_last", residual=False)
    assert torch.autograd.gradgradcheck(lambda *t: norm.nx(*t, None, "gelu"), (x, w, b))


def _gradient_penalty(norm_fn, x, kernel, critic_w, params, dtype):
    """R1 / WGAN-GP: conv -> norm -> a linear critic; the penalty is |d critic / d x|^2, backpropagated into
    the conv kernel, the norm's parameters and x, which takes every second-order term of the norm."""
    x, kernel = x.to(dtype).detach().requires_grad_(), kernel.to(dtype).detach().requires_grad_()
    params = [p.to(dtype).detach().requires_grad_() for p in params]
    h = F.conv2d(x, kernel, padding=1)
    critic = (norm_fn(h, *params) * critic_w.to(dtype)).sum()
    (g,) = torch.autograd.grad(critic, x, create_graph=True)
    g.square().sum().backward()
    return [x.grad, kernel.grad, *(p.grad for p in params)]


@pytest.mark.parametrize("act", ["identity", "silu"])
@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_penalty_against_float64(device, name, act):
    """The double-backward gradients in float32 on the device against the float64 formula (torch's own
    float32 error on the same chain sets the bound where the problem is ill-conditioned)."""
    norm = NORMS[name]
    x = make_input((2, 3, 5, 6), device=device, mean=0.5)
    kernel = make_input((C, 3, 3, 3), device=device) * 0.3
    h = F.conv2d(x, kernel, padding=1)
    w, b = norm_params(norm, h)
    critic_w = make_input(h.shape, device=device)
    r = make_input(h.shape, device=device)

    def run(fn, dev, dtype):
        return _gradient_penalty(
            lambda h_, w_, b_: fn(h_, w_, b_, r.to(dev, dtype), act),
            x.to(dev),
            kernel.to(dev),
            critic_w.to(dev),
            (w.to(dev), b.to(dev)),
            dtype,
        )

    ours = run(norm.nx, device, torch.float32)
    ref = run(norm.ref, "cpu", torch.float64)
    native = run(norm.native, device, torch.float32)
    for what, o, rf, n in zip(["x", "conv", "weight", "bias"], ours, ref, native, strict=True):
        if rf is None:  # the penalty does not depend on it (the bias, before a linear activation)
            assert o is None or not o.any(), f"{what}.grad: nonzero where the penalty does not depend on it"
            continue
        assert o is not None, f"{what}.grad is None: a second-order term was dropped"
        assert_bwd_close(o, rf, torch.float32, native=n, what=f"{what}.grad")


MODULE_PAIRS = {
    # normext module, torch.nn module with the same parameters, activation applied after the torch one
    "GroupNorm": (lambda: normext.GroupNorm(2, C, activation="silu"), lambda: torch.nn.GroupNorm(2, C)),
    "InstanceNorm2d": (
        lambda: normext.InstanceNorm2d(C, affine=True, activation="silu"),
        lambda: torch.nn.InstanceNorm2d(C, affine=True),
    ),
    "LayerNorm": (lambda: normext.LayerNorm(6, activation="silu"), lambda: torch.nn.LayerNorm(6)),
    "BatchNorm2d": (lambda: normext.BatchNorm2d(C, activation="silu"), lambda: torch.nn.BatchNorm2d(C)),
    "SyncBatchNorm": (lambda: normext.SyncBatchNorm(C, activation="silu"), lambda: torch.nn.BatchNorm2d(C)),
}


@pytest.mark.parametrize("name", MODULE_PAIRS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_penalty_modules_match_torch(device, name):
    """The GAN-critic case the issue reported: conv.weight.grad and the norm's weight.grad of a gradient
    penalty equal torch.nn's (they were off by 5%, and None)."""
    ours_m, theirs_m = (f().to(device) for f in MODULE_PAIRS[name])
    with torch.no_grad():
        ours_m.weight.copy_(torch.rand_like(ours_m.weight) + 0.5)
        ours_m.bias.copy_(torch.randn_like(ours_m.bias))
    theirs_m.load_state_dict(ours_m.state_dict())
    x = make_input((2, 3, 5, 6), device=device)
    kernel = make_input((C, 3, 3, 3), device=device) * 0.3
    critic_w = make_input((2, C, 5, 6), device=device)

    def run(module, post):
        grads = _gradient_penalty(lambda h: post(module(h)), x, kernel, critic_w, [], torch.float32)
        return [*grads, module.weight.grad, module.bias.grad]

    ours, theirs = run(ours_m, lambda y: y), run(theirs_m, F.silu)
    for what, o, t in zip(["x", "conv", "norm.weight", "norm.bias"], ours, theirs, strict=True):
        assert o is not None, f"{what}.grad is None"
        assert rel_err(o, t) < 1e-4, f"{what}.grad: rel err {rel_err(o, t):.3g} against torch.nn"


@pytest.mark.parametrize("name", NORMS)
def test_backward_runs_fused_kernels_unless_building_a_graph(name):
    """A plain backward calls the fused backward op (the fast path); create_graph=True calls none (the
    torch-ops path), and neither warns."""
    norm = NORMS[name]
    x = make_input((2, C, 3, 5)).requires_grad_()
    w, b = (t.requires_grad_() for t in norm_params(norm, x))
    r = make_input((2, C, 3, 5)).requires_grad_()
    for create_graph in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = norm.nx(x, w, b, r, "silu")
            with _RecordOps() as rec:
                grads = torch.autograd.grad(y, (x, w, b, r), torch.randn_like(y), create_graph=create_graph)
        bwd = [func for func, *_ in rec.calls if "bwd" in func._schema.name]
        assert bool(bwd) != create_graph, f"backward ops {bwd} with create_graph={create_graph}"
        assert all(g.requires_grad == create_graph for g in grads)


@pytest.mark.compile
@pytest.mark.parametrize("ident", ["GroupNorm", "LayerNorm", "BatchNorm2d-train", "FrozenBatchNorm2d"])
def test_compiled_backward_runs_fused_kernels(ident):
    """The graph-building test of the backward does not fire while AOT autograd traces it: the compiled
    backward is the fused ops, not the torch-ops path."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    torch._dynamo.reset()
    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=keep, bw_compiler=keep)

    m = dict(_aliased_cases())[ident]
    x = make_input((2, C, 3, 5)).requires_grad_()
    torch.compile(lambda t: m(t, residual=t), backend=backend, fullgraph=True)(x).sum().backward()
    bwd = {str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"}
    assert any("normext" in t and "bwd" in t for t in bwd), f"no fused backward op in {sorted(bwd)}"


def test_differentiating_a_backward_op_is_an_error():
    """torch's default for an op without autograd is a one-time warning and a gradient that silently drops
    terms; the backward ops instead refuse to be differentiated."""
    x = make_input((2, C, 3, 5)).requires_grad_()
    y, mean, rstd = torch.ops.normext.group_norm_fwd(x, None, None, None, 2, 1e-5, 0, 0.01)
    dy = torch.randn_like(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dx = torch.ops.normext.group_norm_bwd(dy, x, None, mean, rstd, None, None, 2, 0, 0.01, [True] * 4)[0]
        with pytest.raises(RuntimeError, match="not implemented"):
            dx.sum().backward()


# ------------------------------------------------------------------- 3. running statistics of the wrong size


def _wrong_size_calls(device):
    """(id, call, state tensors, expected message) for each running-stat or parameter size mismatch."""
    x = make_input((2, C, 3, 5), device=device)
    x1 = make_input((2, 1, 3, 5), device=device)
    rm, rv = running(device)
    big = torch.zeros(2 * C, device=device)
    in_stats = normext.InstanceNorm2d(C, track_running_stats=True).to(device)
    in_affine = normext.InstanceNorm2d(C, affine=True, track_running_stats=True).to(device)
    bn = normext.BatchNorm2d(C).to(device)
    bn.running_mean = torch.zeros(2 * C, device=device)
    bn1 = normext.BatchNorm2d(C).to(device)
    mean, var = (f"{n} should contain {C} elements not {2 * C}" for n in ("running_mean", "running_var"))
    one = f"running_mean should contain 1 elements not {C}"
    return [
        ("instance_norm-mean", lambda: nxF.instance_norm(x, big, rv), [big, rv], mean),
        ("instance_norm-var", lambda: nxF.instance_norm(x, rm, big), [rm, big], var),
        ("instance_norm-eval", lambda: nxF.instance_norm(x, big, rv, use_input_stats=False), [big, rv], mean),
        ("InstanceNorm2d-1-channel", lambda: in_stats(x1), list(in_stats.buffers()), one),
        ("InstanceNorm2d-weight", lambda: in_affine(x[:, :3]), list(in_affine.buffers()), "channels"),
        ("batch_norm-train", lambda: nxF.batch_norm(x, big, rv, training=True), [big, rv], mean),
        ("batch_norm-eval", lambda: nxF.batch_norm(x, rm, big), [rm, big], var),
        ("BatchNorm2d-buffer", lambda: bn(x), list(bn.buffers()), mean),
        ("BatchNorm2d-1-channel", lambda: bn1(x1), list(bn1.buffers()), one),
        ("batch_norm-weight", lambda: nxF.batch_norm(x, rm, rv, big, training=True), [rm, rv], "weight"),
    ]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_running_stats_of_wrong_size_rejected_before_update(device):
    """Rejected with torch's message before anything is updated in place (they were broadcast into every
    entry, or half-updated before a broadcast error)."""
    for ident, call, state, message in _wrong_size_calls(device):
        before = [t.clone() for t in state]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # InstanceNorm(affine=False) warns about the channel count first
            with pytest.raises((RuntimeError, ValueError), match=message):
                call()
        for t, old in zip(state, before, strict=True):
            assert torch.equal(t, old), f"{ident}: state changed by a rejected call"


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_leaves_instance_norm_running_stats_alone(device):
    rm, rv = running(device)
    keep = rm.clone(), rv.clone()
    y = nxF.instance_norm(make_input((0, C, 3, 5), device=device), rm, rv)
    assert y.shape == (0, C, 3, 5)
    assert torch.equal(rm, keep[0]) and torch.equal(rv, keep[1])


# ----------------------------------------------------------------- 4. aliased inputs under torch.compile


def _aliased_cases():
    """(id, module) run as module(x, residual=x): the same tensor in two arguments of one op."""
    return [
        ("GroupNorm", normext.GroupNorm(2, C, activation="silu")),
        ("InstanceNorm2d", normext.InstanceNorm2d(C, affine=True, track_running_stats=True)),
        ("LayerNorm", normext.LayerNorm(5, activation="relu")),
        ("LayerNorm2d", normext.LayerNorm2d(C)),
        ("BatchNorm2d-train", normext.BatchNorm2d(C, activation="silu")),
        ("BatchNorm2d-eval", normext.BatchNorm2d(C).eval()),
        ("SyncBatchNorm", normext.SyncBatchNorm(C)),
        ("FrozenBatchNorm2d", normext.FrozenBatchNorm2d(C, activation="relu")),
    ]


@pytest.mark.compile
@pytest.mark.parametrize("ident", [i for i, _ in _aliased_cases()])
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_with_residual_x(device, ident):
    """residual=x compiles with fullgraph=True (BatchNorm training broke the graph: an autograd.Function
    with a duplicated input) and matches eager: output, gradients and running statistics."""
    torch._dynamo.reset()
    eager = dict(_aliased_cases())[ident].to(device)
    compiled = copy.deepcopy(eager)
    x = make_input((2, C, 3, 5), device=device, fmt="channels_last")
    dy = make_input(x.shape, device=device)

    def run(m, fn):
        x_ = x.detach().clone().requires_grad_()
        y = fn(x_)
        y.backward(dy)
        return [y, x_.grad, *(p.grad for p in m.parameters()), *(b.clone() for b in m.buffers())]

    ours = run(
        compiled, torch.compile(lambda t: compiled(t, residual=t), fullgraph=True, backend="aot_eager")
    )
    for a, b in zip(ours, run(eager, lambda t: eager(t, residual=t)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_weight_is_bias(device):
    """One tensor as weight and bias (and the residual x) of the training BatchNorm op."""
    torch._dynamo.reset()
    rm, rv = running(device)

    def fn(x, w):
        return nxF.batch_norm(x, rm, rv, w, w, training=True, activation="silu", residual=x)

    grads = []
    x0, w0 = make_input((3, C, 2, 2), device=device), torch.linspace(0.5, 1.5, C, device=device)
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        f(x, w).square().sum().backward()
        grads.append((x.grad, w.grad))
    torch.testing.assert_close(grads[1], grads[0])


# ------------------------------------------------------------------------------------- 5. smaller cases


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_instance_norm_eps0_constant_instance_gives_bias(device, fmt):
    """eps=0: a constant instance has var + eps = 0; torch takes its 1/std as 0, so the output is the bias
    and its input gradient 0 (it was NaN). The other instances, the running stats and the parameter
    gradients as torch."""
    x = make_input((2, C, 3, 5), device=device)
    x[0, 1] = 3.0
    x[1, 3] = -2.0
    x = to_format(x, fmt)
    w, b = make_params(C, device=device)
    rm, rv = running(device)
    dy = make_input(x.shape, device=device)
    outs = []
    for fn in (nxF.instance_norm, F.instance_norm):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        stats = rm.clone(), rv.clone()
        y = fn(leaves[0], *stats, leaves[1], leaves[2], eps=0.0)
        y.backward(dy)
        outs.append((y, *(t.grad for t in leaves), *stats))
    for what, ours, theirs in zip(["y", "x.grad", "w.grad", "b.grad", "mean", "var"], *outs, strict=True):
        assert torch.isfinite(ours).all(), f"{what} not finite"
        # x.grad of a constant instance is 0: judged against the size of the upstream gradient
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * dy.abs().max().item(), msg=what)
    assert torch.equal(outs[0][0][0, 1], b[1].expand(3, 5))


def _modules():
    return [
        normext.GroupNorm(2, C),
        normext.InstanceNorm2d(C),
        normext.LayerNorm(5),
        normext.LayerNorm2d(C),
        normext.BatchNorm2d(C),
        normext.SyncBatchNorm(C),
        normext.FrozenBatchNorm2d(C),
    ]


@pytest.mark.parametrize("module", _modules(), ids=lambda m: type(m).__name__)
def test_jit_script_is_refused_with_one_clear_error(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's own deprecation warning
        for target in (module, torch.nn.Sequential(torch.nn.Identity(), module)):
            with pytest.raises(RuntimeError, match="torch.jit.script.*use torch.compile, or torch.jit.trace"):
                torch.jit.script(target)


@pytest.mark.parametrize("module", _modules(), ids=lambda m: type(m).__name__)
def test_jit_trace_works(module):
    module = module.eval()
    x = make_input((2, C, 3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, x)
    x2 = make_input((2, C, 3, 5))
    torch.testing.assert_close(traced(x2), module(x2), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_instance_norm_without_channels_is_empty_as_torch(device):
    """C = 0: an empty output, as torch's (it was an error about num_groups)."""
    x = make_input((2, 0, 3, 5), device=device).requires_grad_()
    rm, rv = torch.zeros(0, device=device), torch.ones(0, device=device)
    w, b = (torch.ones(0, device=device).requires_grad_() for _ in range(2))
    module = normext.InstanceNorm2d(0, affine=True, track_running_stats=True).to(device)
    for y in (
        nxF.instance_norm(x, rm, rv, w, b),
        nxF.instance_norm(x, rm, rv, use_input_stats=False),
        module(x, residual=torch.zeros_like(x)),
    ):
        assert y.shape == F.instance_norm(x).shape == x.shape
        y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == (0,)


AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    *(pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=requires_cuda) for dt in
      (torch.float16, torch.bfloat16)),
]  # fmt: skip


@pytest.mark.parametrize("rdtype", [torch.int64, torch.int32, torch.bool], ids=str)
@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_integer_residual_is_a_dtype_error(device, dtype, name, rdtype):
    """Autocast casts floating-point tensors only: an integer residual stays the dtype error it is outside
    autocast (it was cast to the input's dtype silently)."""
    norm = NORMS[name]
    x = make_input((2, C, 3, 5), dtype, device)
    w, b = norm_params(norm, x)
    res = torch.ones(x.shape, dtype=rdtype, device=device)
    with torch.autocast(device, dtype=dtype), pytest.raises(RuntimeError, match="residual must have"):
        norm.nx(x, w, b, res, None)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_activation_codes_name_the_problem(device):
    """A raw op call with an activation code no kernel knows, or a backward asked to work from the output with
    an activation it cannot invert, is an error that says which."""
    from normext._ops import FROM_OUTPUT, activation_code

    x = torch.randn(2, 4, 3, 3, device=device)
    with pytest.raises(RuntimeError, match="unknown activation code 99"):
        torch.ops.normext.group_norm_fwd(x, None, None, None, 2, 1e-5, 99, 0.01)
    mean, rstd = torch.zeros(2, 2, device=device), torch.ones(2, 2, device=device)
    with pytest.raises(RuntimeError, match="unknown activation code 99"):
        torch.ops.normext.group_norm_bwd(x, x, None, mean, rstd, None, None, 2, 99, 0.01, [True] * 4)
    silu = activation_code("silu") | FROM_OUTPUT
    with pytest.raises(RuntimeError, match="needs an invertible activation"):
        torch.ops.normext.group_norm_bwd(x, x, None, mean, rstd, None, None, 2, silu, 0.01, [True] * 4)
