# The emulated CUDA build itself (make test-emu): each of its checks fires on a kernel that breaks the rule,
# shuffles follow PTX's lane rules, results do not depend on the thread / block order or the device profile,
# and every op makes the number of launches its plan says.

import pytest
import torch
from conftest import EMU, make_input, make_params

import normext.functional as nxF

if EMU:
    from normext import _C

pytestmark = [
    pytest.mark.emu,
    pytest.mark.skipif(not EMU, reason="runs in the emulated CUDA build (make test-emu)"),
]


@pytest.fixture(autouse=True)
def _default_schedule():
    yield
    if EMU:
        _C.emu_set_schedule("cycle", 0)
        _C.emu_set_device("H100")


# ------------------------------------------------------------------------------------------ the checks


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_missing_barrier_reads_poison(order):
    """Without the barrier a thread reads its neighbour's slot before (forward) or after (reverse) it is
    written, depending on the order: some slot reads the NaN poison. With it, every slot is right."""
    _C.emu_set_schedule(order, 7)
    n = 64
    bad = _C.emu_selftest("neighbour", n)[:n]
    assert bad.isnan().any(), "a read before the neighbour's write must see poisoned shared memory"
    good = _C.emu_selftest("neighbour_synced", n)[:n]
    assert torch.equal(good, ((torch.arange(n) + 1) % n).float())


def test_unwritten_shared_memory_is_nan():
    assert _C.emu_selftest("read_unwritten", 32)[:32].isnan().all()


def test_barrier_after_early_exit_is_an_error():
    with pytest.raises(
        RuntimeError, match=r"early_exit_barrier_kernel.*__syncthreads\(\) is reached by 40 threads"
    ):
        _C.emu_selftest("early_exit_barrier", 64)


def test_full_mask_shuffle_in_partial_warp_is_an_error():
    with pytest.raises(
        RuntimeError, match=r"shuffle_kernel.*mask 0xffffffff names lanes 4\.\.31, which do not exist"
    ):
        _C.emu_selftest("shuffle", 100, arg=0xFFFFFFFF, width=32)


def test_shuffle_with_absent_lane_is_an_error():
    # Lanes 16..31 skip the full-mask shuffle that lanes 0..15 wait in.
    with pytest.raises(RuntimeError, match=r"waits in __shfl_down_sync with mask 0xffffffff.*has exited"):
        _C.emu_selftest("shuffle", 32, arg=0xFFFFFFFF, width=16)


def test_shuffle_mask_without_own_lane_is_an_error():
    with pytest.raises(RuntimeError, match="does not include its own lane"):
        _C.emu_selftest("shuffle", 32, arg=0x0000FFFF, width=32)


def test_shuffle_from_lane_outside_mask_is_an_error():
    # Lanes 0..15 shuffle down by one with mask 0xffff: lane 15's source, lane 16, takes no part.
    with pytest.raises(
        RuntimeError, match=r"reads lane 16 in __shfl_down_sync, which is not in the mask 0xffff"
    ):
        _C.emu_selftest("shuffle", 32, arg=0x0000FFFF, width=16)


@pytest.mark.parametrize("width", [32, 16, 8, 4, 2, 1])
@pytest.mark.parametrize("arg", [0, 1, 3, 5, 31])
def test_shuffle_lane_rules(width, arg):
    """__shfl_sync / _up / _down / _xor against the CUDA programming guide's definition, per lane."""
    out = _C.emu_selftest("shuffle_table", 64, arg=arg, width=width).view(4, 64)
    for t in range(64):
        warp_base = t - t % 32
        lane = t % 32
        seg = lane - lane % width
        idx = seg + arg % width
        up = lane - arg if lane - arg >= seg else lane
        down = lane + arg if lane + arg < seg + width else lane
        # An xor partner in an earlier segment is read; one in a later segment is not (CUDA guide).
        xor = lane ^ arg if (lane ^ arg) < seg + width else lane
        expected = [idx, up, down, xor]
        for k in range(4):
            assert out[k, t].item() == warp_base + expected[k], (k, t)


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_misaligned_vector_load_is_an_error(offset):
    with pytest.raises(RuntimeError, match="vector access of 16 bytes .* not 16-byte aligned"):
        _C.emu_selftest("vector_load", 32, arg=offset)
    assert _C.emu_selftest("vector_load", 32, arg=4)[0].item() == 4 + 5 + 6 + 7


def test_launch_limits():
    with pytest.raises(RuntimeError, match="invalid block size"):
        _C.emu_selftest("read_unwritten", 2048)
    with pytest.raises(RuntimeError, match="invalid grid"):
        _C.emu_selftest("grid_y", 32, arg=65536)
    with pytest.raises(RuntimeError, match="need allow_dynamic_smem"):
        _C.emu_selftest("dynamic_smem", 128, arg=64 << 10)
    assert _C.emu_selftest("dynamic_smem", 128, arg=48 << 10)[0].item() == 1.0
    assert _C.emu_selftest("dynamic_smem_opted_in", 128, arg=100 << 10)[0].item() == 1.0


# --------------------------------------------------------------------------------- order independence


def _gn_case():
    x = make_input((3, 64, 7, 9), torch.float32, "cpu", "channels_last", mean=0.5, std=2.0)
    w, b = make_params(64, torch.float32, "cpu")
    return x, w, b


def _run_all_ops():
    """Forward and backward of every family, returning every output and gradient."""
    outs = []
    x, w, b = _gn_case()
    for fmt_x in (x, x.contiguous()):
        for fn in (
            lambda t, w_, b_: nxF.group_norm(t, 8, w_, b_, activation="silu"),
            lambda t, w_, b_: nxF.layer_norm_2d(t, w_, b_),
            lambda t, w_, b_: nxF.batch_norm(t, None, None, w_, b_, training=True),
        ):
            leaves = [t.detach().requires_grad_() for t in (fmt_x, w, b)]
            y = fn(*leaves)
            y.backward(torch.ones_like(y) + torch.arange(y.numel()).view_as(y).float().sin())
            outs += [y.detach(), *(t.grad for t in leaves)]
    rows = torch.randn(300, 777)
    wl, bl = torch.randn(777), torch.randn(777)
    leaves = [t.requires_grad_() for t in (rows, wl, bl)]
    y = nxF.layer_norm(leaves[0], (777,), leaves[1], leaves[2])
    y.backward(torch.cos(y.detach()))
    outs += [y.detach(), *(t.grad for t in leaves)]
    return outs


def test_results_do_not_depend_on_thread_or_block_order():
    results = {}
    for order in ("forward", "reverse", "shuffle"):
        _C.emu_set_schedule(order, 11)
        torch.manual_seed(0)
        results[order] = _run_all_ops()
    for order in ("reverse", "shuffle"):
        for a, b in zip(results["forward"], results[order], strict=True):
            assert torch.equal(a, b), f"{order} order changed a result"


# ------------------------------------------------------------------------------------------ launch counts


def _launches(fn):
    _C.emu_reset_launch_counts()
    fn()
    return sum(_C.emu_launch_counts().values())


def _fwd_bwd_launches(fn, x, *params):
    leaves = [t.detach().requires_grad_() for t in (x, *params)]
    _C.emu_reset_launch_counts()
    y = fn(*leaves)
    fwd = sum(_C.emu_launch_counts().values())
    _C.emu_reset_launch_counts()
    y.backward(torch.ones_like(y))
    return fwd, sum(_C.emu_launch_counts().values())


# (op, shape, layout) -> (forward launches, backward launches) as the host planning code lays them out:
# small groups / rows are one fused launch each way (plus the dgamma/dbeta combine), small BatchNorm inputs
# one launch forward and two backward (sums, elementwise); large ones take the multi-kernel paths.
LAUNCH_PLANS = {
    ("group_norm", (2, 64, 8, 8), "contiguous"): (1, 2),
    ("group_norm", (2, 64, 8, 8), "channels_last"): (1, 2),
    # The latency floor of design.md §6: one launch forward; the backward is sums, then dx whose blocks form
    # (P, Q) themselves and whose last blocks reduce dgamma / dbeta. Larger inputs keep the combine kernel
    # between the two where those redundant merges would cost bandwidth (channels-last at 128x128).
    ("group_norm", (1, 32, 64, 64), "contiguous"): (1, 2),
    ("group_norm", (1, 32, 64, 64), "channels_last"): (1, 2),
    ("group_norm", (1, 32, 128, 128), "contiguous"): (2, 2),
    ("group_norm", (1, 32, 128, 128), "channels_last"): (2, 3),
    ("layer_norm", (64, 256), None): (1, 2),
    ("layer_norm", (8, 20000), None): (1, 3),
    ("layer_norm_2d", (2, 32, 8, 8), "contiguous"): (1, 2),
    ("layer_norm_2d", (2, 32, 8, 8), "channels_last"): (1, 2),
    ("batch_norm", (4, 32, 8, 8), "contiguous"): (1, 2),
    ("batch_norm", (4, 32, 8, 8), "channels_last"): (1, 2),
    ("batch_norm", (2, 256, 7, 7), "contiguous"): (1, 2),
    ("batch_norm", (2, 256, 7, 7), "channels_last"): (1, 2),
    ("batch_norm", (8, 64, 48, 48), "contiguous"): (3, 3),
    ("batch_norm", (8, 64, 48, 48), "channels_last"): (3, 3),
    ("layer_norm_2d", (2, 64, 48, 48), "contiguous"): (1, 2),
    ("layer_norm_2d", (2, 64, 48, 48), "channels_last"): (1, 2),
    ("rms_norm", (64, 256), None): (1, 2),
    ("rms_norm", (8, 20000), None): (1, 3),
    ("rms_norm_2d", (2, 32, 8, 8), "contiguous"): (1, 2),
    ("rms_norm_2d", (2, 32, 8, 8), "channels_last"): (1, 2),
    # Pre-norm add&norm: the add is inside the one forward launch (s written by it); the backward is the
    # norm's (the add of ds is not a kernel of normext's).
    ("add_layer_norm", (64, 256), None): (1, 2),
    ("add_rms_norm", (64, 256), None): (1, 2),
    ("add_layer_norm", (8, 20000), None): (1, 3),
}


@pytest.mark.parametrize(
    "case", list(LAUNCH_PLANS), ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}"
)
def test_launch_counts(case):
    op, shape, fmt = case
    rows = {
        "layer_norm": lambda t, w_, b_: nxF.layer_norm(t, shape[-1:], w_, b_),
        "rms_norm": lambda t, w_, b_: nxF.rms_norm(t, shape[-1:], w_),
        "add_layer_norm": lambda t, w_, b_: sum(nxF.add_layer_norm(t, t * 2, shape[-1:], w_, b_)),
        "add_rms_norm": lambda t, w_, b_: sum(nxF.add_rms_norm(t, t * 2, shape[-1:], w_)),
    }
    if op in rows:
        x = torch.randn(shape)
        w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
        counts = _fwd_bwd_launches(rows[op], x, w, b)
    else:
        x = make_input(shape, torch.float32, "cpu", fmt)
        w, b = make_params(shape[1], torch.float32, "cpu")
        fn = {
            "group_norm": lambda t, w_, b_: nxF.group_norm(t, 8, w_, b_),
            "layer_norm_2d": lambda t, w_, b_: nxF.layer_norm_2d(t, w_, b_),
            "rms_norm_2d": lambda t, w_, b_: nxF.rms_norm_2d(t, w_),
            "batch_norm": lambda t, w_, b_: nxF.batch_norm(t, None, None, w_, b_, training=True),
        }[op]
        counts = _fwd_bwd_launches(fn, x, w, b)
    assert counts == LAUNCH_PLANS[case]


# ------------------------------------------------------------------------------------------ vector widths


def _bf16_access_bytes(fn):
    """Bytes of bfloat16 loads and stores fn() makes in the kernels, by access width in bytes."""
    _C.emu_reset_launch_counts()
    fn()
    return {width: n * width for (elem, width), n in _C.emu_vector_access_counts().items() if elem == 2}


# (op, shape, layout, groups) -> bfloat16 access widths in bytes (forward, backward): the widest vector that
# divides the contiguous extent each kernel walks (16, 8 or 4 bytes), instead of 2-byte scalars for the whole
# op as soon as one extent is not a multiple of 8 values.
VECTOR_WIDTHS = {
    # HxW = 49 (RoI heads), D = 8: a group's span of 392 values is 16-byte vectors; the fused backward walks
    # channel rows of 49 values, which start at odd offsets, so it stays scalar (see bwd_nchw).
    ("group_norm", (2, 16, 7, 7), "contiguous", 2): ({16}, {2}),
    # HxW = 70, D = 4: a span of 280 values (16 bytes), rows of 70 (4 bytes).
    ("group_norm", (2, 16, 7, 10), "contiguous", 4): ({16}, {4}),
    # C = 60 channels-last: rows of 60 values, 8-byte vectors.
    ("group_norm", (2, 60, 6, 6), "channels_last", 6): ({8}, {8}),
    # LayerNorm D = 770: rows of 770 values, 4-byte vectors.
    ("layer_norm", (16, 770), None, None): ({4}, {4}),
    # BatchNorm past the one-launch size: channels-last rows of C = 60 (8 bytes); NCHW planes of 70 or 49
    # values start at odd offsets, and each takes 16-byte vectors in its body, 2-byte values in its head and
    # tail.
    ("batch_norm", (4, 60, 24, 24), "channels_last", None): ({8}, {8}),
    ("batch_norm", (32, 16, 7, 10), "contiguous", None): ({16, 2}, {16, 2}),
    ("batch_norm", (48, 32, 7, 7), "contiguous", None): ({16, 2}, {16, 2}),
    # C = 64 channels-last: the forward in 16-byte vectors, the backward in 8-byte ones (kRowsGradVec: wider
    # per-channel constants do not fit the registers of 50% occupancy).
    ("batch_norm", (4, 64, 24, 24), "channels_last", None): ({16}, {8}),
    # LayerNorm2d NCHW, HxW = 64: the same for the positions a thread holds (k2dBwdVec).
    ("layer_norm_2d", (2, 16, 8, 8), None, None): ({16}, {8}),
}


@pytest.mark.parametrize(
    "case", list(VECTOR_WIDTHS), ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2]}"
)
def test_odd_extents_take_the_widest_vector(case):
    op, shape, fmt, G = case
    C = shape[-1] if op == "layer_norm" else shape[1]
    x = make_input(shape, torch.bfloat16, "cpu", fmt or "contiguous")
    w, b = make_params(C, torch.float32, "cpu")
    fn = {
        "group_norm": lambda t, w_, b_: nxF.group_norm(t, G, w_, b_),
        "layer_norm": lambda t, w_, b_: nxF.layer_norm(t, shape[-1:], w_, b_),
        "batch_norm": lambda t, w_, b_: nxF.batch_norm(t, None, None, w_, b_, training=True),
        "layer_norm_2d": nxF.layer_norm_2d,
    }[op]
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    y = None

    def forward():
        nonlocal y
        y = fn(*leaves)

    fwd = _bf16_access_bytes(forward)
    bwd = _bf16_access_bytes(lambda: y.backward(torch.ones_like(y)))
    assert (set(fwd), set(bwd)) == VECTOR_WIDTHS[case]
    for by_width in (fwd, bwd):
        # A head and tail are the edges of an extent: most bytes still move in the widest vectors.
        widest = max(by_width)
        assert by_width[widest] >= 0.75 * sum(by_width.values()), by_width


@pytest.mark.parametrize("op", ["layer_norm", "layer_norm_2d"])
def test_backward_with_no_output_requested_reads_nothing(op):
    """An all-false output mask returns empty gradients without a launch (x and dy are not read); one wanted
    output launches kernels (so the count is not zero by accident)."""
    x = torch.randn(4, 32, 6, 6)
    ops = torch.ops.normext
    if op == "layer_norm":
        w, b = torch.randn(6), torch.randn(6)
        _, mean, rstd = ops.layer_norm_fwd(x, w, b, None, [6], 1e-5, 0, 0.0)

        def bwd(mask):
            return ops.layer_norm_bwd(torch.ones_like(x), x, None, mean, rstd, w, b, [6], 0, 0.0, mask)
    else:
        w, b = torch.randn(32), torch.randn(32)
        _, mean, rstd = ops.layer_norm_2d_fwd(x, w, b, None, 1e-5, 0, 0.0)

        def bwd(mask):
            return ops.layer_norm_2d_bwd(torch.ones_like(x), x, None, mean, rstd, w, b, 0, 0.0, mask)

    grads = []
    assert _launches(lambda: grads.extend(bwd([False] * 4))) == 0
    assert all(g.numel() == 0 for g in grads)
    assert _launches(lambda: bwd([False, True, False, False])) > 0


def _run_tiled_by_shape():
    """Cases whose tiling once followed the device: LayerNorm backward with rows per warp group, a block per
    row and long rows (dgamma/dbeta partials per block), and LayerNorm2d on NCHW with 2 x 113 position tiles
    of 32 threads, between 2 x 108 (A100 SMs) and 2 x 132 (H100)."""
    outs = []
    for shape in ((4096, 96), (300, 3000), (8, 20000)):
        x = torch.randn(shape)
        w, b = torch.randn(shape[-1]), torch.randn(shape[-1])
        leaves = [t.requires_grad_() for t in (x, w, b)]
        y = nxF.layer_norm(leaves[0], shape[-1:], leaves[1], leaves[2])
        y.backward(torch.sin(y.detach()))
        outs += [y.detach(), *(t.grad for t in leaves)]
    x = make_input((2, 8, 120, 120), torch.float32, "cpu", "contiguous")
    w, b = make_params(8, torch.float32, "cpu")
    leaves = [t.detach().requires_grad_() for t in (x, w, b)]
    y = nxF.layer_norm_2d(*leaves)
    y.backward(torch.cos(y.detach()))
    return outs + [y.detach(), *(t.grad for t in leaves)]


def test_results_do_not_depend_on_the_gpu():
    """The same inputs give the same bits whichever GPU the emulation answers for (SM count, shared memory,
    occupancy): every reduction order is a function of the shape alone."""
    results = {}
    for device in ("H100", "A100", "H200"):
        _C.emu_set_device(device)
        assert _C.emu_device() == device
        torch.manual_seed(0)
        results[device] = _run_all_ops() + _run_tiled_by_shape()
    for device in ("A100", "H200"):
        for i, (a, b) in enumerate(zip(results["H100"], results[device], strict=True)):
            assert torch.equal(a, b), f"result {i} differs between H100 and {device}"
