# ruff: noqa: B023, B905  (the timed lambdas run inside the loop iteration that defines them)
"""CPU side-by-side of normext GroupNorm against torch (F.group_norm, and the GN -> add -> SiLU chain):
one thread, process CPU time, alternating A/B rounds, median of the per-round ratios (ratio > 1: normext
faster). Run: .venv/bin/python bench/cpu_group_norm.py"""

import statistics
import time

import torch
import torch.nn.functional as F

import normext

torch.set_num_threads(1)
torch.manual_seed(0)


def tm(f, n=10):
    f()
    t0 = time.process_time()
    for _ in range(n):
        f()
    return (time.process_time() - t0) / n * 1e3


def ab(fa, fb, rounds=5):
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(tm(fa))
        tb.append(tm(fb))
    return statistics.median(ta), statistics.median(tb), statistics.median([a / b for a, b in zip(ta, tb)])


for shape, G in [((2, 256, 50, 76), 32), ((64, 256, 7, 7), 32), ((2, 32, 32, 32, 32), 32)]:
    for cl in [False, True]:
        x = torch.randn(shape)
        if cl:
            x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        C = shape[1]
        w = torch.randn(C)
        b = torch.randn(C)
        r1 = ab(lambda: F.group_norm(x, G, w, b), lambda: normext.functional.group_norm(x, G, w, b))
        xa = x.clone().requires_grad_()
        gy = torch.randn_like(x)

        def fb(f):
            y = f(xa, G, w, b)
            y.backward(gy)

        r2 = ab(lambda: fb(F.group_norm), lambda: fb(normext.functional.group_norm))
        r3 = ab(
            lambda: F.silu(F.group_norm(x, G, w, b) + x),
            lambda: normext.functional.group_norm(x, G, w, b, activation="silu", residual=x),
        )
        print(
            shape,
            "CL" if cl else "NCHW",
            " | ".join(f"torch {a:.2f} nx {b:.2f} x{r:.2f}" for a, b, r in (r1, r2, r3)),
            flush=True,
        )
