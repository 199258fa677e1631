# SyncBatchNorm tests: gloo on the CPU in 2 and 3 processes against one BatchNorm on the concatenated batch
# (outputs, input gradients, summed parameter gradients, running statistics; unequal and empty per-rank
# batches), the plain-BatchNorm fallback outside a distributed run and in eval, convert_sync_batchnorm.
import datetime
import socket
import time
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import make_input

import normext

TIMEOUT_S = 120  # whole spawn; collectives time out after COLLECTIVE_TIMEOUT_S, so nothing hangs
COLLECTIVE_TIMEOUT_S = 60

# (name, per-rank batch sizes for 2 / 3 ranks, shape after N, dtype, memory format, activation, residual,
# momentum, affine). float64 makes the comparison with the concatenated batch exact to ~1e-12.
SCENARIOS = [
    (
        "nchw-f64-leaky-res",
        {2: [3, 1], 3: [2, 0, 3]},
        (5, 3, 4),
        torch.float64,
        "contiguous",
        "leaky_relu",
        True,
        0.1,
        True,
    ),
    (
        "cl-f32-cumulative",
        {2: [1, 2], 3: [1, 1, 2]},
        (6, 4, 3),
        torch.float32,
        "channels_last",
        None,
        False,
        None,
        True,
    ),
    (
        "nc-f64-noaffine",
        {2: [0, 4], 3: [3, 2, 0]},
        (7,),
        torch.float64,
        "contiguous",
        "silu",
        False,
        0.3,
        False,
    ),
]
STEPS = [True, True, False, True]  # train, train, eval, train


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario_data(scenario, world, step):
    """Every rank draws the same full batch (seeded by scenario and step) and takes its slice."""
    name, sizes, rest, dtype, fmt, act, residual, _, _ = scenario
    gen_seed = zlib.crc32(name.encode()) + 10 * world + step
    torch.manual_seed(gen_seed)
    total = sum(sizes[world])
    x = make_input((total, *rest), dtype, "cpu", fmt, mean=1.5 * step - 1, std=2.0)
    res = make_input((total, *rest), dtype, "cpu", fmt) if residual else None
    dy = make_input((total, *rest), dtype, "cpu", fmt)
    return x, res, dy


def reference_module(scenario):
    _, _, rest, dtype, _, _, _, momentum, affine = scenario
    m = {0: torch.nn.BatchNorm1d, 1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d}[len(rest) - 1](
        rest[0], momentum=momentum, affine=affine, dtype=dtype
    )
    if affine:
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.5, 1.5, rest[0]))
            m.bias.copy_(torch.linspace(-1, 1, rest[0]))
    return m


def close(a, b, dtype, what):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def run_scenario(scenario, rank, world):
    name, sizes, rest, dtype, fmt, act, residual, momentum, affine = scenario
    sizes = sizes[world]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    ref = reference_module(scenario)
    # Half the scenarios convert a torch.nn module (keeping its state), half build normext's directly.
    if name.startswith("cl"):
        ours = normext.SyncBatchNorm.convert_sync_batchnorm(reference_module(scenario))
        ours.activation = act
    else:
        ours = normext.SyncBatchNorm(
            rest[0], momentum=momentum, affine=affine, activation=act, negative_slope=0.2, dtype=dtype
        )
        ours.load_state_dict(ref.state_dict())
    for step, training in enumerate(STEPS):
        ours.train(training)
        ref.train(training)
        x, res, dy = scenario_data(scenario, world, step)
        xl = x[lo:hi].clone().requires_grad_()
        rl = res[lo:hi].clone().requires_grad_() if residual else None
        y = ours(xl, rl)
        y.backward(dy[lo:hi])
        X = x.clone().requires_grad_()
        R = res.clone().requires_grad_() if residual else None
        z = ref(X) + R if residual else ref(X)
        Y = F.leaky_relu(z, 0.2) if act == "leaky_relu" else F.silu(z) if act == "silu" else z
        Y.backward(dy)
        where = f"{name} rank {rank}/{world} step {step}"
        assert y.shape == xl.shape and y.dtype == dtype, where
        if fmt == "channels_last" and hi > lo:
            assert y.is_contiguous(memory_format=torch.channels_last), where
        close(y, Y[lo:hi].detach(), dtype, f"{where} output")
        close(xl.grad, X.grad[lo:hi], dtype, f"{where} input grad")
        if residual:
            close(rl.grad, R.grad[lo:hi], dtype, f"{where} residual grad")
        if affine:
            grads = torch.stack([ours.weight.grad, ours.bias.grad])
            dist.all_reduce(grads)
            close(grads[0], ref.weight.grad, dtype, f"{where} summed weight grad")
            close(grads[1], ref.bias.grad, dtype, f"{where} summed bias grad")
            ours.zero_grad()
            ref.zero_grad()
        close(ours.running_mean, ref.running_mean, dtype, f"{where} running_mean")
        close(ours.running_var, ref.running_var, dtype, f"{where} running_var")
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item(), where


def biasless_through_collectives(rank, world):
    """bias=False (torch 2.14's weight without a bias) on the all-gather / all-reduce path: output, input
    gradient and summed weight gradient of F.batch_norm on the concatenated batch."""
    m = normext.SyncBatchNorm(3, bias=False, activation="leaky_relu", negative_slope=0.2, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
    torch.manual_seed(11 + world)
    x = torch.randn(2 * world, 3, 5, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x)
    lo, hi = 2 * rank, 2 * rank + 2
    xl = x[lo:hi].clone().requires_grad_()
    y = m(xl)
    y.backward(dy[lo:hi])
    X, w = x.clone().requires_grad_(), m.weight.detach().clone().requires_grad_()
    Y = F.leaky_relu(F.batch_norm(X, None, None, w, None, training=True), 0.2)
    Y.backward(dy)
    where = f"bias=False rank {rank}/{world}"
    close(y, Y[lo:hi].detach(), torch.float64, f"{where} output")
    close(xl.grad, X.grad[lo:hi], torch.float64, f"{where} input grad")
    dist.all_reduce(m.weight.grad)
    close(m.weight.grad, w.grad, torch.float64, f"{where} summed weight grad")
    assert m.bias is None, where


def worker(rank, world, port, errors):
    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        for scenario in SCENARIOS:
            run_scenario(scenario, rank, world)
        biasless_through_collectives(rank, world)
        # A process group of a subset of ranks: ranks outside it run plain BatchNorm.
        sub = dist.new_group([0, 1])
        m = normext.SyncBatchNorm(3, process_group=sub, dtype=torch.float64)
        torch.manual_seed(7)
        x = torch.randn(4, 3, 5, dtype=torch.float64)
        part = x[2 * rank : 2 * rank + 2] if rank < 2 else x[:2]
        y = m(part)
        expected = F.batch_norm(x[:4] if rank < 2 else x[:2], None, None, training=True)
        expected = expected[2 * rank : 2 * rank + 2] if rank < 2 else expected
        torch.testing.assert_close(y, expected, msg=lambda s: f"subgroup rank {rank}: {s}")
        # Double backward across ranks is an error on every rank (not a gradient short of its second-order
        # terms), raised before the backward's all-reduce so that no rank waits.
        m = normext.SyncBatchNorm(3, dtype=torch.float64)
        x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
        try:
            torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
        except RuntimeError as e:
            assert "double backward" in str(e), e
        else:
            raise AssertionError("SyncBatchNorm double backward across ranks did not raise")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_gloo_matches_concatenated_batch(world):
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = mp.start_processes(
        worker, args=(world, free_port(), errors), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not procs.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"SyncBatchNorm workers did not finish within {TIMEOUT_S} s")
    except mp.ProcessRaisedException:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
        pytest.fail("\n".join(messages) or "a worker failed")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()


# ------------------------------------------------------------------------------- not distributed


def test_fallback_without_process_group():
    """No process group initialized: SyncBatchNorm is BatchNorm (training, eval, running stats, grads)."""
    assert not dist.is_initialized()
    ours = normext.SyncBatchNorm(6, activation="relu", momentum=None)
    theirs = torch.nn.BatchNorm2d(6, momentum=None)
    assert isinstance(ours, torch.nn.SyncBatchNorm)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for training in (True, True, False):
        ours.train(training)
        theirs.train(training)
        x = make_input((3, 6, 4, 4), torch.float32, "cpu", "channels_last").requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y_t = ours(x), F.relu(theirs(x2))
        torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
        y.sum().backward()
        y_t.sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours.train()(torch.randn(1, 6, 1, 1))
    with pytest.raises(ValueError, match="at least 2D"):
        ours(torch.randn(6))


def test_convert_sync_batchnorm_keeps_state():
    """torch.nn and normext BatchNorms anywhere in a model become normext.SyncBatchNorm sharing the same
    parameter and buffer tensors; other modules, the training flag and the fused activation are kept."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1),
        torch.nn.BatchNorm2d(4, momentum=0.2),
        torch.nn.Sequential(normext.BatchNorm2d(4, eps=1e-3, activation="silu"), torch.nn.ReLU()),
        torch.nn.SyncBatchNorm(4, affine=False),
        normext.FrozenBatchNorm2d(4),
    )
    model[1].running_mean.fill_(0.5)
    model.eval()
    tensors = {
        "1": (model[1].weight, model[1].running_mean, model[1].num_batches_tracked),
        "2.0": (model[2][0].weight, model[2][0].running_var, model[2][0].num_batches_tracked),
    }
    out = normext.SyncBatchNorm.convert_sync_batchnorm(model)
    assert out is model
    for name in ("1", "2.0", "3"):
        m = out.get_submodule(name)
        assert type(m) is normext.SyncBatchNorm, name
        assert not m.training
    assert out[1].momentum == 0.2 and out[2][0].eps == 1e-3 and out[2][0].activation == "silu"
    assert out[3].weight is None and not out[3].affine
    assert out[1].weight is tensors["1"][0] and out[1].running_mean is tensors["1"][1]
    assert out[1].num_batches_tracked is tensors["1"][2]
    assert out[2][0].weight is tensors["2.0"][0] and out[2][0].running_var is tensors["2.0"][1]
    assert isinstance(out[0], torch.nn.Conv2d) and isinstance(out[4], normext.FrozenBatchNorm2d)
    assert isinstance(out[2][1], torch.nn.ReLU)
    single = normext.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3))
    assert type(single) is normext.SyncBatchNorm
    x = torch.randn(2, 3, 4, 4)
    assert out(x).shape == (2, 4, 4, 4)


def test_state_dict_matches_torch():
    ours = normext.SyncBatchNorm(5, activation="gelu")
    theirs = torch.nn.SyncBatchNorm(5)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.running_mean.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert "activation=gelu" in repr(ours)
