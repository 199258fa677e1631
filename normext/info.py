"""`python -m normext.info`: what this build of normext contains and what it runs on."""

import torch

from normext import _C


def build_info():
    return {
        "normext CUDA kernels": "yes" if _C.cuda_built else "no",
        "CUDA architectures": _C.cuda_archs or "-",
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "-",
        "GPU visible": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no",
        "CPU threads": torch.get_num_threads(),
        # The build of the CPU kernels in use (AVX2 where the CPU has it, unless ATEN_CPU_CAPABILITY=default).
        "CPU kernels": getattr(_C, "cpu_capability", "-"),
    }


def main():
    for key, value in build_info().items():
        print(f"{key:22s} {value}")


if __name__ == "__main__":
    main()
