"""Kernel coverage of an emulated test run: every __global__ function defined in csrc/cuda/*.cu (a template
counts once) against the launches the run recorded (NORMEXT_EMU_LAUNCHES, written by tests/conftest.py).
Prints `cuda-emu kernel coverage: X of Y kernels launched` as its last line; exits 1 when X < Y."""

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# `__global__ void __launch_bounds__(...) name(`, the name possibly on the next line.
KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\(")


def kernels():
    names = set()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        with open(path) as f:
            names.update(KERNEL.findall(f.read()))
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("launches", help="JSON file of launches per kernel")
    args = parser.parse_args()
    with open(args.launches) as f:
        launched = json.load(f)
    defined = kernels()
    missing = sorted(defined - set(launched))
    for name in sorted(defined):
        print(f"  {launched.get(name, 0):8d}  {name}")
    if missing:
        print("kernels no emulated test launched: " + ", ".join(missing))
    print(f"cuda-emu kernel coverage: {len(defined) - len(missing)} of {len(defined)} kernels launched")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
