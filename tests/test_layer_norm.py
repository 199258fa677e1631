# LayerNorm and LayerNorm2d tests: normext.LayerNorm / LayerNorm2d, normext.functional.layer_norm /
# layer_norm_2d and torch.ops.normext.layer_norm[_2d]_fwd/bwd against the float64 reference,
# torch.nn.LayerNorm and the permute -> F.layer_norm -> permute chain (dtypes x activations x residual/affine,
# row lengths across the CUDA kernel classes, memory formats, views, gradcheck, opcheck, determinism, errors,
# state_dict).
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    FORMATS,
    LOW_AND_FP32,
    VIEW_KINDS,
    assert_bwd_close,
    assert_fwd_close,
    assert_layout_kept,
    check_all,
    forward_backward,
    leaf,
    make_input,
    make_noncontiguous,
    make_params,
    parse_dtype,
    poison_allocator,
    requires_cuda,
    residual_away_from_kink,
    skip_if_unsupported,
    sliced_batch,
    to_format,
    view_inputs,
    with_storage_offset,
)
from reference import (
    ACT_CODES,
    ACTIVATIONS,
    act_ref,
    layer_norm_2d_pre_ref,
    layer_norm_2d_ref,
    layer_norm_pre_ref,
    layer_norm_ref,
    layer_norm_stats_ref,
    native_chain,
    permute_layer_norm_2d,
    rel_err,
    rms_norm_ref,
    to64,
)

import normext
import normext.functional as nxF

SLOPE = 0.2  # a non-default leaky_relu slope, so an ignored negative_slope shows
ERRORS = (RuntimeError, ValueError, TypeError)
# Row lengths: the list plus the edges of the CUDA kernel classes (a warp or part of one per row up
# to 1024, a block per row with the row in registers up to 8192 in backward / 16384 in forward, two passes
# beyond).
# 770, 1020 and 1030: rows that take 2- and 4-element vectors on CUDA (not multiples of 8); 1030 in float32
# is the block-per-row forward with 2-element vectors.
ROW_LENGTHS = [1, 3, 7, 770, 1000, 1020, 1024, 1025, 1030, 4097, 8200, 16500]


# The two families as (ours, float64 reference, torch-native chain) over (x, w, b, residual).
def ln_fns(normalized_shape, act=None, slope=SLOPE, eps=1e-5):
    ns = tuple(normalized_shape)
    return (
        lambda x, w, b, r: nxF.layer_norm(x, ns, w, b, eps, act, slope, r),
        lambda x, w, b, r: layer_norm_ref(x, ns, w, b, eps, act, slope, r),
        lambda x, w, b, r: native_chain(F.layer_norm(x, ns, w, b, eps), r, act, slope),
    )


def ln2d_fns(act=None, slope=SLOPE, eps=1e-6):
    return (
        lambda x, w, b, r: nxF.layer_norm_2d(x, w, b, eps, act, slope, r),
        lambda x, w, b, r: layer_norm_2d_ref(x, w, b, eps, act, slope, r),
        lambda x, w, b, r: native_chain(permute_layer_norm_2d(x, w, b, eps), r, act, slope),
    )


def ln_inputs(shape, normalized_shape, dtype_name, device, affine=True, residual=True, mean=0.0, std=1.0):
    dtype, pdtype = parse_dtype(dtype_name)
    x = make_input(shape, dtype, device, mean=mean, std=std)
    res = make_input(shape, dtype, device) if residual else None
    if affine:
        D = torch.Size(normalized_shape).numel()
        w, b = (p.reshape(normalized_shape) for p in make_params(D, pdtype, device))
    else:
        w, b = None, None
    return dtype, (x, w, b, res)


def ln2d_inputs(shape, dtype_name, device, fmt, affine=True, residual=True, mean=0.0, std=1.0):
    dtype, pdtype = parse_dtype(dtype_name)
    x = make_input(shape, dtype, device, fmt, mean=mean, std=std)
    res = make_input(shape, dtype, device, fmt) if residual else None
    w, b = make_params(shape[1], pdtype, device) if affine else (None, None)
    return dtype, (x, w, b, res)


def test_exports():
    assert normext.LayerNorm is normext.modules.LayerNorm
    assert normext.LayerNorm2d is normext.modules.LayerNorm2d
    assert normext.functional.layer_norm is nxF.layer_norm
    assert issubclass(normext.LayerNorm, torch.nn.LayerNorm)
    assert issubclass(normext.LayerNorm2d, torch.nn.LayerNorm)


# =============================================================================================== LayerNorm


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype_name", LOW_AND_FP32)
@pytest.mark.parametrize("device", DEVICES)
def test_ln_forward_dtype_activation(device, dtype_name, act):
    dtype, tensors = ln_inputs((3, 5, 40), (40,), dtype_name, device)
    check_all(ln_fns((40,), act), tensors, dtype, backward=False)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype_name", LOW_AND_FP32)
@pytest.mark.parametrize("device", DEVICES)
def test_ln_backward_dtype_activation(device, dtype_name, act):
    dtype, tensors = ln_inputs((4, 3, 24), (24,), dtype_name, device)
    check_all(ln_fns((24,), act), tensors, dtype)


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16-mixed"])
@pytest.mark.parametrize("D", ROW_LENGTHS)
@pytest.mark.parametrize("device", DEVICES)
def test_ln_row_lengths(device, D, dtype_name):
    rows = 37 if D <= 1025 else 3
    dtype, tensors = ln_inputs((rows, D), (D,), dtype_name, device)
    check_all(ln_fns((D,), "silu"), tensors, dtype)


@pytest.mark.parametrize(
    "shape,normalized_shape",
    [((2, 3, 4, 5), (4, 5)), ((2, 3, 4, 5), (3, 4, 5)), ((6, 7), (6, 7)), ((9,), (9,)), ((2, 1, 5), (1, 5))],
    ids=["2dims", "3dims", "whole", "1d-input", "size1-dim"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_ln_normalized_shapes(device, shape, normalized_shape):
    dtype, tensors = ln_inputs(shape, normalized_shape, "float32", device)
    check_all(ln_fns(normalized_shape, "gelu"), tensors, dtype)


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("affine", ["none", "weight-only", "both"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16-mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_affine_and_residual(device, dtype_name, affine, residual):
    dtype, (x, w, b, res) = ln_inputs((5, 33), (33,), dtype_name, device, affine != "none", residual)
    if affine == "weight-only":  # LayerNorm(bias=False)
        b = None
    check_all(ln_fns((33,), "leaky_relu"), (x, w, b, res), dtype)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_ln_float64_cpu(act):
    dtype, tensors = ln_inputs((3, 2, 13), (2, 13), "float64", "cpu")
    check_all(ln_fns((2, 13), act), tensors, dtype)


@pytest.mark.parametrize("kind", VIEW_KINDS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16-mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_views(device, dtype_name, kind):
    """Non-contiguous inputs, and dense views at an offset that breaks 16-byte alignment."""
    dtype, pdtype = parse_dtype(dtype_name)
    x, res = view_inputs((2, 6, 64), dtype, device, kind)
    w, b = make_params(x.shape[-1], pdtype, device)
    w, b = with_storage_offset(w, 1), with_storage_offset(b, 5)
    check_all(ln_fns((x.shape[-1],), "gelu_tanh"), (x, w, b, res), dtype)


@pytest.mark.parametrize("case", ["f32-mean100-std0.1", "f32-mean100-std0.01", "f16-mean1e4-std100"])
@pytest.mark.parametrize("D", [7, 1000, 4097, 16500])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_off_centre_data(device, D, case):
    """Rows with mean >> std, where E[x^2] - E[x]^2 cancels. float32 with std 0.1: rel err < 1e-4 outright;
    with std 0.01 an exactly rounded mean is already off by half an ulp of 100 (3.8e-4 of the std), so it
    is held to max(1e-4, 2x torch's float32 error); float16 around 1e4 uses the flash-attention rule."""
    dtype = {"f32": torch.float32, "f16": torch.float16}[case[:3]]
    mean, std = {"mean100-std0.1": (100.0, 0.1), "mean100-std0.01": (100.0, 0.01)}.get(case[4:], (1e4, 100.0))
    x = make_input((4, D), dtype, device, mean=mean, std=std)
    w, b = make_params(D, torch.float32, device)
    ours, ref, _ = ln_fns((D,))
    dy = torch.randn_like(x)
    y, g = forward_backward(lambda *t: ours(*t, None), (x, w, b), dy)
    y_ref, g_ref = forward_backward(lambda *t: ref(*t, None), [to64(t) for t in (x, w, b)], to64(dy))
    nat_w, nat_b = (w, b) if dtype == torch.float32 else (w.to(dtype), b.to(dtype))
    y_nat, g_nat = forward_backward(
        lambda *t: F.layer_norm(t[0], (D,), t[1], t[2]), (x.clone(), nat_w, nat_b), dy
    )
    for name, out, r, nat in zip(
        ("y", "dx", "dweight", "dbias"), [y, *g], [y_ref, *g_ref], [y_nat, *g_nat], strict=True
    ):
        err, nat_err = rel_err(out, r), rel_err(nat, r)
        if dtype == torch.float16:
            assert err <= 2 * nat_err + 1e-3, f"{name}: {err:.3g} > 2 x torch {nat_err:.3g} + 1e-3"
        elif std >= 0.1:
            assert err < 1e-4, f"{name}: rel err {err:.3g}"
        else:
            assert err < max(1e-4, 2 * nat_err), f"{name}: rel err {err:.3g} (torch float32: {nat_err:.3g})"


@pytest.mark.parametrize("kind", ["layer", "add_layer", "rms"])
@pytest.mark.parametrize("D", [4097, 16500])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_rows_that_start_off_centre(device, D, kind):
    """The first 16 values of every 4096-value block 1000 away from the rest (std 1). A variance from sums
    shifted by those values loses up to 8 bits in float32 (y off by ~4e-6 here), and a second pass without
    its correction of the mean ~3e-7; with both, ~5e-8, as torch's Welford. add_layer normalizes s = x + r
    as the op stores it (the reference starts from that float32 sum); rms divides by var + mean²."""
    x = make_input((3, D), torch.float32, device)
    for j in range(16):
        x[:, j::4096] += 1000.0
    w, b = make_params(D, torch.float32, device)
    s, tensors = x, (x, w, b)
    if kind == "add_layer":
        r = make_input((3, D), torch.float32, device)
        s = x + r

        def ours(x_, w_, b_):
            return nxF.add_layer_norm(x_, r, (D,), w_, b_)[0]

    elif kind == "rms":
        tensors = (x, w)

        def ours(x_, w_):
            return nxF.rms_norm(x_, (D,), w_, 1e-6)

    else:

        def ours(x_, w_, b_):
            return nxF.layer_norm(x_, (D,), w_, b_)

    def ref(s_, w_, b_=None):
        if kind == "rms":
            return rms_norm_ref(s_, (D,), w_, 1e-6)
        return layer_norm_ref(s_, (D,), w_, b_)

    dy = torch.randn_like(x)
    y, g = forward_backward(ours, tensors, dy)
    y_ref, g_ref = forward_backward(ref, [to64(t) for t in (s, *tensors[1:])], to64(dy))
    for name, out, r_ in zip(("y", "dx", "dweight", "dbias"), [y, *g], [y_ref, *g_ref], strict=False):
        assert rel_err(out, r_) < 1.5e-7, f"{name}: rel err {rel_err(out, r_):.3g}"


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("act", [None, "relu", "silu"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_nonfinite_input_propagates_like_torch(device, act, bad):
    x = make_input((4, 3, 30), torch.float32, device)
    x[1, 2, 7] = float(bad)
    x[3, 0, 0] = float(bad)  # the first element of a row
    w, b = make_params(30, torch.float32, device)
    y = nxF.layer_norm(x, (30,), w, b, activation=act)
    expected = native_chain(F.layer_norm(x, (30,), w, b), None, act)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.equal(torch.isinf(y), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert finite.any() and not finite.all()
    assert rel_err(y[finite], expected[finite]) < 1e-5


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_poisoned_memory_module(device, dtype_name):
    """NaN-filled memory freed right before the call: an output or gradient element the kernels do not
    write shows up as NaN (the reference has none)."""
    dtype, _ = parse_dtype(dtype_name)
    shape = (3, 7, 100)
    x = make_input(shape, dtype, device)
    res = make_input(shape, dtype, device)
    m = normext.LayerNorm(100, activation="gelu", device=device)
    with torch.no_grad():
        m.weight.copy_(make_params(100)[0])
        m.bias.copy_(make_params(100)[1])
    xl, rl = leaf(x), leaf(res)
    poison_allocator(device, x, x, x)
    y = m(xl, rl)
    assert torch.isfinite(y).all()
    poison_allocator(device, x, x, x, m.weight, m.weight)
    y.backward(torch.randn_like(y))
    for t in (xl.grad, rl.grad, m.weight.grad, m.bias.grad):
        assert torch.isfinite(t).all()
    y_nat = native_chain(F.layer_norm(x, (100,), m.weight.to(dtype), m.bias.to(dtype)), res, "gelu", 0.01)
    assert_fwd_close(y, layer_norm_ref(x, (100,), m.weight, m.bias, 1e-5, "gelu", 0.01, res), dtype, y_nat)


@pytest.mark.parametrize("shape", [(0, 16), (0, 3, 16), (4, 0)], ids=["rows0", "batch0", "D0"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_empty(device, shape):
    ns = shape[-1:]
    x = torch.empty(shape, device=device).requires_grad_()
    m = normext.LayerNorm(ns, activation="relu", device=device)
    y = m(x)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert m.weight.grad is None or (m.weight.grad.shape == ns and not m.weight.grad.any())


# ------------------------------------------------------------------------------------ LayerNorm op level


def ln_op_fwd(x, w, b, res, ns, act, slope=SLOPE, eps=1e-5):
    return torch.ops.normext.layer_norm_fwd(x, w, b, res, list(ns), eps, ACT_CODES[act], slope)


def ln_op_bwd(dy, x, res, mean, rstd, w, b, ns, act, mask, slope=SLOPE):
    return torch.ops.normext.layer_norm_bwd(
        dy, x, res, mean, rstd, w, b, list(ns), ACT_CODES[act], slope, mask
    )


LN_OP_CASES = [
    ((4, 7, 40), (40,), True, True, "silu"),
    ((3, 4, 5), (4, 5), True, False, "leaky_relu"),
    ((5, 1030), (1030,), False, True, "gelu"),
    ((2, 3, 9), (9,), False, False, "identity"),
]
LN_OP_IDS = ["silu-aff-res", "2dims-aff", "1030-res", "identity"]


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16-mixed"])
@pytest.mark.parametrize("case", LN_OP_CASES, ids=LN_OP_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_ln_ops_against_reference_poisoned(device, case, dtype_name):
    """layer_norm_fwd / layer_norm_bwd called directly after poisoning the allocator: mean/rstd have the
    input's leading dims in float32, every output is finite and matches the reference, unrequested
    gradients are empty."""
    shape, ns, affine, residual, act = case
    dtype, (x, w, b, res) = ln_inputs(shape, ns, dtype_name, device, affine, residual)
    lead = shape[: len(shape) - len(ns)]
    poison_allocator(device, x, x, torch.empty(lead), torch.empty(lead))
    y, mean, rstd = ln_op_fwd(x, w, b, res, ns, act)
    for t in (y, mean, rstd):
        assert torch.isfinite(t).all()
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert mean.shape == lead and rstd.shape == lead
    assert mean.dtype == torch.float32 and rstd.dtype == torch.float32
    mean_ref, rstd_ref = layer_norm_stats_ref(x, ns)
    assert rel_err(mean, mean_ref) < 1e-5 and rel_err(rstd, rstd_ref) < 1e-4
    low = dtype != torch.float32
    fns = ln_fns(ns, act)
    assert_fwd_close(y, fns[1](x, w, b, res), dtype, fns[2](x, w, b, res) if low else None)

    dy = make_input(shape, dtype, device)
    leaves = [leaf(to64(t)) for t in (x, w, b, res)]
    fns[1](*leaves).backward(to64(dy))
    nat = [leaf(None if t is None else t.clone()) for t in (x, w, b, res)]
    fns[2](*nat).backward(dy)
    mask = [True, affine, affine, residual and act != "identity"]
    poison_allocator(device, x, x, x, torch.empty(ns), torch.empty(ns))
    grads = ln_op_bwd(dy, x, res, mean, rstd, w, b, ns, act, mask)
    for name, want, gi, lf, nt in zip(
        ("dX", "dgamma", "dbeta", "dresidual"), mask, grads, leaves, nat, strict=True
    ):
        if not want:
            assert gi.numel() == 0, f"unrequested {name} is not empty"
            continue
        assert torch.isfinite(gi).all(), f"{name} has non-finite values"
        assert gi.shape == lf.shape, name
        assert_bwd_close(gi, lf.grad, dtype, nt.grad if low else None, what=name)


@pytest.mark.parametrize("case", LN_OP_CASES, ids=LN_OP_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_ln_opcheck(device, case):
    shape, ns, affine, residual, act = case
    _, (x, w, b, res) = ln_inputs(shape, ns, "float32", device, affine, residual)
    code = ACT_CODES[act]
    torch.library.opcheck(
        torch.ops.normext.layer_norm_fwd.default, (x, w, b, res, list(ns), 1e-5, code, SLOPE)
    )
    _, mean, rstd = torch.ops.normext.layer_norm_fwd(x, w, b, res, list(ns), 1e-5, code, SLOPE)
    dy = make_input(shape, torch.float32, device)
    mask = [True, affine, affine, residual]
    torch.library.opcheck(
        torch.ops.normext.layer_norm_bwd.default, (dy, x, res, mean, rstd, w, b, list(ns), code, SLOPE, mask)
    )


@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"])
def test_ln_gradcheck(act):
    ns = (3, 5)
    x = make_input((2, 4, 3, 5), torch.float64, "cpu")
    w, b = (p.reshape(ns) for p in make_params(15, torch.float64))
    res = residual_away_from_kink(layer_norm_pre_ref(x, ns, w, b))
    assert layer_norm_pre_ref(x, ns, w, b, residual=res).abs().min() > 0.1
    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b, res))
    assert torch.autograd.gradcheck(
        lambda *t: nxF.layer_norm(t[0], ns, t[1], t[2], 1e-5, act, SLOPE, t[3]), inputs
    )


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("affine", ["none", "weight-only", "both"])
def test_ln_gradcheck_optional_args(affine, residual):
    _, (x, w, b, res) = ln_inputs((3, 11), (11,), "float64", "cpu", affine != "none", residual)
    if affine == "weight-only":
        b = None
    inputs = (leaf(x), leaf(w), leaf(b), leaf(res))
    assert torch.autograd.gradcheck(
        lambda *t: nxF.layer_norm(t[0], 11, t[1], t[2], 1e-5, "silu", SLOPE, t[3]), inputs
    )


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(3000, 96), (6, 5000)], ids=["many-rows", "long-rows"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_bitwise_deterministic(device, shape, dtype_name):
    _, tensors = ln_inputs(shape, shape[-1:], dtype_name, device)
    dy = torch.randn_like(tensors[0])
    ours = ln_fns(shape[-1:], "silu")[0]
    y1, g1 = forward_backward(ours, tensors, dy)
    y2, g2 = forward_backward(ours, tensors, dy)
    assert torch.equal(y1, y2)
    for a, c in zip(g1, g2, strict=True):
        assert torch.equal(a, c)


# -------------------------------------------------------------------------------------- LayerNorm module


@pytest.mark.parametrize("config", ["affine", "no-bias", "no-affine"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_module_matches_torch_nn(device, dtype_name, config):
    dtype, _ = parse_dtype(dtype_name)
    ns = (6, 20)
    kwargs = {"elementwise_affine": config != "no-affine", "bias": config == "affine"}
    theirs = torch.nn.LayerNorm(ns, device=device, dtype=dtype, **kwargs)
    ours = normext.LayerNorm(ns, activation="silu", device=device, dtype=dtype, **kwargs)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.copy_(make_params(120, dtype, device)[0].reshape(ns))
            if theirs.bias is not None:
                theirs.bias.copy_(make_params(120, dtype, device)[1].reshape(ns))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = make_input((3, 6, 20), dtype, device)
    res = make_input((3, 6, 20), dtype, device)
    dy = torch.randn_like(x)
    y, g = forward_backward(lambda x_, r_: ours(x_, r_), (x, res), dy)
    y_nat, g_nat = forward_backward(lambda x_, r_: F.silu(theirs(x_) + r_), (x.clone(), res.clone()), dy)
    tensors = [to64(t) for t in (x, theirs.weight, theirs.bias, res)]
    y_ref, g_ref = forward_backward(
        lambda *t: layer_norm_ref(t[0], ns, t[1], t[2], 1e-5, "silu", 0.01, t[3]), tensors, to64(dy)
    )
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_nat, rtol=1e-5, atol=1e-5)
    assert_fwd_close(y, y_ref, dtype, y_nat)
    assert_bwd_close(g[0], g_ref[0], dtype, g_nat[0], what="dx")
    assert_bwd_close(g[1], g_ref[3], dtype, g_nat[1], what="dresidual")
    for name, p, q, gr in zip(
        ("dweight", "dbias"), (ours.weight, ours.bias), (theirs.weight, theirs.bias), g_ref[1:3], strict=True
    ):
        assert (p is None) == (q is None), name
        if p is not None:
            assert p.grad is not None and p.grad.dtype == dtype and p.grad.shape == ns
            assert_bwd_close(p.grad, gr, dtype, q.grad, what=name)


@pytest.mark.parametrize("act", [None, "leaky_relu", "gelu_tanh"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_module_defaults(device, act):
    """Module defaults: eps 1e-5, negative_slope 0.01, residual=None; output = act(torch.nn.LayerNorm(x))."""
    theirs = torch.nn.LayerNorm(48, device=device)
    ours = normext.LayerNorm(48, activation=act, device=device)
    x = make_input((5, 48), torch.float32, device)
    torch.testing.assert_close(ours(x), native_chain(theirs(x), None, act, 0.01), rtol=1e-5, atol=1e-5)
    assert (ours.eps, ours.normalized_shape, ours.elementwise_affine) == (1e-5, (48,), True)
    assert "activation" not in repr(ours) if act is None else f"activation={act}" in repr(ours)


@pytest.mark.parametrize("config", ["affine", "no-bias", "no-affine"])
def test_ln_module_state_dict_both_ways(config):
    kwargs = {"elementwise_affine": config != "no-affine", "bias": config == "affine"}
    ours = normext.LayerNorm((4, 6), activation="relu", **kwargs)
    theirs = torch.nn.LayerNorm((4, 6), **kwargs)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for t in theirs.parameters():
        with torch.no_grad():
            t.copy_(torch.randn_like(t))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    for t in ours.parameters():
        with torch.no_grad():
            t.copy_(torch.randn_like(t))
    back = torch.nn.LayerNorm((4, 6), **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    for p, q in zip(ours.parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln_module_factory_kwargs(device, dtype_name):
    dtype, _ = parse_dtype(dtype_name)
    skip_if_unsupported(device, dtype)
    m = normext.LayerNorm(6, device=device, dtype=dtype)
    assert m.weight.dtype == dtype and m.bias.dtype == dtype and m.weight.device.type == device
    y = m(make_input((2, 6), dtype, device))
    assert y.dtype == dtype and y.device.type == device


# ------------------------------------------------------------------------------------- LayerNorm errors


@pytest.mark.parametrize("device", DEVICES)
def test_ln_error_trailing_dims_mismatch(device):
    x = make_input((2, 3, 8), torch.float32, device)
    msg = r"normalized_shape=\[4\], expected input with shape \[\*, 4\], but got input of size"
    with pytest.raises(ERRORS, match=msg):
        nxF.layer_norm(x, 4)
    with pytest.raises(ERRORS, match="normalized_shape"):
        nxF.layer_norm(x, (2, 3, 8, 1))
    with pytest.raises(ERRORS, match="normalized_shape"):
        normext.LayerNorm((3, 4), device=device)(x)
    with pytest.raises(ERRORS, match="normalized_shape"):
        ln_op_fwd(x, None, None, None, (5,), "identity")


@pytest.mark.parametrize("device", DEVICES)
def test_ln_error_wrong_weight_or_bias_shape(device):
    x = make_input((2, 3, 8), torch.float32, device)
    w, b = make_params(8, torch.float32, device)
    with pytest.raises(ERRORS, match="weight"):
        nxF.layer_norm(x, 8, torch.ones(6, device=device), b)
    with pytest.raises(ERRORS, match="weight"):
        nxF.layer_norm(x, (3, 8), w, None)
    with pytest.raises(ERRORS, match="bias"):
        nxF.layer_norm(x, 8, w, torch.zeros(2, 4, device=device))
    with pytest.raises(ERRORS, match="weight"):
        nxF.layer_norm(x, 8, w.half(), b)


@pytest.mark.parametrize("device", DEVICES)
def test_ln_error_bad_input_residual_activation(device):
    with pytest.raises(ERRORS, match="floating-point"):
        nxF.layer_norm(torch.randint(0, 5, (2, 8), device=device), 8)
    x = make_input((2, 8), torch.float32, device)
    with pytest.raises(ERRORS, match="residual"):
        nxF.layer_norm(x, 8, residual=make_input((2, 9), torch.float32, device))
    with pytest.raises(ERRORS, match="residual"):
        nxF.layer_norm(x, 8, residual=x.half())
    with pytest.raises(ValueError, match="activation"):
        nxF.layer_norm(x, 8, activation="tanh")
    with pytest.raises(ValueError, match="activation"):
        normext.LayerNorm(8, activation="swish")


# ============================================================================================= LayerNorm2d


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", LOW_AND_FP32)
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_forward_dtype_format_activation(device, dtype_name, fmt, act):
    dtype, tensors = ln2d_inputs((2, 24, 5, 7), dtype_name, device, fmt)
    y = check_all(ln2d_fns(act), tensors, dtype, backward=False)
    assert_layout_kept(y, tensors[0], fmt)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", LOW_AND_FP32)
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_backward_dtype_format_activation(device, dtype_name, fmt, act):
    dtype, tensors = ln2d_inputs((2, 12, 4, 5), dtype_name, device, fmt)
    check_all(ln2d_fns(act), tensors, dtype, fmt=fmt)


LN2D_SHAPES = [
    (2, 1, 3, 5),  # C = 1
    (2, 3, 4, 4),  # C = 3
    (1, 7, 9, 11),  # N = 1, odd H*W (a scalar tail after the SIMD lanes)
    (2, 96, 1, 1),  # H*W = 1
    (2, 16, 40, 40),  # several position blocks per sample
    (2, 1000, 3, 3),  # long channel rows
    (1, 1030, 2, 2),  # past a warp's 1024 in channels-last
    (2, 12, 10),  # 1-D spatial
    (2, 12, 3, 4, 5),  # 3-D spatial (channels_last_3d)
    (2, 6, 3, 1, 5),  # 3-D spatial with a size-1 dim
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16-mixed"])
@pytest.mark.parametrize("shape", LN2D_SHAPES, ids=["x".join(map(str, s)) for s in LN2D_SHAPES])
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_shapes(device, shape, dtype_name, fmt):
    dtype, tensors = ln2d_inputs(shape, dtype_name, device, fmt)
    check_all(ln2d_fns("silu"), tensors, dtype, fmt=fmt)


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("affine", ["none", "weight-only", "both"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_affine_and_residual(device, fmt, affine, residual):
    dtype, (x, w, b, res) = ln2d_inputs((2, 10, 3, 6), "float32", device, fmt, affine != "none", residual)
    if affine == "weight-only":
        b = None
    check_all(ln2d_fns("gelu"), (x, w, b, res), dtype, fmt=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_ln2d_float64_cpu(act, fmt):
    dtype, tensors = ln2d_inputs((2, 6, 3, 7), "float64", "cpu", fmt)
    check_all(ln2d_fns(act), tensors, dtype, fmt=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_matches_permute_chain(device, dtype_name, fmt):
    """Same values as the permute -> F.layer_norm -> permute chain users write today, in the input's format
    (the chain returns channels-last strides for an NCHW input)."""
    dtype, pdtype = parse_dtype(dtype_name)
    x = make_input((2, 32, 9, 8), dtype, device, fmt)
    w, b = make_params(32, pdtype, device)
    y = nxF.layer_norm_2d(x, w, b)
    chain = permute_layer_norm_2d(x, w, b, 1e-6)
    assert_layout_kept(y, x, fmt)
    if dtype == torch.float32:
        torch.testing.assert_close(y, chain, rtol=1e-5, atol=1e-5)
    assert_fwd_close(y, layer_norm_2d_ref(x, w, b), dtype, chain)


@pytest.mark.parametrize("kind", ["transposed", "strided", "channel_slice", "flat_offset", "batch_slice"])
@pytest.mark.parametrize("dtype_name", ["float32", "float16-mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_views(device, dtype_name, kind):
    dtype, pdtype = parse_dtype(dtype_name)
    shape = (2, 8, 5, 6)
    fmt = None
    if kind in ("transposed", "strided", "channel_slice"):
        x = make_noncontiguous(shape, dtype, device, kind)
        res = make_noncontiguous(shape, dtype, device, "strided")
    else:
        fmt = "channels_last"
        maker = {"flat_offset": lambda: with_storage_offset(make_input(shape, dtype, device, fmt), 3)}.get(
            kind, lambda: sliced_batch(shape, dtype, device, fmt)
        )
        x, res = maker(), maker()
        assert x.storage_offset() > 0
    w, b = make_params(8, pdtype, device)
    check_all(ln2d_fns("leaky_relu"), (x, w, b, res), dtype, fmt=fmt)


@pytest.mark.parametrize("dy_fmt", FORMATS)
@pytest.mark.parametrize("x_fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_grad_output_in_another_format(device, x_fmt, dy_fmt):
    _, (x, w, b, res) = ln2d_inputs((2, 12, 4, 5), "float32", device, x_fmt)
    dy = make_input(x.shape, torch.float32, device, dy_fmt)
    ours, ref, _ = ln2d_fns("silu")
    _, g = forward_backward(ours, (x, w, b, res), dy)
    _, g_ref = forward_backward(ref, [to64(t) for t in (x, w, b, res)], to64(dy))
    for name, gi, gr in zip(("dx", "dweight", "dbias", "dresidual"), g, g_ref, strict=True):
        assert_bwd_close(gi, gr, torch.float32, what=name)


@pytest.mark.parametrize("case", ["f32-mean100-std0.1", "f32-mean100-std0.01", "f16-mean1e4-std100"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_off_centre_data(device, fmt, case):
    """As test_ln_off_centre_data, over the channels of each position (torch: the permute chain)."""
    dtype = {"f32": torch.float32, "f16": torch.float16}[case[:3]]
    mean, std = {"mean100-std0.1": (100.0, 0.1), "mean100-std0.01": (100.0, 0.01)}.get(case[4:], (1e4, 100.0))
    C = 192
    x = make_input((2, C, 6, 7), dtype, device, fmt, mean=mean, std=std)
    w, b = make_params(C, torch.float32, device)
    ours, ref, _ = ln2d_fns()
    dy = torch.randn_like(x)
    y, g = forward_backward(lambda *t: ours(*t, None), (x, w, b), dy)
    y_ref, g_ref = forward_backward(lambda *t: ref(*t, None), [to64(t) for t in (x, w, b)], to64(dy))
    nat_w, nat_b = (w, b) if dtype == torch.float32 else (w.to(dtype), b.to(dtype))
    y_nat, g_nat = forward_backward(lambda *t: permute_layer_norm_2d(*t), (x.clone(), nat_w, nat_b), dy)
    for name, out, r, nat in zip(
        ("y", "dx", "dweight", "dbias"), [y, *g], [y_ref, *g_ref], [y_nat, *g_nat], strict=True
    ):
        err, nat_err = rel_err(out, r), rel_err(nat, r)
        if dtype == torch.float16:
            assert err <= 2 * nat_err + 1e-3, f"{name}: {err:.3g} > 2 x torch {nat_err:.3g} + 1e-3"
        elif std >= 0.1:
            assert err < 1e-4, f"{name}: rel err {err:.3g}"
        else:
            assert err < max(1e-4, 2 * nat_err), f"{name}: rel err {err:.3g} (torch float32: {nat_err:.3g})"


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_nonfinite_input_propagates_like_torch(device, fmt, bad):
    x = make_input((2, 8, 5, 9), torch.float32, device)
    x[1, 2, 1, 0] = float(bad)
    x[0, 0, 3, 3] = float(bad)  # channel 0 of a position
    x = to_format(x, fmt)
    w, b = make_params(8, torch.float32, device)
    y = nxF.layer_norm_2d(x, w, b, activation="silu")
    expected = F.silu(permute_layer_norm_2d(x, w, b))
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    assert torch.equal(torch.isinf(y), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert finite.any() and not finite.all()
    assert rel_err(y[finite], expected[finite]) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_poisoned_memory_module(device, fmt):
    shape = (3, 20, 5, 7)
    x = make_input(shape, torch.float32, device, fmt)
    res = make_input(shape, torch.float32, device, fmt)
    m = normext.LayerNorm2d(20, activation="gelu", device=device)
    with torch.no_grad():
        m.weight.copy_(make_params(20)[0])
        m.bias.copy_(make_params(20)[1])
    xl, rl = leaf(x), leaf(res)
    poison_allocator(device, x, x, x)
    y = m(xl, rl)
    assert torch.isfinite(y).all()
    poison_allocator(device, x, x, x, m.weight, m.weight)
    y.backward(torch.randn_like(y))
    for t in (xl.grad, rl.grad, m.weight.grad, m.bias.grad):
        assert torch.isfinite(t).all()
    assert rel_err(y, layer_norm_2d_ref(x, m.weight, m.bias, 1e-6, "gelu", 0.01, res)) < 2e-5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(0, 8, 4, 4), (2, 8, 0, 3), (0, 8, 5)], ids=["N0", "H0", "1d-N0"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_empty(device, shape, fmt):
    x = to_format(torch.empty(shape, device=device), fmt).requires_grad_()
    m = normext.LayerNorm2d(8, activation="relu", device=device)
    y = m(x)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert m.weight.grad is None or not m.weight.grad.any()


# ---------------------------------------------------------------------------------- LayerNorm2d op level


LN2D_OP_CASES = [
    ((2, 12, 5, 7), True, True, "silu"),
    ((3, 20, 4, 4), True, False, "leaky_relu"),
    ((2, 16, 9), False, True, "gelu"),
    ((2, 8, 3, 2, 3), False, False, "identity"),
]
LN2D_OP_IDS = ["4d-aff-res", "4d-aff", "3d-res", "5d"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16-mixed"])
@pytest.mark.parametrize("case", LN2D_OP_CASES, ids=LN2D_OP_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_ops_against_reference_poisoned(device, case, dtype_name, fmt):
    shape, affine, residual, act = case
    dtype, (x, w, b, res) = ln2d_inputs(shape, dtype_name, device, fmt, affine, residual)
    N, C = shape[:2]
    HxW = x[0, 0].numel()
    code = ACT_CODES[act]
    poison_allocator(device, x, x, torch.empty(N * HxW), torch.empty(N * HxW))
    y, mean, rstd = torch.ops.normext.layer_norm_2d_fwd(x, w, b, res, 1e-6, code, SLOPE)
    for t in (y, mean, rstd):
        assert torch.isfinite(t).all()
    assert_layout_kept(y, x, fmt)
    assert mean.shape == (N, HxW) and mean.dtype == torch.float32 and rstd.shape == (N, HxW)
    x64 = to64(x)
    mean_ref = x64.mean(1).reshape(N, HxW)
    rstd_ref = (1 / torch.sqrt(x64.var(1, unbiased=False) + 1e-6)).reshape(N, HxW)
    assert rel_err(mean, mean_ref) < 1e-5 and rel_err(rstd, rstd_ref) < 1e-4
    fns = ln2d_fns(act)
    low = dtype != torch.float32
    assert_fwd_close(y, fns[1](x, w, b, res), dtype, fns[2](x, w, b, res) if low else None)

    dy = make_input(shape, dtype, device, fmt)
    leaves = [leaf(to64(t)) for t in (x, w, b, res)]
    fns[1](*leaves).backward(to64(dy))
    nat = [leaf(None if t is None else t.clone()) for t in (x, w, b, res)]
    fns[2](*nat).backward(dy)
    mask = [True, affine, affine, residual and act != "identity"]
    poison_allocator(device, x, x, x, torch.empty(C), torch.empty(C))
    grads = torch.ops.normext.layer_norm_2d_bwd(dy, x, res, mean, rstd, w, b, code, SLOPE, mask)
    for name, want, gi, lf, nt in zip(
        ("dX", "dgamma", "dbeta", "dresidual"), mask, grads, leaves, nat, strict=True
    ):
        if not want:
            assert gi.numel() == 0, f"unrequested {name} is not empty"
            continue
        assert torch.isfinite(gi).all(), f"{name} has non-finite values"
        assert gi.shape == lf.shape, name
        if name in ("dX", "dresidual"):
            assert_layout_kept(gi, x, fmt)
        assert_bwd_close(gi, lf.grad, dtype, nt.grad if low else None, what=name)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", LN2D_OP_CASES, ids=LN2D_OP_IDS)
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_opcheck(device, case, fmt):
    shape, affine, residual, act = case
    _, (x, w, b, res) = ln2d_inputs(shape, "float32", device, fmt, affine, residual)
    code = ACT_CODES[act]
    torch.library.opcheck(torch.ops.normext.layer_norm_2d_fwd.default, (x, w, b, res, 1e-6, code, SLOPE))
    _, mean, rstd = torch.ops.normext.layer_norm_2d_fwd(x, w, b, res, 1e-6, code, SLOPE)
    dy = make_input(shape, torch.float32, device, fmt)
    mask = [True, affine, affine, residual]
    torch.library.opcheck(
        torch.ops.normext.layer_norm_2d_bwd.default, (dy, x, res, mean, rstd, w, b, code, SLOPE, mask)
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"])
def test_ln2d_gradcheck(act, fmt):
    shape = (2, 5, 3, 3)  # H*W = 9: whole float64 SIMD vectors and a scalar tail in NCHW
    x = make_input(shape, torch.float64, "cpu", fmt)
    w, b = make_params(5, torch.float64)
    res = to_format(residual_away_from_kink(layer_norm_2d_pre_ref(x, w, b)), fmt)
    assert layer_norm_2d_pre_ref(x, w, b, residual=res).abs().min() > 0.1
    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b, res))
    assert torch.autograd.gradcheck(
        lambda *t: nxF.layer_norm_2d(t[0], t[1], t[2], 1e-6, act, SLOPE, t[3]), inputs
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 32, 16, 16), (2, 96, 56, 40)], ids=["small", "large"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_bitwise_deterministic(device, shape, dtype_name, fmt):
    _, tensors = ln2d_inputs(shape, dtype_name, device, fmt)
    dy = torch.randn_like(tensors[0])
    ours = ln2d_fns("silu")[0]
    y1, g1 = forward_backward(ours, tensors, dy)
    y2, g2 = forward_backward(ours, tensors, dy)
    assert torch.equal(y1, y2)
    for a, c in zip(g1, g2, strict=True):
        assert torch.equal(a, c)


# ------------------------------------------------------------------------------------ LayerNorm2d module


class TimmStyleLayerNorm2d(torch.nn.LayerNorm):
    """The timm / detectron2 module: a torch.nn.LayerNorm over C applied through permutes."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x):
        return permute_layer_norm_2d(x, self.weight, self.bias, self.eps)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_module_matches_timm_style(device, dtype_name, fmt):
    dtype, _ = parse_dtype(dtype_name)
    theirs = TimmStyleLayerNorm2d(24).to(device=device, dtype=dtype)
    with torch.no_grad():
        theirs.weight.copy_(make_params(24, dtype, device)[0])
        theirs.bias.copy_(make_params(24, dtype, device)[1])
    ours = normext.LayerNorm2d(24, device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = make_input((2, 24, 7, 6), dtype, device, fmt)
    dy = torch.randn_like(x)
    y, (gx,) = forward_backward(ours, (x,), dy)
    y_nat, (gx_nat,) = forward_backward(theirs, (x.clone(),), dy)
    assert_layout_kept(y, x, fmt)
    y_ref, g_ref = forward_backward(
        layer_norm_2d_ref, [to64(t) for t in (x, theirs.weight, theirs.bias)], to64(dy)
    )
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_nat, rtol=1e-5, atol=1e-5)
    assert_fwd_close(y, y_ref, dtype, y_nat)
    assert_bwd_close(gx, g_ref[0], dtype, gx_nat, what="dx")
    for name, p, q, gr in zip(
        ("dweight", "dbias"), (ours.weight, ours.bias), (theirs.weight, theirs.bias), g_ref[1:], strict=True
    ):
        assert p.grad.dtype == dtype and p.grad.shape == (24,)
        assert_bwd_close(p.grad, gr, dtype, q.grad, what=name)


@pytest.mark.parametrize("config", ["affine", "no-bias", "no-affine"])
def test_ln2d_module_state_dict_and_attributes(config):
    kwargs = {"elementwise_affine": config != "no-affine", "bias": config == "affine"}
    ours = normext.LayerNorm2d(16, activation="gelu", **kwargs)
    assert (ours.num_channels, ours.normalized_shape, ours.eps) == (16, (16,), 1e-6)
    assert "activation=gelu" in repr(ours)
    theirs = torch.nn.LayerNorm(16, eps=1e-6, **kwargs)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    for t in theirs.parameters():
        with torch.no_grad():
            t.copy_(torch.randn_like(t))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = torch.nn.LayerNorm(16, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    for p, q in zip(back.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
    x = make_input((2, 16, 3, 3), torch.float32)
    expected = F.gelu(permute_layer_norm_2d(x, theirs.weight, theirs.bias, 1e-6))
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_ln2d_errors(device):
    x = make_input((2, 8, 4, 4), torch.float32, device)
    with pytest.raises(ValueError, match="8 channels"):
        normext.LayerNorm2d(8, device=device)(make_input((2, 6, 4, 4), torch.float32, device))
    with pytest.raises(ValueError, match="8 channels"):
        normext.LayerNorm2d(8, device=device)(make_input((8,), torch.float32, device))
    with pytest.raises(ERRORS, match=r"weight of shape \[8\]"):
        nxF.layer_norm_2d(x, torch.ones(6, device=device))
    with pytest.raises(ERRORS, match="bias"):
        nxF.layer_norm_2d(x, torch.ones(8, device=device), torch.zeros(8, 1, device=device))
    with pytest.raises(ERRORS, match="floating-point"):
        nxF.layer_norm_2d(torch.ones(2, 8, 3, dtype=torch.int64, device=device))
    with pytest.raises(ERRORS, match="residual"):
        nxF.layer_norm_2d(x, residual=make_input((2, 8, 4, 5), torch.float32, device))
    with pytest.raises(ValueError, match="activation"):
        nxF.layer_norm_2d(x, activation="swish")


# ================================================================================================= both


@requires_cuda
@pytest.mark.parametrize("family", ["layer_norm", "layer_norm_2d"])
def test_error_tensors_on_different_devices(family):
    x = make_input((2, 8, 4, 4), torch.float32, "cuda")
    C = 4 if family == "layer_norm" else 8
    w, b = make_params(C, torch.float32, "cuda")

    def fn(x_, w_, b_, r_=None):
        if family == "layer_norm":
            return nxF.layer_norm(x_, C, w_, b_, residual=r_)
        return nxF.layer_norm_2d(x_, w_, b_, residual=r_)

    for args in ((x, w.cpu(), b), (x, w, b.cpu()), (x, w, b, x.cpu()), (x.cpu(), w, b)):
        with pytest.raises(ERRORS, match="device|is on"):
            fn(*args)


@pytest.mark.compile
def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    ln = normext.LayerNorm(16, activation="silu")
    ln2d = normext.LayerNorm2d(16, activation="gelu")
    with torch.no_grad():
        for m in (ln, ln2d):
            m.weight.copy_(make_params(16)[0])
            m.bias.copy_(make_params(16)[1])

    def model(x, r):
        return ln(ln2d(x, r).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    compiled = torch.compile(model, fullgraph=True)
    x = make_input((2, 16, 5, 6), torch.float32, "cpu", "channels_last")
    res = make_input((2, 16, 5, 6), torch.float32, "cpu", "channels_last")
    dy = torch.randn_like(x)

    def run(fn):
        for m in (ln, ln2d):
            m.zero_grad()
        y, g = forward_backward(fn, (x, res), dy)
        return y, [*g, *(p.grad.clone() for m in (ln, ln2d) for p in (m.weight, m.bias))]

    y_e, g_e = run(model)
    y_c, g_c = run(compiled)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for a, c in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    z = layer_norm_2d_ref(x, ln2d.weight, ln2d.bias, 1e-6, "gelu", 0.01, res).permute(0, 2, 3, 1)
    y_ref = act_ref(layer_norm_pre_ref(z, (16,), ln.weight, ln.bias), "silu").permute(0, 3, 1, 2)
    assert rel_err(y_c, y_ref) < 2e-5
