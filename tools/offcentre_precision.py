"""float32 error on off-centre data (mean 100, std 0.01) of normext's GroupNorm / InstanceNorm / BatchNorm /
LayerNorm2d in both layouts, next to torch's, against float64: y, dx, dweight, dbias (relative L2 error).
Runs whichever normext._C is loaded: the CPU build, or the emulated CUDA build with
NORMEXT_CUDA_EMU=build/emu/_C.so (then the CUDA kernels' numbers: emulated, not run on a GPU)."""

import importlib.util
import os
import sys

import torch
import torch.nn.functional as F

if os.environ.get("NORMEXT_CUDA_EMU"):
    spec = importlib.util.spec_from_file_location("normext._C", os.environ["NORMEXT_CUDA_EMU"])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["normext._C"] = mod
    spec.loader.exec_module(mod)

import normext.functional as nxF  # noqa: E402


def ln2d_torch(x, w, b, eps=1e-6):
    return F.layer_norm(x.movedim(1, -1), (x.shape[1],), w, b, eps).movedim(-1, 1)


OPS = {
    "GroupNorm G=32": (
        lambda x, w, b: nxF.group_norm(x, 32, w, b),
        lambda x, w, b: F.group_norm(x, 32, w, b),
    ),
    "InstanceNorm": (
        lambda x, w, b: nxF.instance_norm(x, weight=w, bias=b),
        lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
    ),
    "BatchNorm train": (
        lambda x, w, b: nxF.batch_norm(x, None, None, w, b, training=True),
        lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
    ),
    "LayerNorm2d": (lambda x, w, b: nxF.layer_norm_2d(x, w, b), ln2d_torch),
}


def rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def grads(fn, x, w, b, dy):
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach(), *(t.grad for t in leaves)]


def main():
    torch.manual_seed(0)
    emu = getattr(sys.modules.get("normext._C"), "cuda_emulated", False)
    print(f"normext path: {'CUDA kernels, emulated on the CPU' if emu else 'CPU'}; torch {torch.__version__}")
    print(f"{'op':18} {'shape':14} {'layout':13} {'':8} {'y':>9} {'dx':>9} {'dweight':>9} {'dbias':>9}")
    for shape in [(2, 64, 24, 24), (1, 64, 96, 96)]:
        x64 = torch.randn(shape, dtype=torch.float64) * 0.01 + 100.0
        w64 = torch.rand(shape[1], dtype=torch.float64) + 0.5
        b64 = torch.randn(shape[1], dtype=torch.float64)
        dy64 = torch.randn(shape, dtype=torch.float64)
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = x64.float().contiguous(memory_format=fmt)
            dy = dy64.float().contiguous(memory_format=fmt)
            for name, (ours, theirs) in OPS.items():
                ref = grads(theirs, x64, w64, b64, dy64)
                for who, fn in (("normext", ours), ("torch", theirs)):
                    errs = [
                        rel(o, r)
                        for o, r in zip(grads(fn, x, w64.float(), b64.float(), dy), ref, strict=True)
                    ]
                    layout = "NCHW" if fmt == torch.contiguous_format else "channels_last"
                    print(
                        f"{name:18} {'x'.join(map(str, shape)):14} {layout:13} {who:8} "
                        + " ".join(f"{e:9.2e}" for e in errs)
                    )


if __name__ == "__main__":
    main()
