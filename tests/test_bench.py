# Smoke tests of the benchmark (normext.bench): the suite table is well formed, norms that are not built
# yet are skipped and light up once their functional exists, and a tiny run writes the table, JSON and PNG
# (without matplotlib: no PNG, and a message saying so).
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

import normext
from normext.bench import cases, runner
from normext.bench.cases import Case

TINY = [
    Case("tiny.gn", "group_norm", (2, 8, 6, 5), groups=4, quick=True),
    Case(
        "tiny.gn.add_silu", "group_norm", (2, 8, 6, 5), act="silu", residual=True, groups=4, dtypes=("bf16",)
    ),
    Case("tiny.in.stack", "instance_norm", (1, 4, 5, 6, 7), act="leaky_relu", layers=1, dtypes=("f32",)),
]
FAST = ["--rounds", "2", "--min-block", "0.0005"]


def _finish(y, activation, slope, residual):
    y = y if residual is None else y + residual
    return cases.NATIVE_ACT[activation](y) if activation != "leaky_relu" else F.leaky_relu(y, slope)


# Stand-ins with design.md's signatures for the norms that are built on other branches, so that their
# benchmark builders are exercised before the real ones land.
def _layer_norm(
    input,
    normalized_shape,
    weight=None,
    bias=None,
    eps=1e-5,
    activation=None,
    negative_slope=0.01,
    residual=None,
):
    return _finish(
        F.layer_norm(input, normalized_shape, weight, bias, eps), activation, negative_slope, residual
    )


def _layer_norm_2d(
    input, weight=None, bias=None, eps=1e-6, activation=None, negative_slope=0.01, residual=None
):
    y = F.layer_norm(input.movedim(1, -1), input.shape[1:2], weight, bias, eps).movedim(-1, 1)
    return _finish(y, activation, negative_slope, residual)


def _batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    activation=None,
    negative_slope=0.01,
    residual=None,
):
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _finish(y, activation, negative_slope, residual)


class _LayerNorm2d(torch.nn.LayerNorm):
    def __init__(self, num_channels, eps=1e-6, activation=None):
        super().__init__(num_channels, eps=eps)
        self.activation = activation

    def forward(self, x, residual=None):
        return _layer_norm_2d(x, self.weight, self.bias, self.eps, self.activation, residual=residual)


class _BatchNorm2d(torch.nn.BatchNorm2d):
    def __init__(self, num_features, activation=None):
        super().__init__(num_features)
        self.activation = activation

    def forward(self, x, residual=None):
        return _batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            activation=self.activation,
            residual=residual,
        )


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """Timing is not under test: one thread keeps these tests fast on a busy machine (where a parallel
    region waits for a descheduled worker), and a small roofline copy is enough."""
    monkeypatch.setattr(runner, "COPY_BYTES", {"cpu": 16 << 20, "cuda": 64 << 20})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stand_ins(monkeypatch):
    for name, fn in [
        ("layer_norm", _layer_norm),
        ("layer_norm_2d", _layer_norm_2d),
        ("batch_norm", _batch_norm),
    ]:
        if not hasattr(normext.functional, name):
            monkeypatch.setattr(normext.functional, name, fn, raising=False)
    for name, cls in [("LayerNorm2d", _LayerNorm2d), ("BatchNorm2d", _BatchNorm2d)]:
        if not hasattr(normext, name):
            monkeypatch.setattr(normext, name, cls, raising=False)
    for name in ("BatchNorm1d", "BatchNorm3d"):
        if not hasattr(normext, name):
            monkeypatch.setattr(normext, name, None, raising=False)


def test_suite_is_well_formed():
    names = [c.name for c in cases.SUITE]
    assert len(names) == len(set(names))
    assert {c.norm for c in cases.SUITE} == set(cases.NORMS)
    for case in cases.SUITE:
        assert set(case.dtypes) <= set(cases.DTYPES)
        for device in ("cuda", "cpu"):
            variants = cases.expand(case, device)
            assert variants and len({v.name for v in variants}) == len(variants)
            for v in variants:
                assert v.shape[1] == case.shape[1]  # CPU scaling keeps the channels
                if device == "cpu":
                    assert v.numel <= max(cases.CPU_NUMEL, math.prod(case.shape[:2]))
    assert {c.norm for c in cases.SUITE if c.quick} >= {
        "group_norm",
        "instance_norm",
        "layer_norm",
        "batch_norm",
    }


def test_cpu_scaled_halves_all_but_channels():
    assert cases.cpu_scaled((2, 32, 128, 128, 128), 1 << 19) == (2, 32, 16, 16, 32)
    assert cases.cpu_scaled((4096, 4096), 1 << 19) == (128, 4096)
    assert cases.cpu_scaled((1, 32, 64, 64), 1 << 19) == (1, 32, 64, 64)


def test_min_bytes_follows_the_design_accounting():
    case = Case("x", "group_norm", (2, 4, 3, 3), residual=True, act="relu")
    fwd, both = (cases.Variant(case, case.shape, "bf16", "nchw", b) for b in (False, True))
    assert fwd.min_bytes() == 3 * 72 * 2 and fwd.min_bytes(residual=False) == 2 * 72 * 2
    assert both.min_bytes() == 7 * 72 * 2 and both.min_bytes(residual=False) == 5 * 72 * 2
    # Pre-norm add: x, r read and out, s written; backward dout, ds, s read and dx, dr written.
    pre = Case("y", "add_layer_norm", (8, 9), residual=True)
    fwd, both = (cases.Variant(pre, pre.shape, "f32", "rows", b) for b in (False, True))
    assert fwd.min_bytes() == 4 * 72 * 4 and both.min_bytes() == 9 * 72 * 4


def test_missing_norms_are_skipped_with_a_note(monkeypatch):
    monkeypatch.delattr(normext.functional, "instance_norm")
    variants, notes = cases.select(TINY, "cpu", filters=["tiny"])
    assert variants and all(v.case.norm == "group_norm" for v in variants)
    assert len(notes) == 1 and "normext.functional.instance_norm" in notes[0] and "tiny.in.stack" in notes[0]


def test_filter_and_quick_select_by_name():
    variants, _ = cases.select(TINY, "cpu", quick=True, filters=[r"/bf16/nhwc/fwd$"])
    assert [v.name for v in variants] == ["tiny.gn/bf16/nhwc/fwd"]


def test_every_norm_builder_runs(stand_ins):
    """One variant of every norm and stack kind through the real runner (stand-ins for unbuilt norms)."""
    suite = [
        Case("t.gn", "group_norm", (2, 8, 4, 4), groups=2, act="relu", residual=True),
        Case("t.in", "instance_norm", (2, 4, 3, 4, 5), act="leaky_relu"),
        Case("t.ln", "layer_norm", (16, 24), act="gelu", residual=True),
        Case("t.ln2d", "layer_norm_2d", (2, 8, 4, 4)),
        Case("t.rms", "rms_norm", (16, 24), act="silu", residual=True),
        Case("t.rms2d", "rms_norm_2d", (2, 8, 4, 4)),
        Case("t.add_ln", "add_layer_norm", (16, 24), residual=True),
        Case("t.bn", "batch_norm", (4, 8, 4, 4), act="relu", residual=True),
        Case("t.bn_eval", "batch_norm_eval", (2, 8, 4, 4), act="silu"),
        Case("t.gn.stack", "group_norm", (1, 8, 5, 5), groups=2, act="silu", layers=1),
        Case("t.bn.stack", "batch_norm", (2, 8, 5, 5), act="relu", layers=1),
        Case("t.ln2d.stack", "layer_norm_2d", (1, 8, 5, 5), layers=1),
    ]
    variants, notes = cases.select(suite, "cpu", filters=["/f32/(nchw|ncdhw|rows)/", "bf16/nhwc/fwd"])
    assert not notes
    device, clock = torch.device("cpu"), runner.clock_for(torch.device("cpu"))
    for v in variants:
        result = runner.run_variant(v, device, clock, (1, 1e-4), 1 << 16, 1 << 26)
        assert result["check"]["ok"], (v.name, result["check"])
        expected = (
            {"normext", "chain"}
            if v.case.layers
            else {"normext", "native"} | ({"chain"} if v.case.fused else set())
        )
        assert set(result["timings"]) == expected


def test_tiny_run_writes_table_json_and_png(tmp_path, capsys):
    doc = runner.main(["--device", "cpu", "--out", str(tmp_path), *FAST], suite=TINY)
    out = capsys.readouterr().out
    assert "tiny.gn.add_silu" in out and "geomean speedup" in out and "not measured" in out
    (json_path,) = tmp_path.glob("cpu-*.json")
    saved = json.loads(json_path.read_text())
    assert saved["schema"] == "normext-bench/1" and saved == json.loads(json.dumps(doc))
    for key in ("date", "device", "threads", "torch", "cuda", "normext", "git", "method", "load_average"):
        assert key in saved
    assert saved["device"]["type"] == "cpu" and saved["roofline"]["bytes_per_s"] > 0
    results = {r["name"]: r for r in saved["results"]}
    assert len(results) == 8 + 4 + 2 and not [r for r in results.values() if "error" in r]
    fused = results["tiny.gn.add_silu/bf16/nhwc/fwd+bwd"]
    assert set(fused["timings"]) == {"normext", "native", "chain"} and len(fused["ratios"]["chain"]) == 2
    assert fused["bytes"]["normext"] == 7 * 2 * 8 * 6 * 5 * 2 and 0 < fused["roofline_fraction"]["normext"]
    assert fused["check"]["ok"] and len(fused["timings"]["normext"]["block_s"]) == 2
    stack = results["tiny.in.stack/f32/ndhwc/fwd+bwd"]
    assert set(stack["timings"]) == {"normext", "chain"} and "bytes" not in stack
    assert set(saved["summary"]) == {"group_norm", "instance_norm stacks"}
    assert (tmp_path / json_path.name.replace(".json", ".txt")).exists()
    png = json_path.with_suffix(".png")
    if importlib.util.find_spec("matplotlib") is None:  # the chart is optional: a message takes its place
        assert not png.exists() and "matplotlib is not installed: no PNG chart" in out
    else:
        assert png.stat().st_size > 0


def test_a_failing_variant_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise NotImplementedError("Could not run 'normext::group_norm_fwd' with arguments from the 'CUDA'")

    monkeypatch.setattr(normext.functional, "group_norm", broken)
    suite = [TINY[0], Case("tiny.in", "instance_norm", (1, 4, 5, 6), dtypes=("f32",))]
    doc = runner.main(
        ["--device", "cpu", "--out", str(tmp_path), "--filter", "f32/nchw|tiny.in/", *FAST], suite
    )
    errors = [r for r in doc["results"] if "error" in r]
    assert [r["name"] for r in errors] == ["tiny.gn/f32/nchw/fwd", "tiny.gn/f32/nchw/fwd+bwd"]
    assert errors[0]["error"].startswith("NotImplementedError: Could not run")
    assert set(doc["summary"]) == {"instance_norm"}
    assert "error: NotImplementedError" in capsys.readouterr().out
