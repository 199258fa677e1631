"""CPU BatchNorm side by side: normext vs torch, training forward+backward (running-stat update included),
plain BatchNorm and the ResNet-bottleneck chain BN -> + residual -> ReLU, NCHW and channels_last.

A and B alternate in rounds (A then B, then B then A, ...) so drift in machine load hits both; each round
times `iters` calls of each and the table reports the median of the per-round ratios torch / normext
(> 1: normext faster) with the median per-call times. --clock cpu times the calling thread's CPU time
instead of wall time (with --threads 1, that leaves out time the process waits for a core on a shared
machine). --keep-freed-memory tells glibc malloc to keep freed blocks (no trimming, mmap only above
32 MiB): otherwise whether a multi-MiB output lands on fresh, page-faulting memory depends on the
allocation history, which adds noise of the size of the differences measured, to both sides. Usage:
    python bench/cpu_batch_norm.py [--rounds 7] [--iters 5] [--dtype float32] [--threads N]
                                   [--clock wall|cpu] [--keep-freed-memory]
"""

import argparse
import ctypes
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


def time_calls(fn, iters, clock):
    t0 = clock()
    for _ in range(iters):
        fn()
    return (clock() - t0) / iters


def compare(ours, theirs, rounds, iters, clock):
    ours(), theirs()  # warm-up
    t_ours, t_theirs, ratios = [], [], []
    for r in range(rounds):
        order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        t = {fn: time_calls(fn, iters, clock) for fn in order}
        t_ours.append(t[ours])
        t_theirs.append(t[theirs])
        ratios.append(t[theirs] / t[ours])
    return statistics.median(t_ours), statistics.median(t_theirs), statistics.median(ratios)


def keep_freed_memory():
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_trim_threshold, 2**30) and libc.mallopt(m_mmap_threshold, 32 * 2**20)
    if not ok:
        raise RuntimeError("mallopt failed")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    p.add_argument("--keep-freed-memory", action="store_true")
    args = p.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, training fwd+bwd")
    rounds = f"median of {args.rounds} alternating rounds x {args.iters} calls"
    malloc = ", malloc keeps freed memory" if args.keep_freed_memory else ""
    print(f"{args.clock} time, {rounds}{malloc}; speedup = torch / normext\n")
    print("| shape | layout | op | normext ms | torch ms | speedup |")
    print("|---|---|---|---:|---:|---:|")
    for name, shape in SHAPES:
        for fmt in ("contiguous", "channels_last"):
            for fused in (False, True):
                ours, theirs = make_case(shape, dtype, fmt, fused)
                t_o, t_t, ratio = compare(ours, theirs, args.rounds, args.iters, clock)
                op = "BN+add+ReLU vs chain" if fused else "BN"
                dims = "x".join(map(str, shape))
                print(
                    f"| {name} {dims} | {fmt} | {op} | {t_o * 1e3:.2f} | {t_t * 1e3:.2f} | {ratio:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
