"""What the benchmark shows and keeps: the environment, a progress bar, the terminal table with per-norm
geometric means and peak memory, the JSON document with every raw number, and the PNG chart."""

import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import normext
from normext.info import build_info

SCHEMA = "normext-bench/1"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git():
    root = Path(normext.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def environment(device, quick, effort, clock, compile_baseline):
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev = {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "cudnn": torch.backends.cudnn.version(),
            "tf32": {
                "matmul": torch.backends.cuda.matmul.allow_tf32,
                "cudnn": torch.backends.cudnn.allow_tf32,
            },
        }
    else:
        dev = {"type": "cpu", "name": _cpu_name(), "cores": os.cpu_count()}
    rounds, min_block = effort
    return {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "suite": "quick" if quick else "full",
        "device": dev,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "normext": {k: str(v) for k, v in build_info().items()},
        "git": _git(),
        "method": {
            "rounds": rounds,
            "min_block_s": min_block,
            "clock": clock.name,
            "statistic": f"every call timed; a block's time is the {clock.statistic} of its calls; a "
            "contender's time_s is the median of its block times",
            "order": "contenders timed in turn each round, order rotated per round; speedup = median of "
            "per-round ratios time(other) / time(normext)",
            "inputs": "rotated among sets in separate memory (copies of one random draw) totalling at least "
            "twice the last-level cache",
            "check": "once per variant: normext's output and input gradient against torch's in float32, "
            "within twice torch's own error in the dtype plus a tolerance",
            "bytes": "forward 2*numel*size, backward 3*numel*size, a fused residual adds numel*size per pass",
            "roofline": "copy_ of a large tensor (bytes read + written), before and after the cases; the "
            "higher is used",
            "compile": compile_baseline,
        },
    }


def print_header(env, stream):
    dev = env["device"]
    if dev["type"] == "cuda":
        name = (
            f"{dev['name']} (sm_{dev['capability'].replace('.', '')}, {dev['multiprocessors']} SMs, "
            f"L2 {(dev['l2_bytes'] or 0) >> 20} MiB, cuDNN {dev['cudnn']})"
        )
    else:
        name = f"{dev['name']} ({dev['cores']} cores)"
    print(f"normext bench ({env['suite']} {dev['type'].upper()} suite) on {name}", file=stream)
    print(
        f"  threads {env['threads']} | torch {env['torch']} | CUDA {env['cuda'] or '-'} | normext CUDA "
        f"kernels {env['normext']['normext CUDA kernels']} | git {(env['git']['commit'] or '-')[:10]}"
        f"{' (dirty)' if env['git']['dirty'] else ''}",
        file=stream,
    )
    load = env["load_average"]
    if load and load[0] > 0.5:
        print(
            f"  warning: load average {load[0]:.1f} before starting: other processes compete for the cores"
            + (
                "; a parallel region then waits for the scheduler to run each of its threads (whole "
                "milliseconds), so prefer an idle machine or --threads 1"
                if dev["type"] == "cpu" and env["threads"] > 1
                else ""
            ),
            file=stream,
        )


class Progress:
    """tqdm when it is installed; otherwise a one-line bar on a terminal and a line per 10% elsewhere."""

    def __init__(self, total):
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True)

    def step(self, name):
        if self.bar is not None:
            if self.done:
                self.bar.update(1)
            self.bar.set_postfix_str(name)
            self.done += 1
            return
        elapsed = time.perf_counter() - self.started
        left = f" ~{_clock(elapsed / self.done * (self.total - self.done))} left" if self.done else ""
        line = f"[{self.done}/{self.total}] {_clock(elapsed)}{left}  {name}"
        if self.tty:
            width = 24
            filled = width * self.done // max(self.total, 1)
            sys.stderr.write(f"\r\x1b[K[{'#' * filled}{'.' * (width - filled)}] {line}"[:160])
            sys.stderr.flush()
        elif self.done * 10 // max(self.total, 1) != (self.done - 1) * 10 // max(self.total, 1):
            print(line, file=sys.stderr, flush=True)
        self.done += 1

    def close(self):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _clock(seconds):
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def headline(result):
    """The speedup against torch's way of computing the same thing: the unfused chain for fused variants
    and stacks, the native op otherwise."""
    speedup = result.get("speedup", {})
    return speedup.get("chain", speedup.get("native"))


# The baselines every summary reports, as named in the result's "speedup": torch's op alone (eager), the
# unfused eager chain (fused variants and stacks), torch.compile of the same native computation.
BASELINES = ("native", "chain", "compile")
PASSES = ("fwd", "fwd+bwd")


def group_key(result):
    """The summary group of a variant: its norm, with stacks apart."""
    return f"{result['norm']} stacks" if result["layers"] else result["norm"]


def _speedups(rs):
    """{baseline: {pass: geometric mean or None}} over results `rs`, and the slowest variant: the lowest
    speedup against any baseline, as {"name", "baseline", "speedup"} (None when nothing was measured)."""
    means = {
        b: {p: _geomean([r["speedup"].get(b) for r in rs if r["pass"] == p]) for p in PASSES}
        for b in BASELINES
    }
    worst = min(
        ((v, r["name"], b) for r in rs for b, v in r["speedup"].items() if b in BASELINES and v),
        default=None,
    )
    slowest = None if worst is None else {"name": worst[1], "baseline": worst[2], "speedup": worst[0]}
    return means, slowest


def summarize(results):
    """Per norm (stacks apart): geometric-mean headline speedup, overall and per pass, the geometric mean
    against each baseline per pass ("vs") and the slowest variant."""
    groups = {}
    for r in results:
        if "error" not in r:
            groups.setdefault(group_key(r), []).append(r)
    summary = {}
    for key, rs in groups.items():
        means, slowest = _speedups(rs)
        summary[key] = {
            "variants": len(rs),
            "geomean_speedup": _geomean([headline(r) for r in rs]),
            "geomean_speedup_fwd": _geomean([headline(r) for r in rs if r["pass"] == "fwd"]),
            "geomean_speedup_fwd_bwd": _geomean([headline(r) for r in rs if r["pass"] == "fwd+bwd"]),
            "vs": means,
            "slowest": slowest,
        }
    return summary


def summary_grid(results):
    """The chart's rows: per norm (stacks apart) x dtype x layout, in the results' order, the geometric
    mean against each baseline per pass ({baseline: {pass: value}}), the variant count and the slowest
    variant."""
    groups = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((group_key(r), r["dtype"], r["layout"]), []).append(r)
    rows = []
    for (key, dtype, layout), rs in groups.items():
        means, slowest = _speedups(rs)
        rows.append(
            {
                "group": key,
                "dtype": dtype,
                "layout": layout,
                "variants": len(rs),
                "vs": means,
                "slowest": slowest,
            }
        )
    return rows


def document(env, roofline, results, notes, seconds, complete=True):
    for r in results:
        if "bytes_per_s" in r:
            r["roofline_fraction"] = {k: v / roofline["bytes_per_s"] for k, v in r["bytes_per_s"].items()}
    return {
        **env,
        "roofline": roofline,
        "notes": list(notes),
        "summary": summarize(results),
        "summary_grid": summary_grid(results),
        "results": results,
        "wall_s": seconds,
        "complete": complete,
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g}ms"
    return f"{seconds:.3g}s"


def _fmt_x(value):
    return "-" if value is None else f"{value:.2f}x"


def _compile_cell(result):
    """The compile baseline's time, or why there is none: off (--no-compile), failed, timeout."""
    if "compile" in result["timings"]:
        return _fmt_time(result["timings"]["compile"]["time_s"])
    record = result.get("compile", {}).get("compile")
    return "off" if record is None else record["status"]


def compile_lines(doc):
    """Why a compile baseline is missing (one line per variant that failed or ran out of time), and the
    stacks trained under torch.compile: torch.nn modules against normext's, both compiled."""
    if not doc["method"]["compile"]["enabled"]:
        return ["torch.compile baseline: off (--no-compile)"]
    lines = []
    for r in doc["results"]:
        for name, record in r.get("compile", {}).items():
            if record["status"] != "ok":
                lines.append(f"torch.compile {record['status']} ({name}) in {r['name']}: {record['error']}")
    stacks = [r for r in doc["results"] if "speedup_compiled" in r]
    if stacks:
        lines.append(
            "stacks, one training step, both compiled: torch.compile(torch.nn model) vs "
            "torch.compile(normext model)"
        )
        for r in stacks:
            torch_s, ours_s = (r["timings"][k]["time_s"] for k in ("compile", "normext_compiled"))
            lines.append(
                f"  {r['name']:44s} torch {_fmt_time(torch_s):>8s}  normext {_fmt_time(ours_s):>8s}  "
                f"{_fmt_x(r['speedup_compiled']):>6s}"
            )
    seconds = [rec["seconds"] for r in doc["results"] for rec in r.get("compile", {}).values()]
    if seconds:
        lines.append(
            f"compile time (excluded from the timings): {sum(seconds):.0f} s over {len(seconds)} compiles, "
            f"longest {max(seconds):.0f} s, limit {doc['method']['compile']['timeout_s']:g} s per variant"
        )
    return lines


def _fmt_bytes(n):
    return f"{n / (1 << 20):.1f}"


def table_lines(doc):
    """The terminal table as a list of lines (also what the README takes)."""
    columns = (
        "case",
        "shape",
        "dtype",
        "layout",
        "pass",
        "normext",
        "native",
        "x native",
        "chain",
        "x chain",
        "compile",
        "x compile",
    )
    columns += ("GB/s", "% roof", "check")
    rows = []
    for r in doc["results"]:
        if "error" in r:
            rows.append((r["case"], "", *r["name"].split("/")[1:], "error: " + r["error"][:80]))
            continue
        timed, speedup = r["timings"], r["speedup"]
        rows.append(
            (
                r["case"],
                "x".join(map(str, r["shape"])),
                r["name"].split("/")[1],
                r["layout"],
                r["pass"],
                _fmt_time(timed["normext"]["time_s"]),
                _fmt_time(timed.get("native", {}).get("time_s")),
                _fmt_x(speedup.get("native")),
                _fmt_time(timed.get("chain", {}).get("time_s")),
                _fmt_x(speedup.get("chain")),
                _compile_cell(r),
                _fmt_x(speedup.get("compile")),
                f"{r['bytes_per_s']['normext'] / 1e9:.1f}" if "bytes_per_s" in r else "-",
                f"{100 * r['roofline_fraction']['normext']:.0f}" if "roofline_fraction" in r else "-",
                "ok" if r["check"]["ok"] else f"DIFF {r['check']['rel_err']['normext']:.1e}",
            )
        )
    full = [row for row in rows if len(row) == len(columns)]
    widths = [max([len(c)] + [len(str(row[i])) for row in full]) for i, c in enumerate(columns)]
    right = {5, 6, 7, 8, 9, 10, 11, 12, 13}

    def line(cells):
        if len(cells) < len(columns):  # an error row: the message spans the rest
            head = "  ".join(str(c).ljust(widths[i]) for i, c in enumerate(cells[:-1]))
            return f"{head}  {cells[-1]}"
        padded = [
            str(c).rjust(widths[i]) if i in right else str(c).ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(padded).rstrip()

    return [line(columns), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]


CPU_ROOF_NOTE = (
    "% roof can pass 100 on CPU: each call's output lands in a just-freed, cache-resident buffer, "
    "while the copy streams both its tensors through memory"
)


def roofline_lines(doc):
    roof = doc["roofline"]
    gbps = {k: roof[k]["bytes_per_s"] / 1e9 for k in ("before", "after")}
    lines = [
        f"roofline: copy_ {roof['bytes_per_s'] / 1e9:.1f} GB/s (before the cases {gbps['before']:.1f}, after "
        f"{gbps['after']:.1f}; {roof['before']['bytes_moved'] >> 20} MiB read+written per copy)",
        "x native / x chain / x compile: time(torch) / time(normext), the median of per-round ratios; "
        "native = torch's op for the norm alone, chain = torch's norm, add, activation (stacks: torch "
        "modules), compile = torch.compile of the chain (of the op when unfused; stacks: of the torch model)",
    ]
    return lines + ([CPU_ROOF_NOTE] if doc["device"]["type"] == "cpu" else [])


def case_lines(doc):
    """One line per suite case: the geometric-mean headline speedup over its dtypes and layouts per pass,
    the same against torch.compile, and normext's median % of the roofline (the short table for a
    README)."""
    cases = {}
    for r in doc["results"]:
        if "error" not in r:
            cases.setdefault(r["case"], []).append(r)
    head = (
        f"{'case':26s} {'norm':14s} {'shape':>16s} {'fwd':>7s} {'fwd+bwd':>7s} {'compile fwd':>11s} "
        f"{'fwd+bwd':>7s} {'% roof':>6s}"
    )
    lines = [head, "-" * len(head)]
    for name, rs in cases.items():
        speed = {p: _geomean([headline(r) for r in rs if r["pass"] == p]) for p in PASSES}
        comp = {p: _geomean([r["speedup"].get("compile") for r in rs if r["pass"] == p]) for p in PASSES}
        roofs = sorted(100 * r["roofline_fraction"]["normext"] for r in rs if "roofline_fraction" in r)
        roof = f"{roofs[len(roofs) // 2]:.0f}" if roofs else "-"
        shape = "x".join(map(str, rs[0]["shape"]))
        lines.append(
            f"{name:26s} {rs[0]['norm']:14s} {shape:>16s} {_fmt_x(speed['fwd']):>7s} "
            f"{_fmt_x(speed['fwd+bwd']):>7s} {_fmt_x(comp['fwd']):>11s} {_fmt_x(comp['fwd+bwd']):>7s} "
            f"{roof:>6s}"
        )
    return lines


def _slowest_text(slowest):
    if slowest is None:
        return "-"
    return f"{slowest['name']} {_fmt_x(slowest['speedup'])} vs {slowest['baseline']}"


def summary_lines(doc):
    """Per norm: the geometric means against every baseline per pass, and the slowest variant."""
    head = f"{'geomean speedup':22s} {'variants':>8s}  " + "  ".join(
        f"{p + ' vs ' + b:>18s}" for p in PASSES for b in BASELINES
    )
    lines = [head]
    for key, s in doc["summary"].items():
        cells = "  ".join(f"{_fmt_x(s['vs'][b][p]):>18s}" for p in PASSES for b in BASELINES)
        lines.append(f"{key:22s} {s['variants']:8d}  {cells}")
    lines.append("slowest variant per norm (lowest speedup against any baseline):")
    lines += [f"  {key:22s} {_slowest_text(s['slowest'])}" for key, s in doc["summary"].items()]
    return lines


def memory_lines(doc):
    rows = [r for r in doc["results"] if "peak_memory_bytes" in r]
    if doc["device"]["type"] != "cuda":
        return [
            "peak memory of a training step: not measured (CPU run; torch.cuda.max_memory_allocated only)"
        ]
    if not rows:
        return ["peak memory of a training step: no fused variant or stack in this run"]
    lines = ["peak memory of one training step (fwd+bwd), MiB beyond the inputs:"]
    lines.append(
        f"  {'variant':52s} {'normext':>9s} {'native op':>9s} {'chain':>9s} {'compile':>9s} {'saved':>6s}"
    )
    for r in rows:
        peak = r["peak_memory_bytes"]
        saved = 1 - peak["normext"] / peak["chain"] if peak.get("chain") else None
        cells = [_fmt_bytes(peak[k]) if k in peak else "-" for k in ("normext", "native", "chain", "compile")]
        lines.append(
            f"  {r['name']:52s} " + " ".join(f"{c:>9s}" for c in cells) + f" "
            f"{'-' if saved is None else f'{100 * saved:.0f}%':>6s}"
        )
    return lines


def saved_lines(doc):
    """The "saved MB" column of the training-step stacks: bytes the autograd graph keeps for backward."""
    rows = [r for r in doc["results"] if "saved_bytes" in r]
    if not rows:
        return []
    lines = ["kept for backward by one training step (saved MB, distinct storages of the saved tensors):"]
    lines.append(f"  {'variant':52s} {'normext':>9s} {'mem-eff':>9s} {'chain':>9s}")
    for r in rows:
        b = r["saved_bytes"]
        names = ("normext", "normext_memory_efficient", "chain")
        cells = [_fmt_bytes(b[k]) if k in b else "-" for k in names]
        lines.append(f"  {r['name']:52s} " + " ".join(f"{c:>9s}" for c in cells))
    return lines


def print_results(doc, stream):
    print(file=stream)
    print("\n".join(table_lines(doc)), file=stream)
    print(file=stream)
    print("\n".join(roofline_lines(doc)), file=stream)
    print(file=stream)
    print("\n".join(case_lines(doc)), file=stream)
    print(file=stream)
    print("\n".join(compile_lines(doc)), file=stream)
    print(file=stream)
    print("\n".join(summary_lines(doc)), file=stream)
    print("\n".join(memory_lines(doc) + saved_lines(doc)), file=stream)
    failed = [r["name"] for r in doc["results"] if "check" in r and not r["check"]["ok"]]
    if failed:
        print(
            f"WARNING: normext differs from torch beyond the sanity tolerance in: {', '.join(failed)}",
            file=stream,
        )
    print(f"{len(doc['results'])} variants in {_clock(doc['wall_s'])}", file=stream)


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def file_stem(doc):
    dev = doc["device"]
    stamp = doc["date"][:16].replace(":", "").replace("-", "").replace("T", "-")
    threads = f"-{doc['threads']}t" if dev["type"] == "cpu" else ""
    return f"{dev['type']}-{_slug(dev['name'])}{threads}-{stamp}{'-quick' if doc['suite'] == 'quick' else ''}"


def _compact_number_lists(text):
    """One line per list of numbers (the raw samples), so the JSON stays readable and small."""
    return re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]", lambda m: "[" + re.sub(r"\s+", "", m.group(1)) + "]", text)


def write_json(doc, out_dir):
    """Writes <stem>.json (also after each variant, with "complete": false, so that a run stopped by a
    time limit leaves what it measured); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = (out_dir / file_stem(doc)).with_suffix(".json")
    path.write_text(_compact_number_lists(json.dumps(doc, indent=1)) + "\n")
    return path


def write(doc, out_dir, stream):
    """Writes <stem>.json and <stem>.png (the PNG only when matplotlib is installed) and the table as
    <stem>.txt; returns the paths written."""
    stem = out_dir / file_stem(doc)
    paths = [write_json(doc, out_dir), stem.with_suffix(".txt")]
    text = table_lines(doc) + [""] + roofline_lines(doc) + [""] + case_lines(doc) + [""]
    text += compile_lines(doc) + [""] + summary_lines(doc) + memory_lines(doc) + saved_lines(doc)
    paths[1].write_text("\n".join(text) + "\n")
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG chart (pip install matplotlib)", file=stream)
        return paths
    if not any("error" not in r for r in doc["results"]):
        print("no variant was measured: no PNG chart", file=stream)
        return paths
    matplotlib.use("Agg")
    paths.append(chart(doc, stem.with_suffix(".png")))
    return paths


def chart(doc, path):
    """The summary at a glance: one row per norm x dtype x layout, one cell per pass and baseline holding
    the geometric-mean speedup (green: normext faster, red: slower, log colour scale clipped at 4x), and
    the row's slowest variant named on the right. Every variant's numbers stay in the JSON and table."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = doc["summary_grid"]
    columns = [(p, b) for p in PASSES for b in BASELINES]
    values = np.array(
        [[np.nan if row["vs"][b][p] is None else row["vs"][b][p] for p, b in columns] for row in rows],
        dtype=float,
    )
    top, bottom = 1.4, 0.5  # inches of title and column labels above, margin below
    fig = plt.figure(figsize=(12, 0.3 * len(rows) + top + bottom))
    height = fig.get_figheight()  # 3 inches of row labels, 5 of cells, 4 for the slowest variants
    ax = fig.add_axes((0.25, bottom / height, 0.42, 1 - (top + bottom) / height))
    ax.imshow(np.log2(values), cmap="RdYlGn", vmin=-2, vmax=2, aspect="auto", interpolation="nearest")
    ax.set_facecolor("0.9")  # no such baseline for the row (e.g. no fused variant: no chain)
    for i, j in np.ndindex(values.shape):
        text = "-" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}x"
        ax.text(j, i, text, ha="center", va="center", fontsize=8)
    labels = [f"{row['group']} {row['dtype']} {row['layout']} ({row['variants']})" for row in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xticks(range(len(columns)), [f"{p}\nvs {b}" for p, b in columns], fontsize=8)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False)
    ax.axvline(len(BASELINES) - 0.5, color="black", linewidth=1.5)
    for i, row in enumerate(rows):
        ax.text(len(columns) - 0.3, i, _slowest_text(row["slowest"]), va="center", fontsize=7)
    ax.text(len(columns) - 0.3, -1.1, "slowest variant", fontsize=8, weight="bold")
    dev = doc["device"]
    fig.suptitle(
        f"normext bench ({doc['suite']}): {dev['name']}, {dev['type']}, {doc['threads']} thread(s), "
        f"torch {doc['torch']}, {doc['date'][:10]}\ngeometric-mean speedup time(torch) / time(normext) "
        "per norm x dtype x layout (variants); > 1: normext faster",
        y=1 - 0.1 / height,
        va="top",
        fontsize=10,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
