"""Name-based norm lookups of detection/segmentation frameworks that resolve to normext modules: timm's
norm-layer names, detectron2's get_norm names and mmcv's build_norm_layer types. Nothing here imports a
framework until asked (register_all() or register_<framework>()); none of them is a dependency, and a
framework that is not installed is skipped. The normext names only add to what the framework knows."""

import functools
import importlib.metadata
import importlib.util
import sys

import normext
from normext.modules import GroupNorm

# ----------------------------------------------------------------------------------------------- timm
# timm looks names up after removing "_" and lowercasing, so "normext_groupnorm" works as written. Its
# layers take the channel count first, with eps=1e-6 for its LayerNorms and 32 groups for GroupNorm.


def _timm_group_norm(num_channels, num_groups=32, eps=1e-5, affine=True, **kwargs):
    return normext.GroupNorm(num_groups, num_channels, eps=eps, affine=affine, **kwargs)


def _timm_group_norm1(num_channels, eps=1e-5, affine=True, **kwargs):
    return normext.GroupNorm(1, num_channels, eps=eps, affine=affine, **kwargs)


def _timm_layer_norm(num_channels, eps=1e-6, affine=True, **kwargs):
    return normext.LayerNorm(num_channels, eps=eps, elementwise_affine=affine, **kwargs)


def _timm_layer_norm_2d(num_channels, eps=1e-6, affine=True, **kwargs):
    return normext.LayerNorm2d(num_channels, eps=eps, elementwise_affine=affine, **kwargs)


def _timm_rms_norm(num_channels, eps=1e-6, affine=True, **kwargs):
    return normext.RMSNorm(num_channels, eps=eps, elementwise_affine=affine, **kwargs)


def _normext_class(name):
    return lambda: getattr(normext, name)


# name -> (the normext class it needs, a callable returning the factory timm will call)
TIMM_NAMES = {
    "normext_batchnorm": ("BatchNorm2d", _normext_class("BatchNorm2d")),
    "normext_batchnorm2d": ("BatchNorm2d", _normext_class("BatchNorm2d")),
    "normext_batchnorm1d": ("BatchNorm1d", _normext_class("BatchNorm1d")),
    "normext_groupnorm": ("GroupNorm", lambda: _timm_group_norm),
    "normext_groupnorm1": ("GroupNorm", lambda: _timm_group_norm1),
    "normext_layernorm": ("LayerNorm", lambda: _timm_layer_norm),
    "normext_layernorm2d": ("LayerNorm2d", lambda: _timm_layer_norm_2d),
    "normext_rmsnorm": ("RMSNorm", lambda: _timm_rms_norm),
    "normext_rmsnorm2d": ("RMSNorm2d", _normext_class("RMSNorm2d")),
    "normext_frozenbatchnorm2d": ("FrozenBatchNorm2d", _normext_class("FrozenBatchNorm2d")),
}


def register_timm():
    """Adds the TIMM_NAMES whose normext class is built to timm's norm-layer map (timm.layers.
    get_norm_layer / create_norm_layer, and the norm_layer= argument of the models that use them).
    Returns the names registered."""
    from timm.layers import create_norm

    done = []
    for name, (needs, factory) in TIMM_NAMES.items():
        if hasattr(normext, needs):
            create_norm._NORM_MAP[name.replace("_", "")] = factory()
            done.append(name)
    return done


# ----------------------------------------------------------------------------------------- detectron2
# detectron2's get_norm(norm, out_channels) keeps its names in a dict local to the function, so the
# function is wrapped: the normext names resolve here, everything else goes to detectron2's own.


def _detectron2_group_norm(channels):
    return normext.GroupNorm(32, channels)


def _detectron2_layer_norm(channels):
    return normext.LayerNorm2d(channels, eps=1e-6)


def _detectron2_rms_norm(channels):
    return normext.RMSNorm2d(channels)


# name -> (the normext class it needs, a callable returning the factory get_norm will call)
DETECTRON2_NAMES = {
    "NormextBN": ("BatchNorm2d", _normext_class("BatchNorm2d")),
    "NormextSyncBN": ("SyncBatchNorm", _normext_class("SyncBatchNorm")),
    "NormextFrozenBN": ("FrozenBatchNorm2d", _normext_class("FrozenBatchNorm2d")),
    "NormextGN": ("GroupNorm", lambda: _detectron2_group_norm),
    "NormextLN": ("LayerNorm2d", lambda: _detectron2_layer_norm),
    "NormextRMS": ("RMSNorm2d", lambda: _detectron2_rms_norm),
}


def register_detectron2():
    """Makes detectron2's get_norm (cfg.MODEL.*.NORM) accept the DETECTRON2_NAMES whose normext class is
    built, in detectron2.layers and in every loaded detectron2 module that imported get_norm by name.
    Returns the names registered."""
    from detectron2.layers import batch_norm

    names = {name: factory for name, (needs, factory) in DETECTRON2_NAMES.items() if hasattr(normext, needs)}
    current = batch_norm.get_norm
    original = current.__wrapped__ if getattr(current, "_normext", False) else current

    @functools.wraps(original)
    def get_norm(norm, out_channels, *args, **kwargs):
        if isinstance(norm, str) and norm in names:
            norm = names[norm]()
        return original(norm, out_channels, *args, **kwargs)

    get_norm._normext = True
    for module_name, module in list(sys.modules.items()):
        imported = getattr(module, "get_norm", None)
        if module_name.split(".")[0] == "detectron2" and imported in (original, current):
            module.get_norm = get_norm
    return list(names)


# ---------------------------------------------------------------------------------------------- mmcv
class MMCVGroupNorm(GroupNorm):
    """normext.GroupNorm with the channel count first: mmcv's build_norm_layer calls
    layer(num_features, num_groups=..., ...) for every type except nn.GroupNorm itself."""

    def __init__(self, num_channels, num_groups, eps=1e-5, affine=True, **kwargs):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, **kwargs)


# type -> (the normext class it needs, a callable returning the class to register). mmcv names the
# layer from its base class (bn, gn, ln, in), so state_dict keys are those of the mmcv type.
MMCV_TYPES = {
    "NormextBN": ("BatchNorm2d", _normext_class("BatchNorm2d")),
    "NormextBN1d": ("BatchNorm1d", _normext_class("BatchNorm1d")),
    "NormextBN2d": ("BatchNorm2d", _normext_class("BatchNorm2d")),
    "NormextBN3d": ("BatchNorm3d", _normext_class("BatchNorm3d")),
    "NormextSyncBN": ("SyncBatchNorm", _normext_class("SyncBatchNorm")),
    "NormextGN": ("GroupNorm", lambda: MMCVGroupNorm),
    "NormextLN": ("LayerNorm", _normext_class("LayerNorm")),
    "NormextRMS": ("RMSNorm", _normext_class("RMSNorm")),
    "NormextRMS2d": ("RMSNorm2d", _normext_class("RMSNorm2d")),
    "NormextIN": ("InstanceNorm2d", _normext_class("InstanceNorm2d")),
    "NormextIN1d": ("InstanceNorm1d", _normext_class("InstanceNorm1d")),
    "NormextIN2d": ("InstanceNorm2d", _normext_class("InstanceNorm2d")),
    "NormextIN3d": ("InstanceNorm3d", _normext_class("InstanceNorm3d")),
}


def _mmcv_major_version():
    for dist in ("mmcv", "mmcv-lite", "mmcv-full"):
        try:
            return int(importlib.metadata.version(dist).split(".")[0])
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def register_mmcv():
    """Registers the MMCV_TYPES whose normext class is built for build_norm_layer (norm_cfg=dict(type=
    "NormextGN", num_groups=32), plus activation="relu" etc. to fuse): in mmengine's MODELS registry for
    mmcv 2.x, in mmcv.cnn's NORM_LAYERS for mmcv 1.x. Returns the types registered."""
    if _mmcv_major_version() == 1:
        from mmcv.cnn import NORM_LAYERS as registry
    else:
        from mmengine.registry import MODELS as registry

    done = []
    for name, (needs, cls) in MMCV_TYPES.items():
        if hasattr(normext, needs):
            registry.register_module(name=name, module=cls(), force=True)
            done.append(name)
    return done


# ------------------------------------------------------------------------------------------------ all
_REGISTER = {"timm": register_timm, "detectron2": register_detectron2, "mmcv": register_mmcv}


def register_all():
    """Registers the normext names with every framework above that is installed (importing it; mmcv takes
    seconds to import). Returns {framework: [names registered]} for the installed ones."""
    return {
        package: register()
        for package, register in _REGISTER.items()
        if importlib.util.find_spec(package) is not None
    }
