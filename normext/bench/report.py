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


def environment(device, quick, effort, clock_statistic):
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
            "clock": "CUDA events" if device.type == "cuda" else "time.perf_counter",
            "statistic": f"every call timed; a block's time is the {clock_statistic} of its calls; a "
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


def summarize(results):
    """Per norm (stacks apart): geometric-mean headline speedup, overall and per pass."""
    groups = {}
    for r in results:
        if "error" in r:
            continue
        key = f"{r['norm']} stacks" if r["layers"] else r["norm"]
        groups.setdefault(key, []).append(r)
    summary = {}
    for key, rs in groups.items():
        summary[key] = {
            "variants": len(rs),
            "geomean_speedup": _geomean([headline(r) for r in rs]),
            "geomean_speedup_fwd": _geomean([headline(r) for r in rs if r["pass"] == "fwd"]),
            "geomean_speedup_fwd_bwd": _geomean([headline(r) for r in rs if r["pass"] == "fwd+bwd"]),
        }
    return summary


def document(env, roofline, results, notes, seconds):
    for r in results:
        if "bytes_per_s" in r:
            r["roofline_fraction"] = {k: v / roofline["bytes_per_s"] for k, v in r["bytes_per_s"].items()}
    return {
        **env,
        "roofline": roofline,
        "notes": list(notes),
        "summary": summarize(results),
        "results": results,
        "wall_s": seconds,
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
                f"{r['bytes_per_s']['normext'] / 1e9:.1f}" if "bytes_per_s" in r else "-",
                f"{100 * r['roofline_fraction']['normext']:.0f}" if "roofline_fraction" in r else "-",
                "ok" if r["check"]["ok"] else f"DIFF {r['check']['rel_err']['normext']:.1e}",
            )
        )
    full = [row for row in rows if len(row) == len(columns)]
    widths = [max([len(c)] + [len(str(row[i])) for row in full]) for i, c in enumerate(columns)]
    right = {5, 6, 7, 8, 9, 10, 11}

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
        "x native / x chain: time(torch) / time(normext), the median of per-round ratios; native = torch's "
        "op for the norm alone, chain = torch's norm, add, activation (stacks: torch modules)",
    ]
    return lines + ([CPU_ROOF_NOTE] if doc["device"]["type"] == "cpu" else [])


def case_lines(doc):
    """One line per suite case: the geometric-mean headline speedup over its dtypes and layouts, per pass,
    and normext's median % of the roofline (the short table for a README)."""
    cases = {}
    for r in doc["results"]:
        if "error" not in r:
            cases.setdefault(r["case"], []).append(r)
    head = f"{'case':26s} {'norm':14s} {'shape':>16s} {'fwd':>7s} {'fwd+bwd':>7s} {'% roof':>6s}"
    lines = [head, "-" * len(head)]
    for name, rs in cases.items():
        speed = {p: _geomean([headline(r) for r in rs if r["pass"] == p]) for p in ("fwd", "fwd+bwd")}
        roofs = sorted(100 * r["roofline_fraction"]["normext"] for r in rs if "roofline_fraction" in r)
        roof = f"{roofs[len(roofs) // 2]:.0f}" if roofs else "-"
        shape = "x".join(map(str, rs[0]["shape"]))
        lines.append(
            f"{name:26s} {rs[0]['norm']:14s} {shape:>16s} {_fmt_x(speed['fwd']):>7s} "
            f"{_fmt_x(speed['fwd+bwd']):>7s} {roof:>6s}"
        )
    return lines


def summary_lines(doc):
    lines = []
    for key, s in doc["summary"].items():
        fwd = _fmt_x(s["geomean_speedup_fwd"])
        both = _fmt_x(s["geomean_speedup_fwd_bwd"])
        lines.append(
            f"{key:22s} geomean speedup {_fmt_x(s['geomean_speedup'])} (fwd {fwd}, fwd+bwd {both}) over "
            f"{s['variants']} variants"
        )
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
    lines.append(f"  {'variant':52s} {'normext':>9s} {'native op':>9s} {'chain':>9s} {'saved':>6s}")
    for r in rows:
        peak = r["peak_memory_bytes"]
        saved = 1 - peak["normext"] / peak["chain"] if peak.get("chain") else None
        lines.append(
            f"  {r['name']:52s} {_fmt_bytes(peak['normext']):>9s} "
            f"{_fmt_bytes(peak['native']) if 'native' in peak else '-':>9s} {_fmt_bytes(peak['chain']):>9s} "
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


def write(doc, out_dir, stream):
    """Writes <stem>.json and <stem>.png (the PNG only when matplotlib is installed) and the table as
    <stem>.txt; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / file_stem(doc)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".txt")]
    paths[0].write_text(_compact_number_lists(json.dumps(doc, indent=1)) + "\n")
    text = table_lines(doc) + [""] + roofline_lines(doc) + [""] + case_lines(doc) + [""]
    text += summary_lines(doc) + memory_lines(doc) + saved_lines(doc)
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
    """Two panels over the variants: headline speedup (log scale) and normext's % of the copy roofline,
    with the axes labelled at the top and the bottom of the (tall) figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [r for r in doc["results"] if "error" not in r]
    inches = 0.16 * len(rows)
    top, bottom = 1.3, 0.8  # inches of title / axis labels above and below the bars
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(13, inches + top + bottom), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    fig.subplots_adjust(top=1 - top / fig.get_figheight(), bottom=bottom / fig.get_figheight(), left=0.17)
    y = list(range(len(rows)))
    colors = ["tab:blue" if r["pass"] == "fwd" else "tab:orange" for r in rows]
    ax1.barh(y, [headline(r) for r in rows], color=colors)
    ax1.axvline(1.0, color="black", linewidth=0.8)
    ax1.set_xscale("log")
    ax1.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax1.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.set_xlabel("speedup vs torch (the unfused chain for fused variants)")
    ax1.set_yticks(y, [r["name"] for r in rows], fontsize=6)
    ax1.set_ylim(len(rows) - 0.5, -0.5)
    roof = doc["roofline"]["bytes_per_s"] / 1e9
    ax2.barh(y, [100 * r.get("roofline_fraction", {}).get("normext", 0) for r in rows], color=colors)
    ax2.set_xlabel(f"normext, % of copy roofline ({roof:.1f} GB/s)")
    for ax in (ax1, ax2):
        ax.grid(axis="x", linewidth=0.3)
        ax.tick_params(axis="x", top=True, labeltop=True)
    dev = doc["device"]
    fig.suptitle(
        f"normext bench ({doc['suite']}): {dev['name']}, {dev['type']}, {doc['threads']} thread(s), "
        f"torch {doc['torch']}, {doc['date'][:10]}",
        y=1 - 0.25 / fig.get_figheight(),
    )
    fig.legend(
        handles=[
            Patch(color="tab:blue", label="forward"),
            Patch(color="tab:orange", label="forward+backward"),
        ],
        loc="upper right",
        ncols=2,
        bbox_to_anchor=(0.99, 1 - 0.45 / fig.get_figheight()),
        frameon=False,
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
