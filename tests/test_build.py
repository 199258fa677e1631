# Build facts: with a CUDA toolkit and a CUDA-enabled torch the extension must contain the CUDA kernels (the
# build never silently falls back to CPU-only), and `python -m normext.info` reports them.
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

import normext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_toolkit_present():
    return shutil.which("nvcc") is not None or cpp_extension.CUDA_HOME is not None


@pytest.mark.skipif(
    torch.version.cuda is None or not cuda_toolkit_present(), reason="no CUDA toolkit or CPU-only torch"
)
def test_cuda_kernels_built_when_toolkit_present():
    assert normext._C.cuda_built is True, (
        "nvcc / CUDA_HOME is available and torch has CUDA, but normext._C was built without CUDA kernels"
    )
    assert isinstance(normext._C.cuda_archs, str) and normext._C.cuda_archs


def test_cuda_built_flag_is_a_bool():
    assert isinstance(normext._C.cuda_built, bool)
    if torch.version.cuda is None:
        assert normext._C.cuda_built is False


def test_info_module_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "normext.info"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "CUDA kernels" in out.stdout
    expected = "yes" if normext._C.cuda_built else "no"
    line = next(ln for ln in out.stdout.splitlines() if "CUDA kernels" in ln)
    assert line.split()[-1] == expected, line


# ------------------------------------------------------------------ tools/cuda_report.py (make cuda-report)

sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_report  # noqa: E402


@pytest.mark.parametrize(
    ("regs", "smem", "threads", "expected"),
    [
        (32, 0, 256, 1.0),  # 8 blocks of 8 warps fill the 64 warp slots
        (64, 0, 256, 0.5),  # 2048 registers per warp: 32 warps
        (65, 0, 256, 0.375),  # 72 registers per thread after the 256-per-warp rounding: 28 warps -> 3 blocks
        (128, 0, 256, 0.25),
        (255, 0, 1024, 0.0),  # a 1024-thread block needs 256K registers at 255: it cannot launch
        (32, 48 * 1024, 256, 0.5),  # 49 KiB with the reserved 1 KiB: 4 blocks in 228 KiB
        (16, 0, 32, 0.5),  # 32 blocks of one warp
    ],
)
def test_cuda_report_occupancy(regs, smem, threads, expected):
    """Theoretical sm_90 occupancy, worked out by hand from the per-SM limits (NVIDIA's calculator)."""
    assert cuda_report.occupancy(regs, smem, threads) == expected


@pytest.mark.skipif(
    shutil.which("nvcc") is None or cuda_report.find_tool("cuobjdump") is None, reason="no nvcc"
)
def test_cuda_report_fails_on_a_spill(tmp_path):
    """A kernel made to spill (64 live floats under a 32-register cap) fails the report; the same kernel with
    room for them passes. Compiled for sm_90 with PTX, as the default build is."""
    body = """
    __global__ void __launch_bounds__(BOUNDS) spill_kernel(const float* x, float* y, int n) {
      float v[64];
    #pragma unroll
      for (int i = 0; i < 64; ++i) v[i] = x[threadIdx.x + i * n];
      float s = 0.f;
    #pragma unroll
      for (int i = 0; i < 64; ++i) s += v[i] * v[63 - i];
    #pragma unroll
      for (int i = 0; i < 64; ++i) y[threadIdx.x + i * n] = v[i] * s;
    }
    """
    results = {}
    for case, bounds in (("fits", "256"), ("spills", "1024, 2")):  # at most 255 / 32 registers
        src = tmp_path / f"{case}.cu"
        src.write_text(body.replace("BOUNDS", bounds))
        obj = tmp_path / f"{case}.o"
        gencode = ["-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_90,code=compute_90"]
        subprocess.run(["nvcc", "-c", "-O3", *gencode, str(src), "-o", str(obj)], check=True, timeout=300)
        results[case] = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "cuda_report.py"), str(obj)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    fits, spills = results["fits"], results["spills"]
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "no spills" in fits.stdout
    assert spills.returncode == 1, spills.stdout + spills.stderr
    assert re.search(r"spill_kernel: \d+ spill bytes", spills.stdout), spills.stdout
