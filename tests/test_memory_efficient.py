# memory_efficient=True (design.md §2, §3): every norm keeps its output (and the residual), not its input, and
# recovers x̂ from y in backward. Saved tensors, gradients against the plain path and float64, the errors.
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import (
    DEVICES,
    FORMATS,
    assert_bwd_close,
    make_input,
    make_params,
    parse_dtype,
    skip_if_unsupported,
)
from reference import (
    batch_norm_ref,
    group_norm_ref,
    instance_norm_ref,
    layer_norm_2d_ref,
    layer_norm_ref,
    native_chain,
    permute_layer_norm_2d,
    permute_rms_norm_2d,
    rel_err,
    rms_norm_2d_ref,
    rms_norm_ref,
    to64,
)

import normext
import normext.functional as nxF
from normext.bench.memory import saved_bytes, saved_storages

SLOPE = 0.1
C = 4


def _running(x):
    rm = torch.linspace(-0.5, 0.5, x.shape[1], dtype=torch.float64)
    rv = torch.linspace(0.5, 1.5, x.shape[1], dtype=torch.float64)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return rm.to(x.device, dt), rv.to(x.device, dt)


# name -> (normext f(x, w, b, r, act, me), float64 reference f(x, w, b, r, act), torch-native f, param shape)
FAMILIES = {
    "group_norm": (
        lambda x, w, b, r, a, me: nxF.group_norm(
            x, 2, w, b, activation=a, negative_slope=SLOPE, residual=r, memory_efficient=me
        ),
        lambda x, w, b, r, a: group_norm_ref(x, 2, w, b, activation=a, slope=SLOPE, residual=r),
        lambda x, w, b, r, a: native_chain(F.group_norm(x, 2, w, b), r, a, SLOPE),
        lambda x: (x.shape[1],),
    ),
    "instance_norm": (
        lambda x, w, b, r, a, me: nxF.instance_norm(
            x, None, None, w, b, activation=a, negative_slope=SLOPE, residual=r, memory_efficient=me
        ),
        lambda x, w, b, r, a: instance_norm_ref(x, None, None, w, b, activation=a, slope=SLOPE, residual=r)[
            0
        ],
        lambda x, w, b, r, a: native_chain(F.instance_norm(x, None, None, w, b), r, a, SLOPE),
        lambda x: (x.shape[1],),
    ),
    "layer_norm": (
        lambda x, w, b, r, a, me: nxF.layer_norm(
            x, x.shape[-2:], w, b, activation=a, negative_slope=SLOPE, residual=r, memory_efficient=me
        ),
        lambda x, w, b, r, a: layer_norm_ref(x, x.shape[-2:], w, b, activation=a, slope=SLOPE, residual=r),
        lambda x, w, b, r, a: native_chain(F.layer_norm(x, x.shape[-2:], w, b), r, a, SLOPE),
        lambda x: tuple(x.shape[-2:]),
    ),
    "layer_norm_2d": (
        lambda x, w, b, r, a, me: nxF.layer_norm_2d(
            x, w, b, activation=a, negative_slope=SLOPE, residual=r, memory_efficient=me
        ),
        lambda x, w, b, r, a: layer_norm_2d_ref(x, w, b, activation=a, slope=SLOPE, residual=r),
        lambda x, w, b, r, a: native_chain(permute_layer_norm_2d(x, w, b), r, a, SLOPE),
        lambda x: (x.shape[1],),
    ),
    "batch_norm_train": (
        lambda x, w, b, r, a, me: nxF.batch_norm(
            x, *_running(x), w, b, True, activation=a, negative_slope=SLOPE, residual=r, memory_efficient=me
        ),
        lambda x, w, b, r, a: batch_norm_ref(
            x, None, None, w, b, True, activation=a, slope=SLOPE, residual=r
        )[0],
        lambda x, w, b, r, a: native_chain(F.batch_norm(x, None, None, w, b, True), r, a, SLOPE),
        lambda x: (x.shape[1],),
    ),
    "batch_norm_eval": (
        lambda x, w, b, r, a, me: nxF.batch_norm(
            x, *_running(x), w, b, False, activation=a, negative_slope=SLOPE, residual=r, memory_efficient=me
        ),
        lambda x, w, b, r, a: batch_norm_ref(
            x, *_running(x), w, b, False, activation=a, slope=SLOPE, residual=r
        )[0],
        # torch's CPU batch_norm wants running statistics in the weight's dtype.
        lambda x, w, b, r, a: native_chain(
            F.batch_norm(x, *(t.to(w.dtype) for t in _running(x)), w, b, False), r, a, SLOPE
        ),
        lambda x: (x.shape[1],),
    ),
    # RMSNorm has no bias: b is passed along and never used, so its gradient is None everywhere.
    "rms_norm": (
        lambda x, w, b, r, a, me: nxF.rms_norm(
            x, x.shape[-2:], w, 1e-6, activation=a, negative_slope=SLOPE, residual=r, memory_efficient=me
        ),
        lambda x, w, b, r, a: rms_norm_ref(x, x.shape[-2:], w, 1e-6, activation=a, slope=SLOPE, residual=r),
        lambda x, w, b, r, a: native_chain(F.rms_norm(x, x.shape[-2:], w, 1e-6), r, a, SLOPE),
        lambda x: tuple(x.shape[-2:]),
    ),
    "rms_norm_2d": (
        lambda x, w, b, r, a, me: nxF.rms_norm_2d(
            x, w, activation=a, negative_slope=SLOPE, residual=r, memory_efficient=me
        ),
        lambda x, w, b, r, a: rms_norm_2d_ref(x, w, activation=a, slope=SLOPE, residual=r),
        lambda x, w, b, r, a: native_chain(permute_rms_norm_2d(x, w), r, a, SLOPE),
        lambda x: (x.shape[1],),
    ),
}
INVERTIBLE = [None, "leaky_relu"]


def _params(name, x, dtype):
    """Weights bounded away from 0 (|w| in [0.5, 1.5]) with mixed signs, and biases, in dtype."""
    shape = FAMILIES[name][3](x)
    w, b = make_params(int(torch.Size(shape).numel()), dtype, x.device)
    return w.reshape(shape), b.reshape(shape)


def _run(fn, x, w, b, r, dy):
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, w, b, r)]
    y = fn(*leaves)
    y.backward(dy)
    return y, [None if t is None else t.grad for t in leaves]


def _case(name, device, dtype, fmt, residual, param_dtype=None):
    x = make_input((2, C, 5, 6), dtype, device, fmt)
    w, b = _params(name, x, param_dtype or dtype)
    r = make_input(x.shape, dtype, device, fmt) if residual else None
    dy = make_input(x.shape, dtype, device, fmt)
    return x, w, b, r, dy


def _same_storage(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("act", INVERTIBLE)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_plain_path_and_float64(device, name, fmt, act, residual):
    """float32: every gradient of the memory-efficient path agrees with the plain path and with float64."""
    nx, ref, native, _ = FAMILIES[name]
    x, w, b, r, dy = _case(name, device, torch.float32, fmt, residual)
    y_me, g_me = _run(lambda *t: nx(*t, act, True), x, w, b, r, dy)
    y_pl, g_pl = _run(lambda *t: nx(*t, act, False), x, w, b, r, dy)
    assert torch.equal(y_me, y_pl), "memory_efficient changes the forward"
    _, g_64 = _run(lambda *t: ref(*t, act), *(to64(t) for t in (x, w, b, r, dy)))
    _, g_nat = _run(lambda *t: native(*t, act), x, w, b, r, dy)
    for what, me, pl, r64, nat in zip(("dx", "dw", "db", "dr"), g_me, g_pl, g_64, g_nat, strict=True):
        if r64 is None:
            continue
        assert_bwd_close(me, r64, torch.float32, native=nat, what=f"{what} (memory_efficient)")
        assert rel_err(me, pl) < 1e-4, f"{what}: memory_efficient vs plain {rel_err(me, pl):.3g}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "bfloat16-mixed"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_gradients(device, name, fmt, dtype):
    """float16/bfloat16: x̂ comes from the output rounded to the dtype, off by up to half an ulp of y over
    |γ| per element. The bound: the plain path's (or torch native's, the larger) error doubled, the usual
    absolute slack, and that recovery error, eps(dtype)·rms(y)/min|γ| (relative to x̂'s scale of 1)."""
    dtype, pdtype = parse_dtype(dtype)
    nx, ref, native, _ = FAMILIES[name]
    x, w, b, r, dy = _case(name, device, dtype, fmt, True, pdtype)
    y_me, g_me = _run(lambda *t: nx(*t, "leaky_relu", True), x, w, b, r, dy)
    recovery = torch.finfo(dtype).eps * y_me.double().square().mean().sqrt().item() / w.abs().min().item()
    _, g_pl = _run(lambda *t: nx(*t, "leaky_relu", False), x, w, b, r, dy)
    _, g_64 = _run(lambda *t: ref(*t, "leaky_relu"), *(to64(t) for t in (x, w, b, r, dy)))
    _, g_nat = _run(lambda *t: native(*t, "leaky_relu"), x, w, b, r, dy)
    for what, me, pl, r64, nat in zip(("dx", "dw", "db", "dr"), g_me, g_pl, g_64, g_nat, strict=True):
        if r64 is None:
            continue
        err, base = rel_err(me, r64), max(rel_err(pl, r64), rel_err(nat, r64))
        bound = 2 * base + 1e-3 + recovery
        assert err <= bound, f"{what}: {err:.3g} > 2 x {base:.3g} + 1e-3 + {recovery:.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "name", ["group_norm", "layer_norm", "layer_norm_2d", "batch_norm_train", "rms_norm", "rms_norm_2d"]
)
def test_gradcheck_float64(name, fmt):
    """float64 on the CPU: the memory-efficient backward is the exact derivative (finite differences)."""
    nx = FAMILIES[name][0]
    x, w, b, r, _ = _case(name, "cpu", torch.float64, fmt, True)
    inputs = [t.detach().requires_grad_() for t in (x, w, b, r)]
    assert torch.autograd.gradcheck(lambda *t: nx(*t, "leaky_relu", True), inputs, fast_mode=True)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("device", DEVICES)
def test_saved_tensors_never_hold_the_input(device, name, fmt, residual):
    """What the graph keeps never shares storage with x (so x is freed once the forward returns); it keeps
    y. The plain path keeps x, which shows the check can see it."""
    nx = FAMILIES[name][0]
    x, w, b, r, _ = _case(name, device, torch.float32, fmt, residual)
    x = x.requires_grad_()
    for me in (True, False):
        saved, y = saved_storages(lambda me=me: nx(x, w, b, r, "leaky_relu", me))
        holds_x = any(_same_storage(t, x) for t in saved)
        assert holds_x != me, f"memory_efficient={me}: input kept = {holds_x}"
        if me:
            assert any(_same_storage(t, y) for t in saved), "memory_efficient keeps the output"


@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_batch_norm_keeps_only_the_output(device, fmt, act):
    """FrozenBatchNorm2d (and eval BatchNorm without parameter gradients) needs no x̂: with memory_efficient
    it keeps y alone, relu included, and dx = γ·rstd·dz matches the plain path."""
    m = normext.FrozenBatchNorm2d(C, activation=act, negative_slope=SLOPE, memory_efficient=True).to(device)
    plain = normext.FrozenBatchNorm2d(C, activation=act, negative_slope=SLOPE).to(device)
    w, b = make_params(C, torch.float32, device)
    for mod in (m, plain):
        mod.weight.copy_(w)
        mod.bias.copy_(b)
        mod.running_mean.copy_(_running(w[None])[0])
    x = make_input((2, C, 5, 6), torch.float32, device, fmt).requires_grad_()
    r = make_input(x.shape, torch.float32, device, fmt).requires_grad_()
    saved, y = saved_storages(lambda: m(x, r))
    assert not any(_same_storage(t, x) or _same_storage(t, r) for t in saved)
    dy = make_input(x.shape, torch.float32, device, fmt)
    g_me = torch.autograd.grad(y, (x, r), dy)
    g_pl = torch.autograd.grad(plain(x, r), (x, r), dy)
    for a, p in zip(g_me, g_pl, strict=True):
        assert torch.allclose(a, p, rtol=1e-6, atol=1e-6)
    # Double backward through it (the gradient is linear in dy, and has no second-order term in x).
    (gx,) = torch.autograd.grad(m(x, r), x, dy.requires_grad_(), create_graph=True)
    (gx_plain,) = torch.autograd.grad(plain(x, r), x, dy, create_graph=True)
    (h,) = torch.autograd.grad(gx.square().sum(), dy)
    (h_plain,) = torch.autograd.grad(gx_plain.square().sum(), dy)
    assert torch.allclose(h, h_plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_weight_is_a_clear_error(device):
    """A weight element of exactly 0 makes x̂ unrecoverable there: the backward refuses, for every family."""
    for name, (nx, *_) in FAMILIES.items():
        x, w, b, r, dy = _case(name, device, torch.float32, "contiguous", False)
        w = w.clone()
        w.view(-1)[1] = 0.0
        x, w = x.requires_grad_(), w.requires_grad_()
        y = nx(x, w, b, r, "leaky_relu", True)
        with pytest.raises(RuntimeError, match="equal to 0"):
            y.backward(dy)


NOT_INVERTIBLE = [("relu", 0.01), ("silu", 0.01), ("gelu", 0.01), ("leaky_relu", 0.0), ("leaky_relu", -0.2)]
MODULES = [
    lambda **k: normext.GroupNorm(2, C, **k),
    lambda **k: normext.InstanceNorm2d(C, **k),
    lambda **k: normext.LayerNorm(3, **k),
    lambda **k: normext.LayerNorm2d(C, **k),
    lambda **k: normext.BatchNorm2d(C, **k),
    lambda **k: normext.SyncBatchNorm(C, **k),
]
FUNCTIONALS = [
    lambda x, **k: nxF.group_norm(x, 2, **k),
    lambda x, **k: nxF.instance_norm(x, **k),
    lambda x, **k: nxF.layer_norm(x, (3,), **k),
    lambda x, **k: nxF.layer_norm_2d(x, **k),
    lambda x, **k: nxF.batch_norm(x, None, None, training=True, **k),
]


@pytest.mark.parametrize("act, slope", NOT_INVERTIBLE)
def test_bad_activations_are_value_errors(act, slope):
    """Not invertible: refused at construction (modules) and at the call (functionals), saying why."""
    x = torch.randn(2, C, 3, 3)
    kw = dict(activation=act, negative_slope=slope, memory_efficient=True)
    for make in MODULES:
        with pytest.raises(ValueError, match="invertible"):
            make(**kw)
    for call in FUNCTIONALS:
        with pytest.raises(ValueError, match="invertible"):
            call(x, **kw)


def test_constant_statistics_allow_relu():
    """FrozenBatchNorm2d needs no x̂: relu is allowed there, silu is not; so does eval BatchNorm while the
    weight needs no gradient (and refuses it when it does)."""
    x = torch.randn(2, C, 3, 3)
    normext.FrozenBatchNorm2d(C, activation="relu", memory_efficient=True)
    with pytest.raises(ValueError, match="invertible"):
        normext.FrozenBatchNorm2d(C, activation="silu", memory_efficient=True)
    # Eval BatchNorm with relu: fine while the weight needs no gradient, refused when it does.
    rm, rv = torch.zeros(C), torch.ones(C)
    w = torch.ones(C, requires_grad=True)
    xg = x.clone().requires_grad_()
    kw = dict(activation="relu", memory_efficient=True)
    nxF.batch_norm(xg, rm, rv, w.detach(), None, False, **kw).sum().backward()
    with pytest.raises(ValueError, match="invertible"):
        nxF.batch_norm(xg, rm, rv, w, None, False, **kw)


def test_double_backward_is_refused():
    x = torch.randn(2, C, 3, 3, requires_grad=True)
    y = nxF.group_norm(x, 2, torch.ones(C), None, memory_efficient=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_modules_and_convert_model():
    """Modules carry memory_efficient (repr too); convert_model(memory_efficient=True) turns it on where the
    fused activation allows and leaves the others."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.LeakyReLU(0.1),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.SiLU(),
        nn.BatchNorm2d(8),
    )
    ref = nn.Sequential(*[m for m in model]).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = ref.train()(x)
    model = normext.convert_model(model, memory_efficient=True)
    flags = [getattr(m, "memory_efficient", None) for m in (model[1], model[4], model[6])]
    assert flags == [True, False, True]
    assert "memory_efficient=True" in repr(model[1])
    xg = x.clone().requires_grad_()
    saved, y = saved_storages(lambda: model(xg))
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    y.sum().backward()


def test_in_place_change_of_the_kept_output_is_caught():
    """The output is what backward reads: modifying it in place afterwards is autograd's clear error."""
    x = torch.randn(2, C, 3, 3, requires_grad=True)
    y = nxF.group_norm(x, 2, torch.ones(C), None, memory_efficient=True)
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_conv_gn_stack_keeps_half_of_torch():
    """The issue's measure: 4 x (conv3x3 -> GroupNorm(8) -> LeakyReLU) at 2x32x32x32, bytes of distinct
    storages kept for backward: memory_efficient <= 0.5 x torch and <= 0.7 x normext fused."""

    def stack(norm):
        layers = []
        for _ in range(4):
            layers += [nn.Conv2d(32, 32, 3, padding=1), norm(), nn.LeakyReLU(0.01)]
        return nn.Sequential(*layers)

    torch_model = stack(lambda: nn.GroupNorm(8, 32))
    fused = normext.convert_model(stack(lambda: nn.GroupNorm(8, 32)))
    me = normext.convert_model(stack(lambda: nn.GroupNorm(8, 32)), memory_efficient=True)
    x = torch.randn(2, 32, 32, 32, requires_grad=True)
    models = {"torch": torch_model, "fused": fused, "me": me}
    sizes = {k: saved_bytes(lambda m=m: m(x)) for k, m in models.items()}
    assert sizes["me"] <= 0.5 * sizes["torch"], sizes
    assert sizes["me"] <= 0.7 * sizes["fused"], sizes


@pytest.mark.parametrize("device", DEVICES)
def test_sync_batch_norm_single_process(device):
    """SyncBatchNorm outside a distributed run is BatchNorm: memory_efficient keeps y there too."""
    skip_if_unsupported(device, torch.float32)
    kw = dict(activation="leaky_relu", negative_slope=SLOPE)
    m = normext.SyncBatchNorm(C, **kw, memory_efficient=True).to(device)
    plain = normext.SyncBatchNorm(C, **kw).to(device)
    x = make_input((2, C, 5, 6), torch.float32, device).requires_grad_()
    saved, y = saved_storages(lambda: m(x))
    assert not any(_same_storage(t, x) for t in saved)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(plain(x), x, dy)[0])


@pytest.mark.compile
def test_torch_compile_matches_eager():
    """Under torch.compile (one graph) the op still keeps y and gives the eager gradients."""
    m = normext.GroupNorm(2, C, activation="leaky_relu", negative_slope=SLOPE, memory_efficient=True)
    x = torch.randn(2, C, 5, 6, requires_grad=True)
    r = torch.randn(2, C, 5, 6, requires_grad=True)
    dy = torch.randn(2, C, 5, 6)
    eager = torch.autograd.grad(m(x, r), (x, r, m.weight, m.bias), dy)
    compiled = torch.compile(m, fullgraph=True)
    got = torch.autograd.grad(compiled(x, r), (x, r, m.weight, m.bias), dy)
    for a, e in zip(got, eager, strict=True):
        torch.testing.assert_close(a, e)
