"""Resource report of normext's CUDA kernels on sm_90 (`make cuda-report`): per kernel instantiation the
registers, spill bytes, static shared memory and theoretical occupancy, read from the objects `make build`
made (nothing is recompiled). Exits 1 when any kernel spills, 2 when the report cannot be made.

Registers, stack and shared memory come from `cuobjdump --dump-resource-usage` of the sm_90 cubin. Spill
bytes need ptxas: a kernel with a stack frame is compiled again from the object's own compute_90 PTX with
`ptxas -v --entry` (the build's ptxas, so the same code); a kernel without one cannot spill. Occupancy is
computed at the kernel's __launch_bounds__ block size (EIATTR_MAX_THREADS): every kernel names the block size
its host code launches it with there, or, where the block follows the shape, its largest block.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

# sm_90 (H100 / H200) per-SM limits, as in NVIDIA's occupancy calculator.
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of this
MAX_WARPS = 64  # 2048 threads
MAX_BLOCKS = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024  # the runtime's own per-block shared memory
SMEM_ALLOC_UNIT = 128
ARCH = "sm_90"
# Spills known and explained in the code, reported but not failing the report: any other spill fails it.
# Empty: no kernel spills (issue 11). An entry maps a kernel instantiation, as the report prints it, to why.
KNOWN_SPILLS: dict[str, str] = {}


def occupancy(regs, smem, threads):
    """Resident warps per SM over 64 for a block of `threads` threads (static shared memory only)."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    smem_block = -(-smem // SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT + SMEM_RESERVED_PER_BLOCK
    by_smem = SMEM_PER_SM // smem_block
    blocks = min(by_regs, by_smem, MAX_BLOCKS, MAX_WARPS // warps)
    return blocks * warps / MAX_WARPS


def find_tool(name):
    """A CUDA binary from CUDA_HOME, PATH, or the copy triton ships (cuobjdump is not in every toolkit)."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for cand in (os.path.join(home, "bin", name), shutil.which(name)):
        if cand and os.access(cand, os.X_OK):
            return cand
    try:
        import triton  # noqa: PLC0415

        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.access(cand, os.X_OK):
            return cand
    except ImportError:
        pass
    return None


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines() if out.returncode == 0 else []
    return lines if len(lines) == len(names) else list(names)


def short_name(demangled):
    """`void normext::cuda::(anonymous namespace)::k<c10::Half, 8, false>(args)` -> `k<half, 8, false>`."""
    s = demangled.removeprefix("void ")
    depth = 0
    for i, ch in enumerate(s):  # cut the argument list: the first '(' outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0 and not s[i:].startswith("(anonymous"):
            s = s[:i]
            break
    s = s.replace("(anonymous namespace)::", "")
    s = re.sub(r"\b(normext::cuda::|c10::)", "", s)
    return s.replace("BFloat16", "bf16").replace("Half", "half")


def resource_usage(cuobjdump, obj):
    """{mangled: dict(regs, stack, smem)} of the sm_90 cubin in obj (empty when it has none)."""
    text = run([cuobjdump, "--dump-resource-usage", "-arch", ARCH, obj])
    found, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and name:
            found[name] = {"regs": int(m[1]), "stack": int(m[2]), "smem": int(m[3]), "local": int(m[4])}
            name = None
    return found


def max_threads(cuobjdump, obj):
    """{mangled: __launch_bounds__ block size} from the sm_90 cubin's EIATTR_MAX_THREADS (absent: none)."""
    text = run([cuobjdump, "-elf", "-arch", ARCH, obj])
    found, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\.nv\.info\.(\S+)$", line)
        if m:
            name = m.group(1)
        elif name and "EIATTR_MAX_THREADS" in line:
            found[name] = None  # the value follows two lines below
        elif name in found and found[name] is None:
            m = re.match(r"\s*Value:\s*(0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)", line)
            if m:
                found[name] = int(m[1], 16) * int(m[2], 16) * int(m[3], 16)
    return {k: v for k, v in found.items() if v}


def ptx_of(cuobjdump, obj, workdir):
    """The object's compute_90 PTX extracted into workdir, or None when the build embedded none."""
    subprocess.run([cuobjdump, "-xptx", "all", obj], cwd=workdir, capture_output=True, check=False)
    files = sorted(glob.glob(os.path.join(workdir, "*sm_90*.ptx")))
    return files[0] if files else None


def dynamic_smem_users(ptx):
    """Entries of the PTX that use the dynamic shared memory (runtime.cuh's normext_dynamic_smem)."""
    users, name = set(), None
    with open(ptx) as f:
        for line in f:
            m = re.match(r"(?:\.visible )?\.entry (\S+)\(", line)
            if m:
                name = m.group(1)
            elif name and "normext_dynamic_smem" in line:
                users.add(name)
    return users


def spills(ptxas, ptx, entries):
    """{mangled: (spill store bytes, spill load bytes)} from ptxas -v, compiling only `entries`."""
    if not entries:
        return {}
    cmd = [ptxas, f"-arch={ARCH}", "-O3", "-v", "-o", os.devnull, ptx]
    for e in entries:
        cmd += ["--entry", e]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    found, name = {}, None
    for line in (out.stdout + out.stderr).splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            found[name] = (int(m[1]), int(m[2]))
            name = None
    return found


def objects(build_dir):
    return sorted(glob.glob(os.path.join(build_dir, "temp.*", "csrc", "cuda", "*.o")))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("objects", nargs="*", help="CUDA objects (default: those of `make build` under build/)")
    ap.add_argument("--build-dir", default="build")
    ap.add_argument("--max-regs", type=int, default=0, help="also fail above this many registers (0: off)")
    ap.add_argument(
        "--if-possible",
        action="store_true",
        help="without CUDA objects or cuobjdump, say so and exit 0 (make test)",
    )
    args = ap.parse_args()
    objs = args.objects or objects(args.build_dir)
    cuobjdump, ptxas = find_tool("cuobjdump"), find_tool("ptxas")
    if not objs:
        print(
            f"cuda-report: no CUDA objects under {args.build_dir}/ (run make build with nvcc)",
            file=sys.stderr,
        )
        return 2
    if cuobjdump is None:
        print("cuda-report: cuobjdump not found (CUDA_HOME/bin, PATH or triton's)", file=sys.stderr)
        return 2
    rows, problems, unknown, known, wide = [], [], [], [], []
    for obj in objs:
        usage = resource_usage(cuobjdump, os.path.abspath(obj))
        if not usage:
            print(f"cuda-report: {obj} has no {ARCH} code: skipped")
            continue
        threads = max_threads(cuobjdump, os.path.abspath(obj))
        with tempfile.TemporaryDirectory() as tmp:
            ptx = ptx_of(cuobjdump, os.path.abspath(obj), tmp)
            dynamic = dynamic_smem_users(ptx) if ptx else set()
            framed = [k for k, u in usage.items() if u["stack"] or u["local"]]
            spilled = spills(ptxas, ptx, framed) if ptx and ptxas else {}
        names = list(usage)
        for mangled, short in zip(names, demangle(names), strict=True):
            u = usage[mangled]
            if mangled in spilled:
                spill = sum(spilled[mangled])
            elif u["stack"] or u["local"]:
                spill = None  # no PTX to ask ptxas: a stack frame may be a spill
            else:
                spill = 0
            rows.append(
                (os.path.basename(obj), short_name(short), u, threads.get(mangled), mangled in dynamic, spill)
            )
    if not rows:
        print(f"cuda-report: no {ARCH} code in the objects (TORCH_CUDA_ARCH_LIST without 9.0): skipped")
        return 0
    head = f"{'kernel':<64} {'regs':>4} {'spill':>5} {'stack':>5} {'smem':>6} {'block':>6} {'occ':>5}"
    print(f"sm_90 resources of {len(rows)} kernel instantiations (occupancy: resident warps / 64)")
    print(head)
    print("-" * len(head))
    last = None
    for obj, name, u, threads, dyn, spill in sorted(rows, key=lambda r: (r[0], r[1])):
        if obj != last:
            print(f"[{obj}]")
            last = obj
        occ = f"{occupancy(u['regs'], u['smem'], threads):5.0%}" if threads else "    ?"
        block = f"{threads}" if threads else "?"
        smem = f"{u['smem']}{'+d' if dyn else ''}"
        spill_s = "?" if spill is None else str(spill)
        print(f"{name:<64} {u['regs']:>4} {spill_s:>5} {u['stack']:>5} {smem:>6} {block:>6} {occ}")
        if spill is None:
            unknown.append(name)
        elif spill > 0 and name in KNOWN_SPILLS:
            known.append(f"{name}: {spill} spill bytes ({KNOWN_SPILLS[name]})")
        elif spill > 0:
            problems.append(f"{name}: {spill} spill bytes")
        if args.max_regs and u["regs"] > args.max_regs:
            problems.append(f"{name}: {u['regs']} registers (> {args.max_regs})")
        if u["regs"] > 128:
            wide.append(f"{name}: {u['regs']}")
    print(
        "smem: static bytes per block (+d: plus the dynamic shared memory of the launch); block: threads per"
        " block from __launch_bounds__"
    )
    if unknown:
        print(
            f"cuda-report: spill bytes unknown for {len(unknown)} kernel(s) with a stack frame: the objects"
            " hold no compute_90 PTX for ptxas (a TORCH_CUDA_ARCH_LIST with 9.0+PTX, the default, embeds it)"
        )
    if wide:
        print(
            "cuda-report: above 128 registers (fails with --max-regs 128, as make cuda-report runs it):",
            *wide,
            sep="\n  ",
        )
    if known:
        print("cuda-report: known spills (KNOWN_SPILLS):", *known, sep="\n  ")
    if problems:
        print(f"cuda-report: FAILED, {len(problems)} problem(s):", *problems, sep="\n  ")
        return 1
    most = max(r[2]["regs"] for r in rows)
    print(f"cuda-report: ok, no {'other ' if known else ''}spills, at most {most} registers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
