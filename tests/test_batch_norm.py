# BatchNorm tests: normext.BatchNorm1d/2d/3d, normext.functional.batch_norm and the batch_norm_* ops
# against the float64 reference and torch.nn (training/eval, running statistics over several steps,
# shapes x memory formats x dtypes x activations, off-centre data, gradcheck, opcheck, determinism,
# bad inputs, torch.compile).
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    FORMATS,
    LOW_AND_FP32,
    assert_bwd_close,
    assert_fwd_close,
    assert_layout_kept,
    make_input,
    make_noncontiguous,
    make_params,
    parse_dtype,
    poison_allocator,
    requires_cuda,
    sliced_batch,
    to_format,
    with_storage_offset,
)
from reference import ACT_CODES, ACTIVATIONS, batch_norm_ref, native_chain, rel_err, to64

import normext
import normext.functional as nxF

SLOPE = 0.2  # a non-default leaky_relu slope, so an ignored negative_slope shows
ERRORS = (RuntimeError, ValueError, TypeError)
MODULES = {2: normext.BatchNorm1d, 3: normext.BatchNorm1d, 4: normext.BatchNorm2d, 5: normext.BatchNorm3d}
TORCH_MODULES = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


def leaves_of(tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def fwd_bwd(fn, tensors, dy):
    """fn on fresh leaves (copies) of `tensors`, backpropagating dy; returns (output, [grads])."""
    leaves = leaves_of(tensors)
    y = fn(*leaves)
    y.backward(dy)
    return y, [None if t is None else t.grad for t in leaves]


def running_stats(C, dtype, device):
    """Running statistics away from the (0, 1) defaults, so a dropped or swapped update shows."""
    return (
        (torch.randn(C, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype),
        (torch.rand(C, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype),
    )


def bn(x, rm, rv, w=None, b=None, training=True, momentum=0.1, act=None, res=None, slope=SLOPE, eps=1e-5):
    return nxF.batch_norm(x, rm, rv, w, b, training, momentum, eps, act, slope, res)


def bn_native(
    x, rm, rv, w=None, b=None, training=True, momentum=0.1, act=None, res=None, slope=SLOPE, eps=1e-5
):
    """The unfused torch chain in x's dtype: F.batch_norm, then + residual, then the activation."""
    return native_chain(F.batch_norm(x, rm, rv, w, b, training, momentum, eps), res, act, slope)


def check_all(x, w, b, act, res, dtype, training=True, fmt=None, pdtype=None, backward=True):
    """Forward, backward and the running-stat update of the functional against the float64 reference; for
    half/bf16 the torch-native chain in the same dtype is the baseline of the flash-attention rule."""
    low = dtype not in (torch.float32, torch.float64)
    C = x.shape[1]
    rm0, rv0 = running_stats(C, pdtype or dtype, x.device)
    tensors = (x, w, b, res)
    dy = torch.randn_like(x)
    rm, rv = rm0.clone(), rv0.clone()
    y, g = fwd_bwd(lambda *t: bn(t[0], rm, rv, t[1], t[2], training, 0.1, act, t[3]), tensors, dy)
    y_ref, g_ref = fwd_bwd(
        lambda *t: batch_norm_ref(t[0], rm0, rv0, t[1], t[2], training, 0.1, 1e-5, act, SLOPE, t[3])[0],
        [to64(t) for t in tensors],
        to64(dy),
    )
    _, rm_ref, rv_ref = batch_norm_ref(x, rm0, rv0, training=training, momentum=0.1)
    rm_nat, rv_nat = rm0.clone(), rv0.clone()
    y_nat, g_nat = fwd_bwd(
        lambda *t: bn_native(t[0], rm_nat, rv_nat, t[1], t[2], training, 0.1, act, t[3]), tensors, dy
    )
    assert y.dtype == x.dtype and y.device == x.device
    if fmt is not None:
        assert_layout_kept(y, x, fmt)
    assert_fwd_close(y, y_ref, dtype, y_nat if low else None)
    if backward:
        for name, gi, gr, gnat, t in zip(
            ("dx", "dweight", "dbias", "dresidual"), g, g_ref, g_nat, tensors, strict=True
        ):
            if t is None:
                continue
            assert gi is not None, f"{name} is missing"
            assert gi.shape == t.shape and gi.dtype == t.dtype, f"{name}: {gi.shape} {gi.dtype}"
            assert_bwd_close(gi, gr, dtype, gnat if low else None, what=name)
    # Running statistics: updated in their own dtype, as torch does (compared with torch's own update).
    assert rm.dtype == rm0.dtype and rv.dtype == rv0.dtype
    if training:
        tol = 1e-6 if rm.dtype in (torch.float32, torch.float64) else 1e-2
        assert rel_err(rm, rm_ref) < tol and rel_err(rv, rv_ref) < tol
        torch.testing.assert_close(rm, rm_nat, rtol=tol, atol=tol)
        torch.testing.assert_close(rv, rv_nat, rtol=tol, atol=tol)
    else:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    return y


# ----------------------------------------------------------------------------------------- functional


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", LOW_AND_FP32)
@pytest.mark.parametrize("device", DEVICES)
def test_dtype_format_activation(device, dtype_name, fmt, act, training):
    dtype, pdtype = parse_dtype(dtype_name)
    shape = (3, 10, 4, 5)
    x = make_input(shape, dtype, device, fmt, mean=0.5, std=2.0)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(10, pdtype, device)
    check_all(x, w, b, act, res, dtype, training, fmt, pdtype)


SHAPES = [(6, 5), (4, 5, 7), (2, 5, 3, 4), (2, 5, 3, 2, 3)]
SHAPE_IDS = ["NC", "NCL", "NCHW", "NCDHW"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16-mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_shapes(device, shape, dtype_name, fmt, training):
    dtype, pdtype = parse_dtype(dtype_name)
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(shape[1], pdtype, device)
    check_all(x, w, b, "relu", res, dtype, training, fmt, pdtype)


ODD_SHAPES = [
    (3, 1),  # C = 1, three values per channel
    (1, 7, 3),  # N = 1
    (5, 3, 1, 1),  # H*W = 1
    (1, 1, 9, 7),  # C = 1
    (3, 19, 3, 5),  # C not a multiple of the vector width
    (2, 37, 1, 3, 1),  # 3-D spatial with size-1 dims
    (64, 24, 2, 2),  # many samples, few values each
    (2, 8, 40, 41),  # few samples, large spatial
    (4, 60, 24, 24),  # C = 60 past the one-launch size: 4-element channels-last vectors on CUDA
    (32, 16, 7, 10),  # H*W = 70 past the one-launch size: NCHW planes at odd offsets (head and tail on CUDA)
    (48, 32, 7, 7),  # H*W = 49 (RoI heads, ResNet's last stage) past the one-launch size
    (4, 3, 45, 47),  # planes of 2115 values cut into 3 tiles on CUDA, a partition ending inside a plane
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=["x".join(map(str, s)) for s in ODD_SHAPES])
@pytest.mark.parametrize("device", DEVICES)
def test_odd_shapes(device, shape, fmt):
    x = make_input(shape, torch.float32, device, fmt)
    res = make_input(shape, torch.float32, device, fmt)
    w, b = make_params(shape[1], torch.float32, device)
    check_all(x, w, b, "silu", res, torch.float32, True, fmt)


@pytest.mark.parametrize("shape", [(4, 64, 24, 24), (2, 48, 40, 40)], ids=["C64", "C48"])
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_few_channels(device, shape):
    """Channels-last with few channels (ResNet's stem C = 64; C = 48) and too many values for the one-launch
    path: on CUDA a block of only as many vector columns as cover C (8 for bfloat16's 8-wide vectors, all
    busy at C = 64, 6 of 8 at C = 48) and correspondingly more rows."""
    x = make_input(shape, torch.bfloat16, device, "channels_last")
    res = make_input(shape, torch.bfloat16, device, "channels_last")
    w, b = make_params(shape[1], torch.float32, device)
    check_all(x, w, b, "relu", res, torch.bfloat16, True, "channels_last", torch.float32)


@pytest.mark.parametrize("shape", [(2, 2, 256, 260), (2, 2, 256, 514)], ids=["K130", "K257"])
@pytest.mark.parametrize("device", DEVICES)
def test_many_partials_per_channel(device, shape):
    """Channels-last with C = 2 and 133K / 263K values per channel: on CUDA 130 / 257 partial results per
    channel (1024 rows each), which the finalize kernels merge with 2 / 4 warps per channel (one warp up to
    128) in a fixed tree."""
    x = make_input(shape, torch.float32, device, "channels_last", mean=3.0)
    w, b = make_params(shape[1], torch.float32, device)
    check_all(x, w, b, None, None, torch.float32, True, "channels_last")


@pytest.mark.parametrize(
    "shape,fmt",
    [((4, 60, 24, 24), "channels_last"), ((32, 16, 7, 10), "contiguous"), ((48, 32, 7, 7), "contiguous")],
    ids=["C60-cl", "HW70", "HW49"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_odd_extents(device, shape, fmt):
    """bfloat16 where the contiguous extent (C = 60 channels-last, H*W = 70 or 49 NCHW) is not a multiple of
    8: on CUDA 4-element vectors that divide C = 60, and for the planes 8-element vectors with each plane's
    head and tail read element by element."""
    x = make_input(shape, torch.bfloat16, device, fmt)
    res = make_input(shape, torch.bfloat16, device, fmt)
    w, b = make_params(shape[1], torch.float32, device)
    check_all(x, w, b, "relu", res, torch.bfloat16, True, fmt, torch.float32)


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", DEVICES)
def test_affine_and_residual_optional(device, training, affine, residual):
    shape = (3, 6, 4, 3)
    x = make_input(shape, torch.float32, device, "channels_last")
    w, b = make_params(6, torch.float32, device) if affine else (None, None)
    res = make_input(shape, torch.float32, device) if residual else None
    check_all(x, w, b, "gelu", res, torch.float32, training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["transposed", "channel_slice", "flat_offset", "batch_slice"])
@pytest.mark.parametrize("device", DEVICES)
def test_views(device, kind, training):
    shape = (2, 8, 5, 6)
    if kind in ("transposed", "channel_slice"):
        x = make_noncontiguous(shape, torch.float32, device, kind)
    elif kind == "flat_offset":
        x = with_storage_offset(make_input(shape, torch.float32, device, "channels_last"), 3)
    else:
        x = sliced_batch(shape, torch.float32, device, "channels_last")
    res = make_noncontiguous(shape, torch.float32, device, "strided")
    w, b = make_params(8, torch.float32, device)
    check_all(x, with_storage_offset(w, 1), b, "leaky_relu", res, torch.float32, training)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, training, dtype_name, fmt):
    """N = 0: an empty output of the right shape; the running statistics stay as they were (torch too)."""
    dtype, _ = parse_dtype(dtype_name)
    x = to_format(torch.empty((0, 4, 3, 3), dtype=dtype, device=device), fmt).requires_grad_()
    m = normext.BatchNorm2d(4, activation="relu", device=device, dtype=dtype)
    m.train(training)
    before = (m.running_mean.clone(), m.running_var.clone())
    y = m(x)
    assert y.shape == x.shape and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(m.running_mean, before[0]) and torch.equal(m.running_var, before[1])
    assert m.weight.grad is None or not m.weight.grad.any()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["f32-mean100-std0.1", "f32-mean100-std0.01", "f16-mean1e4-std100"])
@pytest.mark.parametrize("device", DEVICES)
def test_off_centre_data(device, case, fmt):
    """mean >> std, where E[x^2] - E[x]^2 cancels; same bounds as the GroupNorm test (float32 with std 0.01
    is held to max(1e-4, 2x torch's float32 error), since rounding x to float32 alone costs ~4e-4)."""
    dtype = {"f32": torch.float32, "f16": torch.float16}[case[:3]]
    mean, std = {"mean100-std0.1": (100.0, 0.1), "mean100-std0.01": (100.0, 0.01)}.get(case[4:], (1e4, 100.0))
    shape = (4, 16, 12, 12)
    x = make_input(shape, dtype, device, fmt, mean=mean, std=std)
    w, b = make_params(16, torch.float32, device)
    dy = torch.randn_like(x)
    rm0, rv0 = running_stats(16, torch.float32, device)
    rm, rv = rm0.clone(), rv0.clone()
    y, g = fwd_bwd(lambda *t: bn(t[0], rm, rv, t[1], t[2]), (x, w, b), dy)
    y_ref, g_ref = fwd_bwd(
        lambda *t: batch_norm_ref(t[0], None, None, t[1], t[2], True)[0],
        [to64(t) for t in (x, w, b)],
        to64(dy),
    )
    y_nat, g_nat = fwd_bwd(lambda *t: F.batch_norm(t[0], None, None, t[1], t[2], True), (x, w, b), dy)
    for name, out, ref, nat in zip(
        ("y", "dx", "dweight", "dbias"), [y, *g], [y_ref, *g_ref], [y_nat, *g_nat], strict=True
    ):
        err, nat_err = rel_err(out, ref), rel_err(nat, ref)
        if dtype == torch.float16:
            assert err <= 2 * nat_err + 1e-3, f"{name}: {err:.3g} > 2 x torch {nat_err:.3g} + 1e-3"
        elif std >= 0.1:
            assert err < 1e-4, f"{name}: rel err {err:.3g}"
        else:
            assert err < max(1e-4, 2 * nat_err), f"{name}: rel err {err:.3g} (torch float32: {nat_err:.3g})"
    _, rm_ref, rv_ref = batch_norm_ref(x, rm0, rv0, training=True)
    assert rel_err(rm, rm_ref) < 1e-6 and rel_err(rv, rv_ref) < 1e-4


@pytest.mark.parametrize("act", [None, "relu", "silu"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_input_propagates_like_torch(device, fmt, act):
    x = make_input((3, 8, 3, 3), torch.float32, device)
    x[1, 2, 1, 0] = float("nan")
    x[0, 5, 0, 0] = float("inf")
    x = to_format(x, fmt)
    w, b = make_params(8, torch.float32, device)
    y = bn(x, None, None, w, b, act=act)
    expected = bn_native(x, None, None, w, b, act=act)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    finite = torch.isfinite(expected)
    assert finite.any() and not finite.all()
    assert rel_err(y[finite], expected[finite]) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", DEVICES)
def test_poisoned_memory(device, training, fmt):
    """NaN-filled memory freed right before each call: an unwritten output or gradient element shows."""
    shape = (3, 20, 5, 7)
    x = make_input(shape, torch.float32, device, fmt)
    res = make_input(shape, torch.float32, device, fmt)
    w, b = make_params(20, torch.float32, device)
    rm, rv = running_stats(20, torch.float32, device)
    xl, rl, wl, bl = leaves_of((x, res, w, b))
    poison_allocator(device, x, x, x, w, w)
    y = bn(xl, rm, rv, wl, bl, training, act="gelu", res=rl)
    assert torch.isfinite(y).all() and torch.isfinite(rm).all() and torch.isfinite(rv).all()
    poison_allocator(device, x, x, x, w, w, w, w)
    y.backward(torch.randn_like(y))
    for t in (xl.grad, rl.grad, wl.grad, bl.grad):
        assert torch.isfinite(t).all()


# ---------------------------------------------------------------------------------------- modules


def copy_params(dst, src):
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(dst, name).copy_(getattr(src, name))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_module_several_steps_against_torch(device, shape, momentum):
    """Training steps, an eval step in between and after, then more training: outputs, gradients, running
    statistics and num_batches_tracked follow torch.nn.BatchNorm*d (followed by the same activation)."""
    C = shape[1]
    theirs = TORCH_MODULES[len(shape)](C, momentum=momentum, device=device)
    ours = MODULES[len(shape)](
        C, momentum=momentum, activation="leaky_relu", negative_slope=SLOPE, device=device
    )
    w, b = make_params(C, torch.float32, device)
    with torch.no_grad():
        theirs.weight.copy_(w)
        theirs.bias.copy_(b)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    fmt = "channels_last" if len(shape) > 2 else "contiguous"
    for step, training in enumerate([True, True, False, True, True, False]):
        ours.train(training)
        theirs.train(training)
        x = make_input(shape, torch.float32, device, fmt, mean=step - 2.0, std=1.0 + step)
        dy = torch.randn_like(x)
        ours.zero_grad()
        theirs.zero_grad()
        y, (dx,) = fwd_bwd(ours, (x,), dy)
        y_t, (dx_t,) = fwd_bwd(lambda x_: F.leaky_relu(theirs(x_), SLOPE), (x,), dy)
        torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, dx_t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-6, atol=1e-6)
        assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()
    assert ours.num_batches_tracked.item() == 4


@pytest.mark.parametrize("device", DEVICES)
def test_module_track_running_stats_false(device):
    """No buffers; batch statistics in training and in eval."""
    ours = normext.BatchNorm2d(6, track_running_stats=False, device=device)
    theirs = torch.nn.BatchNorm2d(6, track_running_stats=False, device=device)
    assert ours.running_mean is None and ours.running_var is None and ours.num_batches_tracked is None
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x = make_input((3, 6, 4, 4), torch.float32, device)
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        assert rel_err(ours(x), batch_norm_ref(x, training=True)[0]) < 2e-5


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float16-mixed", "bfloat16-mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_mixed_precision(device, dtype_name):
    """half/bf16 input with parameters and running statistics in float32 (what autocast training gives), or
    the whole module in half/bf16: output in the input dtype, running statistics updated in their dtype."""
    dtype, pdtype = parse_dtype(dtype_name)
    m = normext.BatchNorm2d(8, activation="relu", device=device, dtype=pdtype)
    t = torch.nn.BatchNorm2d(8, device=device, dtype=pdtype)
    x = make_input((4, 8, 6, 6), dtype, device, "channels_last", mean=3.0, std=2.0)
    y = m(x)
    y_t = F.relu(t(x))
    assert y.dtype == dtype and m.running_mean.dtype == pdtype
    assert_layout_kept(y, x, "channels_last")
    y_ref, rm_ref, rv_ref = batch_norm_ref(x, torch.zeros(8), torch.ones(8), training=True, activation="relu")
    assert_fwd_close(y, y_ref, dtype, y_t)
    tol = 1e-6 if pdtype == torch.float32 else 1e-2
    assert rel_err(m.running_mean, rm_ref) < tol and rel_err(m.running_var, rv_ref) < tol
    m.eval()
    t.eval()
    assert_fwd_close(
        m(x), batch_norm_ref(x, m.running_mean, m.running_var, activation="relu")[0], dtype, F.relu(t(x))
    )


@pytest.mark.parametrize("cls", [normext.BatchNorm1d, normext.BatchNorm2d, normext.BatchNorm3d])
def test_module_state_dict_both_ways(cls):
    theirs_cls = {normext.BatchNorm1d: torch.nn.BatchNorm1d, normext.BatchNorm2d: torch.nn.BatchNorm2d}.get(
        cls, torch.nn.BatchNorm3d
    )
    theirs = theirs_cls(5)
    ours = cls(5, activation="silu")
    assert isinstance(ours, theirs_cls)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    with torch.no_grad():
        for t in theirs.state_dict().values():
            t.copy_(torch.randint(1, 9, t.shape) if t.dtype == torch.long else torch.rand(t.shape))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = theirs_cls(5)
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert "activation=silu" in repr(ours)


@pytest.mark.parametrize("device", DEVICES)
def test_module_unbatched_and_dims(device):
    with pytest.raises(ValueError, match="expected 4D input"):
        normext.BatchNorm2d(3, device=device)(torch.randn(2, 3, 4, device=device))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        normext.BatchNorm1d(3, device=device)(torch.randn(2, 3, 4, 4, device=device))
    with pytest.raises(ValueError, match="expected 5D input"):
        normext.BatchNorm3d(3, device=device)(torch.randn(2, 3, 4, 4, device=device))


# ------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1), (1, 4, 1, 1, 1)])
@pytest.mark.parametrize("device", DEVICES)
def test_one_value_per_channel_raises_in_training(device, shape):
    x = torch.randn(shape, device=device)
    m = MODULES[len(shape)](4, device=device)
    for fn in (m, lambda x_: bn(x_, None, None), lambda x_: F.batch_norm(x_, None, None, training=True)):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            fn(x)
    m.eval()
    assert m(x).shape == shape


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    x = make_input((2, 8, 4, 4), torch.float32, device)
    w, b = make_params(8, torch.float32, device)
    rm, rv = running_stats(8, torch.float32, device)
    keep = (rm.clone(), rv.clone())
    with pytest.raises(ERRORS, match="weight"):
        bn(x, rm, rv, torch.ones(6, device=device), b)
    with pytest.raises(ERRORS, match="bias"):
        bn(x, rm, rv, w, torch.zeros(2, 4, device=device), training=False)
    with pytest.raises(ERRORS, match="running_mean"):
        bn(x, torch.zeros(7, device=device), rv, w, b)
    with pytest.raises(ERRORS, match="running_var|var"):
        bn(x, rm, torch.ones(9, device=device), w, b, training=False)
    with pytest.raises(ERRORS, match="residual"):
        bn(x, rm, rv, w, b, res=make_input((2, 8, 4, 5), torch.float32, device))
    with pytest.raises(ERRORS, match="floating-point"):
        bn(torch.randint(0, 5, (2, 8, 4, 4), device=device), rm, rv)
    with pytest.raises(ValueError, match="activation"):
        bn(x, rm, rv, act="tanh")
    with pytest.raises(ValueError, match="activation"):
        normext.BatchNorm2d(8, activation="swish")
    with pytest.raises(ValueError, match="running_mean and running_var"):
        bn(x, None, None, training=False)
    with pytest.raises(ValueError, match="eps must be positive"):
        bn(x, rm, rv, eps=0.0)
    with pytest.raises(ValueError, match="shape"):
        bn(torch.randn(5, device=device), None, None)
    # Every call above was rejected before touching the running statistics.
    assert torch.equal(rm, keep[0]) and torch.equal(rv, keep[1])


@requires_cuda
def test_error_tensors_on_different_devices():
    x = make_input((2, 8, 4, 4), torch.float32, "cuda")
    w, b = make_params(8, torch.float32, "cuda")
    rm, rv = running_stats(8, torch.float32, "cuda")
    with pytest.raises(ERRORS, match="is on"):
        bn(x, rm, rv, w.cpu(), b)
    with pytest.raises(ERRORS, match="is on"):
        bn(x, rm.cpu(), rv, w, b)
    with pytest.raises(ERRORS, match="is on"):
        bn(x, rm, rv.cpu(), w, b, training=False)


# ------------------------------------------------------------------------- gradcheck and opcheck


def kink_free_residual(x, w, b, training):
    """A float64 residual that puts every pre-activation at |z| in [0.2, 1], away from the relu kink."""
    rm, rv = running_stats(x.shape[1], torch.float64, "cpu")
    z0 = batch_norm_ref(x, rm, rv, w, b, training)[0].detach()
    sign = torch.where(torch.rand(z0.shape, dtype=torch.float64) < 0.5, -1.0, 1.0).double()
    return (torch.rand(z0.shape, dtype=torch.float64) * 0.8 + 0.2) * sign - z0, rm, rv


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"])
def test_gradcheck(act, training):
    x = make_input((3, 4, 2, 3), torch.float64, "cpu", "channels_last")
    w, b = make_params(4, torch.float64)
    res, rm, rv = kink_free_residual(x, w, b, training)
    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b, to_format(res, "channels_last")))

    def fn(x_, w_, b_, r_):
        return bn(x_, rm.clone(), rv.clone(), w_, b_, training, act=act, res=r_)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4)], ids=["NC", "NCL"])
def test_gradcheck_optional_args(shape, affine):
    x = make_input(shape, torch.float64, "cpu").requires_grad_()
    w, b = make_params(shape[1], torch.float64) if affine else (None, None)
    inputs = (x, *leaves_of((w, b)))
    assert torch.autograd.gradcheck(lambda x_, w_, b_: bn(x_, None, None, w_, b_, act="silu"), inputs)


def op_cases(device, fmt):
    x = make_input((3, 6, 4, 5), torch.float32, device, fmt, mean=1.0)
    res = make_input((3, 6, 4, 5), torch.float32, device, fmt)
    dy = make_input((3, 6, 4, 5), torch.float32, device, fmt)
    w, b = make_params(6, torch.float32, device)
    rm, rv = running_stats(6, torch.float32, device)
    return x, res, dy, w, b, rm, rv


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, fmt):
    ops = torch.ops.normext
    x, res, dy, w, b, rm, rv = op_cases(device, fmt)
    code = ACT_CODES["gelu"]
    torch.library.opcheck(ops.batch_norm_fwd.default, (x, w, b, res, rm, rv, 0.1, 1e-5, code, SLOPE))
    torch.library.opcheck(ops.batch_norm_fwd.default, (x, None, None, None, None, None, 0.1, 1e-5, 0, SLOPE))
    _, mean, rstd = ops.batch_norm_fwd(x, w, b, res, None, None, 0.1, 1e-5, code, SLOPE)
    torch.library.opcheck(ops.batch_norm_stats.default, (x,))
    m, q = ops.batch_norm_stats(x)
    counts = torch.tensor([60.0, 0.0, 60.0], device=device)
    torch.library.opcheck(
        ops.batch_norm_merge.default,
        (counts, torch.stack([m, m, m]), torch.stack([q, q, q]), rm, rv, 0.1, 1e-5),
    )
    torch.library.opcheck(ops.batch_norm_apply.default, (x, rm, rv, w, b, res, 1e-5, code, SLOPE))
    torch.library.opcheck(ops.batch_norm_apply.default, (x, rm, rv, None, None, None, 1e-5, 0, SLOPE))
    torch.library.opcheck(ops.batch_norm_bwd_reduce.default, (dy, x, res, mean, rstd, w, b, code, SLOPE))
    s_dz, s_dzx = ops.batch_norm_bwd_reduce(dy, x, res, mean, rstd, w, b, code, SLOPE)
    for sums, mask in (
        ((s_dz, s_dzx), [True, True]),
        ((None, None), [True, False]),
        ((None, None), [False, True]),
    ):
        torch.library.opcheck(
            ops.batch_norm_bwd_elemt.default, (dy, x, res, mean, rstd, w, b, *sums, 1 / 60, code, SLOPE, mask)
        )
    for args, mask in (
        ((res, mean, rstd, w, b), [True, True, True, True]),
        ((res, mean, rstd, w, b), [False, True, False, True]),
        ((None, mean, rstd, None, None), [True, False, False, False]),
    ):
        torch.library.opcheck(ops.batch_norm_bwd.default, (dy, x, *args, code, SLOPE, mask))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_ops_against_reference(device, fmt):
    """Each op directly: statistics, the merge of unequal (and empty) parts equal to the statistics of the
    whole, the running-stat update, apply, and the backward sums / elementwise pass."""
    ops = torch.ops.normext
    x, res, dy, w, b, rm0, rv0 = op_cases(device, fmt)
    N, C = x.shape[:2]
    x64 = to64(x)
    dims = [0, 2, 3]
    mean_ref = x64.mean(dims)
    var_ref = x64.var(dims, unbiased=False)
    mean, m2 = ops.batch_norm_stats(x)
    assert mean.dtype == torch.float32 and mean.shape == (C,)
    assert rel_err(mean, mean_ref) < 1e-6 and rel_err(m2, var_ref * x[:, 0].numel()) < 1e-5
    parts = [x[:1], x[1:1], x[1:]]  # sizes 1, 0, 2
    stats = [ops.batch_norm_stats(p) for p in parts]
    counts = torch.tensor([float(p.numel() // C) for p in parts], device=device)
    rm, rv = rm0.clone(), rv0.clone()
    mean_m, var_m = ops.batch_norm_merge(
        counts, torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats]), rm, rv, 0.25, 1e-5
    )
    assert rel_err(mean_m, mean_ref) < 1e-6 and rel_err(var_m, var_ref) < 1e-5
    _, rm_ref, rv_ref = batch_norm_ref(x, rm0, rv0, training=True, momentum=0.25)
    assert rel_err(rm, rm_ref) < 1e-6 and rel_err(rv, rv_ref) < 1e-6
    y = ops.batch_norm_apply(x, mean_m, var_m, w, b, res, 1e-5, ACT_CODES["silu"], SLOPE)
    assert_layout_kept(y, x, fmt)
    y_ref = batch_norm_ref(x, None, None, w, b, True, activation="silu", residual=res)[0]
    assert rel_err(y, y_ref) < 2e-5
    rstd = torch.rsqrt(var_m + 1e-5)
    s_dz, s_dzx = ops.batch_norm_bwd_reduce(dy, x, res, mean_m, rstd, w, b, ACT_CODES["silu"], SLOPE)
    leaves = leaves_of([to64(t) for t in (x, w, b, res)])
    batch_norm_ref(leaves[0], None, None, leaves[1], leaves[2], True, activation="silu", residual=leaves[3])[
        0
    ].backward(to64(dy))
    assert rel_err(s_dzx, leaves[1].grad) < 1e-5 and rel_err(s_dz, leaves[2].grad) < 1e-5
    count = x.numel() // C
    dX, dR = ops.batch_norm_bwd_elemt(
        dy, x, res, mean_m, rstd, w, b, s_dz, s_dzx, 1 / count, ACT_CODES["silu"], SLOPE, [True, True]
    )
    assert rel_err(dX, leaves[0].grad) < 1e-4 and rel_err(dR, leaves[3].grad) < 1e-5
    dX, dR = ops.batch_norm_bwd_elemt(
        dy, x, res, mean_m, rstd, w, b, None, None, 1.0, 0, SLOPE, [True, False]
    )
    assert dR.numel() == 0
    assert rel_err(dX, to64(dy) * to64(w * rstd).view(1, -1, 1, 1)) < 1e-6


@pytest.mark.parametrize("act", ["identity", "silu"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("shape", "threads"), [((3, 6, 4, 5), 1), ((2, 3, 96, 96), 2)], ids=["by-channel", "two-passes"]
)
@pytest.mark.parametrize("device", DEVICES)
def test_bwd_is_reduce_then_elemt(device, shape, threads, fmt, act):
    """batch_norm_bwd, the training backward in one op, gives bit for bit what SyncBatchNorm's two ops give
    without the all-reduce (and so the same gradients on one process as across several), on both of its
    channels-first CPU paths: a channel a task, and two passes when there are fewer channels than two per
    thread."""
    ops = torch.ops.normext
    x = make_input(shape, torch.float32, device, fmt, mean=1.0)
    res, dy = (make_input(shape, torch.float32, device, fmt) for _ in range(2))
    w, b = make_params(shape[1], torch.float32, device)
    code = ACT_CODES[act]
    _, mean, rstd = ops.batch_norm_fwd(x, w, b, res, None, None, 0.1, 1e-5, code, SLOPE)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dX, dw, db, dR = ops.batch_norm_bwd(dy, x, res, mean, rstd, w, b, code, SLOPE, [True] * 4)
        s_dz, s_dzx = ops.batch_norm_bwd_reduce(dy, x, res, mean, rstd, w, b, code, SLOPE)
        count = x.numel() // shape[1]
        dX2, dR2 = ops.batch_norm_bwd_elemt(
            dy, x, res, mean, rstd, w, b, s_dz, s_dzx, 1 / count, code, SLOPE, [True, True]
        )
    finally:
        torch.set_num_threads(before)
    for got, want in ((dX, dX2), (dw, s_dzx), (db, s_dz), (dR, dR2)):
        assert torch.equal(got, want)
    assert_layout_kept(dX, x, fmt)


# ------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(4, 32, 24, 24), (64, 48, 7, 7)], ids=["large-spatial", "many-rows"])
@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(device, shape, fmt):
    x = make_input(shape, torch.bfloat16, device, fmt)
    res = make_input(shape, torch.bfloat16, device, fmt)
    w, b = make_params(shape[1], torch.float32, device)
    dy = torch.randn_like(x)
    rm0, rv0 = running_stats(shape[1], torch.float32, device)

    def run():
        rm, rv = rm0.clone(), rv0.clone()
        y, g = fwd_bwd(lambda *t: bn(t[0], rm, rv, t[1], t[2], act="relu", res=t[3]), (x, w, b, res), dy)
        return [y, *g, rm, rv]

    for a, c in zip(run(), run(), strict=True):
        assert torch.equal(a, c)


# ------------------------------------------------------------------------------ InstanceNorm eval


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_instance_norm_running_stats_path_uses_apply(device, fmt):
    """InstanceNorm with use_input_stats=False (eval with tracked statistics) normalizes with the running
    statistics through batch_norm_apply: values and gradients as torch.nn.InstanceNorm2d."""
    ours = normext.InstanceNorm2d(6, affine=True, track_running_stats=True, activation="relu", device=device)
    theirs = torch.nn.InstanceNorm2d(6, affine=True, track_running_stats=True, device=device)
    rm, rv = running_stats(6, torch.float32, device)
    w, b = make_params(6, torch.float32, device)
    for m in (ours, theirs):
        with torch.no_grad():
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.weight.copy_(w)
            m.bias.copy_(b)
        m.eval()
    x = make_input((2, 6, 5, 4), torch.float32, device, fmt)
    dy = torch.randn_like(x)
    y, (dx,) = fwd_bwd(ours, (x,), dy)
    y_t, (dx_t,) = fwd_bwd(lambda x_: F.relu(theirs(x_)), (x,), dy)
    assert_layout_kept(y, x, fmt)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- compile


@pytest.mark.compile
def test_torch_compile_fullgraph_updates_running_stats():
    torch._dynamo.reset()
    eager = normext.BatchNorm2d(8, activation="relu")
    compiled_m = normext.BatchNorm2d(8, activation="relu")
    compiled_m.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_m, fullgraph=True)
    for step in range(3):
        x = make_input((3, 8, 5, 5), torch.float32, "cpu", "channels_last", mean=step)
        res = make_input((3, 8, 5, 5), torch.float32, "cpu", "channels_last")
        dy = torch.randn_like(x)
        y_e, g_e = fwd_bwd(eager, (x, res), dy)
        y_c, g_c = fwd_bwd(compiled, (x, res), dy)
        torch.testing.assert_close(y_c, y_e)
        for a, c in zip(g_c, g_e, strict=True):
            torch.testing.assert_close(a, c)
    torch.testing.assert_close(compiled_m.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_m.running_var, eager.running_var)
    torch.testing.assert_close(compiled_m.weight.grad, eager.weight.grad)
    assert compiled_m.num_batches_tracked.item() == 3
    eager.eval()
    compiled_m.eval()
    x = make_input((3, 8, 5, 5), torch.float32)
    torch.testing.assert_close(compiled(x), eager(x))
