# Smoke tests of the benchmark (normext.bench): the suite table is well formed, norms that are not built
# yet are skipped and light up once their functional exists, a tiny run writes the table, JSON and PNG
# (without matplotlib: no PNG, and a message saying so), the torch.compile baseline is timed or its row
# says why not (failure, time limit), the options (--clock, --threads lists) do what they say, and the
# summaries are checked against hand-computed geometric means.
import importlib.util
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F

import normext
from normext.bench import cases, report, runner
from normext.bench.cases import Case

TINY = [
    Case("tiny.gn", "group_norm", (2, 8, 6, 5), groups=4, quick=True),
    Case(
        "tiny.gn.add_silu", "group_norm", (2, 8, 6, 5), act="silu", residual=True, groups=4, dtypes=("bf16",)
    ),
    Case("tiny.in.stack", "instance_norm", (1, 4, 5, 6, 7), act="leaky_relu", layers=1, dtypes=("f32",)),
]
# Timing effort is not under test, nor (except in the compile tests) the compile baseline.
FAST = ["--rounds", "2", "--min-block", "0.0005", "--no-compile"]


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
    assert saved["schema"] == "normext-bench/1" and saved == json.loads(json.dumps(doc)) and saved["complete"]
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


def _one_variant_run(tmp_path, args, suite=None, select="f32/nchw/"):
    suite = suite or [Case("tiny.gn.silu", "group_norm", (2, 8, 6, 5), act="silu", groups=4, dtypes=("f32",))]
    argv = ["--device", "cpu", "--out", str(tmp_path), "--rounds", "2", "--min-block", "0.0005"]
    return runner.main([*argv, "--filter", select, *args], suite)


@pytest.mark.compile
def test_compile_baseline_is_timed_after_compiling(tmp_path, capsys):
    """The real torch.compile of the native chain (GN -> SiLU), forward only (one graph, fastest to
    compile): compiled before the timing, timed in the same rounds, and shown in the table."""
    doc = _one_variant_run(tmp_path, [], select="f32/nchw/fwd$")
    (r,) = doc["results"]
    assert r["compile"]["compile"]["status"] == "ok" and r["compile"]["compile"]["seconds"] > 0
    assert set(r["timings"]) == {"normext", "native", "chain", "compile"}
    assert len(r["ratios"]["compile"]) == 2 and r["speedup"]["compile"] > 0
    assert r["bytes"]["compile"] == r["bytes"]["chain"]
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("case "))
    assert "x compile" in header and "compile time (excluded from the timings)" in out
    assert doc["method"]["compile"]["enabled"] and doc["method"]["compile"]["timeout_s"] == 300


def _broken_compile(fn):
    def run(*args, **kwargs):
        raise RuntimeError("Inductor says no\nsecond line")

    return run


def _slow_compile(fn):
    def run(*args, **kwargs):
        time.sleep(30)  # interrupted by the limit

    return run


def _stubborn_compile(fn):
    def run(*args, **kwargs):
        try:
            time.sleep(30)
        except TimeoutError:  # swallowed, as Inductor does with some errors: the limit strikes again
            time.sleep(30)

    return run


@pytest.mark.parametrize(
    "patch, args, status, message",
    [
        (_broken_compile, [], "failed", "RuntimeError: Inductor says no"),
        (_slow_compile, ["--compile-timeout", "0.3"], "timeout", "over the 0.3 s limit"),
        (_stubborn_compile, ["--compile-timeout", "0.3"], "timeout", "over the 0.3 s limit"),
    ],
)
def test_a_compile_that_fails_or_runs_out_of_time_keeps_its_row(
    tmp_path, monkeypatch, capsys, patch, args, status, message
):
    monkeypatch.setattr(runner, "_compiled", patch)
    started = time.perf_counter()
    doc = _one_variant_run(tmp_path, args, select="f32/nchw/fwd$")
    assert time.perf_counter() - started < 20  # the sleeping compile was cut short
    (r,) = doc["results"]
    assert r["compile"]["compile"]["status"] == status and r["compile"]["compile"]["error"] == message
    assert set(r["timings"]) == {"normext", "native", "chain"} and "compile" not in r["speedup"]
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tiny.gn.silu "))
    assert f" {status} " in row and "ok" in row.split()[-1]
    assert f"torch.compile {status} (compile) in tiny.gn.silu/f32/nchw/fwd: {message}" in out
    assert doc["summary"]["group_norm"]["vs"]["compile"]["fwd"] is None


def test_a_stopped_run_leaves_the_variants_it_measured(tmp_path, monkeypatch):
    measure = runner.run_variant

    def stopped_after_one(variant, *args):
        if variant.backward:
            raise KeyboardInterrupt  # what a time limit's SIGINT does
        return measure(variant, *args)

    monkeypatch.setattr(runner, "run_variant", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        _one_variant_run(tmp_path, ["--no-compile"])
    (json_path,) = tmp_path.glob("*.json")
    saved = json.loads(json_path.read_text())
    assert not saved["complete"] and [r["name"] for r in saved["results"]] == ["tiny.gn.silu/f32/nchw/fwd"]
    assert saved["summary"]["group_norm"]["variants"] == 1


def test_no_compile_leaves_the_baseline_out_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_compiled", _broken_compile)  # would fail if it were called
    doc = _one_variant_run(tmp_path, ["--no-compile"])
    assert all("compile" not in r and "compile" not in r["timings"] for r in doc["results"])
    out = capsys.readouterr().out
    assert "torch.compile baseline: off (--no-compile)" in out
    assert next(line for line in out.splitlines() if line.startswith("tiny.gn.silu ")).count(" off ") == 1


def test_stacks_under_compile_compare_both_compiled_models(tmp_path, monkeypatch, capsys, stand_ins):
    """The plumbing of the compiled stacks (torch.nn model and normext model, both under torch.compile),
    with torch.compile replaced by the identity: compiling itself is tested above."""
    monkeypatch.setattr(runner, "_compiled", lambda fn: fn)
    suite = [Case("t.gn.stack", "group_norm", (1, 8, 5, 5), groups=2, act="relu", layers=1, dtypes=("f32",))]
    doc = _one_variant_run(tmp_path, [], suite)
    (r,) = doc["results"]
    assert set(r["timings"]) == {"normext", "chain", "compile", "normext_compiled"}
    assert {rec["status"] for rec in r["compile"].values()} == {"ok"} and set(r["compile"]) == set(
        runner.COMPILED
    )
    per_round = [a / b for a, b in zip(*(r["timings"][k]["block_s"] for k in runner.COMPILED), strict=True)]
    assert r["speedup_compiled"] == pytest.approx(sorted(per_round)[0] / 2 + sorted(per_round)[1] / 2)
    assert "torch.compile(normext model)" in capsys.readouterr().out


def test_cpu_clock_counts_cpu_time_not_waiting():
    """--clock cpu: a call that sleeps costs (almost) no process CPU time, and the full wall time on the
    wall clock."""
    nap = lambda: time.sleep(0.05)  # noqa: E731
    (wall,) = runner.clock_for(torch.device("cpu"), "wall").block(nap, 1)
    (cpu,) = runner.clock_for(torch.device("cpu"), "cpu").block(nap, 1)
    assert wall >= 0.05 and cpu < 0.01


def test_clock_and_thread_list_options(tmp_path):
    docs = _one_variant_run(
        tmp_path, ["--no-compile", "--clock", "cpu", "--threads", "1,2"], select="f32/nchw/fwd$"
    )
    assert [d["threads"] for d in docs] == [1, 2]
    assert all(d["method"]["clock"] == "time.process_time" for d in docs)
    assert {p.name.split("-20")[0] for p in tmp_path.glob("*.json")} == {
        f"cpu-{report._slug(docs[0]['device']['name'])}-{t}t" for t in (1, 2)
    }
    with pytest.raises(SystemExit):
        runner.parse_args(["--threads", "0"])


def _result(name, norm, dtype, layout, pass_, layers=0, **speedup):
    return {
        "name": f"{name}/{dtype}/{layout}/{pass_}",
        "norm": norm,
        "dtype": dtype,
        "layout": layout,
        "pass": pass_,
        "layers": layers,
        "speedup": speedup,
    }


def test_summaries_against_hand_computed_geometric_means():
    results = [
        _result("a", "group_norm", "float32", "nchw", "fwd", native=2.0, compile=0.5),
        _result("b", "group_norm", "float32", "nchw", "fwd", native=8.0, chain=3.0, compile=2.0),
        _result("b", "group_norm", "float32", "nchw", "fwd+bwd", native=1.5, chain=0.25, compile=4.0),
        _result("b", "group_norm", "float32", "nhwc", "fwd", native=9.0, chain=1.0, compile=1.0),
        _result(
            "s",
            "group_norm",
            "float32",
            "nchw",
            "fwd+bwd",
            layers=2,
            chain=0.9,
            compile=1.2,
            normext_compiled=0.1,
        ),
        {"name": "broken/float32/nchw/fwd", "case": "broken", "norm": "group_norm", "error": "E"},
    ]
    grid = report.summary_grid(results)
    assert [(g["group"], g["layout"], g["variants"]) for g in grid] == [
        ("group_norm", "nchw", 3),
        ("group_norm", "nhwc", 1),
        ("group_norm stacks", "nchw", 1),
    ]
    nchw = grid[0]["vs"]
    assert nchw["native"]["fwd"] == pytest.approx(4.0) and nchw["native"]["fwd+bwd"] == pytest.approx(1.5)
    assert nchw["chain"]["fwd"] == pytest.approx(3.0) and nchw["compile"]["fwd"] == pytest.approx(1.0)
    assert grid[0]["slowest"] == {"name": "b/float32/nchw/fwd+bwd", "baseline": "chain", "speedup": 0.25}
    # a stack's normext_compiled ratio is not a baseline, and a stack has no native op
    assert grid[2]["slowest"]["speedup"] == 0.9 and grid[2]["vs"]["native"]["fwd+bwd"] is None
    summary = report.summarize(results)
    assert set(summary) == {"group_norm", "group_norm stacks"} and summary["group_norm"]["variants"] == 4
    gn = summary["group_norm"]
    assert gn["vs"]["native"]["fwd"] == pytest.approx((2 * 8 * 9) ** (1 / 3))
    assert gn["vs"]["compile"]["fwd"] == pytest.approx(1.0) and gn["vs"]["chain"]["fwd"] == pytest.approx(
        3**0.5
    )
    # the headline: the chain where there is one, else the native op
    assert gn["geomean_speedup_fwd"] == pytest.approx((2 * 3 * 1) ** (1 / 3))
    assert gn["slowest"]["speedup"] == 0.25


def test_peak_memory_lines_include_the_compile_baseline():
    mib = 1 << 20
    peaks = [
        {"normext": mib, "native": 2 * mib, "chain": 4 * mib, "compile": 3 * mib},
        {"normext": mib, "chain": 2 * mib},
    ]
    doc = {
        "device": {"type": "cuda"},
        "results": [{"name": n, "peak_memory_bytes": p} for n, p in zip("ab", peaks, strict=True)],
    }
    head, columns, a, b = report.memory_lines(doc)
    assert columns.split() == ["variant", "normext", "native", "op", "chain", "compile", "saved"]
    assert a.split() == ["a", "1.0", "2.0", "4.0", "3.0", "75%"] and b.split() == [
        "b",
        "1.0",
        "-",
        "2.0",
        "-",
        "50%",
    ]
