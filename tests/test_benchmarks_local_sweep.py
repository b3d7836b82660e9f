"""The block-config sweep of ``benchmarks/kernels_local.py`` on a tiny case.

Without CUDA the kernels run under the Triton CPU interpreter (TRITON_INTERPRET=1, chosen in
conftest.py and here, before triton is imported); the timer is injected, so only the sweep's
bookkeeping is tested: records, the default configs' zero error, failures and the deadline.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytestmark = pytest.mark.skip(reason="no CUDA and TRITON_INTERPRET is not 1")

ROOT = Path(__file__).resolve().parents[1]
CASE = ("tiny", 1, 1, 16, (8, 16), 8)  # name, B, H, D, grid, text_len
VARIANTS = [("circle-r3", "circle", 3, (4, 8)), ("tile-4x8-r1x1", "tile", 8, (4, 8))]
# {} is the default; with 4×8 tiles every block is clamped to 32, so 16 splits tiles into 2 slices/chunks
# {"mask_dot": True}: the tensor-core circle test (the interpreter's default is the formula)
CONFIGS = {"fwd": [{}, {"BN": 16}, {"mask_dot": True}], "dkdv": [{}, {"BM": 16}], "dq": [{}, {"BM": 16, "BN": 16}]}


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels_local", ROOT / "benchmarks" / "kernels_local.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load()


def _n_records(configs, variants) -> int:
    return sum(len(c) for c in configs.values()) * len(variants)


@pytest.fixture(scope="module")
def timed_sweep(bench):
    """Records of the tiny sweep (both variants, 2 configs per kind) and the functions it timed."""
    calls = []

    def timer(fn):
        calls.append(fn)
        return 2.0

    records = bench.sweep(CASE, VARIANTS, CONFIGS, bench=timer, device=DEVICE, log=lambda *a: None)
    return records, calls


def test_sweep_records_and_default_error(bench, timed_sweep):
    records, calls = timed_sweep
    assert len(records) == _n_records(CONFIGS, VARIANTS)
    assert len(calls) == len(records) + 2 * len(VARIANTS)  # + the default fwd and bwd per variant
    for r in records:
        assert set(r) == set(bench.SWEEP_KEYS), r
        assert r["status"] == "ok" and r["ok"] and r["error"] is None, r
        assert r["ms"] == 2.0 and r["default_ms"] == 2.0 and r["speedup"] == 1.0
        assert r["pass"] == ("fwd" if r["kernel"] == "fwd" else "bwd")
        assert set(r["effective"]) == {"BM", "BN", "num_warps", "num_stages", "MASK_DOT"}
        # the dot runs only where asked and where the layout allows it (circles, not tile windows)
        assert r["effective"]["MASK_DOT"] == (r["config"] == {"mask_dot": True} and r["variant"].startswith("circle"))
        assert max(r["effective"]["BM"], r["effective"]["BN"]) <= 32  # clamped to the 4×8 tile
        # a tile window has no circle test: asking for the dot there launches the default kernel
        no_op = r["config"] == {"mask_dot": True} and not r["variant"].startswith("circle")
        assert r["is_default"] == (r["config"] == {} or no_op), r
        assert 0.0 <= r["max_rel_err"] < bench.SWEEP_TOL
        if r["is_default"]:
            assert r["max_rel_err"] < 1e-6, r
    json.dumps(records)  # the records go into the output JSON

    best = bench.best_configs(records)
    assert set(best) == {"fwd", "dkdv", "dq"} and all(set(b) == {v[0] for v in VARIANTS} for b in best.values())
    assert set(bench.best_overall(records)) == {"fwd", "dkdv", "dq"}


def test_max_rel_err(bench):
    ref = torch.tensor([1.0, -4.0])
    assert bench.max_rel_err([ref, ref], [ref, ref]) == 0.0
    assert bench.max_rel_err([ref, ref + torch.tensor([0.0, 0.2])], [ref, ref]) == pytest.approx(0.05)
    assert math.isnan(bench.max_rel_err([torch.tensor([1.0, float("nan")])], [ref]))
    assert not bench.max_rel_err([torch.tensor([1.0, float("inf")])], [ref]) < bench.SWEEP_TOL


def test_main_sweep_only_writes_json(bench, timed_sweep, tmp_path, monkeypatch):
    records, _ = timed_sweep
    seen = {}

    def fake_sweep(case, configs, deadline_s):
        seen["case"], seen["deadline_s"], seen["kinds"], seen["configs"] = case[0], deadline_s, sorted(configs), configs
        return records

    monkeypatch.setattr(bench, "sweep", fake_sweep)
    monkeypatch.setattr(bench, "run_local_cases", lambda *a, **k: pytest.fail("--sweep-only ran the cases"))
    out = tmp_path / "sweep.json"
    bench.main(["--sweep-only", "--sweep-deadline", "7", "--out", str(out)])
    result = json.loads(out.read_text())
    assert seen["deadline_s"] == 7.0 and seen["kinds"] == ["dkdv", "dq", "fwd"] and seen["case"] == "flux-4k"
    assert {"gpu", "torch", "triton"} <= set(result["env"]) and result["rows"] == []
    assert len(result["sweep"]) == len(records)
    assert set(result["sweep_best"]) == {"fwd", "dkdv", "dq"}
    assert set(result["sweep_best_overall"]) == {"fwd", "dkdv", "dq"}
    bench.main(["--sweep-only", "--sweep-kinds", "fwd", "--sweep-case", "sdxl-4k", "--out", str(out)])
    assert seen["case"] == "sdxl-4k"
    assert seen["kinds"] == ["fwd"]
    # --sweep-configs replaces the lists of the kinds it names; the others keep SWEEP_CONFIGS
    bench.main(["--sweep-only", "--sweep-kinds", "fwd", "dq", "--sweep-configs", '{"fwd": [{"mask_dot": true}]}',
                "--out", str(out)])
    assert seen["configs"] == {"fwd": [{"mask_dot": True}], "dq": bench.SWEEP_CONFIGS["dq"]}


def test_sweep_failing_timer_is_recorded_and_sweep_goes_on(bench):
    configs = {"dkdv": [{"BM": 16}], "fwd": [{}, {"BN": 16}]}
    n = [0]

    def timer(fn):
        n[0] += 1
        if n[0] in (1, 2):  # the default bwd (timed when first needed: no default_ms) and the dkdv config
            raise RuntimeError("broken timer " + "x" * 1000)
        return 1.0

    records = bench.sweep(CASE, VARIANTS[1:], configs, bench=timer, device=DEVICE, log=lambda *a: None)
    assert [r["kernel"] for r in records] == ["dkdv", "fwd", "fwd"]  # backward kinds first
    failed, *fwd = records
    assert failed["status"] == "failed" and not failed["ok"] and math.isnan(failed["ms"])
    assert failed["error"].startswith("RuntimeError: broken timer") and len(failed["error"]) < 400
    assert math.isnan(failed["default_ms"])
    assert failed["max_rel_err"] < bench.SWEEP_TOL  # it ran: only the timing failed
    assert all(r["status"] == "ok" and r["ms"] == 1.0 for r in fwd)
    assert bench.best_configs(records).keys() == {"fwd"}  # failed configs are never "best"
    assert "dkdv" not in bench.best_overall(records)


def test_fused_dkdv_sweep_times_the_fused_backward(bench):
    """A "dkdv_fused" config times backward="fused_dq" and is checked against that backward's own
    default-config gradients (equal: the kernels sum in the same order whatever the blocks)."""
    timed = []

    def timer(fn):
        timed.append(fn)
        return 3.0

    records = bench.sweep(CASE, VARIANTS[:1], {"dkdv_fused": [{"BM": 16}]}, bench=timer, device=DEVICE,
                          log=lambda *a: None)
    (rec,) = records
    assert rec["kernel"] == "dkdv_fused" and rec["pass"] == "bwd_fused" and rec["status"] == "ok"
    assert rec["effective"]["BM"] == 16 and rec["max_rel_err"] < 1e-3
    assert len(timed) == 2 and timed[0] is timed[1]  # its default and its config: the same fused pass
    assert "dkdv_fused" not in bench.DEFAULT_SWEEP_KINDS


def test_sweep_deadline_skips(bench):
    def timer(fn):
        raise AssertionError("nothing may be timed after the deadline")

    records = bench.sweep(CASE, VARIANTS, CONFIGS, bench=timer, deadline_s=0, device=DEVICE, log=lambda *a: None)
    assert len(records) == _n_records(CONFIGS, VARIANTS)
    for r in records:
        assert set(r) == set(bench.SWEEP_KEYS)
        assert r["status"] == "skipped" and not r["ok"] and math.isnan(r["ms"])
    assert bench.best_configs(records) == {} and bench.best_overall(records) == {}


def test_sweep_configs_cover_the_brief(bench):
    """The GPU sweep: 24 dkdv and 24 dq configs, distinct; the backward kinds run first."""
    cfgs = bench.SWEEP_CONFIGS
    assert len(cfgs["dkdv"]) == 24 and len(cfgs["dq"]) == 24 and len(cfgs["fwd"]) >= 5
    for kind, lst in cfgs.items():
        assert len({json.dumps(c, sort_keys=True) for c in lst}) == len(lst), kind
    assert {c["BM"] for c in cfgs["dkdv"]} == {16, 32, 64} and {c["BN"] for c in cfgs["dq"]} == {32, 64, 128}
    assert bench.SWEEP_ORDER[-1] == "fwd"
