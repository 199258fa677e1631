"""CPU BatchNorm side by side: normext vs torch, training forward+backward (running-stat update included),
plain BatchNorm and the ResNet-bottleneck chain BN -> + residual -> ReLU, NCHW and channels_last.

A and B alternate in rounds (A then B, then B then A, ...) so drift in machine load hits both; each round
times `iters` calls of each and the table reports the median of the per-round ratios torch / normext
(> 1: normext faster) with the median per-call times. Usage:
    python bench/cpu_batch_norm.py [--rounds 7] [--iters 5] [--dtype float32] [--threads N]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import normext.functional as nxF

# Design §6's CPU suite: the GPU shapes scaled down so a 2-core machine finishes in minutes.
SHAPES = [
    ("DeepLab 256ch", (2, 256, 64, 64)),
    ("DeepLab 2048ch", (2, 2048, 16, 16)),
    ("ResNet stem", (2, 64, 112, 112)),
    ("RoI head", (256, 256, 7, 7)),
]


def make_case(shape, dtype, fmt, fused):
    C = shape[1]
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=mf).requires_grad_()
    res = torch.randn(shape, dtype=dtype).contiguous(memory_format=mf).requires_grad_() if fused else None
    w = torch.rand(C, requires_grad=True)
    b = torch.randn(C, requires_grad=True)
    dy = torch.randn(shape, dtype=dtype).contiguous(memory_format=mf)
    rm, rv = torch.zeros(C), torch.ones(C)
    inputs = [t for t in (x, w, b, res) if t is not None]

    def ours():
        y = nxF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, "relu" if fused else None, residual=res)
        return torch.autograd.grad(y, inputs, dy)

    def theirs():
        y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        if fused:
            y = F.relu(y + res)
        return torch.autograd.grad(y, inputs, dy)

    return ours, theirs


def time_calls(fn, iters):
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def compare(ours, theirs, rounds, iters):
    ours(), theirs()  # warm-up
    t_ours, t_theirs, ratios = [], [], []
    for r in range(rounds):
        order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        t = {fn: time_calls(fn, iters) for fn in order}
        t_ours.append(t[ours])
        t_theirs.append(t[theirs])
        ratios.append(t[theirs] / t[ours])
    return statistics.median(t_ours), statistics.median(t_theirs), statistics.median(ratios)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, training fwd+bwd, ")
    print(f"median of {args.rounds} alternating rounds x {args.iters} calls; speedup = torch / normext\n")
    print("| shape | layout | op | normext ms | torch ms | speedup |")
    print("|---|---|---|---:|---:|---:|")
    for name, shape in SHAPES:
        for fmt in ("contiguous", "channels_last"):
            for fused in (False, True):
                ours, theirs = make_case(shape, dtype, fmt, fused)
                t_o, t_t, ratio = compare(ours, theirs, args.rounds, args.iters)
                op = "BN+add+ReLU vs chain" if fused else "BN"
                dims = "x".join(map(str, shape))
                print(f"| {name} {dims} | {fmt} | {op} | {t_o * 1e3:.2f} | {t_t * 1e3:.2f} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
