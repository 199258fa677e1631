# Build facts: with a CUDA toolkit and a CUDA-enabled torch the extension must contain the CUDA kernels (the
# build never silently falls back to CPU-only), and `python -m normext.info` reports them.
import os
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
