# GroupNorm tests: normext.GroupNorm, normext.functional.group_norm and torch.ops.normext.group_norm_fwd/bwd
# against the float64 reference and torch.nn (dtypes x memory formats x activations x residual/affine, odd
# shapes, views, gradcheck, opcheck, determinism, error messages, state_dict, torch.compile).
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
from conftest import (
    check_all as shared_check_all,
)
from reference import (
    ACT_CODES,
    ACTIVATIONS,
    group_norm_pre_ref,
    group_norm_ref,
    group_stats_ref,
    native_chain,
    rel_err,
    to64,
)

import normext
import normext.functional as nxF

SLOPE = 0.2  # a non-default leaky_relu slope, so an ignored negative_slope shows
ERRORS = (RuntimeError, ValueError, TypeError)


def gn(x, G, w=None, b=None, act=None, slope=SLOPE, res=None, eps=1e-5):
    return nxF.group_norm(x, G, w, b, eps=eps, activation=act, negative_slope=slope, residual=res)


def gn_native(x, G, w=None, b=None, act=None, slope=SLOPE, res=None, eps=1e-5):
    """The unfused torch chain in x's dtype: F.group_norm, then + residual, then the activation. torch's
    NCHW path is used whatever x's layout: its CPU channels-last GroupNorm computes E[x^2] - E[x]^2 and
    is not a fair baseline (relative error ~1 on off-centre data)."""
    return native_chain(F.group_norm(x.contiguous(), G, w, b, eps), res, act, slope)


def check_all(x, G, w, b, act, res, dtype, fmt=None, slope=SLOPE, backward=True):
    """Forward (and backward) of the functional against the float64 reference; for half/bf16 the
    torch-native chain in the same dtype is the baseline of the flash-attention rule (conftest.check_all)."""

    def ours(x_, w_, b_, r_):
        return gn(x_, G, w_, b_, act, slope, r_)

    def ref(x_, w_, b_, r_):
        return group_norm_ref(x_, G, w_, b_, 1e-5, act, slope, r_)

    def native(x_, w_, b_, r_):
        return gn_native(x_, G, w_, b_, act, slope, r_)

    return shared_check_all((ours, ref, native), (x, w, b, res), dtype, fmt, backward)


def test_activation_codes():
    """normext._ops.ACTIVATIONS maps every activation name to the code the ops expect."""
    from normext import _ops

    for name, code in ACT_CODES.items():
        assert _ops.ACTIVATIONS[name] == code, name


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", LOW_AND_FP32)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_dtype_format_activation(device, dtype_name, fmt, act):
    dtype, pdtype = parse_dtype(dtype_name)
    shape, G = (2, 12, 5, 7), 4
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(12, pdtype, device)
    y = check_all(x, G, w, b, act, res, dtype, backward=False)
    assert_layout_kept(y, x, fmt)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", LOW_AND_FP32)
@pytest.mark.parametrize("device", DEVICES)
def test_backward_dtype_format_activation(device, dtype_name, fmt, act):
    dtype, pdtype = parse_dtype(dtype_name)
    shape, G = (2, 12, 4, 6), 3
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(12, pdtype, device)
    check_all(x, G, w, b, act, res, dtype, fmt=fmt)


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16-mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_affine_and_residual(device, dtype_name, fmt, affine, residual):
    dtype, pdtype = parse_dtype(dtype_name)
    shape, G = (2, 16, 3, 5), 4
    x = make_input(shape, dtype, device, fmt)
    w, b = make_params(16, pdtype, device) if affine else (None, None)
    res = make_input(shape, dtype, device, fmt) if residual else None
    check_all(x, G, w, b, "silu", res, dtype, fmt=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_float64_cpu(act, fmt):
    x = make_input((2, 6, 3, 4), torch.float64, "cpu", fmt)
    res = make_input((2, 6, 3, 4), torch.float64, "cpu", fmt)
    w, b = make_params(6, torch.float64)
    check_all(x, 3, w, b, act, res, torch.float64, fmt=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 12, 10), (2, 12, 3, 4, 5)], ids=["1d", "3d"])
@pytest.mark.parametrize("device", DEVICES)
def test_1d_and_3d_spatial(device, shape, dtype_name, fmt):
    dtype, pdtype = parse_dtype(dtype_name)
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(12, pdtype, device)
    check_all(x, 4, w, b, "gelu", res, dtype, fmt=fmt)


ODD_SHAPES = [
    ((2, 6, 1, 1), 3),  # H*W = 1
    ((2, 6, 1, 1), 6),  # H*W = 1 and G = C: every group is a single element
    ((1, 12, 5, 3), 1),  # N = 1, G = 1
    ((2, 12, 4, 4), 12),  # G = C
    ((2, 20, 3, 3), 5),  # C = 20
    ((3, 6, 5, 7), 2),  # numel 630, not a multiple of 8
    ((2, 1, 3, 5), 1),  # C = 1
    ((1, 6, 7), 2),  # 1-D spatial, N = 1
    ((2, 12, 9), 12),  # 1-D spatial, G = C
    ((2, 6, 3, 1, 5), 3),  # 3-D spatial with a size-1 dim
    ((1, 12, 2, 3, 3), 1),  # 3-D spatial, G = 1
    ((2, 32, 48, 48), 1),  # large groups (73728 elements each)
    ((2, 64, 33, 31), 32),  # many groups, odd H*W
    ((3, 16, 7, 7), 2),  # H*W = 49 (RoI heads): groups of 8 x 49, rows of 49 values
    ((2, 16, 7, 10), 4),  # H*W = 70: rows of 70 values (2-element vectors on CUDA)
    ((2, 60, 6, 6), 6),  # C = 60, D = 10: channels-last rows of 60 (4-element vectors on CUDA)
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,G", ODD_SHAPES, ids=[f"{'x'.join(map(str, s))}-G{g}" for s, g in ODD_SHAPES])
@pytest.mark.parametrize("device", DEVICES)
def test_odd_shapes(device, shape, G, dtype_name, fmt):
    dtype, pdtype = parse_dtype(dtype_name)
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(shape[1], pdtype, device)
    check_all(x, G, w, b, "silu", res, dtype, fmt=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (0, 8, 5), (0, 8, 2, 3, 4)], ids=["2d", "1d", "3d"])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, shape, dtype_name, fmt):
    dtype, _ = parse_dtype(dtype_name)
    x = to_format(torch.empty(shape, dtype=dtype, device=device), fmt).requires_grad_()
    res = torch.empty_like(x).requires_grad_()
    m = normext.GroupNorm(4, 8, activation="relu", device=device, dtype=dtype)
    y = m(x, res)
    assert y.shape == shape and y.dtype == dtype and y.device == x.device
    y_f = gn(x.detach(), 2)
    assert y_f.shape == shape and y_f.dtype == dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == shape
    assert res.grad is not None and res.grad.shape == shape
    for p in (m.weight, m.bias):
        assert p.grad is None or (p.grad.shape == p.shape and not p.grad.any())


# --------------------------------------------------------------------------------- views and strides


@pytest.mark.parametrize("kind", ["transposed", "strided", "channel_slice"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_input(device, dtype_name, kind):
    dtype, pdtype = parse_dtype(dtype_name)
    shape = (2, 8, 5, 6)
    x = make_noncontiguous(shape, dtype, device, kind)
    res = make_noncontiguous(shape, dtype, device, "strided")
    w, b = make_params(8, pdtype, device)
    check_all(x, 2, w, b, "leaky_relu", res, dtype)


@pytest.mark.parametrize("kind", ["flat_offset", "batch_slice"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16-mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_storage_offset_views(device, dtype_name, fmt, kind):
    dtype, pdtype = parse_dtype(dtype_name)
    shape = (2, 12, 5, 3)
    if kind == "flat_offset":
        x = with_storage_offset(make_input(shape, dtype, device, fmt), 3)
        res = with_storage_offset(make_input(shape, dtype, device, fmt), 1)
    else:
        x = sliced_batch(shape, dtype, device, fmt)
        res = sliced_batch(shape, dtype, device, fmt)
    assert x.storage_offset() > 0 and res.storage_offset() > 0
    w, b = make_params(12, pdtype, device)
    w, b = with_storage_offset(w, 1), with_storage_offset(b, 5)
    check_all(x, 3, w, b, "gelu_tanh", res, dtype, fmt=fmt)


@pytest.mark.parametrize("dy_fmt", FORMATS)
@pytest.mark.parametrize("x_fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_grad_output_in_another_format(device, x_fmt, dy_fmt):
    """dy does not have to share x's memory format."""
    shape, G = (2, 12, 4, 5), 3
    x = make_input(shape, torch.float32, device, x_fmt)
    res = make_input(shape, torch.float32, device, dy_fmt)
    w, b = make_params(12, torch.float32, device)
    dy = make_input(shape, torch.float32, device, dy_fmt)
    _, g = forward_backward(lambda *t: gn(t[0], G, t[1], t[2], "silu", SLOPE, t[3]), (x, w, b, res), dy)
    _, g_ref = forward_backward(
        lambda *t: group_norm_ref(t[0], G, t[1], t[2], 1e-5, "silu", SLOPE, t[3]),
        [to64(t) for t in (x, w, b, res)],
        to64(dy),
    )
    for name, gi, gr in zip(("dx", "dweight", "dbias", "dresidual"), g, g_ref, strict=True):
        assert_bwd_close(gi, gr, torch.float32, what=name)


# ------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["f32-mean100-std0.1", "f32-mean100-std0.01", "f16-mean1e4-std100"])
@pytest.mark.parametrize("device", DEVICES)
def test_off_centre_data(device, case, fmt):
    """Data with mean >> std, where E[x^2] - E[x]^2 cancels catastrophically (relative error ~1).

    A float32 mean is off by up to half an ulp of 100 (3.8e-6) even when exactly rounded: 3.8e-5 of a 0.1
    std, 3.8e-4 of a 0.01 std, so rel err < 1e-4 is out of reach for any float32 kernel at std 0.01 (torch's
    NCHW Welford path gets ~4e-4). The bound for y, dx, dweight, dbias is max(1e-4, 2x torch's error in the
    same dtype on the NCHW path); float16 around 1e4 uses the flash-attention rule (+1e-3).
    """
    dtype = {"f32": torch.float32, "f16": torch.float16}[case[:3]]
    mean, std = {"mean100-std0.1": (100.0, 0.1), "mean100-std0.01": (100.0, 0.01)}.get(case[4:], (1e4, 100.0))
    shape, G = (2, 32, 16, 16), 8
    x = make_input(shape, dtype, device, fmt, mean=mean, std=std)
    w, b = make_params(32, torch.float32, device)
    dy = torch.randn_like(x)
    y, g = forward_backward(lambda x_, w_, b_: gn(x_, G, w_, b_), (x, w, b), dy)
    y_ref, g_ref = forward_backward(
        lambda *t: group_norm_ref(t[0], G, t[1], t[2]), [to64(t) for t in (x, w, b)], to64(dy)
    )
    y_nat, g_nat = forward_backward(lambda x_, w_, b_: gn_native(x_, G, w_, b_), (x.contiguous(), w, b), dy)
    atol = 1e-3 if dtype == torch.float16 else 0.0
    for name, out, ref, nat in zip(
        ("y", "dx", "dweight", "dbias"), [y, *g], [y_ref, *g_ref], [y_nat, *g_nat], strict=True
    ):
        err, nat_err = rel_err(out, ref), rel_err(nat, ref)
        bound = max(1e-4, 2 * nat_err + atol)
        assert err < bound, f"{name}: rel err {err:.3g} >= {bound:.3g} (torch: {nat_err:.3g})"


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("act", [None, "relu", "silu"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_input_propagates_like_torch(device, fmt, act, bad):
    x = make_input((2, 8, 3, 3), torch.float32, device)
    x[1, 2, 1, 0] = float(bad)
    x = to_format(x, fmt)
    w, b = make_params(8, torch.float32, device)
    y = gn(x, 4, w, b, act)
    expected = gn_native(x, 4, w, b, act)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.equal(torch.isinf(y), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert finite.any() and not finite.all()
    assert rel_err(y[finite], expected[finite]) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("device", DEVICES)
def test_poisoned_memory_module(device, dtype_name, fmt):
    """NaN-filled memory freed right before the call: an output or gradient element the kernels do not
    write shows up as NaN (the reference has none)."""
    dtype, _ = parse_dtype(dtype_name)
    shape, G = (3, 20, 5, 7), 5
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    m = normext.GroupNorm(G, 20, activation="gelu", device=device)
    with torch.no_grad():
        m.weight.copy_(make_params(20)[0])
        m.bias.copy_(make_params(20)[1])
    xl, rl = leaf(x), leaf(res)
    poison_allocator(device, x, x, x)
    y = m(xl, rl)
    assert torch.isfinite(y).all()
    dy = torch.randn_like(y)
    poison_allocator(device, x, x, x, m.weight, m.weight)
    y.backward(dy)
    for t in (xl.grad, rl.grad, m.weight.grad, m.bias.grad):
        assert torch.isfinite(t).all()
    nat = [leaf(t.clone()) for t in (x, res)]
    y_nat = gn_native(nat[0], G, m.weight, m.bias, "gelu", res=nat[1])
    ref = group_norm_ref(x, G, m.weight, m.bias, 1e-5, "gelu", residual=res)
    assert_fwd_close(y, ref, dtype, y_nat)


# ------------------------------------------------------------------------------------------- op level


def op_fwd(x, w, b, res, G, act, slope=SLOPE, eps=1e-5):
    return torch.ops.normext.group_norm_fwd(x, w, b, res, G, eps, ACT_CODES[act], slope)


def op_bwd(dy, x, res, mean, rstd, w, b, G, act, mask, slope=SLOPE):
    return torch.ops.normext.group_norm_bwd(dy, x, res, mean, rstd, w, b, G, ACT_CODES[act], slope, mask)


OP_CASES = [
    ((2, 12, 5, 7), 4, True, True, "silu"),
    ((3, 20, 5, 7), 5, True, False, "leaky_relu"),
    ((2, 16, 9), 16, False, True, "gelu"),
    ((2, 8, 3, 2, 3), 2, False, False, "identity"),
]
OP_IDS = [
    f"{'x'.join(map(str, c[0]))}-G{c[1]}-{'aff' if c[2] else 'noaff'}-{'res' if c[3] else 'nores'}"
    for c in OP_CASES
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16-mixed"])
@pytest.mark.parametrize("case", OP_CASES, ids=OP_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_ops_against_reference_poisoned(device, case, dtype_name, fmt):
    """group_norm_fwd / group_norm_bwd called directly after poisoning the allocator with NaN: every output
    is finite and matches the reference (mean/rstd are (N, G) float32)."""
    shape, G, affine, residual, act = case
    dtype, pdtype = parse_dtype(dtype_name)
    N, C = shape[:2]
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt) if residual else None
    w, b = make_params(C, pdtype, device) if affine else (None, None)
    poison_allocator(device, x, x, torch.empty(N * G), torch.empty(N * G))
    y, mean, rstd = op_fwd(x, w, b, res, G, act)
    for t in (y, mean, rstd):
        assert torch.isfinite(t).all()
    assert y.dtype == dtype and y.shape == x.shape
    assert_layout_kept(y, x, fmt)
    assert mean.shape == (N, G) and rstd.shape == (N, G)
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    mean_ref, rstd_ref = group_stats_ref(x, G)
    assert rel_err(mean, mean_ref) < 1e-5 and rel_err(rstd, rstd_ref) < 1e-4
    y_ref = group_norm_ref(x, G, w, b, 1e-5, act, SLOPE, res)
    low = dtype != torch.float32
    y_nat = gn_native(x, G, w, b, act, res=res) if low else None
    assert_fwd_close(y, y_ref, dtype, y_nat)

    dy = make_input(shape, dtype, device, fmt)
    leaves = [leaf(to64(t)) for t in (x, w, b, res)]
    group_norm_ref(leaves[0], G, leaves[1], leaves[2], 1e-5, act, SLOPE, leaves[3]).backward(to64(dy))
    if low:
        nat = [leaf(None if t is None else t.clone()) for t in (x, w, b, res)]
        gn_native(nat[0], G, nat[1], nat[2], act, res=nat[3]).backward(dy)
    mask = [True, affine, affine, residual]
    poison_allocator(device, x, x, x, torch.empty(C), torch.empty(C))
    grads = op_bwd(dy, x, res, mean, rstd, w, b, G, act, mask)
    for name, want, gi, lf, i in zip(
        ("dX", "dgamma", "dbeta", "dresidual"), mask, grads, leaves, range(4), strict=True
    ):
        if not want:
            assert gi.numel() == 0, f"unrequested {name} is not empty"
            continue
        assert torch.isfinite(gi).all(), f"{name} has non-finite values"
        assert gi.shape == lf.shape, name
        assert_bwd_close(gi, lf.grad, dtype, nat[i].grad if low else None, what=name)


@pytest.mark.parametrize(
    "mask", [(True, False, False, False), (False, True, True, False), (False, False, False, True)]
)
@pytest.mark.parametrize("device", DEVICES)
def test_op_bwd_output_mask(device, mask):
    shape, G = (2, 8, 4, 4), 2
    x = make_input(shape, torch.float32, device)
    res = make_input(shape, torch.float32, device)
    w, b = make_params(8, torch.float32, device)
    _, mean, rstd = op_fwd(x, w, b, res, G, "gelu")
    dy = make_input(shape, torch.float32, device)
    leaves = [leaf(to64(t)) for t in (x, w, b, res)]
    group_norm_ref(leaves[0], G, leaves[1], leaves[2], 1e-5, "gelu", SLOPE, leaves[3]).backward(to64(dy))
    grads = op_bwd(dy, x, res, mean, rstd, w, b, G, "gelu", list(mask))
    for want, gi, lf in zip(mask, grads, leaves, strict=True):
        if want:
            assert rel_err(gi, lf.grad) < 1e-4
        else:
            assert gi.numel() == 0


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", OP_CASES, ids=OP_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, case, fmt):
    shape, G, affine, residual, act = case
    C = shape[1]
    x = make_input(shape, torch.float32, device, fmt)
    res = make_input(shape, torch.float32, device, fmt) if residual else None
    w, b = make_params(C, torch.float32, device) if affine else (None, None)
    code = ACT_CODES[act]
    torch.library.opcheck(torch.ops.normext.group_norm_fwd.default, (x, w, b, res, G, 1e-5, code, SLOPE))
    _, mean, rstd = torch.ops.normext.group_norm_fwd(x, w, b, res, G, 1e-5, code, SLOPE)
    dy = make_input(shape, torch.float32, device, fmt)
    mask = [True, affine, affine, residual]
    torch.library.opcheck(
        torch.ops.normext.group_norm_bwd.default, (dy, x, res, mean, rstd, w, b, G, code, SLOPE, mask)
    )


# --------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"])
def test_gradcheck(act, fmt):
    shape, G = (2, 6, 3, 2), 3
    x = make_input(shape, torch.float64, "cpu", fmt)
    w, b = make_params(6, torch.float64)
    res = to_format(kink_free_residual(x, G, w, b), fmt)
    z = group_norm_pre_ref(x, G, w, b, residual=res)
    assert z.abs().min() > 0.1
    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b, res))
    assert torch.autograd.gradcheck(lambda *t: gn(t[0], G, t[1], t[2], act, SLOPE, t[3]), inputs)


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
def test_gradcheck_optional_args(affine, residual):
    shape, G = (2, 4, 5), 2
    x = make_input(shape, torch.float64, "cpu").requires_grad_()
    w, b = make_params(4, torch.float64) if affine else (None, None)
    res = make_input(shape, torch.float64, "cpu") if residual else None
    inputs = (x, leaf(w), leaf(b), leaf(res))

    def fn(x_, w_, b_, r_):
        return gn(x_, G, w_, b_, "silu", SLOPE, r_)

    assert torch.autograd.gradcheck(fn, inputs)


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,G", [((2, 32, 16, 16), 8), ((2, 64, 48, 40), 32)], ids=["small", "large"])
@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(device, shape, G, dtype_name, fmt):
    dtype, pdtype = parse_dtype(dtype_name)
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    w, b = make_params(shape[1], pdtype, device)
    dy = torch.randn_like(x)

    def run():
        return forward_backward(lambda *t: gn(t[0], G, t[1], t[2], "silu", SLOPE, t[3]), (x, w, b, res), dy)

    y1, g1 = run()
    y2, g2 = run()
    assert torch.equal(y1, y2)
    for a, c in zip(g1, g2, strict=True):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------- modules


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_matches_torch_nn(device, dtype_name, fmt, affine):
    dtype, _ = parse_dtype(dtype_name)
    shape, G, C = (2, 16, 6, 5), 4, 16
    theirs = torch.nn.GroupNorm(G, C, affine=affine, device=device, dtype=dtype)
    if affine:
        w, b = make_params(C, dtype, device)
        with torch.no_grad():
            theirs.weight.copy_(w)
            theirs.bias.copy_(b)
    ours = normext.GroupNorm(G, C, affine=affine, activation="silu", device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = make_input(shape, dtype, device, fmt)
    res = make_input(shape, dtype, device, fmt)
    dy = torch.randn_like(x)
    y, g = forward_backward(lambda x_, r_: ours(x_, r_), (x, res), dy)
    assert y.dtype == dtype
    assert_layout_kept(y, x, fmt)
    y_nat, g_nat = forward_backward(lambda x_, r_: F.silu(theirs(x_) + r_), (x.clone(), res.clone()), dy)
    tensors = [to64(t) for t in (x, theirs.weight, theirs.bias, res)]
    y_ref, g_ref = forward_backward(
        lambda *t: group_norm_ref(t[0], G, t[1], t[2], 1e-5, "silu", 0.01, t[3]), tensors, to64(dy)
    )
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_nat, rtol=1e-5, atol=1e-5)
    assert_fwd_close(y, y_ref, dtype, y_nat)
    assert_bwd_close(g[0], g_ref[0], dtype, g_nat[0], what="dx")
    assert_bwd_close(g[1], g_ref[3], dtype, g_nat[1], what="dresidual")
    if affine:
        theirs_grads = (theirs.weight.grad, theirs.bias.grad)
        for name, p, gr, gnat in zip(
            ("dweight", "dbias"), (ours.weight, ours.bias), g_ref[1:3], theirs_grads, strict=True
        ):
            assert p.grad is not None and p.grad.dtype == dtype
            assert_bwd_close(p.grad, gr, dtype, gnat, what=name)


@pytest.mark.parametrize("act", [None, "leaky_relu", "gelu_tanh"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_default_slope_and_no_residual(device, act):
    """Module defaults: negative_slope 0.01, residual=None; output = act(torch.nn.GroupNorm(x))."""
    theirs = torch.nn.GroupNorm(3, 12, device=device)
    ours = normext.GroupNorm(3, 12, activation=act, device=device)
    x = make_input((2, 12, 5, 5), torch.float32, device)
    y = ours(x)
    torch.testing.assert_close(y, native_chain(theirs(x), None, act, 0.01), rtol=1e-5, atol=1e-5)
    assert rel_err(y, group_norm_ref(x, 3, activation=act, slope=0.01)) < 2e-5


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_module_state_dict_both_ways(affine):
    ours = normext.GroupNorm(4, 12, affine=affine, activation="relu")
    theirs = torch.nn.GroupNorm(4, 12, affine=affine)
    assert (ours.num_groups, ours.num_channels, ours.eps, ours.affine) == (4, 12, 1e-5, affine)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert {n for n, _ in ours.named_parameters()} == ({"weight", "bias"} if affine else set())
    if not affine:
        assert ours.weight is None and ours.bias is None
        return
    # Same default initialization as torch.nn.GroupNorm: weight ones, bias zeros.
    assert torch.equal(ours.weight, torch.ones(12)) and torch.equal(ours.bias, torch.zeros(12))
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(12))
        theirs.bias.copy_(torch.randn(12))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(12))
        ours.bias.copy_(torch.randn(12))
    back = torch.nn.GroupNorm(4, 12, affine=True)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(back.weight, ours.weight) and torch.equal(back.bias, ours.bias)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("device", DEVICES)
def test_module_factory_kwargs(device, dtype_name):
    dtype, _ = parse_dtype(dtype_name)
    skip_if_unsupported(device, dtype)
    m = normext.GroupNorm(2, 6, device=device, dtype=dtype)
    assert m.weight.dtype == dtype and m.bias.dtype == dtype
    assert m.weight.device.type == device
    assert isinstance(m.weight, torch.nn.Parameter)
    y = m(make_input((1, 6, 4), dtype, device))
    assert y.dtype == dtype and y.device.type == device


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("device", DEVICES)
def test_error_channels_not_divisible_by_groups(device):
    x = make_input((2, 6, 4, 4), torch.float32, device)
    with pytest.raises(ERRORS, match="divisible by num_groups"):
        gn(x, 4)
    with pytest.raises(ERRORS, match="divisible by num_groups"):
        normext.GroupNorm(4, 6)
    with pytest.raises(ERRORS, match="divisible by num_groups"):
        op_fwd(x, None, None, None, 4, "identity")


@pytest.mark.parametrize("device", DEVICES)
def test_error_module_wrong_channel_count(device):
    m = normext.GroupNorm(4, 16, device=device)
    with pytest.raises(ERRORS, match="channels"):
        m(make_input((2, 8, 4, 4), torch.float32, device))


@pytest.mark.parametrize("device", DEVICES)
def test_error_wrong_weight_or_bias_shape(device):
    x = make_input((2, 8, 4, 4), torch.float32, device)
    w, b = make_params(8, torch.float32, device)
    with pytest.raises(ERRORS, match="weight"):
        gn(x, 4, torch.ones(6, device=device), b)
    with pytest.raises(ERRORS, match="weight"):
        gn(x, 4, torch.ones(2, 4, device=device), b)
    with pytest.raises(ERRORS, match="bias"):
        gn(x, 4, w, torch.zeros(16, device=device))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
@pytest.mark.parametrize("device", DEVICES)
def test_error_integer_input(device, dtype):
    x = torch.randint(0, 5, (2, 8, 4, 4), dtype=dtype, device=device)
    with pytest.raises(ERRORS, match="floating-point"):
        gn(x, 4)
    with pytest.raises(ERRORS, match="floating-point"):
        normext.GroupNorm(4, 8, device=device)(x)


@pytest.mark.parametrize("device", DEVICES)
def test_error_residual_wrong_shape(device):
    x = make_input((2, 8, 4, 4), torch.float32, device)
    with pytest.raises(ERRORS, match="residual"):
        gn(x, 4, res=make_input((2, 8, 4, 5), torch.float32, device))
    with pytest.raises(ERRORS, match="residual"):
        normext.GroupNorm(4, 8, device=device)(x, make_input((1, 8, 4, 4), torch.float32, device))


@pytest.mark.parametrize("device", DEVICES)
def test_error_unknown_activation(device):
    x = make_input((2, 8, 4, 4), torch.float32, device)
    with pytest.raises(ValueError, match="activation"):
        gn(x, 4, act="tanh")
    with pytest.raises(ValueError, match="activation"):
        normext.GroupNorm(4, 8, activation="swish", device=device)(x)


@requires_cuda
def test_error_tensors_on_different_devices():
    x = make_input((2, 8, 4, 4), torch.float32, "cuda")
    w, b = make_params(8, torch.float32, "cuda")
    with pytest.raises(ERRORS, match="device|is on"):
        gn(x, 4, w.cpu(), b)
    with pytest.raises(ERRORS, match="device|is on"):
        gn(x, 4, w, b, res=x.cpu())
    with pytest.raises(ERRORS, match="device|is on"):
        gn(x.cpu(), 4, w, b)


# ---------------------------------------------------------------------------------------------- compile


@pytest.mark.compile
def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    m = normext.GroupNorm(4, 16, activation="silu")
    with torch.no_grad():
        m.weight.copy_(make_params(16)[0])
        m.bias.copy_(make_params(16)[1])
    compiled = torch.compile(m, fullgraph=True)
    x = make_input((2, 16, 6, 6), torch.float32, "cpu", "channels_last")
    res = make_input((2, 16, 6, 6), torch.float32, "cpu", "channels_last")
    dy = torch.randn_like(x)

    def run(fn):
        m.zero_grad()
        y, g = forward_backward(fn, (x, res), dy)
        return y, [*g, m.weight.grad.clone(), m.bias.grad.clone()]

    y_e, g_e = run(m)
    y_c, g_c = run(compiled)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for a, c in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    y_ref = group_norm_ref(x, 4, m.weight, m.bias, 1e-5, "silu", 0.01, res)
    assert rel_err(y_c, y_ref) < 2e-5
