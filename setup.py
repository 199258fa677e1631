# Builds normext._C: a CUDAExtension when torch has CUDA and a toolkit is found, else CPU-only.
# Knobs: TORCH_CUDA_ARCH_LIST (default without a visible GPU: 8.0;9.0+PTX), MAX_JOBS,
# NORMEXT_FORCE_CUDA=1 (fail instead of building CPU-only), NORMEXT_CPU_SIMD=0 (portable CPU kernels only).
import glob
import os
import platform
import shutil
from concurrent.futures import ThreadPoolExecutor

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


def simd_capabilities():
    """The SIMD builds of the CPU kernels beside the portable one: AVX2+FMA and AVX-512 on x86-64, one of
    them chosen at run time (csrc/cpu/dispatch.cpp)."""
    if os.environ.get("NORMEXT_CPU_SIMD") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    return ["AVX2", "AVX512"]


# The CPU kernel translation units, compiled once per CPU capability as ATen compiles its own (each in
# namespace normext::cpu::<CAPABILITY>); the rest of the extension is compiled once, for any CPU.
CPU_KERNELS = sorted(glob.glob("csrc/cpu/*_cpu.cpp"))
# The flags match those of ATen's kernels of the same capability; at::vec picks its implementation from the
# CPU_CAPABILITY_* macro.
CPU_CAPABILITIES = {
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "AVX512": [
        *("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"),
        *("-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"),
    ],
}


class BuildWithCpuKernels(BuildExtension):
    """Compiles CPU_KERNELS per capability into their own folders (ninja, incremental) and links the objects
    into the extension, the portable ones first: an inline function that several objects define (a
    std:: or c10 template) is taken from the first, so code the DEFAULT kernels reach never holds SIMD
    instructions. The capabilities' ninja calls run in threads beside the extension's own (CUDA) call and the
    link waits for all: called one after another, each would wait for its slowest file while the other
    cores idle. MAX_JOBS (default: the core count) is shared out between the concurrent calls."""

    def build_extension(self, ext):
        capabilities = ["DEFAULT", *simd_capabilities()]
        cxx = ext.extra_compile_args["cxx"]
        compile_all = self.compiler.compile
        jobs = os.environ.get("MAX_JOBS", "")
        total = int(jobs) if jobs.isdigit() else os.cpu_count() or 1
        os.environ["MAX_JOBS"] = str(max(1, total // (len(capabilities) + 1)))
        pool = ThreadPoolExecutor(len(capabilities))
        cpu = [
            pool.submit(
                compile_all,
                CPU_KERNELS,
                output_dir=os.path.join(self.build_temp, "cpu-" + cap.lower()),
                macros=ext.define_macros,
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": cxx + CPU_CAPABILITIES[cap]},
            )
            for cap in capabilities
        ]

        def compile_then_join(*args, **kwargs):
            # build_ext.build_extension compiles the sources, then reads ext.extra_objects to link.
            objects = compile_all(*args, **kwargs)
            kernels = [o for future in cpu for o in future.result()]
            ext.extra_objects = kernels + [o for o in ext.extra_objects if o not in kernels]
            return objects

        self.compiler.compile = compile_then_join
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_all
            pool.shutdown(wait=True)
            if jobs:
                os.environ["MAX_JOBS"] = jobs
            else:
                del os.environ["MAX_JOBS"]


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
    cxx += [f"-DNORMEXT_CPU_{cap}" for cap in simd_capabilities()]
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
