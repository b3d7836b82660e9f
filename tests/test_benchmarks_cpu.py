"""The GPU benchmark scripts in --tiny mode on CPU, so they don't rot; the `linfusion bench` command."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_e2e_tiny(tmp_path):
    e2e = _load("e2e")
    out = tmp_path / "e2e.json"
    e2e.main(["--tiny", "--models", "flux", "sdxl", "wan13b", "--resolutions", "64",
              "--impls", "cudnn", "cudnn_fused", "sdpa_default", "linear", "linear_relu", "local_tile", "local_circle_auto",
              "local_flex", "--out", str(out)],
             log=lambda *a: None)
    result = json.loads(out.read_text())
    assert {"gpu", "torch", "triton", "cuda", "diffusers"} <= set(result["env"])
    rows = result["rows"]
    assert {r["model"] for r in rows} == {"flux", "sdxl", "wan13b"}
    for r in rows:
        assert set(r) >= {"model", "resolution", "impl", "step_ms", "peak_gb", "status"}
        if r["impl"] in ("cudnn", "cudnn_fused"):
            assert r["status"] == "skipped" and "CUDA" in r["reason"]
        else:
            assert r["status"] == "ok", r
            assert r["step_ms"] > 0
    assert {r["resolution"] for r in rows} == {"64x64", "tiny-v-9f"}


def test_e2e_hold_dense_makes_every_patched_layer_run_softmax():
    """The cudnn_fused baseline: LinFusion's processor, dense branch in every layer."""
    e2e = _load("e2e")
    from linfusion import patch_model, unpatch_model
    from linfusion.processor import LinFusionProcessor

    net = e2e.build_model("flux", True, torch.device("cpu"), torch.float32)
    kwargs, _, _ = e2e.make_inputs("flux", e2e.TINY_RESOLUTIONS[0], True, torch.device("cpu"), torch.float32)
    patch_model(net, method="linear", dense_fallback=False)
    with pytest.raises(RuntimeError, match="no patched layer"):
        e2e.hold_dense(net)
    unpatch_model(net)
    patch_model(net, method="linear")
    processors = [p for p in net.attn_processors.values() if isinstance(p, LinFusionProcessor)]
    for p in processors:  # as at a size where the cost model picks the patched path
        p.dense_fallback.patched_is_faster = lambda *args, **kwargs: True
    with torch.no_grad():
        net(**kwargs)
    assert {p.last_choice for p in processors} == {"patched"}
    stock_calls = []
    for p in processors:  # the replaced processors must not run: this baseline is LinFusion's own dense path
        p.bind_original(lambda *args, **kw: stock_calls.append(1))
    e2e.hold_dense(net)
    with torch.no_grad():
        net(**kwargs)
    assert {p.last_choice for p in processors} == {"dense"} and not stock_calls


def test_e2e_append_keeps_earlier_rows_and_replaces_the_remeasured_ones(tmp_path):
    e2e = _load("e2e")
    out = tmp_path / "e2e.json"
    quiet = dict(log=lambda *a: None)
    e2e.main(["--tiny", "--models", "flux", "sdxl", "--resolutions", "64", "--impls", "linear", "--out", str(out)], **quiet)
    e2e.main(["--tiny", "--models", "sdxl", "--resolutions", "64", "--impls", "linear", "local_tile", "--append",
              "--out", str(out)], **quiet)
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["model"], r["impl"]) for r in rows) == [("flux", "linear"), ("sdxl", "linear"),
                                                             ("sdxl", "local_tile")]
    assert not (tmp_path / "e2e.json.tmp").exists()
    # a re-run that skips a row (here: no time budget) keeps the earlier measurement
    before = {(r["model"], r["impl"]): r["step_ms"] for r in rows}
    e2e.main(["--tiny", "--models", "sdxl", "--resolutions", "64", "--impls", "linear", "--append", "--max-minutes", "0",
              "--out", str(out)], **quiet)
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["impl"]): r["step_ms"] for r in rows} == before
    assert all(r["step_ms"] is not None for r in rows)


@pytest.mark.parametrize("shape", ["circle", "tile"])
def test_tiled_flex_baseline_matches_reference(shape):
    """The FlexAttention baseline on tile-ordered tokens equals the reference, odd grids included."""
    flex = _load("flex_baseline")
    from linfusion.kernels import local_attention_reference

    torch.manual_seed(0)
    cases = (((13, 21), 5, (4, 8), 3), ((9, 10), 0, (8, 16), 7), ((3, 6, 7), 0, (2, 4, 4), (1, 3, 2)))
    for grid, text, tile, window in cases:
        n = text + torch.Size(grid).numel()
        q, k, v = (torch.randn(2, 2, n, 16, dtype=torch.float64) for _ in range(3))
        got = flex.flex_local_attention_tiled(q, k, v, grid, window, text_len=text, shape=shape, tile=tile)
        want = local_attention_reference(q, k, v, grid, window, text_len=text, shape=shape, tile=tile)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="integer circle radii"):
        flex.flex_local_attention_tiled(q, k, v, (3, 6, 7), 2.5, shape="circle", tile=(2, 4, 4))


def test_e2e_plot_orders_resolutions_by_size():
    e2e = _load("e2e")
    labels = ["2048x2048", "8192x8192", "1024x1024", "4096x4096", "720p-81f", "480p-81f", "64x64"]
    assert sorted(labels[:4] + labels[6:], key=e2e.resolution_order) == [
        "64x64", "1024x1024", "2048x2048", "4096x4096", "8192x8192"]
    assert sorted(labels[4:6], key=e2e.resolution_order) == ["480p-81f", "720p-81f"]


def test_e2e_flex_route_matches_reference():
    e2e = _load("e2e")
    from linfusion.kernels import local_attention_reference

    torch.manual_seed(0)
    for grid, text in (((6, 7), 3), ((3, 4, 5), 0)):
        n = text + torch.Size(grid).numel()
        q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
        radii = (2.5,) * len(grid)
        got = e2e.FLEX_ROUTES["local_flex"](q, k, v, grid, radii, text_len=text)
        want = local_attention_reference(q, k, v, grid, radii, text_len=text)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_e2e_skips_by_prediction():
    e2e = _load("e2e")
    prev = {"step_ms": 100.0, "tokens": 1024}
    assert e2e.predict_ms(prev, (64, 64), "cudnn") == pytest.approx(1600.0)
    assert e2e.predict_ms(prev, (64, 64), "linear") == pytest.approx(480.0)
    assert e2e.predict_ms(None, (64, 64), "linear") is None


def test_highres16k_tiny(tmp_path):
    bench = _load("highres16k")
    out = tmp_path / "hr.json"
    bench.main(["--tiny", "--out", str(out)], log=lambda *a: None)
    result = json.loads(out.read_text())
    assert result["sizes"][-1] == [128, 128] and result["image_shape"] == [1, 128, 128, 3]
    assert result["finite"]
    assert list(result["pass_seconds"]) == ["x".join(map(str, size)) for size in result["sizes"]]
    bench.main(["--tiny", "--upscale", "latent", "--out", str(out)], log=lambda *a: None)
    latent = json.loads(out.read_text())
    assert latent["config"]["upscale"] == "latent" and latent["finite"] and latent["sizes"] == result["sizes"]


def test_bench_command_parses_and_finds_scripts():
    from linfusion.commands import bench

    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "e2e", "--tiny", "--models", "flux"])
    assert args.benchmark == "e2e" and args.args == ["--tiny", "--models", "flux"]
    assert bench.find_script("e2e") == ROOT / "benchmarks" / "e2e.py"
    assert bench.find_script("calibrate").name == "calibrate_crossover.py"


def test_calibration_fits_kernel_rows():
    cal = _load("calibrate_crossover")
    base = json.loads((ROOT / "linfusion" / "crossover_profiles.json").read_text())["profiles"]["cuda-sm90"]
    rows = []
    for n in (4096, 16384, 65536):
        flops = 4.0 * 24 * n * n * 128
        rows.append({"op": "dense", "impl": "cudnn", "pass": "fwd", "shape": f"1x24x{n}x128",
                     "ms": flops / 600e12 * 1e3 + 0.01})
        nbytes = 4 * 24 * n * 128 * 2
        rows.append({"op": "linear", "impl": "triton", "pass": "fwd", "variant": "elu1", "shape": f"1x24x{n}x128",
                     "ms": nbytes / 3.6e12 * 1e3 + 0.025, "floor_ms": nbytes / 4.0e12 * 1e3})
    prof = cal.fit_from_rows(rows, base)
    assert prof["dense_tflops"] == pytest.approx(600, rel=0.01)
    assert prof["launch_us"] == pytest.approx(10, abs=1)
    assert prof["bandwidth_tbps"] == pytest.approx(4.0, rel=0.01)
    assert prof["linear_bw_efficiency"] == pytest.approx(0.9, rel=0.01)
    assert prof["linear_launch_us"] == pytest.approx(25, abs=1)


def test_profile_layers_tiny(tmp_path):
    prof = _load("profile_layers")
    out = tmp_path / "profile.json"
    assert prof.main(["--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"cudnn", "linear", "linear_relu", "local_tile"}
    for variant in result["variants"].values():
        assert variant["two_blocks_ms"] > 0 and variant["top"]


def test_e2e_times_fast_steps_until_the_minimum_time_is_reached():
    """Two timed 70 ms steps differ by several percent between calls: fast rows time more steps."""
    import time

    e2e = _load("e2e")
    calls = []

    def net(**kwargs):
        calls.append(1)
        time.sleep(0.01)

    step_ms, first_s, _, timed = e2e.time_step(net, {}, 2, torch.device("cpu"), min_seconds=0.1)
    assert timed >= 8 and len(calls) == timed + 1  # one warm-up, then >= 0.1 s of 10 ms steps
    assert 9 <= step_ms < 50 and first_s > 0
    calls.clear()
    assert e2e.time_step(net, {}, 3, torch.device("cpu"))[3] == 3 and len(calls) == 4  # no minimum: --repeats
    assert e2e.time_step(net, {}, 0, torch.device("cpu"), min_seconds=5.0)[3] == 1  # one long call, timed alone
    assert e2e.time_step(net, {}, 1, torch.device("cpu"), min_seconds=60.0, max_repeats=5)[3] == 5  # capped


def test_mini_failures_analysis_on_renders_and_a_wrong_image(tmp_path):
    """benchmarks/mini_failures.py: ground-truth renders pass everything; a blank image fails every
    object's shape, counted by shape, size and texture class; the grid shows the failures."""
    import numpy as np

    from linfusion.mini.checker import AdherenceChecker
    from linfusion.mini.world import parse_prompt, prompt_set, render

    mf = _load("mini_failures")
    prompts = prompt_set("heldout", 6, seed=0)
    renders = [render(parse_prompt(p), 128, 128) for p in prompts]
    summary, failures = mf.analyse(prompts, renders, AdherenceChecker())
    assert summary["strict"] == 1.0 and failures == [] and summary["confusions"] == {}
    n_objects = sum(len(parse_prompt(p).objects) for p in prompts)
    assert sum(int(v.split("/")[1]) for v in summary["shape_fail_rate_by_size"].values()) == n_objects
    blank = [np.full_like(renders[0], 128)] + renders[1:]
    summary, failures = mf.analyse(prompts, blank, AdherenceChecker())
    assert summary["strict"] == 5 / 6 and [f[0] for f in failures] == [0]
    assert summary["failures"][0]["prompt"] == prompts[0] and "obj0.shape" in summary["failures"][0]["failing"]
    texture = mf.texture_class(parse_prompt(prompts[0]))
    assert summary["passed_by_object_texture"][texture].startswith(
        f"{sum(mf.texture_class(parse_prompt(p)) == texture for p in prompts) - 1}/")
    mf.failure_grid(failures, str(tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 0


def _unbound_globals(path: Path) -> set[str]:
    """Names that some scope of the file reads as globals but that neither the module nor builtins bind
    (what a NameError at run time would report); found with ``symtable``, nothing is executed."""
    import builtins
    import symtable

    top = symtable.symtable(path.read_text(), str(path), "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    bound |= set(dir(builtins)) | {"__file__", "__name__", "__doc__"}
    missing, stack = set(), list(top.get_children())
    while stack:
        scope = stack.pop()
        stack.extend(scope.get_children())
        missing |= {s.get_name() for s in scope.get_symbols() if s.is_global() and s.get_name() not in bound}
    return missing


SOURCE_FILES = sorted(str(p.relative_to(ROOT)) for folder in ("benchmarks", "linfusion", "scripts")
                       for p in (ROOT / folder).rglob("*.py"))


def test_distill_curves_split_students_and_plot_every_loss_term(tmp_path):
    curves = _load("distill_curves")
    single = tmp_path / "metrics.jsonl"
    single.write_text("\n".join(json.dumps({"step": s, "kd": 1.0 / s, "lr": 1e-4}) for s in (1, 2, 3)) + "\n")
    mixed = tmp_path / "distill_metrics.jsonl"  # the Mini GPU script's file: several students, "student" on each line
    mixed.write_text("\n".join(json.dumps({"student": m, "step": s, "kd": 0.5, "attn": 0.2, "lr": 2e-4})
                               for m in ("linear", "local") for s in (1, 2)) + "\n\n")
    runs = curves.read_runs([f"a={single}", f"b={mixed}"])
    assert list(runs) == ["a", "b/linear", "b/local"]
    assert [r["step"] for r in runs["b/local"]] == [1, 2] and "attn" not in runs["a"][0]
    out = tmp_path / "plots" / "curves.png"
    assert curves.main([str(out), f"a={single}", f"b={mixed}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="LABEL=path"):
        curves.read_runs([str(single)])


@pytest.mark.parametrize("script", SOURCE_FILES)
def test_no_unbound_names(script):
    """Many code paths (benchmarks, CUDA dispatch) need a GPU and never run here; a helper that a
    refactor moved away (``copy_bandwidth_tbps`` once) would only fail on the lent H200. Catch it statically."""
    assert _unbound_globals(ROOT / script) == set()


def test_the_unbound_name_check_can_fail(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import os\n\ndef f(x):\n    y = os.sep\n    return helper(x) + y\n")
    assert _unbound_globals(script) == {"helper"}


def test_ab_local_tiny_compares_two_kernel_trees(tmp_path):
    """benchmarks/ab_local.py on CPU (interpreted kernels): the working tree's kernels loaded a second
    time as the "old" tree, so old and new agree exactly; an impl with config flags runs its pass."""
    pytest.importorskip("triton")
    ab = _load("ab_local")
    assert ab.parse_flags(["dq_tma", "BM=32", "dq.tma_loads"], "dkdv") == {"dkdv": {"dq_tma": True, "BM": 32},
                                                                          "dq": {"tma_loads": True}}
    out = tmp_path / "ab.json"
    ab.main(["--old", str(ROOT / "linfusion" / "kernels"), "--cases", "tiny", "--windows", "tile", "--repeats", "1",
             "--out", str(out), "--impls", "old:fwd", "new:fwd", "new:split+BM=16"])
    data = json.loads(out.read_text())
    records = {r["impl"]: r for r in data["records"]}
    assert set(records) == {"old:fwd", "new:fwd", "new:split+BM=16"}
    assert records["new:fwd"]["max_rel_err"] == 0.0 and records["new:fwd"]["ms"] > 0
    assert records["new:split+BM=16"]["pass"] == "bwd"
