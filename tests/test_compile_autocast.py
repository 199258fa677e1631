# Every normext module and functional under torch.compile(fullgraph=True) (forward, backward and running
# statistics equal to eager), torch.library.opcheck on every op as the modules call it (and a check that
# every registered op is reached), and the autocast policy (low-precision activations in, float32
# parameters and statistics, the input's dtype out; a residual of another dtype cast to the input's).
import copy
import itertools
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
from conftest import DEVICES, make_input, requires_cuda
from reference import rel_err
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import normext
import normext.functional as nxF

TOL = dict(rtol=1e-5, atol=1e-5)


def needs(name, where=normext):
    """Skips a case until the normext class or functional it uses is built."""
    where_name = "normext" if where is normext else "normext.functional"
    return pytest.mark.skipif(not hasattr(where, name), reason=f"{where_name}.{name} not built yet")


@dataclass
class Case:
    fn: object  # a module or a function of `args`
    args: list  # positional arguments (tensors, or None)
    state: list = field(default_factory=list)  # tensors the call may update (running statistics)
    updates_state: bool = False

    def grad_tensors(self):
        params = list(self.fn.parameters()) if isinstance(self.fn, nn.Module) else []
        return [t for t in self.args if isinstance(t, torch.Tensor) and t.requires_grad] + params


def _randomize(module):
    """Parameters and running statistics away from their defaults, so a dropped one shows."""
    with torch.no_grad():
        for name, t in itertools.chain(module.named_parameters(), module.named_buffers()):
            if t is None or not t.is_floating_point():
                continue
            if name.endswith(("weight", "running_var")):
                t.copy_(torch.rand_like(t) + 0.5)
            else:
                t.copy_(torch.randn_like(t) * 0.5)
    return module


def _x(shape, device, fmt="contiguous"):
    return make_input(shape, torch.float32, device, fmt).requires_grad_()


def module_case(cls_name, kwargs, shape, fmt="contiguous", residual=False, train=True, updates_state=False):
    def make(device):
        m = _randomize(getattr(normext, cls_name)(**kwargs)).to(device).train(train)
        args = [_x(shape, device, fmt)] + ([_x(shape, device, fmt)] if residual else [])
        return Case(m, args, [b for b in m.buffers() if b.is_floating_point()], updates_state)

    ident = f"{cls_name}-{'train' if train else 'eval'}-{fmt}" + ("-residual" if residual else "")
    ident += "-nobias" if kwargs.get("bias") is False else ""
    return pytest.param(make, id=ident, marks=needs(cls_name))


def _stats(C, device):
    return torch.randn(C, device=device) * 0.5, torch.rand(C, device=device) + 0.5


def _wb(C, device):
    w = (torch.rand(C, device=device) + 0.5).requires_grad_()
    return w, (torch.randn(C, device=device) * 0.5).requires_grad_()


def functional_case(name, make, ident):
    return pytest.param(make, id=f"F.{name}-{ident}", marks=needs(name, nxF))


def _f_group_norm(device):
    x, r = _x((2, 6, 5, 3), device, "channels_last"), _x((2, 6, 5, 3), device, "channels_last")
    w, b = _wb(6, device)

    def fn(x, w, b, r):
        return nxF.group_norm(x, 3, w, b, eps=1e-5, activation="gelu", residual=r)

    return Case(fn, [x, w, b, r])


def _f_instance_norm(use_input_stats):
    def make(device):
        x = _x((2, 4, 7), device)
        w, b = _wb(4, device)
        rm, rv = _stats(4, device)

        def fn(x, w, b):
            return nxF.instance_norm(
                x, rm, rv, w, b, use_input_stats=use_input_stats, momentum=0.2, activation="silu"
            )

        return Case(fn, [x, w, b], [rm, rv], updates_state=use_input_stats)

    return make


def _f_layer_norm(device):
    x, r = _x((3, 4, 8), device), _x((3, 4, 8), device)
    w, b = _wb(8, device)

    def fn(x, w, b, r):
        return nxF.layer_norm(x, (8,), w, b, eps=1e-5, activation="relu", residual=r)

    return Case(fn, [x, w, b, r])


def _f_layer_norm_2d(device):
    x, r = _x((2, 8, 3, 4), device, "channels_last"), _x((2, 8, 3, 4), device, "channels_last")
    w, b = _wb(8, device)

    def fn(x, w, b, r):
        return nxF.layer_norm_2d(x, w, b, eps=1e-6, activation="gelu_tanh", residual=r)

    return Case(fn, [x, w, b, r])


def _f_rms_norm(device):
    x, r = _x((3, 4, 8), device), _x((3, 4, 8), device)
    w, _ = _wb(8, device)

    def fn(x, w, r):
        return nxF.rms_norm(x, (8,), w, eps=1e-6, activation="silu", residual=r)

    return Case(fn, [x, w, r])


def _f_rms_norm_2d(device):
    x, r = _x((2, 8, 3, 4), device), _x((2, 8, 3, 4), device)
    w, _ = _wb(8, device)

    def fn(x, w, r):
        return nxF.rms_norm_2d(x, w, activation="leaky_relu", negative_slope=0.2, residual=r)

    return Case(fn, [x, w, r])


def _f_add_norm(name):
    """add_layer_norm / add_rms_norm; the case's output out + s takes gradients from both outputs."""

    def make(device):
        x, r = _x((3, 4, 8), device), _x((3, 4, 8), device)
        w, b = _wb(8, device)
        args = [x, r, w] + ([b] if name == "add_layer_norm" else [])

        def fn(*t):
            out, s = getattr(nxF, name)(t[0], t[1], (8,), *t[2:])
            return out + s

        return Case(fn, args)

    return make


def _f_batch_norm(training):
    def make(device):
        x, r = _x((3, 5, 4, 2), device), _x((3, 5, 4, 2), device)
        w, b = _wb(5, device)
        rm, rv = _stats(5, device)

        def fn(x, w, b, r):
            return nxF.batch_norm(
                x, rm, rv, w, b, training=training, momentum=0.2, activation="silu", residual=r
            )

        return Case(fn, [x, w, b, r], [rm, rv], updates_state=training)

    return make


CASES = [
    module_case("GroupNorm", dict(num_groups=4, num_channels=16, activation="silu"), (2, 16, 5, 5),
                "channels_last", residual=True),
    module_case("GroupNorm", dict(num_groups=3, num_channels=6, affine=False), (3, 6, 7)),
    module_case("GroupNorm", dict(num_groups=2, num_channels=6, bias=False, activation="relu"), (2, 6, 4, 3),
                "channels_last", residual=True),
    module_case("InstanceNorm1d", dict(num_features=6, affine=True, track_running_stats=True,
                activation="leaky_relu", negative_slope=0.2), (2, 6, 9), updates_state=True),
    module_case("InstanceNorm2d", dict(num_features=5, track_running_stats=True, activation="gelu"),
                (2, 5, 4, 4), train=False),
    module_case("InstanceNorm3d", dict(num_features=4, affine=True, activation="relu"), (2, 4, 3, 3, 3),
                "channels_last", residual=True),
    module_case("InstanceNorm2d", dict(num_features=5, affine=True, bias=False, track_running_stats=True),
                (2, 5, 4, 3), updates_state=True),
    module_case("LayerNorm", dict(normalized_shape=8, activation="gelu_tanh"), (2, 5, 8), residual=True),
    module_case("LayerNorm", dict(normalized_shape=(4, 6), bias=False), (3, 4, 6)),
    module_case("LayerNorm2d", dict(num_channels=8, activation="silu"), (2, 8, 4, 4), "channels_last",
                residual=True),
    module_case("RMSNorm", dict(normalized_shape=8, eps=1e-5, activation="silu"), (2, 5, 8), residual=True),
    module_case("RMSNorm", dict(normalized_shape=(4, 6), eps=1e-5, elementwise_affine=False), (3, 4, 6)),
    module_case("RMSNorm2d", dict(num_channels=8, activation="gelu"), (2, 8, 4, 4), "channels_last",
                residual=True),
    module_case("RMSNorm2d", dict(num_channels=6), (2, 6, 3, 5)),
    module_case("BatchNorm1d", dict(num_features=6, activation="relu"), (5, 6), updates_state=True),
    module_case("BatchNorm2d", dict(num_features=8, activation="silu"), (2, 8, 5, 5), "channels_last",
                residual=True, updates_state=True),
    module_case("BatchNorm2d", dict(num_features=8, momentum=None), (2, 8, 5, 5), train=False),
    module_case("BatchNorm3d", dict(num_features=4, affine=False), (2, 4, 3, 3, 3), updates_state=True),
    module_case("BatchNorm2d", dict(num_features=6, bias=False, activation="silu"), (3, 6, 3, 3),
                "channels_last", residual=True, updates_state=True),
    module_case("BatchNorm1d", dict(num_features=6, bias=False), (5, 6), train=False),
    module_case("SyncBatchNorm", dict(num_features=8, activation="relu"), (2, 8, 4, 4), updates_state=True),
    module_case("FrozenBatchNorm2d", dict(num_features=8, activation="leaky_relu"), (2, 8, 5, 5),
                "channels_last"),
    functional_case("group_norm", _f_group_norm, "gelu-residual"),
    functional_case("instance_norm", _f_instance_norm(True), "input-stats"),
    functional_case("instance_norm", _f_instance_norm(False), "running-stats"),
    functional_case("layer_norm", _f_layer_norm, "relu-residual"),
    functional_case("layer_norm_2d", _f_layer_norm_2d, "gelu_tanh-residual"),
    functional_case("rms_norm", _f_rms_norm, "silu-residual"),
    functional_case("rms_norm_2d", _f_rms_norm_2d, "leaky_relu-residual"),
    functional_case("add_layer_norm", _f_add_norm("add_layer_norm"), "both-outputs"),
    functional_case("add_rms_norm", _f_add_norm("add_rms_norm"), "both-outputs"),
    functional_case("batch_norm", _f_batch_norm(True), "training"),
    functional_case("batch_norm", _f_batch_norm(False), "eval"),
]  # fmt: skip


def _run(case, fn, dy=None):
    """Forward, then backward of dy (or of a fixed random dy); returns (y, grads, state, dy)."""
    y = fn(*case.args)
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    return y, [t.grad for t in case.grad_tensors()], [s.clone() for s in case.state], dy


# ---------------------------------------------------------------------------------------- torch.compile


@pytest.mark.compile
@pytest.mark.parametrize("make", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_matches_eager(device, make):
    """fullgraph=True (any graph break raises); the AOT-autograd pipeline up to the backend, so fake
    impls, functionalization of the running-stat updates and the backward graph are all exercised."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = make(device)
    torch.manual_seed(0)
    compiled = make(device)
    before = [s.clone() for s in eager.state]
    y_e, g_e, s_e, dy = _run(eager, eager.fn)
    y_c, g_c, s_c, _ = _run(compiled, torch.compile(compiled.fn, fullgraph=True, backend="aot_eager"), dy)
    torch.testing.assert_close(y_c, y_e, **TOL)
    assert y_c.stride() == y_e.stride()
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for a, b, old in zip(s_c, s_e, before, strict=True):
        torch.testing.assert_close(a, b, **TOL)
        assert eager.updates_state == (not torch.equal(b, old)), "running statistics not (only) as eager"


def _inductor_chain():
    """The built modules whose ops inductor treats differently: plain ops (GroupNorm, LayerNorm2d,
    FrozenBatchNorm2d) and an op that updates running statistics in place (BatchNorm2d). InstanceNorm's
    Python-side running-stat update is left to the aot_eager test (each inductor kernel costs seconds
    of C++ compilation)."""
    C = 8
    spec = [
        ("GroupNorm", dict(num_groups=2, num_channels=C, activation="silu")),
        ("BatchNorm2d", dict(num_features=C, activation="relu")),
        ("LayerNorm2d", dict(num_channels=C, activation="gelu")),
        ("FrozenBatchNorm2d", dict(num_features=C)),
    ]
    return nn.ModuleList(_randomize(getattr(normext, n)(**kw)) for n, kw in spec if hasattr(normext, n))


@pytest.mark.compile
def test_compile_inductor():
    """The default backend (inductor) around a chain of normext modules, forward and backward."""
    torch._dynamo.reset()
    net = _inductor_chain()
    ref = copy.deepcopy(net)

    def run(norms, x, r):
        for norm in norms:
            x = norm(x, residual=r)
        return x

    x = make_input((2, 8, 5, 5), fmt="channels_last").requires_grad_()
    r = make_input((2, 8, 5, 5), fmt="channels_last")
    y_c = torch.compile(run, fullgraph=True)(net, x, r)
    y_e = run(ref, x, r)
    torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(y_e)
    (g_c,) = torch.autograd.grad(y_c, x, dy)
    (g_e,) = torch.autograd.grad(y_e, x, dy)
    torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
    for a, b in zip(net.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- opcheck


class _RecordOps(TorchDispatchMode):
    """Records every normext op call (with copies of its arguments) and the phase it was made in."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "normext":
            copy_ = tree_map(
                lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, (args, kwargs)
            )
            self.calls.append((func, *copy_, self.phase))
        return func(*args, **kwargs)


def _record(case):
    with _RecordOps() as rec:
        y = case.fn(*case.args)
        rec.phase = "backward"
        y.backward(torch.randn_like(y))
    return rec.calls


def _as_user_args(func, args, phase):
    """Forward-phase calls get their (non-mutated) floating-point inputs back as leaves that require grad,
    as the user's call had them, so opcheck also checks the autograd registration and traces backward."""
    if phase != "forward":
        return args
    schema = func._schema.arguments
    out = []
    for a, arg in zip(schema, args, strict=False):
        mutated = a.alias_info is not None and a.alias_info.is_write
        if isinstance(arg, torch.Tensor) and arg.is_floating_point() and not mutated:
            arg = arg.requires_grad_()
        out.append(arg)
    return tuple(out) + tuple(args[len(out) :])


@pytest.mark.parametrize("make", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_call(device, make):
    calls = _record(make(device))
    for func, args, kwargs, phase in calls:
        torch.library.opcheck(func, _as_user_args(func, args, phase), kwargs)


def _sync_batch_norm_calls(device):
    """SyncBatchNorm's collective path (per-rank statistics, merged after the all-gather) only runs with
    more than one rank; its ops are called here as it calls them, with two ranks' worth of statistics."""
    ops = torch.ops.normext
    xs = [make_input((3, 5, 4, 2), device=device, fmt=f) for f in ("contiguous", "channels_last")]
    stats = [ops.batch_norm_stats(x) for x in xs]
    counts = torch.tensor([24.0, 24.0], device=device)
    means = torch.stack([m for m, _ in stats])
    m2s = torch.stack([m2 for _, m2 in stats])
    running = [torch.randn(5, device=device), torch.rand(5, device=device) + 0.5]
    return [(ops.batch_norm_stats.default, (x,)) for x in xs] + [
        (ops.batch_norm_merge.default, (counts, means, m2s, *running, 0.1, 1e-5)),
        (ops.batch_norm_merge.default, (counts, means, m2s, None, None, 0.1, 1e-5)),
    ]


DIRECT_CALLS = [
    pytest.param(
        _sync_batch_norm_calls,
        id="SyncBatchNorm-collective-path",
        marks=pytest.mark.skipif(
            not hasattr(torch.ops.normext, "batch_norm_merge"),
            reason="normext::batch_norm_merge not built yet",
        ),
    )
]


@pytest.mark.parametrize("calls", DIRECT_CALLS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_direct_calls(device, calls):
    for op, args in calls(device):
        torch.library.opcheck(op, args)


def _active(params):
    return [p.values[0] for p in params if not any(m.args[0] for m in p.marks if m.name == "skipif")]


def test_every_op_is_reached():
    """Each registered normext op is called by some case above (so opcheck covered it)."""
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("normext::")}
    reached = set()
    for make in _active(CASES):
        reached |= {func._schema.name for func, *_ in _record(make("cpu"))}
    for calls in _active(DIRECT_CALLS):
        reached |= {op._schema.name for op, _ in calls("cpu")}
    assert registered <= reached, f"ops no case reaches (add one): {sorted(registered - reached)}"


# --------------------------------------------------------------------------------------------- autocast

AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    *(pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=requires_cuda) for dt in
      (torch.float16, torch.bfloat16)),
]  # fmt: skip

MODULE_CASES = [c for c in CASES if not c.id.startswith("F.")]


@pytest.mark.parametrize("make", MODULE_CASES)
@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_runs_in_the_activation_dtype(device, dtype, make):
    """Under autocast a low-precision activation goes through as it is: float32 parameters and running
    statistics, output in the activation's dtype, equal to the same call outside autocast; statistics in
    float32 (error against float64 within the dtype's rounding); float32 parameter gradients."""
    case = make(device)
    m = case.fn
    x, *rest = [a.detach().to(dtype).requires_grad_() for a in case.args]
    ref = copy.deepcopy(m)
    with torch.autocast(device, dtype=dtype):
        y = m(x, *rest)
    assert y.dtype == dtype
    assert all(
        p.dtype == torch.float32
        for p in itertools.chain(m.parameters(), m.buffers())
        if p.is_floating_point()
    )
    y_plain = ref(x.detach(), *[r.detach() for r in rest])
    assert torch.equal(y, y_plain)
    y64 = copy.deepcopy(ref).to("cpu", torch.float64)(
        x.detach().cpu().double(), *[r.detach().cpu().double() for r in rest]
    )
    assert rel_err(y, y64) < (8e-3 if dtype == torch.bfloat16 else 1e-3)
    y.backward(torch.randn_like(y))
    assert x.grad.dtype == dtype
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_leaves_float32_input_alone(device, dtype):
    m = _randomize(normext.GroupNorm(2, 8, activation="silu")).to(device)
    x = make_input((2, 8, 4, 4), device=device)
    with torch.autocast(device, dtype=dtype):
        y = m(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, m(x))


@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_casts_residual_to_input_dtype(device, dtype):
    """A float32 skip connection added to a low-precision branch: cast to the branch's dtype under
    autocast (the one cast normext makes); outside autocast the mismatch is an error."""
    m = _randomize(normext.GroupNorm(2, 8, activation="relu")).to(device)
    conv = nn.Conv2d(8, 8, 3, padding=1).to(device)
    x = make_input((2, 8, 5, 5), device=device).requires_grad_()
    with torch.autocast(device, dtype=dtype):
        h = conv(x)
        y = m(h, residual=x)
    assert h.dtype == dtype and y.dtype == dtype
    assert torch.equal(y, m(h, residual=x.to(dtype)))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    with pytest.raises(RuntimeError, match="residual must have the input's dtype"):
        m(h, residual=x)


@pytest.mark.compile
@pytest.mark.parametrize("device, dtype", AUTOCAST)
def test_autocast_under_compile(device, dtype):
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _randomize(normext.GroupNorm(2, 8, activation="silu")))
    net = net.to(device)
    ref = copy.deepcopy(net)
    x = make_input((2, 3, 6, 6), device=device)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    with torch.autocast(device, dtype=dtype):
        y_c = compiled(x)
        y_e = ref(x)
    assert y_c.dtype == y_e.dtype == dtype
    torch.testing.assert_close(y_c, y_e)
    y_c.float().sum().backward()
    y_e.float().sum().backward()
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b.grad)
