"""CPU side-by-side timing of normext LayerNorm / LayerNorm2d against torch: F.layer_norm for rows, and the
permute -> F.layer_norm -> permute chain (timm / detectron2) for LayerNorm2d, forward and forward+backward.

CPU times on a shared machine drift between runs, so each case alternates A and B rounds (the order flips
every round) and reports the median of the per-round ratios normext / torch (< 1: normext is faster).

    PYTHONPATH=. .venv/bin/python bench/cpu_layer_norm.py [--rounds R] [--min-time S] [--threads N] [--quick]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import normext.functional as nxF

ROWS = [(8192, 768), (4096, 1024), (512, 4096)]
CHANNELS = [(2, 768, 32, 32), (2, 192, 56, 56), (8, 96, 56, 56)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def permute_chain(x, w, b, eps):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


def make_step(fn, x, w, b, backward):
    if not backward:

        def step():
            with torch.no_grad():
                fn(x, w, b)

        return step
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
    dy = torch.randn_like(fn(x, w, b))

    def step():
        xs.grad = ws.grad = bs.grad = None
        fn(xs, ws, bs).backward(dy)

    return step


def time_per_call(step, iters):
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def compare(ours, theirs, rounds, min_time):
    for step in (ours, theirs):  # warm up (allocator, first-call dispatch)
        step()
        step()
    t0 = time_per_call(theirs, 1)
    iters = max(1, int(min_time / max(t0, 1e-7)))
    ratios, t_ours, t_theirs = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            a = time_per_call(ours, iters)
            b = time_per_call(theirs, iters)
        else:
            b = time_per_call(theirs, iters)
            a = time_per_call(ours, iters)
        ratios.append(a / b)
        t_ours.append(a)
        t_theirs.append(b)
    return statistics.median(t_ours), statistics.median(t_theirs), statistics.median(ratios)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per A or B timing")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="first shape of each family only")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = ROWS[:1] if args.quick else ROWS
    channels = CHANNELS[:1] if args.quick else CHANNELS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} alternating rounds")
    print(f"{'case':44s} {'pass':8s} {'normext ms':>10s} {'torch ms':>10s} {'ratio':>6s}")
    cases = []
    for M, D in rows:
        for dname, dtype in DTYPES.items():
            x = torch.randn(M, D, dtype=dtype)
            w, b = torch.randn(D, dtype=dtype), torch.randn(D, dtype=dtype)
            cases.append(
                (
                    f"LayerNorm {M}x{D} {dname}",
                    x,
                    w,
                    b,
                    lambda x, w, b: nxF.layer_norm(x, (x.shape[-1],), w, b),
                    lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
                )
            )
    for shape in channels:
        for fmt, mf in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            for dname, dtype in DTYPES.items():
                x = torch.randn(shape, dtype=dtype).contiguous(memory_format=mf)
                w, b = torch.randn(shape[1], dtype=dtype), torch.randn(shape[1], dtype=dtype)
                cases.append(
                    (
                        f"LayerNorm2d {'x'.join(map(str, shape))} {fmt} {dname}",
                        x,
                        w,
                        b,
                        lambda x, w, b: nxF.layer_norm_2d(x, w, b, 1e-6),
                        lambda x, w, b: permute_chain(x, w, b, 1e-6),
                    )
                )
    for name, x, w, b, ours, theirs in cases:
        for backward in (False, True):
            a, t, ratio = compare(
                make_step(ours, x, w, b, backward),
                make_step(theirs, x, w, b, backward),
                args.rounds,
                args.min_time,
            )
            what = "fwd+bwd" if backward else "fwd"
            print(f"{name:44s} {what:8s} {a * 1e3:10.3f} {t * 1e3:10.3f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
