# Builds normext._C: a CUDAExtension when torch has CUDA and a toolkit is found, else CPU-only.
# Knobs: TORCH_CUDA_ARCH_LIST (default without a visible GPU: 8.0;9.0+PTX), MAX_JOBS,
# NORMEXT_FORCE_CUDA=1 (fail instead of building CPU-only), NORMEXT_CPU_AVX2=0 (portable CPU kernels only).
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


def build_avx2_kernels():
    """The CPU kernels get a second, AVX2+FMA build on x86-64 (chosen at run time, csrc/cpu/dispatch.cpp)."""
    if os.environ.get("NORMEXT_CPU_AVX2") == "0":
        return False
    return platform.machine() in ("x86_64", "AMD64")


# The CPU kernel translation units, compiled once per CPU capability as ATen compiles its own (each in
# namespace normext::cpu::<CAPABILITY>); the rest of the extension is compiled once, for any CPU.
CPU_KERNELS = sorted(glob.glob("csrc/cpu/*_cpu.cpp"))
# The flags match those of ATen's AVX2 kernels; at::vec picks its AVX2 implementation from the macros.
CPU_CAPABILITIES = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}


class BuildWithCpuKernels(BuildExtension):
    """Compiles CPU_KERNELS per capability into their own folders (ninja, incremental) and links the objects
    into the extension, the portable ones first: an inline function that several objects define (a
    std:: or c10 template) is taken from the first, so code the DEFAULT kernels reach never holds AVX2."""

    def build_extension(self, ext):
        capabilities = ["DEFAULT", "AVX2"] if build_avx2_kernels() else ["DEFAULT"]
        cxx = ext.extra_compile_args["cxx"]
        objects = []
        for cap in capabilities:
            objects += self.compiler.compile(
                CPU_KERNELS,
                output_dir=os.path.join(self.build_temp, "cpu-" + cap.lower()),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": cxx + CPU_CAPABILITIES[cap]},
            )
        ext.extra_objects = objects + [o for o in ext.extra_objects if o not in objects]
        super().build_extension(ext)


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
    sources = ["csrc/normext.cpp", *[p for p in sorted(glob.glob("csrc/cpu/*.cpp")) if p not in CPU_KERNELS]]
    cxx = ["-O3", "-std=c++20", "-Wno-unknown-pragmas"]
    # at::parallel_for is an inline `#pragma omp parallel` (ATen/ParallelOpenMP.h): without -fopenmp the
    # CPU kernels run on one thread. libgomp.so.1 is the runtime torch itself loads, so it is shared.
    link = []
    if platform.system() == "Linux":
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if build_avx2_kernels():
        cxx.append("-DNORMEXT_CPU_AVX2")
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
    cmdclass={"build_ext": BuildWithCpuKernels.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
