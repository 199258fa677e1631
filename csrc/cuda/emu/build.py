"""Builds the emulated CUDA test extension: csrc/normext.cpp and every csrc/cuda/*.cu compiled by the host
C++ compiler against csrc/cuda/emu/runtime.h, registered for CPU tensors. Test infrastructure, never
installed: `python csrc/cuda/emu/build.py [--sanitize]` writes build/emu[-asan]/_C.so."""

import argparse
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

FLAGS = [
    "-O2",
    "-std=c++20",
    "-DNORMEXT_CUDA_EMU",
    "-Wno-unknown-pragmas",
    # The kernels view float storage through vector types, as CUDA code does; nvcc gives that its meaning.
    "-fno-strict-aliasing",
]
# Out-of-bounds and misaligned access in the kernels, their shared memory and the tensors they touch.
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
# -O1, the usual level for sanitizer builds: precise reports and a shorter compile than -O2.
SANITIZE_CFLAGS = ["-O1", *SANITIZE]


def build(sanitize=False, verbose=False):
    from torch.utils.cpp_extension import load

    out = os.path.join(ROOT, "build", "emu-asan" if sanitize else "emu")
    src = os.path.join(out, "src")
    os.makedirs(src, exist_ok=True)
    emu = os.path.join(ROOT, "csrc", "cuda", "emu")
    sources = [os.path.join(ROOT, "csrc", "normext.cpp")]
    sources += [os.path.join(emu, name) for name in ("runtime.cpp", "selftest.cpp")]
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        # The same file nvcc builds, compiled as C++ (a .cu source would be handed to nvcc).
        wrapper = os.path.join(src, os.path.basename(cu)[:-3] + ".cpp")
        text = f'#include "{cu}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        sources.append(wrapper)
    flags = FLAGS + (SANITIZE_CFLAGS if sanitize else [])
    load(
        name="_C",
        sources=sources,
        extra_cflags=flags,
        extra_ldflags=SANITIZE if sanitize else [],
        extra_include_paths=[os.path.join(ROOT, "csrc", "include")],
        build_directory=out,
        with_cuda=False,
        is_python_module=True,
        verbose=verbose,
    )
    return os.path.join(out, "_C.so")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sanitize", action="store_true", help="AddressSanitizer + UndefinedBehaviorSanitizer"
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.sanitize and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        # load() imports what it built, and an ASan library must come after the ASan runtime: rerun this
        # script with the runtime preloaded, as make test-emu runs the tests.
        libs = [
            subprocess.check_output(["gcc", f"-print-file-name={lib}"], text=True).strip()
            for lib in ("libasan.so", "libstdc++.so")
        ]
        env = dict(os.environ, LD_PRELOAD=" ".join(libs), ASAN_OPTIONS="detect_leaks=0")
        return subprocess.call([sys.executable, *sys.argv], env=env)
    print(build(args.sanitize, args.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
