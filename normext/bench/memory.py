"""What a forward keeps for backward: the tensors autograd saves (torch.autograd.graph.saved_tensors_hooks),
and their bytes counted once per distinct storage (two saved views of one buffer are one buffer)."""

import torch


def saved_storages(forward):
    """(tensors the autograd graph saved while running forward(), forward()'s result)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return saved, out


def saved_bytes(forward):
    """Bytes of the distinct storages the graph of forward() keeps for backward."""
    saved, _ = saved_storages(forward)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    return sum(storages.values())
