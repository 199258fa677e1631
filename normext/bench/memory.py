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


def stack_saved_bytes(contenders, inputs):
    """Bytes kept for backward by one training step of each eager stack contender (functools.partial(
    _train_step, model, autocast) of normext.bench.runner; the torch.compile ones are left out), and by the
    normext stack with memory_efficient switched on wherever its activations allow
    ("normext_memory_efficient")."""
    eager = {k: fn for k, fn in contenders.items() if k in ("normext", "chain", "native")}
    out = {name: saved_bytes(lambda fn=fn: fn(inputs)) for name, fn in eager.items()}
    step = contenders["normext"]
    norms = [m for m in step.args[0].modules() if _allows_memory_efficient(m)]
    for m in norms:
        m.memory_efficient = True
    try:
        out["normext_memory_efficient"] = saved_bytes(lambda: step(inputs))
    finally:
        for m in norms:
            m.memory_efficient = False
    return out


def _allows_memory_efficient(m):
    from normext._ops import FusedActivation
    from normext.convert import _allows_memory_efficient as allows

    return isinstance(m, FusedActivation) and not m.memory_efficient and allows(m)
