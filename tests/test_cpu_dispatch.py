# The CPU kernels are built once per CPU capability and chosen at load time (csrc/cpu/dispatch.cpp): the
# portable DEFAULT build, forced with ATEN_CPU_CAPABILITY=default in a subprocess, must give the results of
# the build this process picked (AVX2 on a CPU that has it; then the two differ only by FMA contraction and
# the SIMD exp/erf/tanh, so the tolerances are float32 rounding, measured under 2e-6 of the largest value,
# not the float64-reference ones).
import os
import platform
import subprocess
import sys

import torch

import normext

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(normext.__file__)))

# Outputs and gradients of every CPU kernel family on small seeded inputs whose extents leave a SIMD tail,
# both layouts, fused activations and residuals, float32 and bfloat16. Run here and in the subprocess.
CASES = r"""
import torch
import normext
import normext.functional as nf


def cases():
    torch.manual_seed(0)
    cl = torch.channels_last
    out = {}

    def run(name, f, x, *params, residual=False):
        x = x.detach().requires_grad_()
        ps = [p.detach().requires_grad_() for p in params]
        r = torch.randn_like(x).requires_grad_() if residual else None
        y = f(x, *ps, r) if residual else f(x, *ps)
        gy = torch.randn_like(y)
        leaves = [x, *ps] + ([r] if residual else [])
        grads = torch.autograd.grad(y, leaves, gy)
        out[name] = [y.detach(), *grads]

    for fmt in ("nchw", "cl"):
        x = torch.randn(2, 64, 9, 11) * 3 + 1
        x = x.to(memory_format=cl) if fmt == "cl" else x
        w, b = torch.randn(64), torch.randn(64)
        run(f"gn_silu_res_{fmt}", lambda x, w, b, r: nf.group_norm(x, 8, w, b, activation="silu", residual=r),
            x, w, b, residual=True)
        run(f"gn_bf16_{fmt}", lambda x, w, b: nf.group_norm(x, 8, w, b, activation="gelu"),
            x.to(torch.bfloat16), w, b)
        ln2d = lambda x, w, b: nf.layer_norm_2d(x, w, b, activation="gelu_tanh")
        run(f"ln2d_{fmt}", ln2d, x[:, :48], w[:48], b[:48])
        bn = lambda x, w, b, r: nf.batch_norm(x, None, None, w, b, True, activation="relu", residual=r)
        run(f"bn_relu_res_{fmt}", bn, x, w, b, residual=True)
    run("in3d", lambda x: nf.instance_norm(x, activation="leaky_relu"), torch.randn(2, 5, 6, 7, 3))
    run("ln", lambda x, w, b: nf.layer_norm(x, (100,), w, b, activation="gelu"), torch.randn(37, 100) + 50,
        torch.randn(100), torch.randn(100))
    return out
"""


def results_in_subprocess(tmp_path, env_extra):
    path = tmp_path / "out.pt"
    code = CASES + (
        "\nimport sys\ntorch.save({'capability': normext._C.cpu_capability, 'out': cases()}, sys.argv[1])\n"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([PKG_PARENT, os.environ.get("PYTHONPATH", "")]), **env_extra
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    return torch.load(path)


def test_capability_follows_aten():
    # torch's own choice (cpuinfo, lowered by ATEN_CPU_CAPABILITY): AVX2 kernels wherever torch runs AVX2 or
    # AVX512 ones on x86-64, unless the build left them out (NORMEXT_CPU_AVX2=0, in the environment of
    # `make test` as of the build).
    x86 = platform.machine() in ("x86_64", "AMD64")
    avx2 = x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    built = os.environ.get("NORMEXT_CPU_AVX2") != "0"
    assert normext._C.cpu_capability == ("AVX2" if avx2 and built else "DEFAULT")


def test_default_build_matches(tmp_path):
    got = results_in_subprocess(tmp_path, {"ATEN_CPU_CAPABILITY": "default"})
    assert got["capability"] == "DEFAULT"
    scope = {}
    exec(CASES, scope)
    mine = scope["cases"]()
    assert got["out"].keys() == mine.keys()
    for name, tensors in mine.items():
        # float32 parameter gradients of a bfloat16 input sum terms formed from bfloat16-rounded values:
        # a few more ulps apart (measured: up to 9e-6 of the largest).
        low = tensors[0].dtype == torch.bfloat16
        for i, (a, b) in enumerate(zip(got["out"][name], tensors, strict=True)):
            what = f"{name} tensor {i} (output, then gradients)"
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), what
            scale = float(b.float().abs().max())
            if b.dtype == torch.bfloat16:
                # One bfloat16 rounding apart at most (the float32 values before it differ by a few ulps).
                torch.testing.assert_close(a, b, rtol=2**-7, atol=2**-7 * scale, msg=what)
            else:
                tol = 3e-5 if low else 1e-6
                torch.testing.assert_close(a, b, rtol=10 * tol, atol=tol * scale, msg=what)
