# Real models converted with normext.convert_model: torchvision ResNets (GroupNorm; BatchNorm in
# channels_last; FrozenBatchNorm2d), the torchvision Mask R-CNN FPN backbone and heads, timm ConvNeXt.
# Outputs, every parameter gradient and the running statistics are judged against a float64 copy of the
# model: normext's float32 error must be at most twice torch's own float32 error (plus a small floor);
# state_dict keys are unchanged and load both ways. Also the example (python -m normext.examples.train_seg).
import copy

import pytest
import torch
import torch.nn as nn
from conftest import make_input
from reference import rel_err

import normext
from normext.convert import _FOREIGN_CLASSES, _TORCH_CLASSES

torchvision = pytest.importorskip(
    "torchvision", reason="torchvision is a test dependency (make test installs it)"
)
timm = pytest.importorskip("timm", reason="timm is a test dependency (make test installs it)")
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

FACTOR, FLOOR = 2.0, 1e-6


def needs(*names):
    missing = [n for n in names if not hasattr(normext, n)]
    return pytest.mark.skipif(bool(missing), reason=f"normext.{', normext.'.join(missing)} not built yet")


def gn32(channels):
    return nn.GroupNorm(32, channels)


def is_torch_norm(m):
    cls = type(m)
    return cls in _TORCH_CLASSES or f"{cls.__module__}.{cls.__qualname__}" in _FOREIGN_CLASSES


def flat(y):
    return torch.cat([v.flatten() for v in y.values()]) if isinstance(y, dict) else y


def run(model, x, dy_seed):
    y = flat(model(x))
    gen = torch.Generator().manual_seed(dy_seed)
    y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
    return y, grads, buffers


def assert_no_worse_than_torch(ours, theirs, ref, what):
    err, nat = rel_err(ours, ref), rel_err(theirs, ref)
    assert err <= FACTOR * nat + FLOOR, f"{what}: rel err {err:.3g} > {FACTOR} x torch {nat:.3g} + {FLOOR}"


def check_drop_in(model, x, train=True, fused=0, memory_format=torch.contiguous_format):
    """Converts a copy of `model` and checks it against torch (float32) and a float64 reference."""
    model = model.to(memory_format=memory_format).train(train)
    x = x.contiguous(memory_format=memory_format)
    f64 = copy.deepcopy(model).double()
    ours, report = normext.convert_model(copy.deepcopy(model), return_report=True)
    assert report, "nothing was converted"
    assert not [n for n, m in ours.named_modules() if is_torch_norm(m)], "torch norms left"
    assert sum(r.activation is not None for r in report) == fused
    assert list(ours.state_dict()) == list(model.state_dict())
    y, g, b = run(ours, x, 0)
    y_t, g_t, b_t = run(model, x, 0)
    y_64, g_64, b_64 = run(f64, x.double(), 0)
    assert y.dtype == torch.float32
    if memory_format != torch.contiguous_format and y.dim() == 4:
        assert y.is_contiguous(memory_format=memory_format)
    assert_no_worse_than_torch(y, y_t, y_64, "output")
    assert g.keys() == g_64.keys() and b.keys() == b_64.keys()
    for n in g_64:
        assert_no_worse_than_torch(g[n], g_t[n], g_64[n], f"grad of {n}")
    for n in b_64:
        assert_no_worse_than_torch(b[n], b_t[n], b_64[n], f"buffer {n}")
    # state_dicts load both ways, strictly
    ours.load_state_dict(model.state_dict())
    model.load_state_dict(ours.state_dict())
    return ours


X = (2, 3, 32, 32)  # small: a 2-core CI machine runs every model here in seconds
# BatchNorm in training: 48x48 leaves 2x2 positions in the last stage, so each channel's statistics cover
# 8 values rather than 2 (whose dx is O(eps) and cancels to the last bit: a float32 lottery).
X_BN = (2, 3, 48, 48)


# ------------------------------------------------------------------------------------------ torchvision


def test_resnet18_groupnorm():
    ours = check_drop_in(torchvision.models.resnet18(norm_layer=gn32, num_classes=10), make_input(X))
    assert sum(type(m) is normext.GroupNorm for m in ours.modules()) == 20


@needs("BatchNorm2d")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_resnet18_batchnorm_channels_last(train):
    model = torchvision.models.resnet18(num_classes=10)
    if not train:  # non-trivial running statistics
        with torch.no_grad():
            model(make_input((4, *X[1:])))
    check_drop_in(model, make_input(X_BN), train=train, memory_format=torch.channels_last)


@needs("FrozenBatchNorm2d")
def test_resnet18_frozen_batchnorm():
    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    check_drop_in(model, make_input(X))


@needs("BatchNorm2d")
def test_maskrcnn_fpn_backbone_batchnorm():
    """Mask R-CNN as built for training from scratch (weights_backbone=None): BatchNorm2d backbone."""
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    check_drop_in(model.backbone, make_input(X_BN))


@needs("FrozenBatchNorm2d")
def test_maskrcnn_fpn_backbone_frozen_batchnorm():
    """The FPN backbone as built for fine-tuning: torchvision's FrozenBatchNorm2d, three trainable stages."""
    model = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    check_drop_in(model, make_input(X))


def test_maskrcnn_fpn_backbone_groupnorm():
    """The GroupNorm(32) variant of the Mask R-CNN backbone (the GN Mask R-CNN recipes)."""
    model = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=gn32, trainable_layers=5)
    check_drop_in(model, make_input(X))


@needs("BatchNorm2d")
def test_maskrcnn_v2_mask_head_fuses_batchnorm_relu():
    """Mask R-CNN v2's mask head: Conv2dNormActivation blocks, BatchNorm2d + ReLU fused."""
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3)
    check_drop_in(model.roi_heads.mask_head, make_input((4, 256, 14, 14)), fused=4)


# ------------------------------------------------------------------------------------------------- timm


@needs("LayerNorm", "LayerNorm2d")
def test_timm_convnext():
    """timm's ConvNeXt: LayerNorm2d in the stem and downsampling layers, LayerNorm in the blocks."""
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    ours = check_drop_in(model, make_input(X))
    assert any(type(m) is normext.LayerNorm2d for m in ours.modules())


def test_timm_convnext_groupnorm1():
    """timm's ConvNeXt with its GroupNorm1 (conv_mlp=True), matched by class name."""
    model = timm.create_model(
        "convnext_atto", pretrained=False, num_classes=10, conv_mlp=True, norm_layer="groupnorm1"
    )
    check_drop_in(model, make_input(X))


def test_resnet18_groupnorm_under_autocast():
    """CPU bfloat16 autocast: normext's GroupNorms get bfloat16 activations and return bfloat16, and the
    model's error against float64 is no worse than torch's under the same autocast."""
    model = torchvision.models.resnet18(norm_layer=gn32, num_classes=10)
    ours = normext.convert_model(copy.deepcopy(model))
    x = make_input(X)
    seen = []
    ours.layer1[0].bn1.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_t = ours(x), model(x)
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    y_64 = copy.deepcopy(model).double()(x.double())
    err, nat = rel_err(y, y_64), rel_err(y_t, y_64)
    assert err <= FACTOR * nat + 1e-3, f"rel err {err:.3g} > {FACTOR} x torch {nat:.3g} + 1e-3"


# ---------------------------------------------------------------------------------------------- example


def test_example_train_seg(capsys):
    from normext.examples import train_seg

    losses = train_seg.main(["--steps", "2", "--size", "32"])
    out = capsys.readouterr().out
    assert "torch.nn" in out and "normext" in out and "ms/step" in out
    assert len(losses["torch.nn"]) == len(losses["normext"]) == 2
