# FrozenBatchNorm2d tests: the fixed-statistics apply against the float64 formula and torchvision's module,
# state_dicts from torchvision.ops.FrozenBatchNorm2d and torch.nn.BatchNorm2d, buffers only, gradients to the
# input (and residual) only, activation/residual fusion, layouts and dtypes.
import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    FORMATS,
    assert_fwd_close,
    assert_layout_kept,
    make_input,
    make_params,
    parse_dtype,
)
from reference import ACTIVATIONS, batch_norm_ref, native_chain, rel_err, to64

import normext

SLOPE = 0.2


def frozen_with_random_state(C, device, **kwargs):
    m = normext.FrozenBatchNorm2d(C, **kwargs).to(device)
    w, b = make_params(C, torch.float32, device)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
        m.running_mean.copy_(torch.randn(C) * 2)
        m.running_var.copy_(torch.rand(C) + 0.25)
    return m


def torchvision_formula(m, x):
    """torchvision.ops.FrozenBatchNorm2d.forward, written out (x * scale + shift in x's dtype)."""
    scale = m.weight * (m.running_var + m.eps).rsqrt()
    shift = m.bias - m.running_mean * scale
    return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_backward(device, dtype_name, fmt, act):
    dtype, _ = parse_dtype(dtype_name)
    m = frozen_with_random_state(12, device, activation=act, negative_slope=SLOPE)
    x = make_input((2, 12, 5, 6), dtype, device, fmt).requires_grad_()
    res = make_input((2, 12, 5, 6), dtype, device, fmt).requires_grad_()
    y = m(x, res)
    assert y.dtype == dtype
    assert_layout_kept(y, x, fmt)
    y_ref = batch_norm_ref(
        x,
        m.running_mean,
        m.running_var,
        m.weight,
        m.bias,
        False,
        eps=m.eps,
        activation=act,
        slope=SLOPE,
        residual=res,
    )[0]
    y_nat = native_chain(torchvision_formula(m, x), res, act, SLOPE)
    assert_fwd_close(y, y_ref, dtype, y_nat)
    dy = torch.randn_like(y)
    dx, dres = torch.autograd.grad(y, (x, res), dy)
    dx_ref, dres_ref = torch.autograd.grad(y_ref, (x, res), to64(dy))
    dx_nat, dres_nat = torch.autograd.grad(y_nat, (x, res), dy)
    assert_fwd_close(dx, dx_ref, dtype, dx_nat, what="dx", tol=1e-5)
    assert_fwd_close(dres, dres_ref, dtype, dres_nat, what="dresidual", tol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_buffers_not_parameters_and_input_grad_only(device):
    m = frozen_with_random_state(4, device)
    assert list(m.parameters()) == []
    assert set(dict(m.named_buffers())) == {"weight", "bias", "running_mean", "running_var"}
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    x = make_input((2, 4, 3, 3), torch.float32, device).requires_grad_()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    y = m(x)
    y.sum().backward()
    assert x.grad is not None and all(b.grad is None for b in m.buffers())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed in training mode"
    m.eval()
    torch.testing.assert_close(m(x), y)
    # dx = weight * rsqrt(running_var + eps) per channel.
    scale = (m.weight * (m.running_var + m.eps).rsqrt()).view(1, -1, 1, 1)
    torch.testing.assert_close(x.grad, scale.expand_as(x))


def test_load_batchnorm2d_state_dict():
    """torch.nn.BatchNorm2d's state_dict (with num_batches_tracked) loads with strict=True and gives
    BatchNorm2d's eval output; the module's own state_dict has no num_batches_tracked."""
    bn = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(6) + 0.5)
        bn.bias.copy_(torch.randn(6))
    bn.train()
    for _ in range(3):
        bn(torch.randn(4, 6, 5, 5) * 3 + 1)
    bn.eval()
    m = normext.FrozenBatchNorm2d(6)
    m.load_state_dict(bn.state_dict(), strict=True)
    assert "num_batches_tracked" not in m.state_dict()
    x = make_input((2, 6, 4, 4), torch.float32, "cpu", "channels_last")
    torch.testing.assert_close(m(x), bn(x), rtol=1e-5, atol=1e-5)
    nested = torch.nn.Sequential(torch.nn.BatchNorm2d(6))
    nested[0].load_state_dict(bn.state_dict())
    frozen_nested = torch.nn.Sequential(normext.FrozenBatchNorm2d(6))
    frozen_nested.load_state_dict(nested.state_dict(), strict=True)
    torch.testing.assert_close(frozen_nested(x), bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(
            dict(bias=False),
            id="bias=False",
            marks=pytest.mark.skipif(
                "bias" not in inspect.signature(torch.nn.BatchNorm2d).parameters,
                reason="this torch's BatchNorm2d has no bias keyword",
            ),
        ),
        pytest.param(dict(affine=False), id="affine=False"),
    ],
)
def test_load_weightless_batchnorm2d_state_dict(kwargs):
    """A BatchNorm2d without bias (torch 2.14's bias=False) or without affine parameters freezes with a
    weight of ones and a bias of zeros for what it lacks: strict=True loads it, the output is BatchNorm2d's
    in eval."""
    bn = torch.nn.BatchNorm2d(6, **kwargs)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(6) + 0.5)
    bn.train()
    for _ in range(2):
        bn(torch.randn(4, 6, 5, 5) * 3 + 1)
    bn.eval()
    m = normext.FrozenBatchNorm2d(6)
    with torch.no_grad():
        m.weight.fill_(7.0)
        m.bias.fill_(7.0)
    m.load_state_dict(bn.state_dict(), strict=True)
    expected_weight = torch.ones(6) if bn.weight is None else bn.weight.detach()
    assert torch.equal(m.weight, expected_weight) and torch.equal(m.bias, torch.zeros(6))
    x = make_input((2, 6, 4, 4), torch.float32, "cpu", "channels_last")
    torch.testing.assert_close(m(x), bn(x), rtol=1e-5, atol=1e-5)
    # Without num_batches_tracked the dict is not a BatchNorm's: a missing bias stays an error.
    sd = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    with pytest.raises(RuntimeError, match="Missing key"):
        normext.FrozenBatchNorm2d(6).load_state_dict(sd, strict=True)


def test_load_torchvision_style_state_dict():
    """The keys torchvision.ops.FrozenBatchNorm2d saves (its four buffers) load both ways with strict=True."""
    m = frozen_with_random_state(5, "cpu")
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    assert set(sd) == {"weight", "bias", "running_mean", "running_var"}
    other = normext.FrozenBatchNorm2d(5)
    other.load_state_dict(sd, strict=True)
    for k, v in sd.items():
        assert torch.equal(other.state_dict()[k], v)


def test_torchvision_module_both_ways():
    tv_ops = pytest.importorskip("torchvision.ops")
    theirs = tv_ops.FrozenBatchNorm2d(7)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(7) + 0.5)
        theirs.bias.copy_(torch.randn(7))
        theirs.running_mean.copy_(torch.randn(7))
        theirs.running_var.copy_(torch.rand(7) + 0.1)
    ours = normext.FrozenBatchNorm2d(7, activation="relu")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = make_input((2, 7, 6, 5), torch.float32, "cpu", "channels_last")
    torch.testing.assert_close(ours(x), F.relu(theirs(x)), rtol=1e-5, atol=1e-5)
    back = tv_ops.FrozenBatchNorm2d(7)
    back.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(back(x), theirs(x))
    bn_sd = torch.nn.BatchNorm2d(7).state_dict()
    ours.load_state_dict(bn_sd, strict=True)
    theirs.load_state_dict(bn_sd, strict=True)
    torch.testing.assert_close(ours(x), F.relu(theirs(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_off_centre_data(device):
    """x ~ 100 +- 0.1 with running_mean 100: normalizing as (x - mean) * scale keeps the precision that
    x * scale + (bias - mean * scale) loses."""
    m = normext.FrozenBatchNorm2d(8).to(device)
    with torch.no_grad():
        m.running_mean.fill_(100.0)
        m.running_var.fill_(0.01)
    x = make_input((2, 8, 6, 6), torch.float32, device, mean=100.0, std=0.1)
    y_ref = batch_norm_ref(x, m.running_mean, m.running_var, m.weight, m.bias, False)[0]
    assert rel_err(m(x), y_ref) < 1e-4


def test_errors_and_repr():
    m = normext.FrozenBatchNorm2d(4, eps=1e-3, activation="leaky_relu", negative_slope=0.1)
    assert repr(m) == "FrozenBatchNorm2d(4, eps=0.001, activation=leaky_relu, negative_slope=0.1)"
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 4, 5))
    with pytest.raises((RuntimeError, ValueError), match="residual"):
        m(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 2))
    with pytest.raises(ValueError, match="activation"):
        normext.FrozenBatchNorm2d(4, activation="swish")
    with pytest.raises((RuntimeError, ValueError), match="shape"):
        m(torch.randn(2, 5, 3, 3))
