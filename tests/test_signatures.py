# Every normext module, forward and functional held against its torch counterpart with inspect.signature
# (so a torch release that adds an argument fails here, not in a user's model), and torch 2.14's
# keyword-only bias=False: forward/backward, state_dicts, repr, convert_model, on a torch without it too.
import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import DEVICES, assert_bwd_close, assert_fwd_close, make_input, make_params
from reference import act_torch, batch_norm_ref, group_norm_ref, instance_norm_ref

import normext
import normext.functional as nxF
from normext import _optional_bias
from normext.convert import Conversion

P = inspect.Parameter
KEYWORD_KINDS = (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)

# normext's own arguments, with their defaults (design.md §2).
OWN = {"activation": None, "negative_slope": 0.01, "memory_efficient": False, "residual": None}
# torch 2.14's keyword-only bias=True of GroupNorm, InstanceNorm*d, BatchNorm*d and SyncBatchNorm, which
# normext offers whatever torch is installed: (kind, default).
WITH_BIAS = dict(newer={"bias": (P.KEYWORD_ONLY, True)})


def _same_default(a, b):
    # 1 == True and 0.0 == False would hide a changed default.
    return a is b or (type(a) is type(b) and a == b)


def signature_problems(ours, theirs, renamed=None, defaults=None, dropped=(), newer=None):
    """What keeps a call written for `theirs` from meaning the same with `ours`: a torch argument missing,
    not accepted as a keyword, keyword-only in torch but not here, or with another default; torch's leading
    positional arguments in another order; an argument that is neither torch's nor normext's own.
    renamed: {torch name: normext name}; defaults: {normext name: default that differs on purpose};
    dropped: torch names normext does not take; newer: extra arguments allowed as {name: (kind, default)}."""
    renamed, defaults, newer = renamed or {}, defaults or {}, newer or {}
    ours_params = inspect.signature(ours).parameters
    theirs_params = {
        renamed.get(n, n): p for n, p in inspect.signature(theirs).parameters.items() if n not in dropped
    }
    problems = []
    for name, p in theirs_params.items():
        q = ours_params.get(name)
        if q is None:
            problems.append(f"missing torch's argument {name!r}")
            continue
        if q.kind not in KEYWORD_KINDS:
            problems.append(f"{name!r} cannot be passed by keyword")
        if p.kind == P.KEYWORD_ONLY and q.kind != P.KEYWORD_ONLY:
            problems.append(f"{name!r} is keyword-only in torch, not here")
        expected = defaults.get(name, p.default)
        if not _same_default(q.default, expected):
            problems.append(f"{name!r} defaults to {q.default!r}, expected {expected!r}")
    # Positional calls: up to normext's first own argument, torch's positional arguments in torch's order.
    positional = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
    ours_pos = [n for n, q in ours_params.items() if q.kind in positional]
    theirs_pos = [n for n, p in theirs_params.items() if p.kind in positional]
    k = next((i for i, n in enumerate(ours_pos) if n not in theirs_params), len(ours_pos))
    if ours_pos[:k] != theirs_pos[:k]:
        problems.append(f"positional arguments {ours_pos[:k]} are not torch's {theirs_pos[:k]}")
    for name, q in ours_params.items():
        if name in theirs_params:
            continue
        if name in OWN:
            if q.kind not in KEYWORD_KINDS:
                problems.append(f"normext's {name!r} cannot be passed by keyword")
            if not _same_default(q.default, OWN[name]):
                problems.append(f"normext's {name!r} defaults to {q.default!r}, not {OWN[name]!r}")
        elif name in newer:
            kind, default = newer[name]
            if q.kind != kind or not _same_default(q.default, default):
                problems.append(
                    f"{name!r} is not {kind.description} with default {default!r} as in newer torch"
                )
        else:
            problems.append(f"argument {name!r} is neither torch's nor normext's own")
    names = list(ours_params)
    if "memory_efficient" in names and names[-1] != "memory_efficient":
        problems.append("memory_efficient is not the last argument")
    return problems


def needs(name, where=normext):
    return pytest.mark.skipif(not hasattr(where, name), reason=f"{name} not built yet")


def torchvision_frozen_batch_norm():
    tv_ops = pytest.importorskip("torchvision.ops")
    return tv_ops.FrozenBatchNorm2d


# (normext module name, its torch counterpart (or a function returning it), signature_problems options).
MODULES = [
    ("GroupNorm", nn.GroupNorm, WITH_BIAS),
    ("InstanceNorm1d", nn.InstanceNorm1d, WITH_BIAS),
    ("InstanceNorm2d", nn.InstanceNorm2d, WITH_BIAS),
    ("InstanceNorm3d", nn.InstanceNorm3d, WITH_BIAS),
    ("LayerNorm", nn.LayerNorm, {}),
    ("LayerNorm2d", nn.LayerNorm, dict(renamed={"normalized_shape": "num_channels"}, defaults={"eps": 1e-6})),
    ("BatchNorm1d", nn.BatchNorm1d, WITH_BIAS),
    ("BatchNorm2d", nn.BatchNorm2d, WITH_BIAS),
    ("BatchNorm3d", nn.BatchNorm3d, WITH_BIAS),
    ("SyncBatchNorm", nn.SyncBatchNorm, WITH_BIAS),
    ("RMSNorm", nn.RMSNorm, {}),
    ("RMSNorm2d", nn.RMSNorm, dict(renamed={"normalized_shape": "num_channels",
                                            "elementwise_affine": "affine"}, defaults={"eps": 1e-6})),
    ("FrozenBatchNorm2d", torchvision_frozen_batch_norm, {}),
]  # fmt: skip

FUNCTIONALS = [
    ("group_norm", F.group_norm, {}),
    ("instance_norm", F.instance_norm, {}),
    ("layer_norm", F.layer_norm, {}),
    ("layer_norm_2d", F.layer_norm, dict(dropped=("normalized_shape",), defaults={"eps": 1e-6})),
    ("batch_norm", F.batch_norm, {}),
    ("rms_norm", F.rms_norm, {}),
    ("rms_norm_2d", F.rms_norm, dict(dropped=("normalized_shape",), defaults={"eps": 1e-6})),
]


@pytest.mark.parametrize(
    "name, torch_cls, options", [pytest.param(*m, id=m[0], marks=needs(m[0])) for m in MODULES]
)
def test_module_constructor_signature(name, torch_cls, options):
    ours = getattr(normext, name)
    theirs = torch_cls if isinstance(torch_cls, type) else torch_cls()
    assert signature_problems(ours, theirs, **options) == []
    params = inspect.signature(ours).parameters
    assert "activation" in params and "negative_slope" in params, "every module fuses an activation"


@pytest.mark.parametrize(
    "name, torch_cls",
    [pytest.param(*m[:2], id=m[0], marks=needs(m[0])) for m in MODULES if m[0] != "FrozenBatchNorm2d"],
)
def test_module_forward_signature(name, torch_cls):
    """forward(input, residual=None): torch's forward(input), plus the fused residual."""
    assert signature_problems(getattr(normext, name).forward, torch_cls.forward) == []


@pytest.mark.parametrize(
    "name, torch_fn, options", [pytest.param(*f, id=f[0], marks=needs(f[0], nxF)) for f in FUNCTIONALS]
)
def test_functional_signature(name, torch_fn, options):
    ours = getattr(nxF, name)
    assert signature_problems(ours, torch_fn, **options) == []
    params = inspect.signature(ours).parameters
    assert {"activation", "negative_slope", "residual"} <= set(params), "every functional fuses them"


def test_convert_sync_batchnorm_signature():
    assert (
        signature_problems(
            normext.SyncBatchNorm.convert_sync_batchnorm, nn.SyncBatchNorm.convert_sync_batchnorm
        )
        == []
    )


def test_memory_efficient_everywhere_or_nowhere():
    """design.md §2: every module and functional with a backward takes memory_efficient (FrozenBatchNorm2d,
    whose statistics are constants, is not held to it here: §2 does not settle whether it is one)."""
    objs = [getattr(normext, m[0]) for m in MODULES if hasattr(normext, m[0]) and m[0] != "FrozenBatchNorm2d"]
    objs += [getattr(nxF, f[0]) for f in FUNCTIONALS if hasattr(nxF, f[0])]
    has = {obj.__name__: "memory_efficient" in inspect.signature(obj).parameters for obj in objs}
    assert len(set(has.values())) == 1, f"memory_efficient only on some: {has}"


# The checker itself must see every kind of mismatch (a test that cannot fail protects nothing).
def _torch_like(input, num_groups, weight=None, eps=1e-5, device=None, *, bias=True):
    pass


def _good(
    input, num_groups, weight=None, eps=1e-5, activation=None, device=None, *, bias=True, residual=None
):
    pass


def _missing(input, num_groups, weight=None, activation=None, device=None, *, bias=True):
    pass


def _default(input, num_groups, weight=None, eps=1e-6, activation=None, device=None, *, bias=True):
    pass


def _int_for_bool(input, num_groups, weight=None, eps=1e-5, device=None, *, bias=1):
    pass


def _bias_positional(input, num_groups, weight=None, eps=1e-5, device=None, bias=True):
    pass


def _swapped(input, weight=None, num_groups=None, eps=1e-5, device=None, *, bias=True):
    pass


def _positional_only(input, num_groups, /, weight=None, eps=1e-5, device=None, *, bias=True):
    pass


def _unknown_extra(input, num_groups, weight=None, eps=1e-5, device=None, *, bias=True, slope=0.01):
    pass


def _own_positional_only(input, num_groups, activation=None, /, weight=None, eps=1e-5, device=None, *,
                         bias=True):  # fmt: skip
    pass


def _own_default(input, num_groups, weight=None, eps=1e-5, device=None, *, bias=True, negative_slope=0.1):
    pass


def _memory_efficient_not_last(input, num_groups, weight=None, eps=1e-5, device=None, *,
                               memory_efficient=False, bias=True):  # fmt: skip
    pass


@pytest.mark.parametrize(
    "ours, expected",
    [
        (_good, None),
        (_missing, "missing torch's argument 'eps'"),
        (_default, "'eps' defaults to 1e-06, expected 1e-05"),
        (_int_for_bool, "'bias' defaults to 1, expected True"),
        (_bias_positional, "'bias' is keyword-only in torch, not here"),
        (_swapped, "positional arguments"),
        (_positional_only, "'input' cannot be passed by keyword"),
        (_unknown_extra, "argument 'slope' is neither torch's nor normext's own"),
        (_own_positional_only, "normext's 'activation' cannot be passed by keyword"),
        (_own_default, "normext's 'negative_slope' defaults to 0.1"),
        (_memory_efficient_not_last, "memory_efficient is not the last argument"),
    ],
)
def test_signature_checker_sees_each_mismatch(ours, expected):
    problems = signature_problems(ours, _torch_like)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_checker_sees_a_newer_torch_argument():
    """A torch release adding an argument: without it, normext's module fails the test."""

    def newer_group_norm(num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *,
                         bias=True, elementwise_bias_init=0.0):  # fmt: skip
        pass

    assert signature_problems(normext.GroupNorm, newer_group_norm) == [
        "missing torch's argument 'elementwise_bias_init'"
    ]


def test_checker_on_a_torch_without_the_bias_keyword():
    """torch 2.11's GroupNorm: normext's bias is allowed as torch 2.14's, and only as that."""

    def older_group_norm(num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
        pass

    assert signature_problems(normext.GroupNorm, older_group_norm, **WITH_BIAS) == []
    assert signature_problems(normext.GroupNorm, older_group_norm) == [
        "argument 'bias' is neither torch's nor normext's own"
    ]
    problems = signature_problems(normext.GroupNorm, older_group_norm, newer={"bias": (P.KEYWORD_ONLY, 1)})
    assert problems == ["'bias' is not keyword-only with default 1 as in newer torch"]


# ------------------------------------------------------------------------------- bias=False behaviour

# (class name, positional args, kwargs, input shape); affine everywhere, so bias=False leaves a weight.
BIASLESS_SPECS = [
    ("GroupNorm", (4, 8), {}, (2, 8, 5, 3)),
    ("InstanceNorm1d", (6,), dict(affine=True), (2, 6, 9)),
    ("InstanceNorm2d", (6,), dict(affine=True, track_running_stats=True, momentum=0.3), (2, 6, 4, 5)),
    ("InstanceNorm3d", (4,), dict(affine=True), (2, 4, 3, 4, 3)),
    ("BatchNorm1d", (6,), {}, (5, 6)),
    ("BatchNorm2d", (6,), dict(momentum=None), (3, 6, 4, 4)),
    ("BatchNorm3d", (4,), dict(eps=1e-3), (2, 4, 3, 3, 3)),
    ("SyncBatchNorm", (6,), {}, (3, 6, 4, 4)),
]
BIASLESS = [pytest.param(*c, id=c[0]) for c in BIASLESS_SPECS]


def torch_takes_bias(name):
    return _optional_bias.takes_bias(getattr(nn, name))


# The comparisons with torch's own bias-less modules; on a torch without the keyword the
# torch_without_bias_keyword tests below are what runs.
AGAINST_TORCH = [
    pytest.param(
        *c,
        id=c[0],
        marks=pytest.mark.skipif(not torch_takes_bias(c[0]), reason=f"this torch's nn.{c[0]} has no bias"),
    )
    for c in BIASLESS_SPECS
]


def _randomize_state(*modules):
    """The same random weight and running statistics in every module (the bias, if any, stays 0)."""
    first = modules[0]
    C = first.weight.numel()
    w, _ = make_params(C)
    rm, rv = torch.randn(C) * 0.5, torch.rand(C) + 0.5
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(w)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)


def _reference(name, m, x, weight, training, activation, residual):
    """float64 output from the formula, with the module's configuration and running statistics (the
    references' updated running statistics are not used: torch's module is the reference for those)."""
    if name == "GroupNorm":
        return group_norm_ref(x, m.num_groups, weight, None, m.eps, activation, residual=residual)
    rm = None if m.running_mean is None else m.running_mean.detach().clone()
    rv = None if m.running_var is None else m.running_var.detach().clone()
    if name.startswith("InstanceNorm"):
        use_input_stats = training or not m.track_running_stats
        return instance_norm_ref(
            x, rm, rv, weight, None, use_input_stats, m.momentum, m.eps, activation, residual=residual
        )[0]
    momentum = 0.0 if m.momentum is None else m.momentum
    return batch_norm_ref(x, rm, rv, weight, None, training, momentum, m.eps, activation, residual=residual)[
        0
    ]


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "silu-residual"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name, args, kwargs, shape", AGAINST_TORCH)
@pytest.mark.parametrize("device", DEVICES)
def test_biasless_forward_backward(device, name, args, kwargs, shape, train, fused):
    """normext(bias=False) against torch.nn's module(bias=False) on the same input and against the float64
    formula: output, input and weight gradients, residual gradient, running statistics."""
    ours = getattr(normext, name)(*args, **kwargs, bias=False, activation="silu" if fused else None)
    theirs = getattr(nn, name)(*args, **kwargs, bias=False)
    _randomize_state(ours, theirs)
    ours, theirs = ours.to(device).train(train), theirs.to(device).train(train)
    expected_state = copy.deepcopy(theirs)
    x = make_input(shape, torch.float32, device)
    r = make_input(shape, torch.float32, device) if fused else None
    dy = make_input(shape, torch.float32, device)

    x64 = x.detach().double().cpu().requires_grad_()
    w64 = ours.weight.detach().double().cpu().requires_grad_()
    r64 = None if r is None else r.detach().double().cpu().requires_grad_()
    ref = _reference(name, expected_state.cpu(), x64, w64, train, "silu" if fused else None, r64)
    ref.backward(dy.double().cpu())

    xt, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    rt, ro = (None, None) if r is None else (r.clone().requires_grad_(), r.clone().requires_grad_())
    native = theirs(xt)
    native = act_torch(native + rt, "silu") if fused else native
    native.backward(dy)
    y = ours(xo, ro)
    y.backward(dy)

    assert ours.bias is None and [n for n, _ in ours.named_parameters()] == ["weight"]
    assert_fwd_close(y, ref, torch.float32)
    torch.testing.assert_close(y, native, rtol=1e-4, atol=1e-5)
    assert_bwd_close(xo.grad, x64.grad, torch.float32, native=xt.grad, what="input grad")
    assert_bwd_close(ours.weight.grad, w64.grad, torch.float32, native=theirs.weight.grad, what="weight grad")
    if fused:
        assert_bwd_close(ro.grad, r64.grad, torch.float32, native=rt.grad, what="residual grad")
    for a, b in zip(ours.buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, args, kwargs, shape", AGAINST_TORCH)
def test_biasless_parameters_state_dict_and_repr(name, args, kwargs, shape):
    ours = getattr(normext, name)(*args, **kwargs, bias=False)
    theirs = getattr(nn, name)(*args, **kwargs, bias=False)
    _randomize_state(theirs)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()] == ["weight"]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "bias" not in ours.state_dict()
    assert repr(ours) == repr(theirs)
    fused = getattr(normext, name)(*args, **kwargs, bias=False, activation="relu")
    assert repr(fused) == repr(theirs)[:-1] + ", activation=relu)"
    # strict=True both ways
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = getattr(nn, name)(*args, **kwargs, bias=False)
    back.load_state_dict(ours.state_dict(), strict=True)
    for (k, a), b in zip(theirs.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # a state_dict with a bias does not load strictly into a module without one, as in torch
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"bias\""):
        ours.load_state_dict(getattr(nn, name)(*args, **kwargs).state_dict(), strict=True)
    # reset_parameters: weight back to ones, no bias appears
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones_like(ours.weight)) and ours.bias is None


@pytest.mark.parametrize("name, args, kwargs, shape", BIASLESS)
def test_bias_keyword_is_keyword_only_and_defaults_true(name, args, kwargs, shape):
    cls = getattr(normext, name)
    assert cls(*args, **kwargs).bias is not None
    assert cls(*args, **kwargs, bias=True).bias is not None
    signature = inspect.signature(cls)
    n_positional = sum(p.kind == P.POSITIONAL_OR_KEYWORD for p in signature.parameters.values())
    with pytest.raises(TypeError, match="too many positional arguments"):
        signature.bind(*args, *([None] * (n_positional - len(args))), False)
    # affine=False has neither parameter, whatever bias says
    without = cls(*args, **{**kwargs, "affine": False}, bias=True)
    assert without.weight is None and without.bias is None


@pytest.mark.parametrize("name, args, kwargs, shape", AGAINST_TORCH)
def test_convert_model_biasless_torch_module(name, args, kwargs, shape):
    model = nn.Sequential(getattr(nn, name)(*args, **kwargs, bias=False))
    _randomize_state(model[0])
    ref = copy.deepcopy(model)
    norm = model[0]
    out, report = normext.convert_model(model, return_report=True)
    assert out is model and model[0] is norm and type(norm) is getattr(normext, name)
    assert norm.bias is None and repr(norm) == repr(ref[0])
    torch_cls = getattr(nn, name)
    assert report == [Conversion("0", f"{torch_cls.__module__}.{torch_cls.__qualname__}", f"normext.{name}")]
    for train in (True, False):
        x = make_input(shape).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y, y_ref = model.train(train)(x), ref.train(train)(xr)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        y_ref.sum().backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(norm.weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-5)
    model.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.skipif(not torch_takes_bias("GroupNorm"), reason="this torch's nn.GroupNorm has no bias")
def test_convert_model_rebuilds_biasless_look_alike():
    """A norm matched by class name (here a stand-in for timm's GroupNorm) is rebuilt with bias=False."""
    look_alike = type("GroupNorm", (nn.GroupNorm,), {"__module__": "timm.layers.norm"})
    model = nn.Sequential(look_alike(2, 6, bias=False))
    _randomize_state(model[0])
    ref = copy.deepcopy(model)
    normext.convert_model(model)
    assert type(model[0]) is normext.GroupNorm and model[0].bias is None
    assert repr(model[0]) == "GroupNorm(2, 6, eps=1e-05, affine=True, bias=False)"
    x = make_input((2, 6, 3, 3))
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    model.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.skipif(not torch_takes_bias("SyncBatchNorm"), reason="this torch's nn.SyncBatchNorm has no bias")
@pytest.mark.parametrize("source", [nn.BatchNorm2d, normext.BatchNorm3d], ids=["torch", "normext"])
def test_convert_sync_batchnorm_keeps_biasless(source):
    bn = source(6, bias=False, momentum=0.2)
    _randomize_state(bn)
    sync = normext.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(bn))[0]
    theirs = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(bn)))[0]
    assert type(sync) is normext.SyncBatchNorm and sync.bias is None and sync.weight is bn.weight
    assert list(sync.state_dict()) == list(theirs.state_dict())
    assert repr(sync) == repr(theirs)


def test_integrations_factories_pass_bias_on():
    """timm's and mmcv's normext names take bias=False like the modules (as a norm_cfg / kwargs entry)."""
    integrations = normext.integrations
    gn = integrations.TIMM_NAMES["normext_groupnorm"][1]()(16, num_groups=4, bias=False)
    bn = integrations.TIMM_NAMES["normext_batchnorm2d"][1]()(16, bias=False)
    mmcv_gn = integrations.MMCVGroupNorm(16, num_groups=4, bias=False)
    mmcv_in = integrations.MMCV_TYPES["NormextIN3d"][1]()(16, affine=True, bias=False)
    for m in (gn, bn, mmcv_gn, mmcv_in):
        assert m.weight is not None and m.bias is None and "bias" not in m.state_dict()
    assert mmcv_gn.num_groups == 4 and mmcv_gn.num_channels == 16


# ---------------------------------------------------------------- a torch whose classes lack the keyword


def _old_group_norm_reset(self):
    if self.affine:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


def _old_norm_base_reset(self):
    self.reset_running_stats()
    if self.affine:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


def _old_group_norm_repr(self):
    return "{num_groups}, {num_channels}, eps={eps}, affine={affine}".format(**self.__dict__)


def _old_norm_base_repr(self):
    return (
        "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
        "track_running_stats={track_running_stats}".format(**self.__dict__)
    )


@pytest.fixture
def torch_without_bias_keyword(monkeypatch):
    """The torch.nn norms as the releases before the keyword have them (torch 2.11): constructors that
    always create a bias, reset_parameters that zero it unconditionally, a repr that does not mention it."""
    norm_base = torch.nn.modules.batchnorm._NormBase
    monkeypatch.setattr(_optional_bias, "takes_bias", lambda torch_cls: False)
    monkeypatch.setattr(nn.GroupNorm, "reset_parameters", _old_group_norm_reset)
    monkeypatch.setattr(norm_base, "reset_parameters", _old_norm_base_reset)
    monkeypatch.setattr(nn.GroupNorm, "extra_repr", _old_group_norm_repr)
    monkeypatch.setattr(norm_base, "extra_repr", _old_norm_base_repr)


@pytest.mark.parametrize("name, args, kwargs, shape", BIASLESS)
def test_biasless_on_torch_without_the_keyword(torch_without_bias_keyword, name, args, kwargs, shape):
    cls = getattr(normext, name)
    ours = cls(*args, **kwargs, bias=False)
    with_bias = cls(*args, **kwargs)
    assert [n for n, _ in ours.named_parameters()] == ["weight"]
    assert [n for n, _ in with_bias.named_parameters()] == ["weight", "bias"]
    assert list(ours.state_dict()) == [k for k in with_bias.state_dict() if k != "bias"]
    torch_repr = repr(with_bias)  # torch's own repr there (the module has a bias)
    assert "bias" not in torch_repr
    assert repr(ours) == torch_repr[:-1] + ", bias=False)"
    with pytest.raises(AttributeError):
        (_old_group_norm_reset if name == "GroupNorm" else _old_norm_base_reset)(ours)
    _randomize_state(ours)
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones_like(ours.weight)) and ours.bias is None
    _randomize_state(ours)
    x = make_input(shape)
    if name == "GroupNorm":
        expected = F.group_norm(x, args[0], ours.weight, None, ours.eps)
    elif name.startswith("InstanceNorm"):
        expected = F.instance_norm(x, None, None, ours.weight, None, True, 0.1, ours.eps)
    else:
        expected = F.batch_norm(x, None, None, ours.weight, None, True, 0.1, ours.eps)
    torch.testing.assert_close(ours.train()(x), expected, rtol=1e-5, atol=1e-5)
