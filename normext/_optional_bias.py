"""torch 2.14's keyword-only `bias=True` of GroupNorm, InstanceNorm*d, BatchNorm*d and SyncBatchNorm (an
affine weight without a bias) for the normext modules, also on the torch releases whose classes lack the
keyword: the bias is then dropped after torch's constructor ran, with torch 2.14's parameters, state_dict
keys, reset_parameters and repr."""

import functools
import inspect

import torch


@functools.cache
def takes_bias(torch_cls):
    """Whether the installed torch's norm class has the `bias` keyword."""
    return "bias" in inspect.signature(torch_cls.__init__).parameters


def _torch_class(cls):
    return next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn."))


class OptionalBias:
    """Mixin, placed before the torch.nn class, for norms with torch 2.14's `*, bias=True`."""

    def _init_torch_norm(self, *args, bias, **kwargs):
        """Runs the constructor of the torch.nn class this module derives from with `bias`, passing it on
        where torch takes it and otherwise unregistering the bias torch created."""
        torch_cls = _torch_class(type(self))
        if takes_bias(torch_cls):
            torch_cls.__init__(self, *args, bias=bias, **kwargs)
        else:
            torch_cls.__init__(self, *args, **kwargs)
            if self.affine and not bias:
                self.register_parameter("bias", None)

    def reset_parameters(self):
        # torch releases without the keyword zero the bias unconditionally, which fails on None.
        if self.affine and self.bias is None:
            if hasattr(self, "reset_running_stats"):
                self.reset_running_stats()
            torch.nn.init.ones_(self.weight)
        else:
            super().reset_parameters()

    def extra_repr(self):
        text = super().extra_repr()
        # torch 2.14 reports "bias=..." itself; a torch without the keyword cannot build a module without
        # bias, so the one such a torch's repr would not tell apart is named here.
        if self.affine and self.bias is None and "bias=" not in text:
            text += ", bias=False"
        return text
