# normext.convert_model on every torch.nn norm (and the look-alikes matched by class name): same outputs,
# gradients, parameter/buffer names and objects, state_dicts that load both ways, train/eval, dtype;
# activation fusion inside nn.Sequential and when it must not happen; the report; and the framework
# registries of normext.integrations (timm for real; detectron2 and mmcv through stand-in packages).
import copy
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from conftest import make_input
from optional_deps import optional_import, requires

import normext
from normext.convert import Conversion

timm, _ = optional_import("timm")
requires_timm = requires("timm")
requires_torchvision = requires("torchvision")


def needs(name):
    return pytest.mark.skipif(not hasattr(normext, name), reason=f"normext.{name} not built yet")


def randomize(module):
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t is not None and t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith(("weight", "var")) else torch.randn_like(t))
    return module


def assert_same_module_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].device == sb[k].device, k
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def run_and_compare(ref, conv, x, train):
    """Forward + backward through both; outputs, input and parameter gradients and buffers must agree."""
    xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref.train(train)
    conv.train(train)
    y_ref, y = ref(xr), conv(xc)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(conv.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert_same_module_state(conv, ref)


TORCH_NORMS = [
    pytest.param(nn.GroupNorm, (4, 8), {}, (2, 8, 5, 5), id="GroupNorm"),
    pytest.param(nn.GroupNorm, (2, 8), dict(affine=False, eps=1e-3), (2, 8, 7), id="GroupNorm-noaffine"),
    pytest.param(nn.InstanceNorm1d, (6,), dict(affine=True), (2, 6, 9), id="InstanceNorm1d"),
    pytest.param(nn.InstanceNorm2d, (6,), dict(track_running_stats=True, momentum=0.3), (2, 6, 4, 5),
                 id="InstanceNorm2d-tracked"),
    pytest.param(nn.InstanceNorm3d, (4,), dict(affine=True, track_running_stats=True), (2, 4, 3, 4, 3),
                 id="InstanceNorm3d"),
    pytest.param(nn.LayerNorm, ((5,),), {}, (2, 3, 5), id="LayerNorm", marks=needs("LayerNorm")),
    pytest.param(nn.LayerNorm, ((3, 5),), dict(bias=False, eps=1e-6), (2, 3, 5), id="LayerNorm-nobias",
                 marks=needs("LayerNorm")),
    pytest.param(nn.LayerNorm, (5,), dict(elementwise_affine=False), (4, 5), id="LayerNorm-noaffine",
                 marks=needs("LayerNorm")),
    pytest.param(nn.BatchNorm1d, (6,), {}, (4, 6), id="BatchNorm1d", marks=needs("BatchNorm1d")),
    pytest.param(nn.BatchNorm2d, (6,), dict(momentum=None), (2, 6, 4, 4), id="BatchNorm2d-cumulative",
                 marks=needs("BatchNorm2d")),
    pytest.param(nn.BatchNorm2d, (6,), dict(affine=False, track_running_stats=False), (2, 6, 4, 4),
                 id="BatchNorm2d-untracked", marks=needs("BatchNorm2d")),
    pytest.param(nn.BatchNorm3d, (4,), {}, (2, 4, 3, 3, 3), id="BatchNorm3d", marks=needs("BatchNorm3d")),
    pytest.param(nn.SyncBatchNorm, (6,), {}, (2, 6, 4, 4), id="SyncBatchNorm", marks=needs("SyncBatchNorm")),
]  # fmt: skip


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls, args, kwargs, shape", TORCH_NORMS)
def test_converts_torch_norm_in_place(cls, args, kwargs, shape, train):
    model = nn.Sequential(randomize(cls(*args, **kwargs))).train(train)
    ref = copy.deepcopy(model)
    params = {id(p) for p in model.parameters()}
    norm = model[0]
    out, report = normext.convert_model(model, return_report=True)
    target = getattr(normext, cls.__name__)
    assert out is model and model[0] is norm, "torch.nn norms are converted in place"
    assert type(norm) is target and isinstance(norm, cls)
    assert {id(p) for p in model.parameters()} == params, "an optimizer's parameter references stay valid"
    assert norm.training == train
    assert report == [Conversion("0", f"{cls.__module__}.{cls.__qualname__}", f"normext.{cls.__name__}")]
    assert_same_module_state(model, ref)
    run_and_compare(ref, model, make_input(shape), train)
    # state_dicts load both ways, strictly
    model.load_state_dict(ref.state_dict())
    ref.load_state_dict(model.state_dict())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_keeps_dtype(dtype):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), randomize(nn.GroupNorm(2, 8))).to(dtype)
    ref = copy.deepcopy(model)
    normext.convert_model(model)
    assert type(model[1]) is normext.GroupNorm
    assert all(p.dtype == dtype for p in model.parameters())
    x = make_input((2, 3, 4, 4), dtype)
    y = model(x)
    assert y.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, ref(x), **tol)


def test_converts_module_itself_and_is_idempotent():
    gn = nn.GroupNorm(2, 4)
    assert normext.convert_model(gn) is gn and type(gn) is normext.GroupNorm
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4), nn.ReLU())
    _, first = normext.convert_model(model, return_report=True)
    before = copy.deepcopy(model)
    again, second = normext.convert_model(model, return_report=True)
    assert again is model and second == []
    assert repr(model) == repr(before)
    assert first == [
        Conversion("1", "torch.nn.modules.normalization.GroupNorm", "normext.GroupNorm", "relu", "2")
    ]


def test_leaves_subclasses_normext_modules_and_excluded_alone():
    class MyGroupNorm(nn.GroupNorm):  # may have its own forward
        pass

    model = nn.Sequential(
        MyGroupNorm(2, 4),
        normext.GroupNorm(2, 4),
        nn.Sequential(nn.GroupNorm(2, 4), nn.ReLU()),
        nn.InstanceNorm2d(4),
    )
    _, report = normext.convert_model(model, fuse_activations=False, exclude=["2"], return_report=True)
    assert type(model[0]) is MyGroupNorm
    assert type(model[2][0]) is nn.GroupNorm
    assert [r.name for r in report] == ["3"]


def test_shared_module_stays_shared():
    gn = nn.GroupNorm(2, 4)
    model = nn.Sequential(gn, nn.Conv2d(4, 4, 1), gn)
    normext.convert_model(model)
    assert model[0] is model[2] is gn and type(gn) is normext.GroupNorm


def test_hooks_survive_conversion():
    gn = nn.GroupNorm(2, 4)
    seen = []
    gn.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model = nn.Sequential(gn, nn.SiLU())
    normext.convert_model(model)
    model(torch.randn(2, 4, 3, 3))
    assert seen == [(2, 4, 3, 3)]
    assert type(model[1]) is nn.SiLU, "a forward hook reads the norm's output, so no fusion"


# ------------------------------------------------------------------------------------------------ fusion

FUSABLE = [
    pytest.param(nn.ReLU(inplace=True), "relu", 0.01, id="relu"),
    pytest.param(nn.LeakyReLU(0.2), "leaky_relu", 0.2, id="leaky_relu"),
    pytest.param(nn.SiLU(), "silu", 0.01, id="silu"),
    pytest.param(nn.GELU(), "gelu", 0.01, id="gelu"),
    pytest.param(nn.GELU(approximate="tanh"), "gelu_tanh", 0.01, id="gelu_tanh"),
]


@pytest.mark.parametrize("act, name, slope", FUSABLE)
@pytest.mark.parametrize(
    "norm, train",
    [
        pytest.param(lambda: nn.GroupNorm(4, 8), True, id="GroupNorm"),
        pytest.param(lambda: nn.InstanceNorm2d(8, affine=True), True, id="InstanceNorm2d"),
        pytest.param(lambda: nn.InstanceNorm2d(8, track_running_stats=True), False, id="InstanceNorm2d-eval"),
        pytest.param(lambda: nn.BatchNorm2d(8), True, id="BatchNorm2d", marks=needs("BatchNorm2d")),
        pytest.param(lambda: nn.BatchNorm2d(8), False, id="BatchNorm2d-eval", marks=needs("BatchNorm2d")),
    ],
)
def test_fuses_following_activation(norm, train, act, name, slope):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), randomize(norm()), act, nn.Conv2d(8, 2, 1))
    ref = copy.deepcopy(model)
    _, report = normext.convert_model(model, return_report=True)
    assert model[1].activation == name and model[1].negative_slope == slope
    assert type(model[2]) is nn.Identity
    assert [(r.name, r.activation, r.activation_module) for r in report] == [("1", name, "2")]
    assert list(model.state_dict()) == list(ref.state_dict())
    run_and_compare(ref, model, make_input((2, 3, 6, 6)), train=train)


def test_fusion_only_where_it_is_safe():
    shared = nn.GroupNorm(2, 4)

    class Block(nn.Sequential):  # its own forward: the order of children says nothing
        def forward(self, x):
            return self[0](x) + self[1](x)

    model = nn.Sequential(
        nn.Sequential(nn.GroupNorm(2, 4), nn.Dropout(0.0), nn.ReLU()),  # not directly followed
        nn.Sequential(shared, nn.ReLU()),  # the norm is used elsewhere too
        nn.Sequential(shared),
        Block(nn.GroupNorm(2, 4), nn.ReLU()),
        nn.Sequential(nn.GroupNorm(2, 4), nn.ReLU6()),  # no fused counterpart
        nn.Sequential(nn.GroupNorm(2, 4), nn.GELU()),
    )
    normext.convert_model(model)
    assert [type(s[-1]) for s in model] == [
        nn.ReLU,
        nn.ReLU,
        normext.GroupNorm,
        nn.ReLU,
        nn.ReLU6,
        nn.Identity,
    ]
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.ReLU())
    normext.convert_model(model, fuse_activations=False)
    assert type(model[1]) is nn.ReLU and model[0].activation is None


@requires_torchvision
def test_fuses_conv_norm_activation_blocks():
    """torchvision's Conv2dNormActivation is an nn.Sequential subclass with Sequential's forward."""
    from torchvision.ops.misc import Conv2dNormActivation

    block = Conv2dNormActivation(3, 8, norm_layer=lambda c: nn.GroupNorm(4, c), activation_layer=nn.SiLU)
    ref = copy.deepcopy(block)
    normext.convert_model(block)
    assert block[1].activation == "silu" and type(block[2]) is nn.Identity
    run_and_compare(ref, block, make_input((2, 3, 5, 5)), train=True)


# ----------------------------------------------------------------------------------- matched by name


@requires_timm
@pytest.mark.parametrize(
    "make, target, shape",
    [
        pytest.param(lambda: timm.layers.GroupNorm(8, 4), "GroupNorm", (2, 8, 3, 3), id="GroupNorm"),
        pytest.param(lambda: timm.layers.GroupNorm1(8), "GroupNorm", (2, 8, 3, 3), id="GroupNorm1"),
        pytest.param(lambda: timm.layers.LayerNorm2d(8), "LayerNorm2d", (2, 8, 3, 3), id="LayerNorm2d",
                     marks=needs("LayerNorm2d")),
        pytest.param(lambda: timm.layers.LayerNorm(8), "LayerNorm", (2, 3, 8), id="LayerNorm",
                     marks=needs("LayerNorm")),
    ],
)  # fmt: skip
def test_converts_timm_norms(make, target, shape):
    model = nn.Sequential(randomize(make()))
    ref = copy.deepcopy(model)
    old = model[0]
    normext.convert_model(model)
    assert type(model[0]) is getattr(normext, target)
    assert model[0].weight is old.weight, "the parameters are taken over, not copied"
    run_and_compare(ref, model, make_input(shape), train=True)


@requires_torchvision
@needs("FrozenBatchNorm2d")
def test_converts_torchvision_frozen_batch_norm():
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = randomize(FrozenBatchNorm2d(8, eps=1e-3))
    model = nn.Sequential(frozen, nn.ReLU())
    ref = copy.deepcopy(model)
    _, report = normext.convert_model(model, return_report=True)
    assert type(model[0]) is normext.FrozenBatchNorm2d and model[0].eps == 1e-3
    assert model[0].running_var is frozen.running_var, "the buffers are taken over, not copied"
    assert report == [
        Conversion("0", "torchvision.ops.misc.FrozenBatchNorm2d", "normext.FrozenBatchNorm2d", "relu", "1")
    ]
    run_and_compare(ref, model, make_input((2, 8, 4, 4), fmt="channels_last"), train=False)
    model.load_state_dict(ref.state_dict())
    ref.load_state_dict(model.state_dict())


# ----------------------------------------------------------------------------- detectron2, mmcv stand-ins

# Minimal stand-ins with the APIs of detectron2.layers.batch_norm (get_norm, FrozenBatchNorm2d, the
# channels-first LayerNorm) and of mmengine's registry + mmcv.cnn.build_norm_layer, written from their
# documented behaviour, for machines where those frameworks are not installed.
FAKE_PACKAGES = {
    "detectron2/__init__.py": "",
    "detectron2/layers/__init__.py": "from .batch_norm import FrozenBatchNorm2d, LayerNorm, get_norm\n",
    "detectron2/modeling/__init__.py": "from detectron2.layers import get_norm\n",
    "detectron2/layers/batch_norm.py": """
        import torch
        from torch import nn
        import torch.nn.functional as F

        class FrozenBatchNorm2d(nn.Module):
            def __init__(self, num_features, eps=1e-5):
                super().__init__()
                self.num_features, self.eps = num_features, eps
                for name, fill in [("weight", 1), ("bias", 0), ("running_mean", 0), ("running_var", 1)]:
                    self.register_buffer(name, torch.full((num_features,), float(fill)))

            def forward(self, x):
                return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                    eps=self.eps)

        class LayerNorm(nn.Module):
            def __init__(self, normalized_shape, eps=1e-6):
                super().__init__()
                self.weight = nn.Parameter(torch.ones(normalized_shape))
                self.bias = nn.Parameter(torch.zeros(normalized_shape))
                self.eps, self.normalized_shape = eps, (normalized_shape,)

            def forward(self, x):
                return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                    self.eps).permute(0, 3, 1, 2)

        def get_norm(norm, out_channels):
            if isinstance(norm, str):
                norm = {"BN": nn.BatchNorm2d, "FrozenBN": FrozenBatchNorm2d,
                        "GN": lambda c: nn.GroupNorm(32, c)}[norm]
            return norm(out_channels)
    """,
    "mmengine/__init__.py": "",
    "mmengine/registry.py": """
        class Registry:
            def __init__(self):
                self.modules = {}

            def register_module(self, name=None, force=False, module=None):
                assert force or name not in self.modules
                self.modules[name] = module

            def get(self, name):
                return self.modules.get(name)

        MODELS = Registry()
    """,
    "mmcv/__init__.py": "",
    "mmcv/cnn.py": """
        from torch import nn
        from mmengine.registry import MODELS

        MODELS.register_module("GN", module=nn.GroupNorm)

        def build_norm_layer(cfg, num_features, postfix=""):
            cfg = dict(cfg)
            layer_type = MODELS.get(cfg.pop("type"))
            cfg.setdefault("eps", 1e-5)
            if layer_type is nn.GroupNorm:
                return "gn" + str(postfix), layer_type(num_channels=num_features, **cfg)
            abbr = next(a for base, a in [(nn.modules.instancenorm._InstanceNorm, "in"),
                        (nn.modules.batchnorm._BatchNorm, "bn"), (nn.GroupNorm, "gn"), (nn.LayerNorm, "ln")]
                        if issubclass(layer_type, base))
            return abbr + str(postfix), layer_type(num_features, **cfg)
    """,
}


@pytest.fixture
def fake_frameworks(tmp_path, monkeypatch):
    """Puts the stand-in detectron2/mmengine/mmcv first on sys.path (real ones, if any, are hidden)."""
    for rel, src in FAKE_PACKAGES.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in list(sys.modules):
        if name.split(".")[0] in ("detectron2", "mmengine", "mmcv"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(normext.integrations, "_mmcv_major_version", lambda: 2)
    yield
    for name in list(sys.modules):
        if name.split(".")[0] in ("detectron2", "mmengine", "mmcv"):
            del sys.modules[name]


def test_detectron2_get_norm_names(fake_frameworks):
    import detectron2.layers
    import detectron2.modeling

    names = normext.integrations.register_detectron2()
    assert "NormextGN" in names
    assert set(names) == {
        n for n, (cls, _) in normext.integrations.DETECTRON2_NAMES.items() if hasattr(normext, cls)
    }
    for get_norm in (detectron2.layers.get_norm, detectron2.modeling.get_norm):
        gn = get_norm("NormextGN", 64)
        assert type(gn) is normext.GroupNorm and gn.num_groups == 32 and gn.num_channels == 64
        assert type(get_norm("GN", 64)) is nn.GroupNorm, "detectron2's own names still resolve"
    assert normext.integrations.register_detectron2() == names, "registering twice is harmless"
    assert type(detectron2.layers.get_norm("NormextGN", 32)) is normext.GroupNorm


@pytest.mark.parametrize(
    "cls_name, target, shape",
    [
        pytest.param(
            "FrozenBatchNorm2d", "FrozenBatchNorm2d", (2, 8, 3, 3), marks=needs("FrozenBatchNorm2d")
        ),
        pytest.param("LayerNorm", "LayerNorm2d", (2, 8, 3, 3), marks=needs("LayerNorm2d")),
    ],
)
def test_converts_detectron2_norms(fake_frameworks, cls_name, target, shape):
    from detectron2.layers import batch_norm

    model = nn.Sequential(randomize(getattr(batch_norm, cls_name)(8)))
    ref = copy.deepcopy(model)
    normext.convert_model(model)
    assert type(model[0]) is getattr(normext, target)
    run_and_compare(ref, model, make_input(shape), train=False)


def test_mmcv_build_norm_layer_types(fake_frameworks):
    from mmcv.cnn import build_norm_layer

    types = normext.integrations.register_mmcv()
    assert {"NormextGN", "NormextIN"} <= set(types)
    name, gn = build_norm_layer(dict(type="NormextGN", num_groups=4, activation="silu"), 8, postfix=1)
    assert name == "gn1" and isinstance(gn, normext.GroupNorm)
    assert (gn.num_groups, gn.num_channels, gn.activation) == (4, 8, "silu")
    name, inorm = build_norm_layer(dict(type="NormextIN3d", affine=True), 8)
    assert name == "in" and type(inorm) is normext.InstanceNorm3d and inorm.affine


def test_register_all_registers_what_is_installed(fake_frameworks):
    registered = normext.integrations.register_all()
    assert set(registered) == {"detectron2", "mmcv"} | ({"timm"} if timm is not None else set())
    assert "NormextGN" in registered["mmcv"]


def test_register_all_skips_missing_frameworks(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "timm" else find_spec(name))
    installed = {n for n in ("detectron2", "mmcv") if find_spec(n) is not None}
    assert set(normext.integrations.register_all()) == installed


def test_importing_normext_imports_no_framework():
    import subprocess

    frameworks = ("timm", "mmcv", "mmengine", "detectron2")
    code = f"import sys, normext; print(sorted(m for m in sys.modules if m.split('.')[0] in {frameworks}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@requires_timm
def test_timm_norm_layer_names():
    from timm.layers import create_norm_layer, get_norm_layer

    names = normext.integrations.register_timm()
    assert {"normext_groupnorm", "normext_groupnorm1"} <= set(names)
    gn = create_norm_layer("normext_groupnorm", 64)
    assert type(gn) is normext.GroupNorm and (gn.num_groups, gn.num_channels) == (32, 64)
    assert get_norm_layer("normextgroupnorm1")(16).num_groups == 1
    if hasattr(normext, "LayerNorm2d"):
        ln = create_norm_layer("normext_layernorm2d", 16)
        assert type(ln) is normext.LayerNorm2d and ln.eps == 1e-6
    # A timm model built with the normext name has the same state_dict keys as with timm's own.
    ours = timm.create_model("resnet18", pretrained=False, num_classes=4, norm_layer="normext_groupnorm")
    theirs = timm.create_model("resnet18", pretrained=False, num_classes=4, norm_layer="groupnorm")
    assert type(ours.bn1) is normext.GroupNorm
    ours.load_state_dict(theirs.state_dict())
    x = make_input((1, 3, 32, 32))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_mmcv_build_norm_layer_real():
    """The same against the real mmcv, where it is installed (not a test dependency: it is slow to import)."""
    import importlib.util

    if importlib.util.find_spec("mmcv") is None or importlib.util.find_spec("mmengine") is None:
        pytest.skip("mmcv/mmengine are not installed")
    from mmcv.cnn import build_norm_layer

    assert "NormextGN" in normext.integrations.register_mmcv()
    name, gn = build_norm_layer(dict(type="NormextGN", num_groups=4, activation="relu"), 8)
    assert (
        name == "gn" and isinstance(gn, normext.GroupNorm) and (gn.num_groups, gn.activation) == (4, "relu")
    )
    name, inorm = build_norm_layer(dict(type="NormextIN"), 8, postfix=2)
    assert name == "in2" and type(inorm) is normext.InstanceNorm2d
