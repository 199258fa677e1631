# RMSNorm, RMSNorm2d and the pre-norm add&norm ops (add_layer_norm, add_rms_norm): modules, functionals and
# their ops against float64 references, torch.nn.RMSNorm and the torch-native chains (dtypes x activations x
# residual, row lengths, both layouts, views, off-centre data, both outputs' gradients, gradcheck, opcheck,
# compile, determinism, errors, convert_model and the framework names).
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
    check_all,
    forward_backward,
    leaf,
    make_input,
    make_noncontiguous,
    make_params,
    parse_dtype,
    residual_away_from_kink,
    view_inputs,
    with_storage_offset,
)
from reference import (
    ACT_CODES,
    ACTIVATIONS,
    layer_norm_ref,
    native_chain,
    permute_rms_norm_2d,
    rel_err,
    rms_norm_2d_ref,
    rms_norm_pre_ref,
    rms_norm_ref,
    to64,
)

import normext
import normext.functional as nxF

SLOPE = 0.2
ERRORS = (RuntimeError, ValueError, TypeError)
# Row lengths: 1 and odd widths, and the edges of the CUDA row-kernel classes (warp per row up to 1024, block
# per row up to 8192 in backward / 16384 in forward, two passes beyond).
ROW_LENGTHS = [1, 3, 7, 33, 1025, 4097, 8200, 16500]


def rms_fns(normalized_shape, act=None, slope=SLOPE, eps=1e-6):
    """(ours, float64 reference, torch-native chain) over (x, w, b, residual); b is always None."""
    ns = tuple(normalized_shape)
    return (
        lambda x, w, b, r: nxF.rms_norm(x, ns, w, eps, act, slope, r),
        lambda x, w, b, r: rms_norm_ref(x, ns, w, eps, act, slope, r),
        lambda x, w, b, r: native_chain(
            F.rms_norm(x, ns, None if w is None else w.to(x.dtype), eps), r, act, slope
        ),
    )


def rms2d_fns(act=None, slope=SLOPE, eps=1e-6):
    return (
        lambda x, w, b, r: nxF.rms_norm_2d(x, w, eps, act, slope, r),
        lambda x, w, b, r: rms_norm_2d_ref(x, w, eps, act, slope, r),
        lambda x, w, b, r: native_chain(
            permute_rms_norm_2d(x, None if w is None else w.to(x.dtype), eps), r, act, slope
        ),
    )


def rms_inputs(shape, D, dtype_name, device, fmt="contiguous", affine=True, residual=True, mean=0.0, std=1.0):
    """(dtype, (x, w, None, residual)) with w of D elements (the channel count for RMSNorm2d)."""
    dtype, pdtype = parse_dtype(dtype_name)
    x = make_input(shape, dtype, device, fmt, mean=mean, std=std)
    res = make_input(shape, dtype, device, fmt) if residual else None
    w = make_params(D, pdtype, device)[0] if affine else None
    return dtype, (x, w, None, res)


def test_exports():
    assert issubclass(normext.RMSNorm, torch.nn.RMSNorm)
    assert issubclass(normext.RMSNorm2d, torch.nn.RMSNorm)
    assert normext.modules.RMSNorm2d is normext.RMSNorm2d
    for name in ("rms_norm", "rms_norm_2d", "add_layer_norm", "add_rms_norm"):
        assert name in nxF.__all__


# ================================================================================================= RMSNorm


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype_name", LOW_AND_FP32)
@pytest.mark.parametrize("device", DEVICES)
def test_rms_dtype_activation(device, dtype_name, act):
    dtype, tensors = rms_inputs((4, 3, 40), 40, dtype_name, device)
    check_all(rms_fns((40,), act), tensors, dtype)


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16-mixed"])
@pytest.mark.parametrize("D", ROW_LENGTHS)
@pytest.mark.parametrize("device", DEVICES)
def test_rms_row_lengths(device, D, dtype_name):
    rows = 37 if D <= 1025 else 3
    dtype, tensors = rms_inputs((rows, D), D, dtype_name, device)
    check_all(rms_fns((D,), "silu"), tensors, dtype)


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("affine", [False, True], ids=["noaffine", "affine"])
@pytest.mark.parametrize("device", DEVICES)
def test_rms_optional_args(device, affine, residual):
    dtype, tensors = rms_inputs((2, 5, 4, 6), 24, "float32", device, affine=affine, residual=residual)
    x, w, _, res = tensors
    if w is not None:
        w = w.reshape(4, 6)
    check_all(rms_fns((4, 6), "leaky_relu"), (x, w, None, res), dtype)


def test_rms_float64_cpu():
    dtype, tensors = rms_inputs((3, 2, 13), 13, "float64", "cpu")
    check_all(rms_fns((13,), "gelu"), tensors, dtype)


@pytest.mark.parametrize("kind", VIEW_KINDS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16-mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_rms_views(device, dtype_name, kind):
    """Non-contiguous inputs, and dense views at an offset that breaks 16-byte alignment."""
    dtype, pdtype = parse_dtype(dtype_name)
    x, res = view_inputs((2, 6, 64), dtype, device, kind)
    w = with_storage_offset(make_params(x.shape[-1], pdtype, device)[0], 1)
    check_all(rms_fns((x.shape[-1],), "gelu_tanh"), (x, w, None, res), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("D", [7, 1000, 4097, 16500])
@pytest.mark.parametrize("device", DEVICES)
def test_rms_off_centre_data(device, D, dtype):
    """Rows with mean >> std: the mean square is var + mean² (no cancellation), and x̂ is close to 1
    everywhere. float32 within max(1e-4, 2x torch's float32 error); float16 the flash-attention rule."""
    mean, std = (100.0, 0.05) if dtype == torch.float32 else (1e3, 10.0)
    x = make_input((4, D), dtype, device, mean=mean, std=std)
    w = make_params(D, torch.float32, device)[0]
    dy = torch.randn_like(x)
    y, g = forward_backward(lambda a, b: nxF.rms_norm(a, (D,), b, 1e-6), (x, w), dy)
    y_ref, g_ref = forward_backward(lambda a, b: rms_norm_ref(a, (D,), b, 1e-6), [to64(x), to64(w)], to64(dy))
    y_nat, g_nat = forward_backward(lambda a, b: F.rms_norm(a, (D,), b, 1e-6), (x.clone(), w.to(dtype)), dy)
    for name, out, r, nat in zip(
        ("y", "dx", "dweight"), [y, *g], [y_ref, *g_ref], [y_nat, *g_nat], strict=True
    ):
        err, nat_err = rel_err(out, r), rel_err(nat, r)
        bound = 2 * nat_err + 1e-3 if dtype == torch.float16 else max(1e-4, 2 * nat_err)
        assert err <= bound, f"{name}: rel err {err:.3g} > {bound:.3g} (torch: {nat_err:.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_rms_module_eps_none_is_torch_default(device, dtype):
    """eps=None is torch.finfo(input dtype).eps, as torch.nn.RMSNorm: on data of mean square ~1e-7 (where
    eps matters) the output follows torch's module, and the float64 formula with that eps."""
    D = 48
    ours = normext.RMSNorm(D, device=device)
    theirs = torch.nn.RMSNorm(D, device=device)
    with torch.no_grad():
        ours.weight.copy_(make_params(D)[0])
        theirs.weight.copy_(ours.weight)
    assert ours.eps is None
    x = make_input((5, D), dtype, device, std=3e-4 if dtype == torch.float32 else 0.03)
    eps = torch.finfo(dtype).eps
    y_ref = rms_norm_ref(x, (D,), ours.weight, eps)
    assert rel_err(rms_norm_ref(x, (D,), ours.weight, 1e-6), y_ref) > 0.05, "eps must matter for this data"
    with torch.no_grad():
        y, y_torch = ours(x), theirs(x)
    assert y.dtype == dtype
    assert_fwd_close(y, y_ref, dtype, y_torch)
    if dtype == torch.float32:
        assert rel_err(y, y_torch) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_rms_module_matches_torch_and_state_dict(device):
    x = make_input((3, 7, 20), torch.float32, device)
    theirs = torch.nn.RMSNorm((7, 20), eps=1e-5, device=device)
    with torch.no_grad():
        theirs.weight.copy_(make_params(140)[0].reshape(7, 20))
    ours = normext.RMSNorm((7, 20), eps=1e-5, activation="relu", device=device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == ["weight"]
    xo, xt = leaf(x), leaf(x)
    yo, yt = ours(xo), F.relu(theirs(xt))
    assert rel_err(yo, yt) < 1e-5
    dy = torch.randn_like(yo)
    yo.backward(dy)
    yt.backward(dy)
    assert rel_err(xo.grad, xt.grad) < 1e-4
    assert rel_err(ours.weight.grad, theirs.weight.grad) < 1e-4
    assert "activation=relu" in repr(ours)
    assert normext.RMSNorm(8, elementwise_affine=False).weight is None


@pytest.mark.parametrize("act", ["identity", "relu", "silu", "gelu_tanh"])
def test_rms_gradcheck(act):
    x = make_input((3, 4, 9), torch.float64, "cpu")
    w = make_params(9, torch.float64)[0]
    res = residual_away_from_kink(rms_norm_pre_ref(x, (-1,), w, 1e-6))
    inputs = tuple(leaf(t) for t in (x, w, res))
    fn = lambda a, b, c: nxF.rms_norm(a, 9, b, 1e-6, act, SLOPE, c)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# =============================================================================================== RMSNorm2d


@pytest.mark.parametrize("act", [None, "relu", "leaky_relu", "silu", "gelu"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", LOW_AND_FP32)
@pytest.mark.parametrize("device", DEVICES)
def test_rms2d_formats_dtypes(device, dtype_name, fmt, act):
    dtype, tensors = rms_inputs((2, 24, 5, 7), 24, dtype_name, device, fmt)
    check_all(rms2d_fns(act), tensors, dtype, fmt=fmt)


@pytest.mark.parametrize(
    "shape",
    [(2, 1, 4, 4), (2, 3, 8, 8), (1, 33, 3, 5), (2, 16, 9), (1, 8, 2, 3, 4), (3, 40)],
    ids=["C1", "C3", "C33-odd-HW", "3d", "5d", "2d-input"],
)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_rms2d_shapes(device, shape, fmt):
    dtype, tensors = rms_inputs(shape, shape[1], "float32", device, fmt if len(shape) > 2 else "contiguous")
    check_all(rms2d_fns("silu"), tensors, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("device", DEVICES)
def test_rms2d_module_layout_and_off_centre(device, fmt):
    """RMSNorm2d keeps the memory format, matches the permute -> torch.nn.RMSNorm -> permute chain (also on
    off-centre data) and loads a torch.nn.RMSNorm((C,)) state_dict."""
    C = 32
    theirs = torch.nn.RMSNorm(C, eps=1e-6, device=device)
    with torch.no_grad():
        theirs.weight.copy_(make_params(C)[0])
    ours = normext.RMSNorm2d(C, device=device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = make_input((2, C, 6, 10), torch.float32, device, fmt, mean=50.0, std=0.5)
    y = ours(x)
    assert y.is_contiguous(
        memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    )
    y_torch = theirs(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert rel_err(y, y_torch) < 1e-5
    assert rel_err(y, rms_norm_2d_ref(x, ours.weight)) < 2e-5
    with pytest.raises(ValueError, match="expected input with 32 channels"):
        ours(torch.randn(2, 31, 4, 4, device=device))


def test_rms2d_gradcheck():
    x = make_input((2, 5, 3, 4), torch.float64, "cpu", "channels_last")
    w = make_params(5, torch.float64)[0]
    res = residual_away_from_kink(rms_norm_pre_ref(x, 1, w, 1e-6, channel=True)).contiguous(
        memory_format=torch.channels_last
    )
    inputs = tuple(leaf(t) for t in (x, w, res))
    fn = lambda a, b, c: nxF.rms_norm_2d(a, b, 1e-6, "leaky_relu", SLOPE, c)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# ===================================================================================== pre-norm add & norm


def add_norm_call(kind, x, r, w, b, D, rd):
    if kind == "layer":
        return nxF.add_layer_norm(x, r, D, w, b, 1e-5, residual_dtype=rd)
    return nxF.add_rms_norm(x, r, D, w, 1e-6, residual_dtype=rd)


def add_norm_ref(kind, x, r, w, b, D):
    """float64: s = x + r, out = norm(s)."""
    s = to64(x) + to64(r)
    out = layer_norm_ref(s, (D,), w, b, 1e-5) if kind == "layer" else rms_norm_ref(s, (D,), w, 1e-6)
    return out, s


def add_norm_native(kind, x, r, w, b, D, rd):
    """What torch users write: s = (x + r) in residual_dtype, out = norm(s) back in x's dtype."""
    s = (x.float() + r.float()).to(rd or x.dtype)
    wn = None if w is None else w.to(s.dtype)
    if kind == "layer":
        out = F.layer_norm(s, (D,), wn, None if b is None else b.to(s.dtype), 1e-5)
    else:
        out = F.rms_norm(s, (D,), wn, 1e-6)
    return out.to(x.dtype), s


# (input dtype, residual input dtype, residual_dtype)
ADD_DTYPES = [
    ("float32", "float32", None),
    ("float16", "float16", None),
    ("bfloat16", "bfloat16", None),
    ("bfloat16", "float32", "float32"),
    ("float16", "float16", "float32"),
    ("bfloat16", "float32", None),
]
ADD_IDS = ["f32", "f16", "bf16", "bf16-f32stream", "f16-to-f32stream", "bf16-f32res-cast"]


@pytest.mark.parametrize("D", [1, 7, 768, 4097, 16500], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("dtypes", ADD_DTYPES, ids=ADD_IDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("device", DEVICES)
def test_add_norm_outputs_and_both_gradients(device, kind, dtypes, D):
    """out and s against the float64 formula (low precision: the flash-attention rule against the torch
    chain), s's dtype, and the gradients of a loss on both outputs into input, residual, weight, bias."""
    x_dt, r_dt, rd = (getattr(torch, n) if n else None for n in dtypes)
    x = make_input((3, 5, D), x_dt, device)
    r = make_input((3, 5, D), r_dt, device, std=2.0)
    w, b = make_params(D, torch.float32, device)
    b = b if kind == "layer" else None
    dy, ds = torch.randn_like(x), torch.randn(x.shape, dtype=rd or x_dt, device=device)

    def run(fn, tensors, dy_, ds_):
        leaves = [leaf(t) for t in tensors]
        out, s = fn(*leaves)
        torch.autograd.backward([out, s], [dy_, ds_])
        return out, s, [None if t is None else t.grad for t in leaves]

    out, s, g = run(lambda *t: add_norm_call(kind, *t, D, rd), (x, r, w, b), dy, ds)
    out_ref, s_ref, g_ref = run(lambda *t: add_norm_ref(kind, *t, D), [to64(t) for t in (x, r, w, b)],
                                to64(dy), to64(ds))  # fmt: skip
    out_nat, s_nat, g_nat = run(lambda *t: add_norm_native(kind, *t, D, rd), (x, r, w, b), dy, ds)
    assert out.dtype == x_dt and s.dtype == (rd or x_dt)
    assert out.shape == s.shape == x.shape
    low = x_dt != torch.float32
    assert_fwd_close(out, out_ref, x_dt, out_nat if low else None, what="out")
    s_dtype = s.dtype
    assert_fwd_close(s, s_ref, s_dtype, s_nat if s_dtype != torch.float32 else None, what="s")
    for name, gi, gr, gn, t in zip(("dinput", "dresidual", "dweight", "dbias"), g, g_ref, g_nat, (x, r, w, b),
                                   strict=True):  # fmt: skip
        if t is None:
            continue
        assert gi.dtype == t.dtype and gi.shape == t.shape, name
        assert_bwd_close(gi, gr, x_dt if name in ("dweight", "dbias") else t.dtype, gn, what=name)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("device", DEVICES)
def test_add_norm_views_and_s_exact(device, kind):
    """Strided / offset views in; s is exactly x + r summed in float32 and rounded once to residual_dtype (a
    residual of another dtype converted to it first), and out is the plain norm of that stored s."""
    x = make_noncontiguous((2, 6, 64), torch.bfloat16, device, "strided")
    r = with_storage_offset(make_input((2, 6, 64), torch.float32, device), 1)
    w, b = make_params(64, torch.float32, device)
    b = b if kind == "layer" else None
    for rd in (None, torch.float32):
        out, s = add_norm_call(kind, x, r, w, b, 64, rd)
        stream = rd or x.dtype
        assert s.dtype == stream and torch.equal(s, (x.float() + r.to(stream).float()).to(stream))
        plain = nxF.layer_norm(s, 64, w, b, 1e-5) if kind == "layer" else nxF.rms_norm(s, 64, w, 1e-6)
        torch.testing.assert_close(out, plain.to(out.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm_eps_none_is_that_of_s(device):
    """eps=None takes s's dtype (a float32 stream beside bfloat16 input: float32's eps), as torch.nn.RMSNorm
    applied to s would; on data where eps matters."""
    x = make_input((6, 32), torch.bfloat16, device, std=2e-4)
    r = make_input((6, 32), torch.float32, device, std=2e-4)
    w = make_params(32, torch.float32, device)[0]
    out, s = nxF.add_rms_norm(x, r, 32, w, residual_dtype=torch.float32)
    ref = rms_norm_ref(s, (32,), w, torch.finfo(torch.float32).eps)
    assert rel_err(rms_norm_ref(s, (32,), w, torch.finfo(torch.bfloat16).eps), ref) > 0.5
    assert_fwd_close(out, ref, torch.bfloat16, F.rms_norm(s, (32,), w).to(torch.bfloat16))


@pytest.mark.parametrize("used", ["out", "s"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("device", DEVICES)
def test_add_norm_one_output_in_the_loss(device, kind, used):
    """A loss on out alone or on s alone: the other output's gradient is then None in the backward (none is
    materialized as zeros), and the gradients are those of that one output (float64 reference)."""
    x, r = make_input((4, 48), torch.float32, device), make_input((4, 48), torch.float32, device)
    w, b = make_params(48, torch.float32, device)
    b = b if kind == "layer" else None
    tensors = [t for t in (x, r, w, b) if t is not None]
    g = torch.randn(4, 48, device=device)

    def grads(fn, ts, g_):
        leaves = [leaf(t) for t in ts]
        out, s = fn(*leaves)
        return torch.autograd.grad(out if used == "out" else s, leaves, g_, allow_unused=True)

    def call(fn):
        return lambda x_, r_, w_, b_=None: fn(kind, x_, r_, w_, b_, 48)

    got = grads(call(lambda *a: add_norm_call(*a, None)), tensors, g)
    ref = grads(call(add_norm_ref), [to64(t) for t in tensors], to64(g))
    for name, gi, gr in zip(("dinput", "dresidual", "dweight", "dbias"), got, ref, strict=False):
        if used == "s" and name in ("dweight", "dbias"):
            assert gi is None and gr is None, name
        else:
            assert_bwd_close(gi, gr, torch.float32, what=name)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_add_norm_gradcheck(kind):
    x = make_input((3, 8), torch.float64, "cpu")
    r = make_input((3, 8), torch.float64, "cpu")
    w, b = make_params(8, torch.float64)
    b = b if kind == "layer" else None
    inputs = tuple(leaf(t) for t in (x, r, w, b) if t is not None)

    def fn(*t):
        return add_norm_call(kind, *t[:3], t[3] if len(t) > 3 else None, 8, None)

    assert torch.autograd.gradcheck(fn, inputs)
    # Double backward is refused with a clear error (it used to recurse until memory ran out).
    out, s = fn(*inputs)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum() + s.sum(), inputs, create_graph=True)


# ================================================================================ determinism, ops, compile


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_deterministic(device):
    x = make_input((600, 96), torch.bfloat16, device)
    r = make_input((600, 96), torch.float32, device)
    w = make_params(96, torch.float32, device)[0]
    x2 = make_input((2, 48, 9, 9), torch.float32, device, "channels_last")
    w2 = make_params(48, torch.float32, device)[0]

    def run():
        leaves = [leaf(t) for t in (x, r, w, x2, w2)]
        out, s = nxF.add_rms_norm(leaves[0], leaves[1], 96, leaves[2], residual_dtype=torch.float32)
        y = nxF.rms_norm(leaves[0], 96, leaves[2], activation="silu")
        y2 = nxF.rms_norm_2d(leaves[3], leaves[4], activation="gelu")
        (out.float().sum() + (s * s).sum() + y.float().square().sum() + y2.square().sum()).backward()
        return [out, s, y, y2] + [t.grad for t in leaves]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def _op_cases(device):
    x = make_input((4, 3, 40), torch.float32, device)
    r = make_input((4, 3, 40), torch.float32, device)
    w, b = make_params(40, torch.float32, device)
    x2 = make_input((2, 8, 5, 5), torch.float32, device, "channels_last")
    r2 = make_input((2, 8, 5, 5), torch.float32, device, "channels_last")
    w2 = make_params(8, torch.float32, device)[0]
    silu = ACT_CODES["silu"]
    ops = torch.ops.normext
    _, rstd = ops.rms_norm_fwd(x, w, r, [40], 1e-6, silu, SLOPE)
    _, rstd2 = ops.rms_norm_2d_fwd(x2, w2, r2, 1e-6, silu, SLOPE)
    return [
        (ops.rms_norm_fwd.default, (x, w, r, [40], 1e-6, silu, SLOPE)),
        (ops.rms_norm_fwd.default, (x, None, None, [3, 40], 1e-6, 0, SLOPE)),
        (
            ops.rms_norm_bwd.default,
            (torch.randn_like(x), x, r, rstd, w, [40], silu, SLOPE, [True, True, True]),
        ),
        (ops.rms_norm_2d_fwd.default, (x2, w2, r2, 1e-6, silu, SLOPE)),
        (
            ops.rms_norm_2d_bwd.default,
            (torch.randn_like(x2), x2, r2, rstd2, w2, silu, SLOPE, [True, True, False]),
        ),
        (ops.add_layer_norm_fwd.default, (x, r, w, b, [40], 1e-5, None)),
        (ops.add_layer_norm_fwd.default, (x.half(), r, w, None, [40], 1e-5, torch.float32)),
        (ops.add_rms_norm_fwd.default, (x.bfloat16(), r.bfloat16(), w, [40], 1e-6, None)),
    ]


@pytest.mark.parametrize("i", range(8))
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, i):
    op, args = _op_cases(device)[i]
    torch.library.opcheck(op, args)


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    """The functionals under torch.compile(fullgraph=True): outputs and gradients equal eager's."""
    x = make_input((4, 64), torch.bfloat16, device)
    r = make_input((4, 64), torch.float32, device)
    w = make_params(64, torch.float32, device)[0]
    x2 = make_input((2, 16, 4, 4), torch.float32, device, "channels_last")
    w2 = make_params(16, torch.float32, device)[0]

    def block(x, r, w, x2, w2):
        out, s = nxF.add_layer_norm(x, r, 64, w, None, residual_dtype=torch.float32)
        out2, s2 = nxF.add_rms_norm(out, s, 64, w, residual_dtype=torch.float32)
        y = nxF.rms_norm(out2, 64, w, activation="gelu") * 2
        y2 = nxF.rms_norm_2d(x2, w2, residual=x2, activation="silu")
        return y.float().sum() + s2.sum() + y2.square().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (block, compiled):
        leaves = [leaf(t) for t in (x, r, w, x2, w2)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b)


def test_autocast_policy():
    """Under autocast the norms run in the input's dtype; rms_norm's fused residual is cast to it, while the
    residual stream of add_rms_norm keeps residual_dtype."""
    x = make_input((4, 32), torch.bfloat16, "cpu")
    r = make_input((4, 32), torch.float32, "cpu")
    w = make_params(32, torch.float32)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nxF.rms_norm(x, 32, w, residual=r)
        out, s = nxF.add_rms_norm(x, r, 32, w, residual_dtype=torch.float32)
    assert y.dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert torch.equal(s, x.float() + r)
    with pytest.raises(RuntimeError, match="residual must have the input's dtype"):
        nxF.rms_norm(x, 32, w, residual=r)


# ================================================================================================ errors


def _x(d, *shape, dtype=torch.float32):
    return torch.randn(shape or (2, 4), device=d).to(dtype)


BAD_CALLS = {
    "int-input": (lambda d: nxF.rms_norm(_x(d, dtype=torch.int32), 4), "floating-point input"),
    "shape": (lambda d: nxF.rms_norm(_x(d), 5), "normalized_shape"),
    "weight": (lambda d: nxF.rms_norm(_x(d), 4, _x(d, 5)), "weight of shape"),
    "residual-shape": (
        lambda d: nxF.rms_norm(_x(d), 4, residual=_x(d, 2, 5)),
        "residual must have the input's shape",
    ),
    "activation": (lambda d: nxF.rms_norm(_x(d), 4, activation="tanh"), "unknown activation"),
    "2d-dims": (lambda d: nxF.rms_norm_2d(_x(d, 4)), "at least 2 dimensions"),
    "2d-weight": (lambda d: nxF.rms_norm_2d(_x(d, 2, 3, 4), _x(d, 4)), "weight of shape"),
    "add-shape": (
        lambda d: nxF.add_layer_norm(_x(d), _x(d, 2, 3), 4),
        "residual must have the input's shape",
    ),
    "add-residual-dtype": (
        lambda d: nxF.add_rms_norm(_x(d), _x(d), 4, residual_dtype=torch.float16),
        "residual_dtype must be the input's dtype",
    ),
    "add-int-residual": (
        lambda d: nxF.add_rms_norm(_x(d), _x(d, dtype=torch.int64), 4),
        "floating-point residual",
    ),
    "add-device": (lambda d: nxF.add_layer_norm(_x(d), _x("meta"), 4), "residual is on meta"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device, case):
    call, match = BAD_CALLS[case]
    with pytest.raises(ERRORS, match=match):
        call(device)


# ================================================================================== convert, integrations


class _TimmRmsNorm(torch.nn.Module):
    """timm.layers.norm.RmsNorm's attributes (normalized_shape, eps, elementwise_affine, weight)."""

    def __init__(self, channels, eps=1e-6, affine=True, dims=-1):
        super().__init__()
        self.normalized_shape, self.eps, self.elementwise_affine = (channels,), eps, affine
        self.weight = torch.nn.Parameter(make_params(channels)[0]) if affine else None
        self.dims = dims

    def forward(self, x):
        v = x.float().square().mean(self.dims, keepdim=True)
        y = x * torch.rsqrt(v + self.eps)
        shape = (-1, *([1] * (x.dim() - 2))) if self.dims == 1 else (-1,)
        return y if self.weight is None else y * self.weight.reshape(shape)


def _named(name, dims):
    cls = type(name, (_TimmRmsNorm,), {"__module__": "timm.layers.norm"})
    return lambda *a, **k: cls(*a, dims=dims, **k)


def test_convert_model_rms_norms():
    """torch.nn.RMSNorm switched in place; timm's RmsNorm / RmsNorm2d (by class name) rebuilt around the same
    weight; state_dict keys and values unchanged, outputs the same."""
    model = torch.nn.ModuleDict(
        dict(
            tok=torch.nn.RMSNorm(16, eps=1e-5),
            timm_tok=_named("RmsNorm", -1)(16),
            timm_2d=_named("RmsNorm2d", 1)(8, eps=1e-5),
            timm_2d_plain=_named("RmsNorm2d", 1)(8, affine=False),
        )
    )
    with torch.no_grad():
        model["tok"].weight.copy_(make_params(16)[0])
    x, x2 = torch.randn(3, 16), make_input((2, 8, 4, 4), torch.float32, "cpu", "channels_last")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y_before = [model["tok"](x), model["timm_tok"](x), model["timm_2d"](x2), model["timm_2d_plain"](x2)]
    tok = model["tok"]
    normext.convert_model(model)
    assert model["tok"] is tok and type(tok) is normext.RMSNorm
    assert type(model["timm_tok"]) is normext.RMSNorm and type(model["timm_2d"]) is normext.RMSNorm2d
    assert model["timm_2d"].eps == 1e-5 and model["timm_2d_plain"].weight is None
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    y_after = [model["tok"](x), model["timm_tok"](x), model["timm_2d"](x2), model["timm_2d_plain"](x2)]
    for a, b in zip(y_after, y_before, strict=True):
        assert rel_err(a, b) < 1e-5


def test_integration_names():
    from normext import integrations

    rms = integrations.TIMM_NAMES["normext_rmsnorm"][1]()(24)
    rms2d = integrations.TIMM_NAMES["normext_rmsnorm2d"][1]()(24, affine=False)
    assert type(rms) is normext.RMSNorm and rms.eps == 1e-6 and rms.normalized_shape == (24,)
    assert type(rms2d) is normext.RMSNorm2d and rms2d.weight is None
    assert type(integrations.DETECTRON2_NAMES["NormextRMS"][1]()(24)) is normext.RMSNorm2d
    assert integrations.MMCV_TYPES["NormextRMS2d"][1]() is normext.RMSNorm2d
