"""What the benchmark measures: SUITE holds one line per (model, layer) shape; each line expands over
dtypes, memory layouts and forward / forward+backward into Variants (CPU: the shape scaled down). NORMS
holds, per norm, how to call normext, the torch native op and (for stacks) the modules; the unfused
native chain is built from those. A case is one line, e.g.
    Case("convnext.stage2", LN2D, (2, 384, 32, 32), act="gelu", residual=True, dtypes=AMP),
and a line whose normext function is not built yet is skipped with a note until it is."""

import math
import re
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

import normext

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
PLAIN = ("f32", "bf16")
AMP = ("f32", "bf16", "f16")  # models that people also train with float16 autocast


@dataclass(frozen=True)
class Case:
    """One line of the suite. `layers` > 0 makes it a stack of `layers` x (conv, norm + act) timed as one
    training step (and memory-measured); otherwise it is the norm alone, y = act(norm(x) + residual)."""

    name: str
    norm: str  # a key of NORMS
    shape: tuple
    act: str | None = None
    residual: bool = False
    dtypes: tuple = PLAIN
    layers: int = 0
    groups: int = 32  # group_norm only
    quick: bool = False  # part of --quick
    cpu_shape: tuple | None = None  # default: `shape` scaled down by cpu_scaled()

    @property
    def fused(self):
        return self.act is not None or self.residual


# Keys of NORMS, short for the suite lines.
GN, IN, BN, BN_EVAL = "group_norm", "instance_norm", "batch_norm", "batch_norm_eval"
LN, LN2D = "layer_norm", "layer_norm_2d"
RMS, RMS2D, ADD_LN = "rms_norm", "rms_norm_2d", "add_layer_norm"

# fmt: off
SUITE = [
    # Mask R-CNN R50-FPN, GN(32), 2 images at 800x1216 (design.md section 6)
    Case("maskrcnn.stem", GN, (2, 64, 400, 608), act="relu", dtypes=AMP),
    Case("maskrcnn.res2", GN, (2, 256, 200, 304), dtypes=AMP, quick=True),
    Case("maskrcnn.res2.add_relu", GN, (2, 256, 200, 304), act="relu", residual=True, dtypes=AMP, quick=True),
    Case("maskrcnn.res3", GN, (2, 512, 100, 152), dtypes=AMP),
    Case("maskrcnn.res4", GN, (2, 1024, 50, 76), dtypes=AMP),
    Case("maskrcnn.res5", GN, (2, 2048, 25, 38), dtypes=AMP),
    Case("maskrcnn.box_head", GN, (1024, 256, 7, 7), act="relu", dtypes=AMP),
    Case("maskrcnn.mask_head", GN, (512, 256, 14, 14), act="relu", dtypes=AMP),
    # Detection backbones usually keep BatchNorm frozen: eval-mode statistics, gradients still flow to x
    Case("maskrcnn.frozen_bn.res2", BN_EVAL, (2, 256, 200, 304), act="relu", dtypes=AMP),
    Case("maskrcnn.frozen_bn.res5", BN_EVAL, (2, 2048, 25, 38), act="relu", residual=True, dtypes=AMP),
    # DeepLabV3+ BatchNorm (training statistics), 8 crops of 512
    Case("deeplab.aspp", BN, (8, 256, 128, 128), act="relu"),
    Case("deeplab.layer4", BN, (8, 2048, 64, 64)),
    Case("deeplab.layer3.add_relu", BN, (8, 512, 64, 64), act="relu", residual=True, quick=True),
    # Diffusion UNet GN(32) + SiLU, batch 2, 64x64 latents
    Case("unet.64", GN, (2, 320, 64, 64), act="silu", dtypes=AMP, quick=True),
    Case("unet.32", GN, (2, 640, 32, 32), act="silu", dtypes=AMP),
    Case("unet.16", GN, (2, 1280, 16, 16), act="silu", dtypes=AMP),
    Case("unet.8", GN, (2, 1280, 8, 8), act="silu", dtypes=AMP),
    # nnU-Net InstanceNorm3d (affine) + LeakyReLU, batch 2
    Case("nnunet.128", IN, (2, 32, 128, 128, 128), act="leaky_relu", dtypes=AMP),
    Case("nnunet.64", IN, (2, 64, 64, 64, 64), act="leaky_relu", dtypes=AMP, quick=True),
    Case("nnunet.8", IN, (2, 320, 8, 8, 8), act="leaky_relu", dtypes=AMP),
    # Transformer rows; ViTDet / ConvNeXt channel LayerNorm
    Case("vit_b.ln", LN, (8192, 768), quick=True),
    Case("bert_l.ln", LN, (16384, 1024)),
    Case("llm.ln", LN, (4096, 4096)),
    Case("vitdet.ln2d", LN2D, (2, 768, 64, 64), quick=True),
    # Pre-norm transformer blocks as rows: ViTDet-B's s = x + branch(x), norm(s) (2 images x 64x64 tokens,
    # against torch's add + layer_norm); DiT-XL's RMSNorm (2 x 1024 tokens); a channel RMSNorm
    Case("vitdet_b.prenorm", ADD_LN, (2 * 4096, 768), residual=True, quick=True),
    Case("dit.rms", RMS, (2 * 1024, 1152)),
    Case("rmsnorm2d", RMS2D, (2, 768, 64, 64)),
    # Latency floor: launch count and host overhead decide
    Case("latency.gn", GN, (1, 32, 64, 64), quick=True),
    Case("latency.bn", BN, (2, 256, 7, 7)),
    # conv + norm + act stacks at detection / segmentation shapes: one training step, time and peak memory
    Case("retinanet.head.stack", GN, (2, 256, 100, 152), act="relu", layers=4, quick=True),
    Case("maskrcnn.mask_head.stack", GN, (128, 256, 14, 14), act="relu", layers=4),
    Case("deeplab.aspp.stack", BN, (8, 256, 64, 64), act="relu", layers=2),
    Case("nnunet.stack", IN, (2, 32, 64, 64, 64), act="leaky_relu", layers=2),
    Case("vitdet.sfp.stack", LN2D, (2, 256, 64, 64), layers=2),
]
# fmt: on

CPU_NUMEL = 1 << 19  # elements per activation in the CPU suite
CPU_STACK_NUMEL = 1 << 16  # the stacks' convolutions dominate their time


def cpu_scaled(shape, budget):
    """`shape` scaled down for the CPU suite: halve the largest dim other than the channels (dim 1) until
    the element count fits the budget, so the layer keeps its channel count and grouping."""
    shape = list(shape)
    while math.prod(shape) > budget:
        dims = [d for d in range(len(shape)) if d != 1 and shape[d] > 1]
        if not dims:
            break
        d = max(dims, key=lambda i: shape[i])
        shape[d] = (shape[d] + 1) // 2
    return tuple(shape)


# ---- per-norm builders -------------------------------------------------------------------------------


def _affine(channels, dtype, device):
    return {
        "weight": 1 + 0.1 * torch.randn(channels, dtype=dtype, device=device),
        "bias": 0.1 * torch.randn(channels, dtype=dtype, device=device),
    }


def _weight(channels, dtype, device):
    return {"weight": 1 + 0.1 * torch.randn(channels, dtype=dtype, device=device)}


def _batch_norm_params(channels, dtype, device):
    params = _affine(channels, dtype, device)
    params["running_mean"] = 0.1 * torch.randn(channels, dtype=dtype, device=device)
    params["running_var"] = 1 + 0.1 * torch.rand(channels, dtype=dtype, device=device)
    return params


def _nx(name):
    # Looked up at call time so that a norm lights up as soon as its branch lands (and tests can patch it).
    return getattr(normext.functional, name)


def _layer_norm_2d_native(x, weight, bias, eps):
    # What timm and ConvNeXt do for a channel LayerNorm: move C last, F.layer_norm, move it back.
    return F.layer_norm(x.movedim(1, -1), x.shape[1:2], weight, bias, eps).movedim(-1, 1)


def _rms_norm_2d_native(x, weight, eps):
    # The same for a channel RMSNorm.
    return F.rms_norm(x.movedim(1, -1), x.shape[1:2], weight, eps).movedim(-1, 1)


class _LayerNorm2dNative(torch.nn.LayerNorm):
    def forward(self, x):
        return _layer_norm_2d_native(x, self.weight, self.bias, self.eps)


def _batch_norm_calls(training):
    """(normext call, native call) of batch_norm with training statistics or running ones."""

    def normext_call(c, x, p, r):
        stats, affine = (p["running_mean"], p["running_var"]), (p["weight"], p["bias"])
        return _nx("batch_norm")(x, *stats, *affine, training=training, activation=c.act, residual=r)

    def native_call(c, x, p):
        return F.batch_norm(x, p["running_mean"], p["running_var"], p["weight"], p["bias"], training)

    return normext_call, native_call


@dataclass(frozen=True)
class Norm:
    """How to benchmark one norm. `normext(case, x, params, residual)` computes the fused op,
    `native(case, x, params)` torch's own op without residual or activation; `modules(case, channels)`
    returns (normext module, native norm module) for stacks. `params(channels, dtype, device)` makes the
    parameters, over dim `channel_dim` of the input; they are float32 when `float32_params` (what cuDNN
    BatchNorm takes for half inputs, and what mixed-precision training keeps), else in the input dtype.
    `prenorm`: the residual is added before the norm and both out = norm(x + residual) and the sum are
    outputs (add_layer_norm); the native chain is then torch's add followed by the norm."""

    requires: str  # the normext.functional function; cases are skipped until it exists
    params: object
    normext: object
    native: object
    modules: object = None
    module_requires: tuple = ()  # normext classes a stack needs
    channel_dim: int = 1
    float32_params: bool = False
    trainable_params: bool = True
    prenorm: bool = False


def _instance_norm_class(case):
    return f"InstanceNorm{len(case.shape) - 2}d"


def _batch_norm_class(case):
    return f"BatchNorm{len(case.shape) - 2}d"


NORMS = {
    "group_norm": Norm(
        requires="group_norm",
        params=_affine,
        normext=lambda c, x, p, r: _nx("group_norm")(
            x, c.groups, p["weight"], p["bias"], activation=c.act, residual=r
        ),
        native=lambda c, x, p: F.group_norm(x, c.groups, p["weight"], p["bias"]),
        modules=lambda c, ch: (
            normext.GroupNorm(c.groups, ch, activation=c.act),
            torch.nn.GroupNorm(c.groups, ch),
        ),
        module_requires=("GroupNorm",),
    ),
    "instance_norm": Norm(
        requires="instance_norm",
        params=_affine,
        normext=lambda c, x, p, r: _nx("instance_norm")(
            x, weight=p["weight"], bias=p["bias"], activation=c.act, residual=r
        ),
        native=lambda c, x, p: F.instance_norm(x, weight=p["weight"], bias=p["bias"]),
        modules=lambda c, ch: (
            getattr(normext, _instance_norm_class(c))(ch, affine=True, activation=c.act),
            getattr(torch.nn, _instance_norm_class(c))(ch, affine=True),
        ),
        module_requires=("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"),
    ),
    "layer_norm": Norm(
        requires="layer_norm",
        params=_affine,
        normext=lambda c, x, p, r: _nx("layer_norm")(
            x, x.shape[-1:], p["weight"], p["bias"], activation=c.act, residual=r
        ),
        native=lambda c, x, p: F.layer_norm(x, x.shape[-1:], p["weight"], p["bias"]),
        channel_dim=-1,
    ),
    "layer_norm_2d": Norm(
        requires="layer_norm_2d",
        params=_affine,
        normext=lambda c, x, p, r: _nx("layer_norm_2d")(
            x, p["weight"], p["bias"], eps=1e-6, activation=c.act, residual=r
        ),
        native=lambda c, x, p: _layer_norm_2d_native(x, p["weight"], p["bias"], 1e-6),
        modules=lambda c, ch: (normext.LayerNorm2d(ch, activation=c.act), _LayerNorm2dNative(ch, eps=1e-6)),
        module_requires=("LayerNorm2d",),
    ),
    "rms_norm": Norm(
        requires="rms_norm",
        params=_weight,
        normext=lambda c, x, p, r: _nx("rms_norm")(
            x, x.shape[-1:], p["weight"], eps=1e-6, activation=c.act, residual=r
        ),
        native=lambda c, x, p: F.rms_norm(x, x.shape[-1:], p["weight"], 1e-6),
        channel_dim=-1,
    ),
    "rms_norm_2d": Norm(
        requires="rms_norm_2d",
        params=_weight,
        normext=lambda c, x, p, r: _nx("rms_norm_2d")(x, p["weight"], eps=1e-6, activation=c.act, residual=r),
        native=lambda c, x, p: _rms_norm_2d_native(x, p["weight"], 1e-6),
    ),
    "add_layer_norm": Norm(
        requires="add_layer_norm",
        params=_affine,
        normext=lambda c, x, p, r: _nx("add_layer_norm")(x, r, x.shape[-1:], p["weight"], p["bias"]),
        native=lambda c, x, p: F.layer_norm(x, x.shape[-1:], p["weight"], p["bias"]),
        channel_dim=-1,
        prenorm=True,
    ),
    "batch_norm": Norm(
        "batch_norm",
        _batch_norm_params,
        *_batch_norm_calls(training=True),
        modules=lambda c, ch: (
            getattr(normext, _batch_norm_class(c))(ch, activation=c.act),
            getattr(torch.nn, _batch_norm_class(c))(ch),
        ),
        module_requires=("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"),
        float32_params=True,
    ),
    # FrozenBatchNorm2d as detection backbones use it: running statistics, weight and bias are buffers.
    "batch_norm_eval": Norm(
        "batch_norm",
        _batch_norm_params,
        *_batch_norm_calls(training=False),
        float32_params=True,
        trainable_params=False,
    ),
}

# The native chain's activation, as model code writes it: in place where torch allows it after a norm.
NATIVE_ACT = {
    None: lambda y: y,
    "relu": lambda y: F.relu_(y),
    "leaky_relu": lambda y: F.leaky_relu_(y, 0.01),
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
}
NATIVE_ACT_MODULE = {
    None: lambda: torch.nn.Identity(),
    "relu": lambda: torch.nn.ReLU(inplace=True),
    "leaky_relu": lambda: torch.nn.LeakyReLU(0.01, inplace=True),
    "silu": lambda: torch.nn.SiLU(),
    "gelu": lambda: torch.nn.GELU(),
    "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
}


def native_chain(case, x, params, residual):
    """The unfused native way to compute act(norm(x) + residual): torch's norm, then add, then act; for a
    prenorm norm (norm(x + residual), x + residual): the add, then torch's norm."""
    norm = NORMS[case.norm]
    if norm.prenorm:
        s = x + residual
        return norm.native(case, s, params), s
    y = norm.native(case, x, params)
    if residual is not None:
        y = y.add_(residual)
    return NATIVE_ACT[case.act](y)


# ---- expansion into measured variants ---------------------------------------------------------------

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last, "ncdhw": torch.contiguous_format}
LAYOUTS.update(ndhwc=torch.channels_last_3d, rows=torch.contiguous_format)


def layouts_for(shape):
    return {2: ("rows",), 4: ("nchw", "nhwc"), 5: ("ncdhw", "ndhwc")}.get(len(shape), ("rows",))


@dataclass(frozen=True)
class Variant:
    """One measured line: a case at one shape, dtype, layout and pass."""

    case: Case
    shape: tuple
    dtype: str  # a key of DTYPES
    layout: str  # a key of LAYOUTS
    backward: bool

    @property
    def pass_name(self):
        return "fwd+bwd" if self.backward else "fwd"

    @cached_property
    def name(self):
        return f"{self.case.name}/{self.dtype}/{self.layout}/{self.pass_name}"

    @property
    def numel(self):
        return math.prod(self.shape)

    @property
    def elem_size(self):
        return DTYPES[self.dtype].itemsize

    def min_bytes(self, residual=None):
        """The fewest bytes the op must move (design.md section 5): forward reads x and writes y, backward
        reads x and dy and writes dx; a fused residual adds its read (and the write of its gradient); a
        prenorm one also the write of the sum (and the read of its gradient)."""
        residual = self.case.residual if residual is None else residual
        extra = (1 if residual else 0) + (1 if residual and NORMS[self.case.norm].prenorm else 0)
        per_pass = 2 + extra
        if self.backward:
            per_pass += 3 + extra
        return per_pass * self.numel * self.elem_size


def missing_requirements(case):
    """Names normext must provide before `case` can run (empty when it can)."""
    norm = NORMS[case.norm]
    if not hasattr(normext.functional, norm.requires):
        return [f"normext.functional.{norm.requires}"]
    return [f"normext.{m}" for m in norm.module_requires if case.layers and not hasattr(normext, m)]


def expand(case, device_type, quick=False):
    """The variants of one case on a device type: CPU shapes scaled down, --quick keeps float32/bfloat16;
    stacks are timed as training steps only."""
    shape = case.shape
    if device_type == "cpu":
        shape = case.cpu_shape or cpu_scaled(case.shape, CPU_STACK_NUMEL if case.layers else CPU_NUMEL)
    dtypes = [d for d in case.dtypes if not quick or d in PLAIN]
    passes = (True,) if case.layers else (False, True)
    return [
        Variant(case, shape, dtype, layout, backward)
        for dtype in dtypes
        for layout in layouts_for(shape)
        for backward in passes
    ]


def select(suite, device_type, quick=False, filters=()):
    """The variants to run and one note per skipped norm. `filters` are regular expressions searched in
    the variant names (a variant runs if any matches)."""
    patterns = [re.compile(f) for f in filters]
    variants, skipped = [], {}
    for case in suite:
        if quick and not case.quick:
            continue
        chosen = [
            v
            for v in expand(case, device_type, quick)
            if not patterns or any(p.search(v.name) for p in patterns)
        ]
        if not chosen:
            continue
        missing = missing_requirements(case)
        if missing:
            skipped.setdefault(", ".join(missing), []).extend(chosen)
            continue
        variants += chosen
    notes = [
        f"skipped {len(vs)} variant(s) of {', '.join(sorted({v.case.name for v in vs}))}: "
        f"{what} not available in this build yet"
        for what, vs in skipped.items()
    ]
    return variants, notes
