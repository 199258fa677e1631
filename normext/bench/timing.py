"""How the benchmark times: contenders measured in turn, round after round (A B C, B C A, ...), with the
median of per-round ratios as the speedup. Each call is bracketed by CUDA events on a GPU (a block's time:
the median of its calls), by the host clock on CPU (a block's time: its fastest call). Also the copy
roofline, the cache size to rotate inputs past, peak CUDA memory and a steady CPU allocator."""

import ctypes
import ctypes.util
import math
import statistics
import time

import torch


class CudaClock:
    """Per-call times from CUDA events recorded around each call on the current stream; a block's time is
    the median of its calls."""

    device_type = "cuda"
    name = "CUDA events"
    statistic = "median"
    reduce = staticmethod(statistics.median)

    def sync(self):
        torch.cuda.synchronize()

    def block(self, fn, n):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for start, end in zip(starts, ends, strict=True):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends, strict=True)]


class CpuClock:
    """Per-call host times (wall: time.perf_counter around each call; cpu: time.process_time, the CPU
    time of all the process's threads, which leaves out the time a single-threaded run waits for a core
    on a shared machine); a block's time is its fastest call. On a shared machine other processes only
    ever add time: a descheduled worker thread stalls a parallel region for milliseconds, which a block
    mean (what torch.utils.benchmark's Timer reports) or even a median charges to whichever contender
    ran then."""

    device_type = "cpu"
    statistic = "min"
    reduce = staticmethod(min)
    CLOCKS = {
        "wall": ("time.perf_counter", time.perf_counter),
        "cpu": ("time.process_time", time.process_time),
    }

    def __init__(self, kind="wall"):
        self.kind = kind
        self.name, self.clock = self.CLOCKS[kind]

    def sync(self):
        pass

    def block(self, fn, n):
        clock = self.clock
        times = []
        for _ in range(n):
            start = clock()
            fn()
            times.append(clock() - start)
        return times


def steady_allocator():
    """Pins glibc malloc's thresholds so that freed tensor memory stays in the heap. By default glibc moves
    its mmap threshold as blocks are freed and trims the heap top, so whether each call's tensors come
    with fresh page faults depends on the allocation history: one contender's time moved 8x between two
    runs of this suite. Returns what was set (None where this is not glibc)."""
    settings = {  # name: (mallopt parameter, value); 32 MiB is the largest mmap threshold glibc takes
        "M_TRIM_THRESHOLD": (-1, (1 << 31) - 1),
        "M_MMAP_THRESHOLD": (-3, 32 << 20),
    }
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    applied = {name: value for name, (param, value) in settings.items() if mallopt(param, value) == 1}
    return applied or None


def clock_for(device, kind="wall"):
    """The clock of a device: CUDA events on a GPU; on the CPU the `kind` (wall or cpu) of CpuClock."""
    return CudaClock() if device.type == "cuda" else CpuClock(kind)


def _calls_per_block(clock, fn, min_block_s, max_calls):
    """Warms fn up and sizes its blocks from the fastest of up to 5 calls (fewer when one call already
    fills a block), so that a stalled call does not shrink the blocks."""
    fn()
    clock.sync()
    times = []
    while len(times) < 5 and sum(times) < min_block_s:
        times += clock.block(fn, 1)
    return max(1, min(max_calls, math.ceil(min_block_s / max(min(times), 1e-7))))


def compare(clock, fns, rounds, min_block_s, max_calls=200):
    """Times every contender in `fns` (name -> zero-argument callable) for `rounds` rounds, each round
    one block per contender in a rotated order. Blocks hold enough calls to last about `min_block_s`.
    The first contender is the one the others are compared with.

    Returns {name: {"calls_per_block", "samples_us" (every call, 4 significant digits: more than the
    clocks resolve), "block_s" (each block's time, clock.statistic of its calls), "time_s" (the median of
    block_s)}} and, for every other contender, {name: per-round ratios time(name) / time(first)}."""
    names = list(fns)
    calls = {name: _calls_per_block(clock, fns[name], min_block_s, max_calls) for name in names}
    samples = {name: [] for name in names}
    blocks = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times = clock.block(fns[name], calls[name])
            samples[name] += times
            blocks[name].append(clock.reduce(times))
    result = {
        name: {
            "calls_per_block": calls[name],
            "samples_us": [float(f"{t * 1e6:.4g}") for t in samples[name]],
            "block_s": blocks[name],
            "time_s": statistics.median(blocks[name]),
        }
        for name in names
    }
    first = blocks[names[0]]
    ratios = {name: [b / a for a, b in zip(first, blocks[name], strict=True)] for name in names[1:]}
    return result, ratios


def copy_bandwidth(device, clock, nbytes, rounds, min_block_s):
    """Bytes per second of dst.copy_(src) on a large tensor (bytes read plus bytes written): the roofline."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timed, _ = compare(clock, {"copy": lambda: dst.copy_(src)}, rounds, min_block_s)
    seconds = timed["copy"]["time_s"]
    return {
        "bytes_moved": 2 * src.numel() * 4,
        "time_s": seconds,
        "samples_us": timed["copy"]["samples_us"],
        "bytes_per_s": 2 * src.numel() * 4 / seconds,
    }


def cache_bytes(device):
    """The last-level cache inputs must be rotated past: the GPU's L2, or the CPU's largest cache."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 << 20
    largest = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            break
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        largest = max(largest, int(text.rstrip("KMG")) * scale)
    return largest or 32 << 20


def peak_memory(fn, *args):
    """Peak CUDA memory that one call fn(*args) allocates beyond what was allocated before it (its
    results are dropped when it returns)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
