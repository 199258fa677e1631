# Shared fixtures and helpers for the normext tests: the device list, per-test seeding, inputs in a given
# memory format (also as views with a storage offset or non-contiguous), allocator poisoning, tolerances.
import importlib.util
import json
import os
import sys
import zlib

import pytest
import torch

# Emulated CUDA (`make test-emu`): NORMEXT_CUDA_EMU names the emulated build's _C.so (csrc/cuda/emu/build.py),
# which holds the CUDA kernels and host code compiled for the CPU and registered for CPU tensors. It stands
# in for normext._C, so the suite's CUDA cases run the CUDA code on CPU tensors; the rest is deselected.
EMU_LIB = os.environ.get("NORMEXT_CUDA_EMU")
EMU = bool(EMU_LIB)
if EMU:
    _spec = importlib.util.spec_from_file_location("normext._C", EMU_LIB)
    _emu = importlib.util.module_from_spec(_spec)
    sys.modules["normext._C"] = _emu
    _spec.loader.exec_module(_emu)

from reference import group_norm_pre_ref, rel_err, to64  # noqa: E402

HAS_CUDA = torch.cuda.is_available() and not EMU
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible")
# Under emulation the one device is the CPU running the CUDA kernels; the test ids still say "cuda".
DEVICES = [pytest.param("cpu", id="cuda")] if EMU else ["cpu", pytest.param("cuda", marks=requires_cuda)]
requires_emu = pytest.mark.skipif(not EMU, reason="runs in the emulated CUDA build only (make test-emu)")
FORMATS = ["contiguous", "channels_last"]

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Input dtype names used as test ids; "-mixed" means float32 weight/bias/running stats with a low-precision
# input.
LOW_AND_FP32 = ["float32", "float16", "bfloat16", "float16-mixed", "bfloat16-mixed"]

# Relative-error bounds against the float64 reference for the formats that are not judged against torch.
FWD_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
BWD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
# Low precision (flash-attention rule):
# err(normext) <= FLASH_FACTOR * err(torch native, same dtype) + FLASH_ATOL.
FLASH_FACTOR = 2.0
FLASH_ATOL = 1e-3


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile: torch.compile tests (slower; deselect with -m 'not compile')"
    )
    config.addinivalue_line("markers", "emu: tests of the emulated CUDA build itself (make test-emu)")


def pytest_collection_modifyitems(config, items):
    """Under emulation only the CUDA cases (device id "cuda", which DEVICES then maps to the emulated build)
    and the emulation's own tests are kept."""
    if not EMU:
        return
    keep, drop = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        cuda_case = spec is not None and "device" in spec.params and "cuda" in spec.id.split("-")
        (keep if cuda_case or item.get_closest_marker("emu") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_sessionfinish(session, exitstatus):
    """Under emulation, the launches per kernel of the whole run go to NORMEXT_EMU_LAUNCHES (a JSON file),
    for the coverage report of csrc/cuda/emu/coverage.py."""
    path = os.environ.get("NORMEXT_EMU_LAUNCHES")
    if EMU and path:
        with open(path, "w") as f:
            json.dump(_emu.emu_total_launch_counts(), f, indent=1, sort_keys=True)


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh, reproducible random inputs per test case: the seed is derived from the test id (and from
    NORMEXT_TEST_SEED, when set, to draw a different set of inputs)."""
    extra = int(os.environ.get("NORMEXT_TEST_SEED", "0"))
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ extra)
    yield


def parse_dtype(name):
    """(input dtype, parameter dtype) for a dtype id such as "bfloat16-mixed"."""
    base, _, mixed = name.partition("-")
    dtype = DTYPES[base]
    return dtype, (torch.float32 if mixed else dtype)


def runs_cuda_kernels(device):
    """Whether ops on this device run the CUDA kernels (on a GPU, or emulated on the CPU)."""
    return device == "cuda" or EMU


def skip_if_unsupported(device, dtype):
    if runs_cuda_kernels(device) and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only (gradcheck) dtype")


def memory_format_for(ndim):
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim)


def channels_last_perm(ndim):
    """The permutation that lists the dims of an (N, C, *) tensor in channels-last memory order."""
    return [0, *range(2, ndim), 1]


def to_format(x, fmt):
    """A dense copy of x in the given memory format: "contiguous" (NCHW) or "channels_last" (channels_last
    for 4-D, channels_last_3d for 5-D, the (N, L, C)-dense permuted layout for 3-D)."""
    if fmt == "contiguous":
        return x.contiguous()
    if fmt != "channels_last":
        raise ValueError(fmt)
    mf = memory_format_for(x.dim())
    if mf is not None:
        return x.contiguous(memory_format=mf)
    perm = channels_last_perm(x.dim())
    inv = [perm.index(i) for i in range(x.dim())]
    return x.permute(perm).contiguous().permute(inv)


def make_input(shape, dtype=torch.float32, device="cpu", fmt="contiguous", mean=0.0, std=1.0):
    """Random normal data (drawn on the CPU in float64 so every device sees the same values)."""
    x = torch.randn(shape, dtype=torch.float64) * std + mean
    return to_format(x.to(dtype).to(device), fmt)


def make_params(C, dtype=torch.float32, device="cpu"):
    """Random affine parameters away from the (1, 0) defaults, so a dropped weight or bias shows."""
    w = (torch.rand(C, dtype=torch.float64) + 0.5) * torch.where(torch.rand(C) < 0.2, -1.0, 1.0).double()
    b = torch.randn(C, dtype=torch.float64) * 0.5
    return w.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def same_strides(y, x):
    """Strides agree on every dim of size > 1 (size-1 dims do not change the memory order)."""
    return all(y.stride(d) == x.stride(d) for d in range(x.dim()) if x.size(d) > 1)


def assert_layout_kept(y, x, fmt):
    """y (the output for the dense input x in format fmt) has x's shape, memory format and strides."""
    assert y.shape == x.shape
    mf = memory_format_for(x.dim())
    if fmt == "channels_last" and mf is not None:
        assert y.is_contiguous(memory_format=mf), f"output strides {y.stride()} are not {mf}"
    elif fmt == "contiguous":
        assert y.is_contiguous(), f"output strides {y.stride()} are not contiguous"
    assert same_strides(y, x), f"output strides {y.stride()} != input strides {x.stride()}"


def with_storage_offset(x, offset=3):
    """A view with x's values and strides at storage offset `offset` of a NaN-filled flat buffer
    (flat_buffer[offset:offset + n].view(...) for dense x); the offset breaks 16-byte alignment."""
    buf = torch.full((offset + x.numel() + 5,), float("nan"), dtype=x.dtype, device=x.device)
    v = buf.as_strided(x.shape, x.stride(), offset)
    v.copy_(x)
    assert v.storage_offset() == offset
    return v


def sliced_batch(shape, dtype, device, fmt):
    """x = big[1:] where big has one extra sample: a dense view with a non-zero storage offset."""
    big = make_input((shape[0] + 1, *shape[1:]), dtype, device, fmt)
    return big[1:]


def make_noncontiguous(shape, dtype, device, kind):
    """An input that is neither NCHW-contiguous nor channels-last dense."""
    if kind == "transposed":  # the last two spatial dims swapped
        base = make_input((*shape[:-2], shape[-1], shape[-2]), dtype, device)
        x = base.transpose(-1, -2)
    elif kind == "strided":  # every other element of a wider last dim
        base = make_input((*shape[:-1], 2 * shape[-1]), dtype, device)
        x = base[..., ::2]
    elif kind == "channel_slice":  # every other channel
        base = make_input((shape[0], 2 * shape[1], *shape[2:]), dtype, device)
        x = base[:, ::2]
    else:
        raise ValueError(kind)
    assert x.shape == tuple(shape)
    assert not x.is_contiguous()
    mf = memory_format_for(x.dim())
    assert mf is None or not x.is_contiguous(memory_format=mf)
    return x


# The view kinds of the row-norm view tests: non-contiguous, or dense at an offset breaking 16-byte alignment.
VIEW_KINDS = ["transposed", "strided", "flat_offset", "batch_slice"]


def view_inputs(shape, dtype, device, kind):
    """(x, residual) as views of one VIEW_KINDS kind (the residual strided for the non-contiguous kinds)."""
    if kind in ("transposed", "strided"):
        res = make_noncontiguous(shape, dtype, device, "strided")
        return make_noncontiguous(shape, dtype, device, kind), res
    if kind == "flat_offset":
        return (
            with_storage_offset(make_input(shape, dtype, device), 3),
            with_storage_offset(make_input(shape, dtype, device), 1),
        )
    return sliced_batch(shape, dtype, device, "contiguous"), sliced_batch(shape, dtype, device, "contiguous")


def poison_allocator(device, *likes):
    """Allocate NaN-filled blocks of the given tensors' sizes and free them, so the next allocations of
    those sizes (the caching allocator on CUDA, malloc's free lists on the CPU) likely get NaN memory."""
    blocks = [torch.full((t.numel() + 1,), float("nan"), dtype=t.dtype, device=device) for t in likes]
    del blocks


def assert_fwd_close(out, ref, dtype, native=None, what="output", tol=None):
    """float32/float64: rel err < tol; half/bf16: flash-attention rule against the torch-native result."""
    err = rel_err(out, ref)
    if dtype in (torch.float32, torch.float64):
        bound = tol if tol is not None else FWD_TOL[dtype]
        assert err < bound, f"{what}: rel err {err:.3g} >= {bound:.3g}"
    else:
        assert native is not None, "low precision needs a torch-native baseline"
        nat = rel_err(native, ref)
        bound = FLASH_FACTOR * nat + FLASH_ATOL
        assert err <= bound, (
            f"{what}: rel err {err:.3g} > {FLASH_FACTOR} x torch-native {nat:.3g} + {FLASH_ATOL}"
        )


def assert_bwd_close(out, ref, dtype, native=None, what="grad"):
    """Like assert_fwd_close with the backward bounds. For float32/float64 a native result, when given, only
    matters for ill-conditioned gradients (e.g. dx of two-element groups, which is O(eps) and cancels to the
    last bit): the bound is then max(BWD_TOL, FLASH_FACTOR * torch's own error in the same dtype)."""
    if dtype in (torch.float32, torch.float64):
        tol = BWD_TOL[dtype]
        if native is not None:
            tol = max(tol, FLASH_FACTOR * rel_err(native, ref))
        assert_fwd_close(out, ref, dtype, what=what, tol=tol)
    else:
        assert_fwd_close(out, ref, dtype, native=native, what=what)


def leaf(t):
    """A leaf that requires grad and keeps t's storage, strides and offset (None stays None)."""
    return None if t is None else t.detach().requires_grad_()


def forward_backward(fn, tensors, dy):
    """Runs fn on fresh leaves of `tensors` and backpropagates dy; returns (output, [grads])."""
    leaves = [leaf(t) for t in tensors]
    y = fn(*leaves)
    y.backward(dy)
    return y, [None if t is None else t.grad for t in leaves]


def check_all(fns, tensors, dtype, fmt=None, backward=True):
    """Forward (and backward) of `ours` against the float64 reference; for half/bf16 the torch-native chain in
    the same dtype is the baseline of the flash-attention rule (float32 gradients: see assert_bwd_close).
    fns = (ours, reference, native) over tensors (x, weight, bias, residual); None tensors are skipped."""
    ours, ref, native = fns
    x = tensors[0]
    if not backward:
        with torch.no_grad():
            y = ours(*tensors)
            y_ref = ref(*tensors)
            y_nat = native(*tensors) if dtype in (torch.float16, torch.bfloat16) else None
        assert y.dtype == x.dtype and y.device == x.device
        assert_fwd_close(y, y_ref, dtype, y_nat)
        return y
    dy = torch.randn_like(x)
    y, g = forward_backward(ours, tensors, dy)
    y_ref, g_ref = forward_backward(ref, [to64(t) for t in tensors], to64(dy))
    y_nat, g_nat = forward_backward(native, [None if t is None else t.detach().clone() for t in tensors], dy)
    assert y.dtype == x.dtype and y.device == x.device
    if fmt is not None:
        assert_layout_kept(y, x, fmt)
    assert_fwd_close(y, y_ref, dtype, y_nat if dtype in (torch.float16, torch.bfloat16) else None)
    for name, gi, gr, gnat, t in zip(
        ("dx", "dweight", "dbias", "dresidual"), g, g_ref, g_nat, tensors, strict=True
    ):
        if t is None:
            continue
        assert gi is not None, f"{name} is missing"
        assert gi.shape == t.shape and gi.dtype == t.dtype, f"{name}: {gi.shape} {gi.dtype}"
        assert_bwd_close(gi, gr, dtype, gnat, what=name)
    return y


def residual_away_from_kink(z0):
    """A float64 residual that moves every pre-activation z0 + residual to |z| in [0.2, 1], away from the
    relu / leaky_relu kink (for gradcheck)."""
    sign = torch.where(torch.rand(z0.shape, dtype=torch.float64) < 0.5, -1.0, 1.0).double()
    target = (torch.rand(z0.shape, dtype=torch.float64) * 0.8 + 0.2) * sign
    return target - z0.detach()


def kink_free_residual(x, G, w=None, b=None):
    """residual_away_from_kink for the pre-activation GN(x)*w + b."""
    return residual_away_from_kink(group_norm_pre_ref(x, G, w, b))
