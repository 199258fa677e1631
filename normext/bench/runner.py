"""Runs the benchmark: `python -m normext.bench [--quick] [--filter RE] [--out DIR]`. For each variant it
builds rotating input sets, checks normext against the native chain once, compiles the native
computation with torch.compile (unless --no-compile), times normext / native op / unfused native chain /
compiled native in alternating rounds, and on CUDA records each one's peak training-step memory."""

import argparse
import contextlib
import functools
import gc
import itertools
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from normext.bench import report
from normext.bench.cases import DTYPES, LAYOUTS, NATIVE_ACT_MODULE, NORMS, SUITE, native_chain, select
from normext.bench.memory import stack_saved_bytes
from normext.bench.timing import (
    cache_bytes,
    clock_for,
    compare,
    copy_bandwidth,
    peak_memory,
    steady_allocator,
)

# Timing effort per device: rounds of A/B/C blocks, and the shortest block. --quick uses the second row.
EFFORT = {
    "cuda": {"full": (7, 0.01), "quick": (5, 0.005)},
    "cpu": {"full": (7, 0.01), "quick": (5, 0.006)},
}
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}  # the roofline copy: far past any cache
MAX_SETS = 256  # input sets rotated through at most (tiny cases)
CHECK_TOL = {"f32": 1e-3, "bf16": 1e-2, "f16": 1e-2}  # sanity check only; tests/ holds the real proofs
# In a stack, an element whose pre-activation sits within rounding of a ReLU kink can take the other branch
# in one implementation, and the convolutions behind it spread that through the input gradient.
STACK_CHECK_TOL = 3e-2
# The torch.compile baseline: what a user who wants the chain fused reaches for first. Inductor generates
# C++/OpenMP kernels on the CPU and Triton kernels on a GPU; one compile per variant (dynamic=False, as the
# shapes are fixed), its time excluded from the timing and reported, and capped per variant.
COMPILE_TIMEOUT_S = 300
COMPILED = ("compile", "normext_compiled")  # the contenders that run under torch.compile


def _input_sets(variant, device, rotate_bytes, memory_cap):
    """Enough sets of (x, residual, dy), each in its own memory, to cycle past the last-level cache."""
    dtype = DTYPES[variant.dtype]
    fmt = LAYOUTS[variant.layout]
    case = variant.case
    per_set = variant.numel * variant.elem_size * (1 + variant.backward + (case.residual and not case.layers))
    count = max(1, min(MAX_SETS, math.ceil(rotate_bytes / per_set), memory_cap // per_set))

    def tensor(requires_grad=False):
        t = torch.randn(variant.shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
        return t.requires_grad_(requires_grad)

    first = {"x": tensor(variant.backward)}
    if case.residual and not case.layers:
        first["residual"] = tensor(variant.backward)
    if variant.backward:
        first["dy"] = tensor()
    # The other sets are copies: separate memory is what defeats the cache, and copying is much cheaper
    # than drawing tens of MiB of random numbers per variant.
    return [first] + [
        {k: t.detach().clone().requires_grad_(t.requires_grad) for k, t in first.items()}
        for _ in range(count - 1)
    ]


def _compiled(fn):
    # fullgraph: a graph break raises (the row then says so) instead of timing a half-eager baseline.
    return torch.compile(fn, dynamic=False, fullgraph=True)


def _norm_contenders(variant, device, compile_baseline=False):
    """name -> function of one input set, for a norm case: normext, the native op, the native chain, and
    torch.compile of the native chain (of the native op for an unfused case); and the chain in float32 as
    the reference for the sanity check."""
    case = variant.case
    norm = NORMS[case.norm]
    dtype = torch.float32 if norm.float32_params else DTYPES[variant.dtype]
    params = norm.params(variant.shape[norm.channel_dim], dtype, device)
    for name, p in params.items():
        p.requires_grad_(variant.backward and norm.trainable_params and name in ("weight", "bias"))
    params32 = {k: _upcast(p) for k, p in params.items()}

    def step(compute, params, with_residual=True):
        trainable = [p for p in params.values() if p.requires_grad]

        def run(s):
            residual = s.get("residual") if with_residual else None
            y = compute(case, s["x"], params, residual)
            # A prenorm op's outputs (out, sum): the gradient of both, the check on out.
            outputs = list(y) if isinstance(y, tuple) else [y]
            if not variant.backward:
                return outputs[0]
            wrt = [s["x"]] + ([residual] if residual is not None else []) + trainable
            return outputs[0], torch.autograd.grad(outputs, wrt, [s["dy"]] * len(outputs))

        return run

    contenders = {
        "normext": step(norm.normext, params),
        "native": step(lambda c, x, p, r: norm.native(c, x, p), params, with_residual=False),
    }
    if case.fused:
        contenders["chain"] = step(native_chain, params)
    if compile_baseline:
        compiled = _compiled(functools.partial(native_chain, case))
        contenders["compile"] = step(lambda c, x, p, r: compiled(x, p, r), params)
    return contenders, step(native_chain, params32)


def _stack_contenders(variant, device, compile_baseline=False):
    """name -> function of one input set, for a stack: layers x (norm + act, conv), one training step of a
    float32 model, under autocast for bfloat16/float16 (as mixed-precision training runs it). The input
    and the output are conv outputs, so all contenders see and produce the same dtype. With the compile
    baseline, both models also run under torch.compile: the torch.nn one ("compile") and the normext one
    ("normext_compiled", what torch.compile(convert_model(model)) gives). The reference is the native
    stack without autocast."""
    case = variant.case
    norm = NORMS[case.norm]
    channels = variant.shape[1]
    conv = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[len(variant.shape)]
    native_layers, normext_layers = [], []
    for _ in range(case.layers):
        conv_layer = conv(channels, channels, 3, padding=1, bias=False)
        normext_norm, native_norm = norm.modules(case, channels)
        normext_norm.load_state_dict(native_norm.state_dict())
        native_layers += [native_norm, NATIVE_ACT_MODULE[case.act](), conv_layer]
        normext_layers += [normext_norm, conv_layer]
    models = {"normext": torch.nn.Sequential(*normext_layers), "chain": torch.nn.Sequential(*native_layers)}
    dtype = DTYPES[variant.dtype]
    autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype)
    for model in models.values():
        model.to(device=device, memory_format=LAYOUTS[variant.layout]).train()
    if compile_baseline:
        models["compile"] = _compiled(models["chain"])
        models["normext_compiled"] = _compiled(models["normext"])
    contenders = {name: functools.partial(_train_step, model, autocast) for name, model in models.items()}
    return contenders, functools.partial(_train_step, models["chain"], contextlib.nullcontext())


def _train_step(model, autocast, s):
    with autocast:
        y = model(s["x"])
    return y, torch.autograd.grad(y, [s["x"], *model.parameters()], s["dy"])


def _upcast(t):
    return t.detach().float().requires_grad_(t.requires_grad)


def _rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(variant, contenders, reference, s):
    """A sanity check, not a proof (tests/ has those): the relative error of normext's output (and input
    gradient) against torch's computation in float32 must stay within twice torch's own error in the
    variant's dtype plus CHECK_TOL (STACK_CHECK_TOL for stacks)."""
    expected = reference({k: _upcast(t) for k, t in s.items()})
    errors = {}
    for name in ("normext", "chain" if "chain" in contenders else "native"):  # compiled ones: not here
        got = contenders[name](s)
        if variant.backward:
            errors[name] = max(_rel_err(got[0], expected[0]), _rel_err(got[1][0], expected[1][0]))
        else:
            errors[name] = _rel_err(got, expected)
    baseline = max(v for k, v in errors.items() if k != "normext")
    tol = STACK_CHECK_TOL if variant.case.layers else CHECK_TOL[variant.dtype]
    return {"rel_err": errors, "ok": bool(errors["normext"] <= 2 * baseline + tol)}


class _Deadline:
    """Interrupts the main thread (SIGALRM) once `seconds` have passed inside the `with` block, and says
    whether it did. torch.compile wraps what its code raises, so the flag, not the exception type, tells a
    timeout from a failure. Without SIGALRM or off the main thread it never fires."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.expired = False
        self.armed = (
            seconds is not None
            and hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread()
        )

    def _alarm(self, signum, frame):
        self.expired = True
        # Inductor catches some exceptions and carries on (a compile in the worker pool is retried in the
        # process): raise again every second until one gets out.
        signal.setitimer(signal.ITIMER_REAL, 1.0)
        raise TimeoutError(f"over the {self.seconds:g} s limit")

    def __enter__(self):
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


def _first_line(err):
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _warm_up_compiled(contenders, sets, clock, timeout_s):
    """Compiles each torch.compile contender by calling it on two input sets (forward and, in a training
    step, backward graphs; the second call shows that another set runs without recompiling) within
    `timeout_s`. A contender that fails or runs out of time is removed from `contenders`; the record says
    which happened. Returns {name: {"status": "ok" | "failed" | "timeout", "seconds", "error"?}}."""
    records = {}
    for name in [n for n in contenders if n in COMPILED]:
        deadline = _Deadline(timeout_s)
        started = time.perf_counter()
        try:
            with deadline:
                for s in (sets[0], sets[-1]):
                    contenders[name](s)
                clock.sync()
        except Exception as err:  # noqa: BLE001  (any compile error is reported in the row)
            del contenders[name]
            records[name] = {
                "status": "timeout" if deadline.expired else "failed",
                "seconds": time.perf_counter() - started,
                "error": f"over the {timeout_s:g} s limit" if deadline.expired else _first_line(err),
            }
            torch._dynamo.reset()  # an interrupted compile leaves nothing half-built for the next one
            continue
        records[name] = {"status": "ok", "seconds": time.perf_counter() - started}
    return records


def _round_ratios(timed, num, den):
    """Per-round ratios time(num) / time(den) from the block times of one compare()."""
    return [a / b for a, b in zip(timed[num]["block_s"], timed[den]["block_s"], strict=True)]


def run_variant(variant, device, clock, effort, rotate_bytes, memory_cap, compile_timeout_s=None):
    """Everything measured for one variant, as a JSON-ready dict. `compile_timeout_s` (None: no compile
    baseline) is the limit on compiling the torch.compile contenders."""
    case = variant.case
    result = {
        "name": variant.name,
        "case": case.name,
        "norm": case.norm,
        "shape": list(variant.shape),
        "dtype": str(DTYPES[variant.dtype]).removeprefix("torch."),
        "layout": variant.layout,
        "pass": variant.pass_name,
        "activation": case.act,
        "residual": case.residual,
        "layers": case.layers,
    }
    sets = _input_sets(variant, device, rotate_bytes, memory_cap)
    build = _stack_contenders if case.layers else _norm_contenders
    with_compile = compile_timeout_s is not None
    if with_compile:
        torch._dynamo.reset()  # each variant compiles afresh: no cache limit reached across variants
    contenders, reference = build(variant, device, with_compile)
    result["check"] = _check(variant, contenders, reference, sets[0])
    if with_compile:
        result["compile"] = _warm_up_compiled(contenders, sets, clock, compile_timeout_s)
    if device.type == "cuda" and (case.fused or case.layers) and variant.backward:
        result["peak_memory_bytes"] = {name: peak_memory(fn, sets[0]) for name, fn in contenders.items()}
    if case.layers and variant.backward:
        result["saved_bytes"] = stack_saved_bytes(contenders, sets[0])

    def rotating(fn):
        nxt = itertools.cycle(sets).__next__
        return lambda: fn(nxt())

    rounds, min_block = effort
    timed, ratios = compare(clock, {n: rotating(fn) for n, fn in contenders.items()}, rounds, min_block)
    result["input_sets"] = len(sets)
    result["load_average_1min"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result["timings"] = timed
    result["ratios"] = ratios
    result["speedup"] = {name: _median(r) for name, r in ratios.items()}
    if {"compile", "normext_compiled"} <= set(timed):
        # normext's modules under torch.compile against torch.nn's under torch.compile
        result["speedup_compiled"] = _median(_round_ratios(timed, "compile", "normext_compiled"))
    if not case.layers:
        moved = {"normext": variant.min_bytes(), "native": variant.min_bytes(residual=False)}
        moved["chain"] = moved["compile"] = moved["normext"]
        result["bytes"] = {name: moved[name] for name in timed}
        result["bytes_per_s"] = {name: moved[name] / t["time_s"] for name, t in timed.items()}
    return result


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def run(
    variants,
    device,
    out_dir,
    quick=False,
    effort=None,
    notes=(),
    stream=None,
    clock="wall",
    compile_timeout_s=COMPILE_TIMEOUT_S,
):
    """Measures `variants` on `device`, prints the table (to stdout by default) and writes JSON (and PNG
    if matplotlib is installed) under out_dir. `clock`: wall or cpu (CPU suite); `compile_timeout_s`:
    the per-variant limit on compiling the torch.compile baseline, None to leave that baseline out.
    Returns the result document."""
    stream = stream or sys.stdout
    device = torch.device(device)
    clock = clock_for(device, clock)
    effort = effort or EFFORT[device.type]["quick" if quick else "full"]
    compile_baseline = {
        "enabled": compile_timeout_s is not None,
        "timeout_s": compile_timeout_s,
        "how": "torch.compile(dynamic=False, fullgraph=True) of the native chain (the native op for unfused "
        "cases; the torch.nn model for stacks, and the normext one as normext_compiled), compiled on two "
        "input sets before the timing, so compile time is excluded (and recorded per variant)",
    }
    env = report.environment(device, quick, effort, clock, compile_baseline)
    env["malloc"] = steady_allocator() if device.type == "cpu" else None
    report.print_header(env, stream)
    for note in notes:
        print(f"note: {note}", file=stream)
    rotate_bytes = 2 * cache_bytes(device)
    if device.type == "cuda":
        memory_cap = torch.cuda.get_device_properties(device).total_memory // 4
    else:
        memory_cap = 4 << 30
    copy_bytes = COPY_BYTES[device.type]
    started = time.perf_counter()
    roofline = {"before": copy_bandwidth(device, clock, copy_bytes, *effort)}
    results = []
    progress = report.Progress(len(variants))
    for variant in variants:
        progress.step(variant.name)
        try:
            results.append(
                run_variant(variant, device, clock, effort, rotate_bytes, memory_cap, compile_timeout_s)
            )
        except (RuntimeError, ValueError, TypeError, AttributeError) as err:
            results.append(
                {
                    "name": variant.name,
                    "case": variant.case.name,
                    "norm": variant.case.norm,
                    "error": f"{type(err).__name__}: {str(err).splitlines()[0]}",
                }
            )
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        so_far = {**roofline, "bytes_per_s": roofline["before"]["bytes_per_s"]}
        elapsed = time.perf_counter() - started
        report.write_json(
            report.document(env, so_far, results, notes, elapsed, complete=False), Path(out_dir)
        )
    progress.close()
    roofline["after"] = copy_bandwidth(device, clock, copy_bytes, *effort)
    roofline["bytes_per_s"] = max(r["bytes_per_s"] for r in roofline.values())
    doc = report.document(env, roofline, results, notes, time.perf_counter() - started)
    report.print_results(doc, stream)
    paths = report.write(doc, Path(out_dir), stream)
    for path in paths:
        print(f"wrote {path}", file=stream)
    return doc


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m normext.bench",
        description="normext against torch native ops (cuDNN for BatchNorm on GPU) and the unfused native "
        "chain, on the measured copy roofline. GPU suite when a GPU is visible, CPU suite otherwise.",
    )
    parser.add_argument("--quick", action="store_true", help="a representative subset (float32/bfloat16)")
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="REGEX",
        help="run the variants whose name case/dtype/layout/pass matches the regular expression (searched, "
        "e.g. '^unet' or 'bf16/nhwc/fwd$'); repeatable, any match selects",
    )
    parser.add_argument("--out", default="bench/results", metavar="DIR", help="where JSON and PNG go")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="which suite (auto: cuda if visible)",
    )
    parser.add_argument("--list", action="store_true", help="print the selected variants and exit")
    parser.add_argument(
        "--threads",
        type=_thread_counts,
        metavar="N[,N...]",
        help="torch CPU threads (default: torch's, all cores); a list (e.g. 1,2) runs the suite once per "
        "count, each run with its own files",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="CPU suite: wall time, or the process's CPU time (time.process_time; with --threads 1 it "
        "leaves out the time spent waiting for a core on a shared machine)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time torch.compile of the native computation as a third baseline (default: on; compiling "
        "takes seconds per variant, see README)",
    )
    parser.add_argument(
        "--compile-timeout",
        type=float,
        default=COMPILE_TIMEOUT_S,
        metavar="S",
        help=f"per-variant limit on compiling that baseline; the row says when it ran out (default "
        f"{COMPILE_TIMEOUT_S})",
    )
    parser.add_argument("--rounds", type=int, help="rounds of alternating blocks (default per device)")
    parser.add_argument("--min-block", type=float, help="shortest timed block in seconds")
    return parser.parse_args(argv)


def _thread_counts(text):
    counts = [int(t) for t in text.split(",")]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be positive integers, got {text!r}")
    return counts


def main(argv=None, suite=SUITE):
    """Runs the command line; returns the result document (a list of them for several --threads)."""
    args = parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    variants, notes = select(suite, device, args.quick, args.filter)
    if args.list:
        for v in variants:
            print(v.name, "x".join(map(str, v.shape)))
        for note in notes:
            print(f"note: {note}")
        return None
    if not variants:
        print("no variant selected" + "".join(f"\nnote: {n}" for n in notes), file=sys.stderr)
        return None
    rounds, min_block = EFFORT[device]["quick" if args.quick else "full"]
    effort = (args.rounds or rounds, args.min_block or min_block)
    timeout = args.compile_timeout if args.compile else None
    docs = []
    for threads in args.threads or [None]:
        if threads:
            torch.set_num_threads(threads)
        docs.append(run(variants, device, args.out, args.quick, effort, notes, None, args.clock, timeout))
    return docs[0] if len(docs) == 1 else docs
