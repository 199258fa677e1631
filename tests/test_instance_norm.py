# InstanceNorm tests: normext.InstanceNorm1d/2d/3d and normext.functional.instance_norm against the float64
# reference and torch.nn.InstanceNorm* (running stats, momentum, eval mode, state_dict), across dtypes, memory
# formats, activations, residual/affine, odd shapes, views, gradcheck, determinism and error messages.
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
    forward_backward,
    kink_free_residual,
    leaf,
    make_input,
    make_noncontiguous,
    make_params,
    parse_dtype,
    poison_allocator,
    requires_cuda,
    skip_if_unsupported,
    sliced_batch,
    to_format,
    with_storage_offset,
)
from reference import ACTIVATIONS, group_norm_pre_ref, instance_norm_ref, native_chain, rel_err, to64

import normext
import normext.functional as nxF

SLOPE = 0.2  # a non-default leaky_relu slope, so an ignored negative_slope shows
ERRORS = (RuntimeError, ValueError, TypeError)
OURS = {1: normext.InstanceNorm1d, 2: normext.InstanceNorm2d, 3: normext.InstanceNorm3d}
THEIRS = {1: torch.nn.InstanceNorm1d, 2: torch.nn.InstanceNorm2d, 3: torch.nn.InstanceNorm3d}
SHAPES = {1: (2, 12, 10), 2: (2, 12, 5, 7), 3: (2, 12, 3, 4, 5)}


def inorm(
    x, rm=None, rv=None, w=None, b=None, use_input_stats=True, momentum=0.1, act=None, slope=SLOPE, res=None
):
    return nxF.instance_norm(
        x, rm, rv, w, b, use_input_stats, momentum, 1e-5, activation=act, negative_slope=slope, residual=res
    )


def in_native(
    x, rm=None, rv=None, w=None, b=None, use_input_stats=True, momentum=0.1, act=None, slope=SLOPE, res=None
):
    """The unfused torch chain in x's dtype (NCHW path): F.instance_norm, + residual, activation."""
    y = F.instance_norm(x.contiguous(), rm, rv, w, b, use_input_stats, momentum, 1e-5)
    return native_chain(y, res, act, slope)


def clone_or_none(t):
    return None if t is None else t.clone()


def check_all(x, w, b, act, res, dtype, fmt=None, rm=None, rv=None, use_input_stats=True, momentum=0.1):
    """Forward + backward of the functional against the float64 reference (and the torch-native chain as the
    baseline for half/bf16); running stats, when given, are updated in place and checked too."""
    low = dtype not in (torch.float32, torch.float64)
    dy = torch.randn_like(x)
    rm0, rv0 = clone_or_none(rm), clone_or_none(rv)
    tensors = (x, w, b, res)

    def ours(x_, w_, b_, r_):
        return inorm(x_, rm, rv, w_, b_, use_input_stats, momentum, act, SLOPE, r_)

    y, g = forward_backward(ours, tensors, dy)
    stats = {}

    def ref(x_, w_, b_, r_):
        y_, stats["rm"], stats["rv"] = instance_norm_ref(
            x_, rm0, rv0, w_, b_, use_input_stats, momentum, 1e-5, act, SLOPE, r_
        )
        return y_

    y_ref, g_ref = forward_backward(ref, [to64(t) for t in tensors], to64(dy))
    rm_n, rv_n = clone_or_none(rm0), clone_or_none(rv0)

    def native(x_, w_, b_, r_):
        return in_native(x_, rm_n, rv_n, w_, b_, use_input_stats, momentum, act, SLOPE, r_)

    y_nat, g_nat = forward_backward(native, [clone_or_none(t) for t in tensors], dy)
    assert y.dtype == x.dtype and y.device == x.device
    if fmt is not None:
        assert_layout_kept(y, x, fmt)
    assert_fwd_close(y, y_ref, dtype, y_nat if low else None)
    for name, gi, gr, gnat, t in zip(
        ("dx", "dweight", "dbias", "dresidual"), g, g_ref, g_nat, tensors, strict=True
    ):
        if t is None:
            continue
        assert gi is not None and gi.shape == t.shape and gi.dtype == t.dtype, name
        assert_bwd_close(gi, gr, dtype, gnat, what=name)
    if rm is not None:
        for name, ours_s, ref_s, nat_s in (
            ("running_mean", rm, stats["rm"], rm_n),
            ("running_var", rv, stats["rv"], rv_n),
        ):
            if ours_s.dtype == torch.float32:
                assert rel_err(ours_s, ref_s) < 1e-5, name
            else:
                assert_fwd_close(ours_s, ref_s, ours_s.dtype, nat_s, what=name)
    return y


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", LOW_AND_FP32)
@pytest.mark.parametrize("device", DEVICES)
def test_dtype_format_activation(device, dtype_name, fmt, act):
    dtype, pdtype = parse_dtype(dtype_name)
    shape = SHAPES[2]
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(12, pdtype, device)
    check_all(x, w, b, act, res, dtype, fmt=fmt)


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16-mixed"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_dims_affine_residual(device, dims, dtype_name, fmt, affine, residual):
    dtype, pdtype = parse_dtype(dtype_name)
    shape = SHAPES[dims]
    x = make_input(shape, dtype, device, fmt)
    w, b = make_params(12, pdtype, device) if affine else (None, None)
    res = make_input(shape, dtype, device, fmt) if residual else None
    check_all(x, w, b, "leaky_relu", res, dtype, fmt=fmt)


@pytest.mark.parametrize("use_input_stats", [True, False], ids=["input_stats", "running_stats"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16-mixed", "bfloat16", "float64"])
@pytest.mark.parametrize("device", DEVICES)
def test_functional_running_stats(device, dtype_name, fmt, use_input_stats):
    """use_input_stats=True updates running_mean/var in place (unbiased var, momentum 0.3) like
    F.instance_norm; use_input_stats=False normalizes with them and leaves them alone."""
    dtype, pdtype = parse_dtype(dtype_name)
    skip_if_unsupported(device, dtype)
    shape = SHAPES[2]
    x = make_input(shape, dtype, device, fmt, mean=0.5, std=2.0)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(12, pdtype, device)
    rm = (torch.randn(12) * 0.3).to(device=device, dtype=pdtype)
    rv = (torch.rand(12) + 0.5).to(device=device, dtype=pdtype)
    rm0, rv0 = rm.clone(), rv.clone()
    check_all(
        x, w, b, "silu", res, dtype, fmt=fmt, rm=rm, rv=rv, use_input_stats=use_input_stats, momentum=0.3
    )
    if not use_input_stats:
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    else:
        assert not torch.equal(rm, rm0) and not torch.equal(rv, rv0)


ODD_SHAPES = [
    (1, 6, 4, 4),  # N = 1
    (2, 20, 3, 3),  # C = 20
    (3, 6, 5, 7),  # numel 630, not a multiple of 8
    (2, 1, 3, 5),  # C = 1
    (1, 12, 2),  # 1-D, two elements per instance
    (2, 7, 1, 1, 3),  # 3-D spatial with size-1 dims
    (1, 4, 17, 1),  # H*W = 17 with W = 1
    (2, 16, 96, 96),  # large instances (9216 elements each)
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=["x".join(map(str, s)) for s in ODD_SHAPES])
@pytest.mark.parametrize("device", DEVICES)
def test_odd_shapes(device, shape, dtype_name, fmt):
    dtype, pdtype = parse_dtype(dtype_name)
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(shape[1], pdtype, device)
    check_all(x, w, b, "gelu", res, dtype, fmt=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_single_spatial_element_with_running_stats(device, fmt):
    """H*W = 1 is fine when normalizing with running stats (eval); torch raises only for input stats."""
    shape = (3, 6, 1, 1)
    x = make_input(shape, torch.float32, device, fmt)
    w, b = make_params(6, torch.float32, device)
    rm = torch.randn(6, device=device)
    rv = torch.rand(6, device=device) + 0.5
    check_all(x, w, b, "relu", None, torch.float32, rm=rm, rv=rv, use_input_stats=False)
    m = normext.InstanceNorm2d(6, track_running_stats=True, device=device).eval()
    with torch.no_grad():
        m.running_mean.copy_(rm)
        m.running_var.copy_(rv)
    y = m(x)
    assert rel_err(y, instance_norm_ref(x, rm, rv, use_input_stats=False)[0]) < 2e-5
    with pytest.raises(ValueError, match="spatial"):
        inorm(x)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, dims, fmt):
    shape = (0, *SHAPES[dims][1:])
    x = to_format(torch.empty(shape, device=device), fmt).requires_grad_()
    m = OURS[dims](12, affine=True, activation="silu", device=device)
    y = m(x)
    assert y.shape == shape and y.dtype == x.dtype and y.device == x.device
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == shape
    assert inorm(x.detach()).shape == shape


# --------------------------------------------------------------------------------- views and strides


@pytest.mark.parametrize("kind", ["transposed", "strided", "channel_slice"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_input(device, dtype_name, kind):
    dtype, pdtype = parse_dtype(dtype_name)
    shape = (2, 6, 5, 4)
    x = make_noncontiguous(shape, dtype, device, kind)
    res = make_noncontiguous(shape, dtype, device, "transposed")
    w, b = make_params(6, pdtype, device)
    check_all(x, w, b, "gelu_tanh", res, dtype)


@pytest.mark.parametrize("kind", ["flat_offset", "batch_slice"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16-mixed"])
@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_storage_offset_views(device, dims, dtype_name, fmt, kind):
    dtype, pdtype = parse_dtype(dtype_name)
    shape = SHAPES[dims]
    if kind == "flat_offset":
        x = with_storage_offset(make_input(shape, dtype, device, fmt), 3)
        res = with_storage_offset(make_input(shape, dtype, device, fmt), 5)
    else:
        x = sliced_batch(shape, dtype, device, fmt)
        res = sliced_batch(shape, dtype, device, fmt)
    assert x.storage_offset() > 0
    w, b = make_params(12, pdtype, device)
    w, b = with_storage_offset(w, 1), with_storage_offset(b, 3)
    check_all(x, w, b, "silu", res, dtype, fmt=fmt)


# ------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["f32-mean100-std0.1", "f32-mean100-std0.01", "f16-mean1e4-std100"])
@pytest.mark.parametrize("device", DEVICES)
def test_off_centre_data(device, case, fmt):
    """mean >> std (see test_group_norm.test_off_centre_data for the bound): y, dx, dweight, dbias and the
    running stats within max(1e-4, 2x torch's error on its NCHW path in the same dtype), +1e-3 for float16."""
    dtype = {"f32": torch.float32, "f16": torch.float16}[case[:3]]
    mean, std = {"mean100-std0.1": (100.0, 0.1), "mean100-std0.01": (100.0, 0.01)}.get(case[4:], (1e4, 100.0))
    shape = (2, 8, 24, 24)
    x = make_input(shape, dtype, device, fmt, mean=mean, std=std)
    w, b = make_params(8, torch.float32, device)
    rm, rv = torch.zeros(8, device=device), torch.ones(8, device=device)
    rm_n, rv_n = rm.clone(), rv.clone()
    dy = torch.randn_like(x)
    y, g = forward_backward(lambda x_, w_, b_: inorm(x_, rm, rv, w_, b_, momentum=1.0), (x, w, b), dy)
    stats = {}

    def ref(x_, w_, b_):
        y_, stats["rm"], stats["rv"] = instance_norm_ref(x_, torch.zeros(8), torch.ones(8), w_, b_, True, 1.0)
        return y_

    y_ref, g_ref = forward_backward(ref, [to64(t) for t in (x, w, b)], to64(dy))
    y_nat, g_nat = forward_backward(
        lambda x_, w_, b_: in_native(x_, rm_n, rv_n, w_, b_, momentum=1.0), (x.clone(), w, b), dy
    )
    atol = 1e-3 if dtype == torch.float16 else 0.0
    outs = zip(
        ("y", "dx", "dweight", "dbias", "running_mean", "running_var"),
        [y, *g, rm, rv],
        [y_ref, *g_ref, stats["rm"], stats["rv"]],
        [y_nat, *g_nat, rm_n, rv_n],
        strict=True,
    )
    for name, out, ref_t, nat in outs:
        err, nat_err = rel_err(out, ref_t), rel_err(nat, ref_t)
        bound = max(1e-4, 2 * nat_err + atol)
        assert err < bound, f"{name}: rel err {err:.3g} >= {bound:.3g} (torch: {nat_err:.3g})"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_poisoned_memory(device, dtype_name, fmt):
    """NaN-filled memory freed right before the forward and the backward: every output is finite."""
    dtype, _ = parse_dtype(dtype_name)
    shape = (3, 20, 5, 7)
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    m = normext.InstanceNorm2d(20, affine=True, track_running_stats=True, activation="silu", device=device)
    with torch.no_grad():
        m.weight.copy_(make_params(20)[0])
        m.bias.copy_(make_params(20)[1])
    xl, rl = leaf(x), leaf(res)
    poison_allocator(device, x, x, x, torch.empty(60), torch.empty(60))
    y = m(xl, rl)
    assert torch.isfinite(y).all()
    assert torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all()
    poison_allocator(device, x, x, x, m.weight, m.weight)
    y.backward(torch.randn_like(y))
    for t in (xl.grad, rl.grad, m.weight.grad, m.bias.grad):
        assert torch.isfinite(t).all()
    ref = instance_norm_ref(x, None, None, m.weight, m.bias, activation="silu", residual=res)[0]
    assert_fwd_close(y, ref, dtype, in_native(x, None, None, m.weight, m.bias, act="silu", res=res))


# --------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"])
def test_gradcheck(act, fmt):
    shape, C = (2, 3, 3, 2), 3
    x = make_input(shape, torch.float64, "cpu", fmt)
    w, b = make_params(C, torch.float64)
    res = to_format(kink_free_residual(x, C, w, b), fmt)
    assert group_norm_pre_ref(x, C, w, b, residual=res).abs().min() > 0.1
    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b, res))
    assert torch.autograd.gradcheck(lambda *t: inorm(t[0], None, None, t[1], t[2], act=act, res=t[3]), inputs)


@pytest.mark.parametrize("use_input_stats", [True, False], ids=["input_stats", "running_stats"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("dims", [1, 3])
def test_gradcheck_dims_and_running_stats(dims, affine, use_input_stats):
    shape = {1: (2, 3, 4), 3: (1, 2, 2, 3, 2)}[dims]
    C = shape[1]
    x = make_input(shape, torch.float64, "cpu").requires_grad_()
    w, b = make_params(C, torch.float64) if affine else (None, None)
    res = make_input(shape, torch.float64, "cpu").requires_grad_()
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5

    def fn(x_, w_, b_, r_):
        return inorm(x_, rm.clone(), rv.clone(), w_, b_, use_input_stats, 0.1, "silu", SLOPE, r_)

    assert torch.autograd.gradcheck(fn, (x, leaf(w), leaf(b), res))


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 32, 16, 16), (2, 32, 24, 32, 32)], ids=["2d", "3d-large"])
@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(device, shape, dtype_name, fmt):
    dtype, pdtype = parse_dtype(dtype_name)
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(shape[1], pdtype, device)
    dy = torch.randn_like(x)

    def run():
        rm, rv = torch.zeros(shape[1], device=device), torch.ones(shape[1], device=device)
        fn = lambda *t: inorm(t[0], rm, rv, t[1], t[2], act="leaky_relu", res=t[3])  # noqa: E731
        y, g = forward_backward(fn, (x, w, b, res), dy)
        return [y, *g, rm, rv]

    for a, c in zip(run(), run(), strict=True):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("track", [False, True], ids=["notrack", "track"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_torch_nn(device, dims, affine, track, momentum, fmt):
    """Two training steps and one eval step, float32: output, gradients, running stats and
    num_batches_tracked as torch.nn.InstanceNorm{1,2,3}d (momentum=None included)."""
    if momentum is None and not track:
        pytest.skip("momentum only matters with track_running_stats")
    C, shape = 12, SHAPES[dims]
    kw = dict(affine=affine, track_running_stats=track, momentum=momentum, device=device)
    theirs = THEIRS[dims](C, **kw)
    if affine:
        w, b = make_params(C, torch.float32, device)
        with torch.no_grad():
            theirs.weight.copy_(w)
            theirs.bias.copy_(b)
    ours = OURS[dims](C, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for step, training in enumerate([True, True, False]):
        ours.train(training)
        theirs.train(training)
        x = make_input(shape, torch.float32, device, fmt, mean=0.3 * step, std=1.0 + step)
        dy = torch.randn_like(x)
        y, (gx,) = forward_backward(ours, (x,), dy)
        y_t, (gx_t,) = forward_backward(theirs, (x.clone(),), dy)
        assert_layout_kept(y, x, fmt)
        torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gx_t, rtol=1e-4, atol=1e-5)
        if affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)
        if track:
            torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
            assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()
        else:
            assert ours.running_mean is None and ours.running_var is None


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "gelu"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_activation_residual_low_precision(device, dtype_name, act):
    """Module in dtype (parameters and running stats too) with a fused activation (default slope) and a
    residual, training then eval, against the float64 reference; torch.nn in that dtype is the baseline."""
    dtype, _ = parse_dtype(dtype_name)
    C, shape = 12, SHAPES[2]
    kw = dict(affine=True, track_running_stats=True, device=device, dtype=dtype)
    ours = normext.InstanceNorm2d(C, activation=act, **kw)
    theirs = torch.nn.InstanceNorm2d(C, **kw)
    w, b = make_params(C, dtype, device)
    with torch.no_grad():
        theirs.weight.copy_(w)
        theirs.bias.copy_(b)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        rm, rv = ours.running_mean.clone(), ours.running_var.clone()
        x = make_input(shape, dtype, device, "channels_last", mean=1.0, std=2.0)
        res = make_input(shape, dtype, device, "channels_last")
        dy = torch.randn_like(x)
        y, g = forward_backward(ours, (x, res), dy)
        y_nat, g_nat = forward_backward(
            lambda x_, r_: native_chain(theirs(x_), r_, act), (x.clone(), res), dy
        )

        def ref(x_, w_, b_, r_, rm=rm, rv=rv, training=training):
            return instance_norm_ref(x_, rm, rv, w_, b_, training, 0.1, 1e-5, act, 0.01, r_)[0]

        y_ref, g_ref = forward_backward(ref, [to64(t) for t in (x, ours.weight, ours.bias, res)], to64(dy))
        new_rm, new_rv = instance_norm_ref(x, rm, rv, None, None, training, 0.1)[1:]
        assert y.dtype == dtype
        assert_layout_kept(y, x, "channels_last")
        assert_fwd_close(y, y_ref, dtype, y_nat)
        assert_bwd_close(g[0], g_ref[0], dtype, g_nat[0], what="dx")
        assert_bwd_close(g[1], g_ref[3], dtype, g_nat[1], what="dresidual")
        assert_bwd_close(ours.weight.grad, g_ref[1], dtype, theirs.weight.grad, what="dweight")
        assert_bwd_close(ours.bias.grad, g_ref[2], dtype, theirs.bias.grad, what="dbias")
        assert_fwd_close(ours.running_mean, new_rm, dtype, theirs.running_mean, what="running_mean")
        assert_fwd_close(ours.running_var, new_rv, dtype, theirs.running_var, what="running_var")
        for p in (ours.weight, ours.bias, theirs.weight, theirs.bias):
            p.grad = None


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_unbatched_input_like_torch(device, dims):
    """(C, *) input without a batch dim, as torch.nn.InstanceNorm*d accepts it."""
    C = 6
    theirs = THEIRS[dims](C, affine=True, track_running_stats=True, device=device)
    with torch.no_grad():
        theirs.weight.copy_(make_params(C)[0])
        theirs.bias.copy_(make_params(C)[1])
    ours = OURS[dims](C, affine=True, track_running_stats=True, device=device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = make_input((C, *SHAPES[dims][2:]), torch.float32, device)
    y = ours(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("track", [False, True], ids=["notrack", "track"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_module_state_dict_both_ways(dims, affine, track):
    C = 6
    ours = OURS[dims](C, affine=affine, track_running_stats=track, activation="gelu")
    theirs = THEIRS[dims](C, affine=affine, track_running_stats=track)
    attrs = ("num_features", "eps", "momentum", "affine", "track_running_stats")
    assert [getattr(ours, a) for a in attrs] == [C, 1e-5, 0.1, affine, track]
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert {n for n, _ in ours.named_parameters()} == ({"weight", "bias"} if affine else set())
    for name, value in theirs.state_dict().items():  # torch's defaults: ones, zeros, zeros, ones, 0
        assert torch.equal(ours.state_dict()[name], value), name
    with torch.no_grad():
        for t in theirs.state_dict().values():
            t.copy_(torch.randint(1, 5, t.shape) if t.dtype == torch.long else torch.rand(t.shape) + 0.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        for t in ours.state_dict().values():
            t.add_(1)
    back = THEIRS[dims](C, affine=affine, track_running_stats=track)
    back.load_state_dict(ours.state_dict(), strict=True)
    for name, value in back.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), name
        assert torch.equal(value, theirs.state_dict()[name] + 1), name


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("device", DEVICES)
def test_error_module_wrong_channel_count(device):
    m = normext.InstanceNorm2d(16, affine=True, device=device)
    with pytest.raises(ERRORS, match="channels"):
        m(make_input((2, 8, 4, 4), torch.float32, device))


@pytest.mark.parametrize("device", DEVICES)
def test_error_wrong_weight_or_bias_shape(device):
    x = make_input((2, 8, 4, 4), torch.float32, device)
    with pytest.raises(ERRORS, match="weight"):
        inorm(x, w=torch.ones(6, device=device))
    with pytest.raises(ERRORS, match="bias"):
        inorm(x, w=torch.ones(8, device=device), b=torch.zeros(2, 8, device=device))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("device", DEVICES)
def test_error_integer_input(device, dtype):
    x = torch.randint(0, 5, (2, 8, 4, 4), dtype=dtype, device=device)
    with pytest.raises(ERRORS, match="floating-point"):
        inorm(x)
    with pytest.raises(ERRORS, match="floating-point"):
        normext.InstanceNorm2d(8, affine=True, device=device)(x)


@pytest.mark.parametrize("device", DEVICES)
def test_error_residual_wrong_shape(device):
    x = make_input((2, 8, 4, 4), torch.float32, device)
    with pytest.raises(ERRORS, match="residual"):
        inorm(x, res=make_input((2, 8, 2, 4), torch.float32, device))
    with pytest.raises(ERRORS, match="residual"):
        normext.InstanceNorm2d(8, device=device)(x, make_input((2, 1, 4, 4), torch.float32, device))


@pytest.mark.parametrize("device", DEVICES)
def test_error_unknown_activation(device):
    x = make_input((2, 8, 4, 4), torch.float32, device)
    with pytest.raises(ValueError, match="activation"):
        inorm(x, act="softplus")
    with pytest.raises(ValueError, match="activation"):
        normext.InstanceNorm2d(8, activation="Relu", device=device)(x)


@requires_cuda
def test_error_tensors_on_different_devices():
    x = make_input((2, 8, 4, 4), torch.float32, "cuda")
    w, b = make_params(8, torch.float32, "cuda")
    with pytest.raises(ERRORS, match="device|is on"):
        inorm(x, w=w.cpu(), b=b)
    with pytest.raises(ERRORS, match="device|is on"):
        inorm(x, w=w, b=b, res=x.cpu())
    with pytest.raises(ERRORS, match="device|is on"):
        inorm(x, torch.zeros(8), torch.ones(8), w, b, use_input_stats=False)
