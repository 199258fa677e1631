# Real models converted with normext.convert_model: torchvision ResNets (GroupNorm; BatchNorm in
# channels_last; FrozenBatchNorm2d), the torchvision Mask R-CNN FPN backbone and heads, timm ConvNeXt.
# "Same numbers" is checked twice. In float64 the converted model and torch's must agree to ~1e-9 in the
# output, every parameter gradient and every buffer: the same function, nothing dropped. In float32 the
# output and the running statistics are judged against the float64 model: normext's error at most twice
# torch's own (plus a small floor); so are the gradients, except for BatchNorm networks in training at
# batch 2, whose deep gradients are ill-conditioned (torch's own float32 error on them is 1-3%, and two
# float32 implementations land on either side of it by chance). state_dict keys are unchanged and load
# both ways. Also the example (python -m normext.examples.train_seg).
import copy

import pytest
import torch
import torch.nn as nn
from conftest import make_input
from optional_deps import optional_import, requires
from reference import rel_err

import normext
from normext.convert import _FOREIGN_CLASSES, _TORCH_CLASSES

# Test dependencies that `make test` installs where it can; each model test skips without its own (the
# example needs neither).
torchvision, _ = optional_import("torchvision")
timm, _ = optional_import("timm")
requires_torchvision = requires("torchvision")
requires_timm = requires("timm")
if torchvision is not None:
    from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

FACTOR, FLOOR = 2.0, 1e-5  # float32 against float64: output, all gradients, all buffers
EACH_FACTOR, EACH_FLOOR = 4.0, 1e-4  # ... each gradient, each buffer
SAME_IN_FLOAT64 = 1e-9  # normext against torch, both in float64


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


def assert_no_worse_than_torch(ours, theirs, ref, what, factor=FACTOR, floor=FLOOR):
    err, nat = rel_err(ours, ref), rel_err(theirs, ref)
    assert err <= factor * nat + floor, f"{what}: rel err {err:.3g} > {factor} x torch {nat:.3g} + {floor}"


def cat(tensors):
    return torch.cat([t.detach().double().flatten() for t in tensors])


def compare(ours, torch_, ref, what, factor, floor):
    """Each tensor of the dicts (and, with factor=FACTOR, all together) within the rule."""
    assert ours.keys() == ref.keys()
    if ref:
        assert_no_worse_than_torch(cat(ours.values()), cat(torch_.values()), cat(ref.values()), f"all {what}")
    for n in ref:
        assert_no_worse_than_torch(ours[n], torch_[n], ref[n], f"{what} {n}", factor, floor)


def check_drop_in(model, x, train=True, fused=0, memory_format=torch.contiguous_format, float32_grads=True):
    """Converts a copy of `model` and checks it against torch's in float64 and float32."""
    model = model.to(memory_format=memory_format).train(train)
    x = x.contiguous(memory_format=memory_format)
    f64 = copy.deepcopy(model).double()
    ours64 = normext.convert_model(copy.deepcopy(f64))
    ours, report = normext.convert_model(copy.deepcopy(model), return_report=True)
    assert report, "nothing was converted"
    assert not [n for n, m in ours.named_modules() if is_torch_norm(m)], "torch norms left"
    assert sum(r.activation is not None for r in report) == fused
    assert list(ours.state_dict()) == list(model.state_dict())

    y_64, g_64, b_64 = run(f64, x.double(), 0)
    y, g, b = run(ours64, x.double(), 0)
    assert rel_err(y, y_64) < SAME_IN_FLOAT64, "float64 output"
    for what, ours_, ref in (("gradient of", g, g_64), ("buffer", b, b_64)):
        assert ours_.keys() == ref.keys()
        for n in ref:
            assert rel_err(ours_[n], ref[n]) < SAME_IN_FLOAT64, f"float64 {what} {n}"

    y, g, b = run(ours, x, 0)
    y_t, g_t, b_t = run(model, x, 0)
    assert y.dtype == torch.float32
    if memory_format != torch.contiguous_format and y.dim() == 4:
        assert y.is_contiguous(memory_format=memory_format)
    assert_no_worse_than_torch(y, y_t, y_64, "output")
    compare(b, b_t, b_64, "buffers", EACH_FACTOR, EACH_FLOOR)
    if float32_grads:
        compare(g, g_t, g_64, "gradients", EACH_FACTOR, EACH_FLOOR)
    # state_dicts load both ways, strictly
    ours.load_state_dict(model.state_dict())
    model.load_state_dict(ours.state_dict())
    return ours


X = (2, 3, 32, 32)  # small: a 2-core CI machine runs every model here in seconds
# BatchNorm in training: 40x40 leaves 2x2 positions in the last stage, so each channel's statistics cover
# 8 values rather than 2 (whose dx is O(eps) and cancels to the last bit: a float32 lottery).
X_BN = (2, 3, 40, 40)


# ------------------------------------------------------------------------------------------ torchvision


@requires_torchvision
def test_resnet18_groupnorm():
    ours = check_drop_in(torchvision.models.resnet18(norm_layer=gn32, num_classes=10), make_input(X))
    assert sum(type(m) is normext.GroupNorm for m in ours.modules()) == 20


@requires_torchvision
@needs("BatchNorm2d")
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_resnet18_batchnorm_channels_last(train):
    model = torchvision.models.resnet18(num_classes=10)
    if not train:  # non-trivial running statistics
        with torch.no_grad():
            model(make_input((4, *X[1:])))
    x = make_input(X_BN if train else X)
    check_drop_in(model, x, train, memory_format=torch.channels_last, float32_grads=not train)


@requires_torchvision
@needs("FrozenBatchNorm2d")
def test_resnet18_frozen_batchnorm():
    model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d, num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    check_drop_in(model, make_input(X))


@requires_torchvision
@needs("BatchNorm2d")
def test_maskrcnn_fpn_backbone_batchnorm():
    """Mask R-CNN as built for training from scratch (weights_backbone=None): BatchNorm2d backbone."""
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    check_drop_in(model.backbone, make_input(X_BN), float32_grads=False)


@requires_torchvision
@needs("FrozenBatchNorm2d")
def test_maskrcnn_fpn_backbone_frozen_batchnorm():
    """The FPN backbone as built for fine-tuning: torchvision's FrozenBatchNorm2d, three trainable stages."""
    model = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    check_drop_in(model, make_input(X))


@requires_torchvision
def test_maskrcnn_fpn_backbone_groupnorm():
    """The GroupNorm(32) variant of the Mask R-CNN backbone (the GN Mask R-CNN recipes)."""
    model = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=gn32, trainable_layers=5)
    check_drop_in(model, make_input(X))


@requires_torchvision
@needs("BatchNorm2d")
def test_maskrcnn_v2_mask_head_fuses_batchnorm_relu():
    """Mask R-CNN v2's mask head: Conv2dNormActivation blocks, BatchNorm2d + ReLU fused."""
    model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3)
    check_drop_in(model.roi_heads.mask_head, make_input((4, 256, 14, 14)), fused=4, float32_grads=False)


# ------------------------------------------------------------------------------------------------- timm


@requires_timm
@needs("LayerNorm", "LayerNorm2d")
def test_timm_convnext():
    """timm's ConvNeXt: LayerNorm2d in the stem and downsampling layers, LayerNorm in the blocks."""
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    ours = check_drop_in(model, make_input(X))
    assert any(type(m) is normext.LayerNorm2d for m in ours.modules())


@requires_timm
def test_timm_convnext_groupnorm1():
    """timm's ConvNeXt with its GroupNorm1 (conv_mlp=True), matched by class name."""
    model = timm.create_model(
        "convnext_atto", pretrained=False, num_classes=10, conv_mlp=True, norm_layer="groupnorm1"
    )
    check_drop_in(model, make_input(X))


@requires_torchvision
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
