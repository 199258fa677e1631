# Builds normext._C: a CUDAExtension when torch has CUDA and a toolkit is found, else CPU-only.
# Knobs: TORCH_CUDA_ARCH_LIST (default without a visible GPU: 8.0;9.0+PTX), MAX_JOBS,
# NORMEXT_FORCE_CUDA=1 (fail instead of building CPU-only), NORMEXT_CPU_AVX2=0/1 (default: auto).
import glob
import os
import platform
import shutil

ROOT = os.path.dirname(os.path.abspath(__file__))


def locate_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin makes that
    /usr/local, which has no CUDA headers. Point it at a directory that really holds the toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


locate_cuda_home()

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_ARCHS = "8.0;9.0+PTX"


def cpu_has_avx2():
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx2", "fma", "f16c"))


def want_cuda():
    force = os.environ.get("NORMEXT_FORCE_CUDA", "0") == "1"
    if torch.version.cuda is None:
        if force:
            raise RuntimeError("NORMEXT_FORCE_CUDA=1 but the installed torch was built without CUDA")
        return False
    if CUDA_HOME is None:
        if force:
            raise RuntimeError("NORMEXT_FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found")
        return False
    return True


def cuda_arch_list():
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    return os.environ["TORCH_CUDA_ARCH_LIST"]


def extension():
    sources = ["csrc/normext.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-std=c++20", "-Wno-unknown-pragmas"]
    # at::parallel_for is an inline `#pragma omp parallel` (ATen/ParallelOpenMP.h): without -fopenmp the
    # CPU kernels run on one thread. libgomp.so.1 is the runtime torch itself loads, so it is shared.
    link = []
    if platform.system() == "Linux":
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    avx2 = os.environ.get("NORMEXT_CPU_AVX2")
    if avx2 == "1" or (avx2 is None and cpu_has_avx2()):
        # at::vec picks its AVX2 implementation from these macros; the flags match what ATen's
        # own AVX2 kernels are compiled with.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if want_cuda():
        archs = cuda_arch_list()
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros = [("NORMEXT_WITH_CUDA", None), ("NORMEXT_CUDA_ARCHS", f'"{archs}"')]
        nvcc = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "normext._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension(
        "normext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    packages=find_packages(include=["normext", "normext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
