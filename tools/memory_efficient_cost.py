"""memory_efficient=True against the plain path on the CPU: forward+backward time of one norm (fused
leaky_relu, with and without a residual) in alternating rounds within one process (medians and their ratio),
and the bytes a 4 x (conv3x3 -> GroupNorm(8) -> LeakyReLU) stack at 2x32x32x32 keeps for backward.
Run: .venv/bin/python tools/memory_efficient_cost.py [--threads 1] [--rounds 15]"""

import argparse
import statistics
import time

import torch
import torch.nn as nn

import normext
import normext.functional as nxF
from normext.bench.memory import saved_bytes

CASES = {
    "group_norm 2x256x56x56 G32": (
        (2, 256, 56, 56),
        lambda x, w, b, r, me: nxF.group_norm(
            x, 32, w, b, activation="leaky_relu", residual=r, memory_efficient=me
        ),
    ),
    "instance_norm 2x32x32x32x32": (
        (2, 32, 32, 32, 32),
        lambda x, w, b, r, me: nxF.instance_norm(
            x, None, None, w, b, activation="leaky_relu", residual=r, memory_efficient=me
        ),
    ),
    "batch_norm 8x64x56x56": (
        (8, 64, 56, 56),
        lambda x, w, b, r, me: nxF.batch_norm(
            x, None, None, w, b, True, activation="leaky_relu", residual=r, memory_efficient=me
        ),
    ),
    "layer_norm_2d 2x192x56x56": (
        (2, 192, 56, 56),
        lambda x, w, b, r, me: nxF.layer_norm_2d(
            x, w, b, activation="leaky_relu", residual=r, memory_efficient=me
        ),
    ),
    "layer_norm 8192x768": (
        (8192, 768),
        lambda x, w, b, r, me: nxF.layer_norm(
            x, (768,), w, b, activation="leaky_relu", residual=r, memory_efficient=me
        ),
    ),
}


def step(fn, x, w, b, r, dy, me):
    y = fn(x, w, b, r, me)
    return torch.autograd.grad(y, [t for t in (x, w, b, r) if t is not None], dy)


def timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def stack_bytes():
    def stack():
        layers = []
        for _ in range(4):
            layers += [nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.LeakyReLU(0.01)]
        return nn.Sequential(*layers)

    x = torch.randn(2, 32, 32, 32, requires_grad=True)
    models = {
        "torch": stack(),
        "normext fused": normext.convert_model(stack()),
        "normext memory_efficient": normext.convert_model(stack(), memory_efficient=True),
    }
    return {k: saved_bytes(lambda m=m: m(x)) for k, m in models.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--filter", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = stack_bytes()
    print("bytes kept for backward, 4 x (conv3x3 -> GroupNorm(8) -> LeakyReLU) at 2x32x32x32, float32:")
    for k, v in sizes.items():
        print(f"  {k:26s} {v / 2**20:7.2f} MiB  ({v / sizes['torch']:.2f} x torch)")
    print(f"forward+backward, memory_efficient / plain, {args.threads} thread(s), {args.rounds} rounds:")
    for name, (shape, fn) in CASES.items():
        if args.filter not in name:
            continue
        for residual in (False, True):
            x = torch.randn(shape, requires_grad=True)
            C = shape[1] if len(shape) > 2 else shape[-1]
            w = (torch.rand(C) + 0.5).requires_grad_()
            b = torch.randn(C).requires_grad_()
            r = torch.randn(shape, requires_grad=True) if residual else None
            dy = torch.randn(shape)
            times = {False: [], True: []}
            for me in (False, True):
                step(fn, x, w, b, r, dy, me)
            for _ in range(args.rounds):
                for me in (False, True):
                    args_ = (fn, x, w, b, r, dy, me)
                    times[me].append(timed(lambda a=args_: step(*a)))
            plain, eff = statistics.median(times[False]), statistics.median(times[True])
            label = name + (" +res" if residual else "")
            ms = f"plain {plain * 1e3:8.2f} ms  mem-eff {eff * 1e3:8.2f} ms"
            print(f"  {label:36s} {ms}  ratio {eff / plain:.3f}")


if __name__ == "__main__":
    main()
