"""normext.convert_model: swaps the torch.nn norm layers of a model (and torchvision's, detectron2's and
timm's look-alikes, matched by class name) for normext ones, keeping parameter and buffer names, values,
train/eval mode, device and dtype, and optionally fuses a following activation into the norm."""

import dataclasses
import inspect

import torch.nn as nn

import normext
from normext._ops import FusedActivation, op_activation


def _group_norm_args(m):
    return dict(
        num_groups=m.num_groups,
        num_channels=m.num_channels,
        eps=m.eps,
        affine=m.affine,
        bias=m.bias is not None,
    )


def _running_norm_args(m):
    # InstanceNorm and BatchNorm share torch's _NormBase constructor.
    return dict(
        num_features=m.num_features,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
        bias=m.bias is not None,
    )


def _sync_batch_norm_args(m):
    return dict(_running_norm_args(m), process_group=m.process_group)


def _layer_norm_args(m):
    return dict(
        normalized_shape=tuple(m.normalized_shape),
        eps=m.eps,
        elementwise_affine=m.weight is not None,
        bias=m.bias is not None,
    )


def _channel_layer_norm_args(m):
    # timm's LayerNorm2d (an nn.LayerNorm over (C,)) and detectron2's LayerNorm (a plain module).
    return dict(
        num_channels=tuple(m.normalized_shape)[0],
        eps=m.eps,
        elementwise_affine=m.weight is not None,
        bias=m.bias is not None,
    )


def _rms_norm_args(m):
    # torch.nn.RMSNorm and timm's RmsNorm (normalized_shape, eps, weight or None).
    return dict(
        normalized_shape=tuple(m.normalized_shape), eps=m.eps, elementwise_affine=m.weight is not None
    )


def _channel_rms_norm_args(m):
    # timm's RmsNorm2d: normalized_shape (C,), over dim 1.
    return dict(num_channels=tuple(m.normalized_shape)[0], eps=m.eps, affine=m.weight is not None)


def _frozen_batch_norm_args(m):
    return dict(num_features=m.running_mean.numel(), eps=m.eps)


# torch.nn classes, matched by exact type (a subclass may override forward): converted in place by
# switching the object's class, since each normext module subclasses its torch.nn counterpart and keeps
# its attributes; the module object, its parameters (and so an optimizer's references) and hooks stay.
_TORCH_CLASSES = {
    nn.GroupNorm: ("GroupNorm", _group_norm_args),
    nn.InstanceNorm1d: ("InstanceNorm1d", _running_norm_args),
    nn.InstanceNorm2d: ("InstanceNorm2d", _running_norm_args),
    nn.InstanceNorm3d: ("InstanceNorm3d", _running_norm_args),
    nn.LayerNorm: ("LayerNorm", _layer_norm_args),
    nn.RMSNorm: ("RMSNorm", _rms_norm_args),
    nn.BatchNorm1d: ("BatchNorm1d", _running_norm_args),
    nn.BatchNorm2d: ("BatchNorm2d", _running_norm_args),
    nn.BatchNorm3d: ("BatchNorm3d", _running_norm_args),
    nn.SyncBatchNorm: ("SyncBatchNorm", _sync_batch_norm_args),
}

# Other libraries' norms, matched by "module.qualname" so that none of them is imported here: a new
# normext module is built and takes over the old one's parameter and buffer tensors.
_FOREIGN_CLASSES = {
    "torchvision.ops.misc.FrozenBatchNorm2d": ("FrozenBatchNorm2d", _frozen_batch_norm_args),
    "detectron2.layers.batch_norm.FrozenBatchNorm2d": ("FrozenBatchNorm2d", _frozen_batch_norm_args),
    "detectron2.layers.batch_norm.LayerNorm": ("LayerNorm2d", _channel_layer_norm_args),
    "timm.layers.norm.LayerNorm2d": ("LayerNorm2d", _channel_layer_norm_args),
    "timm.layers.norm.LayerNorm": ("LayerNorm", _layer_norm_args),
    "timm.layers.norm.GroupNorm": ("GroupNorm", _group_norm_args),
    "timm.layers.norm.GroupNorm1": ("GroupNorm", _group_norm_args),
    "timm.layers.norm.RmsNorm": ("RMSNorm", _rms_norm_args),
    "timm.layers.norm.RmsNorm2d": ("RMSNorm2d", _channel_rms_norm_args),
    "timm.models.layers.norm.LayerNorm2d": ("LayerNorm2d", _channel_layer_norm_args),
    "timm.models.layers.norm.LayerNorm": ("LayerNorm", _layer_norm_args),
    "timm.models.layers.norm.GroupNorm": ("GroupNorm", _group_norm_args),
}

# Activations fused by fuse_activations, by exact type: the activation name and negative_slope.
_ACTIVATIONS = {
    nn.ReLU: lambda m: ("relu", 0.01),
    nn.LeakyReLU: lambda m: ("leaky_relu", m.negative_slope),
    nn.SiLU: lambda m: ("silu", 0.01),
    nn.GELU: lambda m: ({"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate), 0.01),
}


@dataclasses.dataclass(frozen=True)
class Conversion:
    """One converted (or fused) norm layer: its qualified name in the model ("" for the model itself),
    the class it had and the normext class it has now, and the activation fused into it (None if none)
    together with the qualified name of the activation module that became nn.Identity."""

    name: str
    source: str
    target: str
    activation: str | None = None
    activation_module: str | None = None


def _class_name(cls):
    if cls.__module__.split(".")[0] == "normext":
        return f"normext.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _plan(m):
    """(normext class, constructor arguments, in place?) for a module that has a normext counterpart built
    (LayerNorm/BatchNorm only exist once their family is built), else None."""
    cls = type(m)
    entry = _TORCH_CLASSES.get(cls)
    in_place = entry is not None
    if entry is None:
        entry = _FOREIGN_CLASSES.get(_class_name(cls))
    if entry is None:
        return None
    target = getattr(normext, entry[0], None)
    return None if target is None else (target, entry[1](m), in_place)


def _tensor_names(m):
    # A parameter registered as None (torch.nn.RMSNorm without affine) is no tensor: state_dict skips it.
    params = {k for k, v in m._parameters.items() if v is not None}
    buffers = {k for k, v in m._buffers.items() if v is not None}
    return params, buffers, set(m._non_persistent_buffers_set) & buffers


def _convert_one(m):
    """The normext version of m, or None when m is not a convertible norm."""
    plan = _plan(m)
    if plan is None:
        return None
    target, args, in_place = plan
    # Built on the meta device where the constructor allows: only its attributes and tensor names are
    # used, the tensors are m's.
    if "device" in inspect.signature(target).parameters:
        args["device"] = "meta"
    fresh = target(**args)
    if _tensor_names(fresh) != _tensor_names(m):
        raise RuntimeError(
            f"convert_model: {_class_name(type(m))} and normext.{target.__name__} have different "
            f"parameters/buffers ({_tensor_names(m)} vs {_tensor_names(fresh)})"
        )
    if in_place:
        m.__class__ = target
        for key, value in fresh.__dict__.items():  # attributes normext adds (e.g. the activation)
            m.__dict__.setdefault(key, value)
        return m
    fresh._parameters.update(m._parameters)
    fresh._buffers.update(m._buffers)
    return fresh.train(m.training)


def _fuse(seq, prefix, uses, excluded, report_by_name):
    """Fuses each normext norm directly followed by a supported activation inside the nn.Sequential seq:
    the norm takes the activation and the activation's slot becomes nn.Identity (no state, so the
    state_dict keys stay). Norms used elsewhere too, or whose output a forward hook reads, are left."""
    names = list(seq._modules)
    for first, second in zip(names, names[1:], strict=False):
        norm, act = seq._modules[first], seq._modules[second]
        get = _ACTIVATIONS.get(type(act))
        if (
            get is None
            or not isinstance(norm, FusedActivation)
            or norm.activation not in (None, "identity")
            or uses[id(norm)] > 1
            or excluded(prefix + first)
            or norm._forward_hooks
            or act._forward_hooks
            or act._forward_pre_hooks
        ):
            continue
        activation, slope = get(act)
        if activation is None:
            continue
        norm.activation, norm.negative_slope = activation, slope
        seq._modules[second] = nn.Identity()
        norm_name = prefix + first
        entry = report_by_name.get(norm_name)
        source = entry.source if entry is not None else _class_name(type(norm))
        report_by_name[norm_name] = Conversion(
            norm_name, source, _class_name(type(norm)), activation, prefix + second
        )


def convert_model(module, fuse_activations=True, *, exclude=(), return_report=False, memory_efficient=False):
    """Replaces the norm layers of `module` with normext modules and returns the converted module.

    Converted: torch.nn GroupNorm, InstanceNorm1d/2d/3d, LayerNorm, RMSNorm, BatchNorm1d/2d/3d,
    SyncBatchNorm (exact types, switched in place: the module objects, parameters, buffers and hooks stay),
    plus by class name torchvision's and detectron2's FrozenBatchNorm2d, timm's LayerNorm2d, LayerNorm,
    GroupNorm, RmsNorm and RmsNorm2d and detectron2's LayerNorm (rebuilt around the same tensors).
    Parameter and buffer names, values, requires_grad, device, dtype and train/eval mode are kept, so
    outputs match and state_dicts load both ways. normext modules are left as they are; so are subclasses
    of the torch classes (their forward may differ) and norms whose normext counterpart is not built.

    fuse_activations: inside every nn.Sequential (or subclass keeping Sequential's forward), a normext
        norm directly followed by nn.ReLU, nn.LeakyReLU, nn.SiLU or nn.GELU (approximate "none" or
        "tanh") takes the activation into its kernel and the activation is replaced by nn.Identity.
    exclude: qualified names of submodules (as in named_modules) whose subtrees are left alone.
    return_report: also return a list of Conversion records, one per converted or fused norm.
    memory_efficient: after the fusion, every normext norm (outside `exclude`) whose activation allows it
        keeps its output instead of its input for backward (see the modules' memory_efficient); a layer
        whose output is then modified in place (torchvision's `out += identity`) makes backward raise, so
        exclude it.

    Returns the converted module (the same object unless `module` itself is a rebuilt norm), or
    (module, report) with return_report=True.
    """
    exclude = set(exclude)

    def excluded(name):
        return any(name == e or name.startswith(e + ".") for e in exclude)

    report_by_name = {}
    done = {}  # id(old module) -> its replacement, so a module used twice stays one module

    def visit(m, prefix):
        for name, child in list(m._modules.items()):
            qualname = prefix + name
            if child is None or qualname in exclude:
                continue
            if id(child) in done:
                m._modules[name] = done[id(child)]
                continue
            source = _class_name(type(child))
            new = _convert_one(child)
            if new is None:
                visit(child, qualname + ".")
                continue
            done[id(child)] = new
            m._modules[name] = new
            report_by_name[qualname] = Conversion(qualname, source, _class_name(type(new)))

    if "" not in exclude:
        source = _class_name(type(module))
        new = _convert_one(module)
        if new is not None:
            report_by_name[""] = Conversion("", source, _class_name(type(new)))
            module = new
        else:
            visit(module, "")
    if fuse_activations:
        uses = {}
        for _, m in module.named_modules(remove_duplicate=False):
            uses[id(m)] = uses.get(id(m), 0) + 1
        for name, m in module.named_modules():
            # Also Sequential subclasses that keep its forward (torchvision's Conv2dNormActivation).
            sequential = isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            if sequential and not excluded(name):
                _fuse(m, name + "." if name else "", uses, excluded, report_by_name)
    if memory_efficient:
        for name, m in module.named_modules():
            if isinstance(m, FusedActivation) and not excluded(name) and _allows_memory_efficient(m):
                m.memory_efficient = True
    report = [report_by_name[k] for k in sorted(report_by_name, key=_module_order(module))]
    return (module, report) if return_report else module


def _allows_memory_efficient(m):
    """Whether m's activation allows memory_efficient: invertible, or, for FrozenBatchNorm2d (whose backward
    needs no x̂), one whose derivative y gives (relu too)."""
    try:
        constant = isinstance(m, normext.FrozenBatchNorm2d)
        op_activation(m.activation, m.negative_slope, True, type(m).__name__, constant_stats=constant)
    except ValueError:
        return False
    return True


def _module_order(module):
    order = {name: i for i, (name, _) in enumerate(module.named_modules(remove_duplicate=False))}
    return lambda name: order.get(name, len(order))
