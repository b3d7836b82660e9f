"""The web demo, headless: a real Gradio server on 127.0.0.1 driven through ``gradio_client``.

The server runs in this process (so a test can break the pipeline on purpose) on a tiny random-weight
SD 1.5 pipeline; images are noise, which is fine: the tests check what comes back, not how it looks.
Set ``USE_MINI = True`` once LinFusion-Mini is bundled to run the same tests on the default model.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

pytest.importorskip("gradio", reason="the web demo needs Gradio: pip install 'linfusion[app]'")
pytest.importorskip("gradio_client", reason="the web demo tests need gradio_client (installed with Gradio)")

from PIL import Image  # noqa: E402

from linfusion.testing.tiny_pipelines import save_tiny_pipeline  # noqa: E402

#: True: the default model (LinFusion-Mini, through load_pipeline(None)); False: a tiny saved pipeline
USE_MINI = True
SIZE = dict(width=96, height=64, steps=2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_demo(models_dir):
    """(engine, demo, url) of a demo served on 127.0.0.1 in this process."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from linfusion.app.engine import DemoEngine
    from linfusion.app.ui import launch

    model = None if USE_MINI else save_tiny_pipeline("sd15", models_dir / "sd15")
    engine = DemoEngine.load(model, device="cpu")
    if not USE_MINI:
        engine.model_name = "tiny SD 1.5 test pipeline (random weights: images are noise)"
    port = free_port()
    demo = launch(engine, host="127.0.0.1", port=port, block=False, quiet=True)
    return engine, demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    engine, demo, url = start_demo(tmp_path_factory.mktemp("models"))
    yield engine, url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[1], verbose=False)


def generate(client, prompt, **kwargs):
    return client.predict(prompt, **{**SIZE, **kwargs}, api_name="/generate")


def check_result(result, width=96, height=64):
    original, accelerated, timing = result
    for path in (original, accelerated):
        with Image.open(path) as image:
            assert image.size == (width, height)
    assert "Original:" in timing and "speedup" in timing and f"{width}×{height} px" in timing
    return timing


def test_generate_returns_both_images_and_timing(client):
    timing = check_result(generate(client, "a red circle on a blue square"))
    assert "LinFusion linear" in timing
    timing = check_result(generate(client, "a red circle", method="local", window=2, shape="tile", seed=3))
    assert "LinFusion local" in timing and "seed 3" in timing


def test_highres_mode_returns_the_target_size(client):
    timing = check_result(generate(client, "a red circle", highres=True))
    assert "high-res mode" in timing


def test_api_is_named_generate_with_prompt_first_and_defaults(client):
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]
    names = [p["parameter_name"] for p in info["parameters"]]
    assert names[0] == "prompt"
    assert all(p["parameter_has_default"] for p in info["parameters"][1:])
    assert len(info["returns"]) == 3


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ("   ", {}, "prompt"),
        ("x", {"steps": 0}, "Steps must be between"),
        ("x", {"steps": 1000}, "Steps must be between"),
        ("x", {"width": 90}, "divisible by 8"),
        ("x", {"width": 8192, "height": 8192}, "choose a smaller resolution"),
        ("x", {"width": 0}, "must be positive"),
        ("x", {"steps": 1, "highres": True}, "High-res mode needs at least 2 steps"),
    ],
)
def test_bad_input_is_an_error_and_the_next_call_succeeds(client, prompt, kwargs, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        generate(client, prompt, **kwargs)
    check_result(generate(client, "a good prompt"))


def test_failed_generation_is_reported_and_the_server_stays_healthy(server, client):
    from gradio_client.exceptions import AppError

    from linfusion.patch import is_patched

    engine = server[0]
    denoiser = getattr(engine.pipe, "transformer", None) or engine.pipe.unet
    original_forward = denoiser.forward

    def broken(*args, **kwargs):
        raise RuntimeError("simulated out of memory")

    denoiser.forward = broken
    try:
        with pytest.raises(AppError, match="Generation failed: RuntimeError: simulated out of memory"):
            generate(client, "this one fails")
    finally:
        denoiser.forward = original_forward
    assert not is_patched(engine.pipe)
    check_result(generate(client, "this one works"))


def test_cancel_really_stops_generation(server, client):
    engine = server[0]
    job = client.submit("a long one", **{**SIZE, "steps": 150}, api_name="/generate")
    deadline = time.time() + 60
    running = None
    while time.time() < deadline:
        running = next((j for j in list(engine._jobs.values()) if not j.done.is_set() and j.step >= 2), None)
        if running:
            break
        time.sleep(0.05)
    assert running is not None, "the long job never started"
    while time.time() < deadline and not job.status().progress_data:
        time.sleep(0.05)
    progress = job.status().progress_data
    assert progress and "original: step" in (progress[0].desc or "") and progress[0].length == 300
    job.cancel()
    assert running.done.wait(30), "the pipeline kept running after cancel"
    assert running.outcome == "cancelled"
    assert running.phase == "original" and running.step < 150
    check_result(generate(client, "after the cancel"))


def test_command_without_model_explains_that_mini_is_not_bundled(capsys):
    from linfusion.app.cli import main
    from linfusion.mini.bundle import mini_is_bundled

    if mini_is_bundled():
        pytest.skip("LinFusion-Mini is bundled: the default model loads")
    assert main(["--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "LinFusion-Mini" in err and "--model" in err


def test_demo_command_options():
    import argparse

    from linfusion.app.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo"])
    assert (args.host, args.port, args.share, args.model, args.adapter) == ("127.0.0.1", 7860, False, None, None)
    args = parser.parse_args(["demo", "--share", "--model", "m", "--adapter", "a", "--device", "cpu", "--dtype", "fp32"])
    assert args.share and args.model == "m" and args.adapter == "a" and callable(args.run)


def test_engine_presets_and_memory_limit(server):
    engine = server[0]
    presets = engine.presets()
    assert presets and presets[0][0].endswith("(native)")
    assert all(w * h <= engine.max_pixels for _, (w, h) in presets)
    with pytest.raises(ValueError, match="megapixels"):
        engine.check_memory(4096, 4096)


def test_cuda_memory_check_uses_free_memory(server, monkeypatch):
    import torch

    from linfusion.app.engine import DemoEngine

    engine = DemoEngine(server[0].pipe, model_name="x")
    engine.device, engine.max_pixels = torch.device("cuda", 0), None
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    engine.check_memory(256, 256)
    with pytest.raises(ValueError, match=r"needs about .* GB of GPU memory but only 2.0 GB is free"):
        engine.check_memory(4096, 4096)
    assert [size for _, size in engine.presets()][-1][0] < 4096


def test_timing_text_explains_a_slower_accelerated_run():
    from linfusion.app.engine import Comparison

    def text(original, accelerated):
        return Comparison("p", "LinFusion linear", 128, 128, 2, 0, None, None, original, accelerated).timing_text()

    assert "no gain at this size" in text(1.0, 1.2)
    assert "no gain" not in text(1.2, 1.0) and "speedup 1.20×" in text(1.2, 1.0)


def test_cancel_reports_the_sessions_job_even_when_it_already_stopped(server):
    """The Cancel button also cancels the request itself, which can stop the job before the button's
    handler runs: the engine still hands back that job, so the page says how it ended."""
    from linfusion.app.engine import DemoEngine

    engine = DemoEngine(server[0].pipe, model_name="x")
    assert engine.cancel("nobody") is None
    job = engine.start_job("s")
    assert engine.cancel("s") is job and job.cancelled  # running: flagged
    job.outcome = "cancelled"
    job.done.set()
    assert engine.cancel("s", wait=60) is job and job.outcome == "cancelled"  # stopped already: no wait
    later = engine.start_job("s")
    later.outcome = "finished"
    later.done.set()
    assert engine.cancel("s") is later and not later.cancelled  # finished: not flagged after the fact
