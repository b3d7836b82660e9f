"""The Gradio page: prompt and options on the left, original vs accelerated on the right.

``build_demo(engine)`` returns a ``gr.Blocks``; ``launch(engine, ...)`` queues it (one job at a time)
and serves it. The click handler is published as the API endpoint ``/generate``::

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    original, accelerated, timing = client.predict("a red fox in the snow", api_name="/generate")
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import uuid

import gradio as gr

from .engine import MAX_STEPS, MIN_STEPS, DemoEngine, GenerationCancelled, highres_support

log = logging.getLogger("linfusion.app")
CUSTOM = "Custom"
GALLERY_SIZE = 12
CSS = """
#timing {font-size: 1.05em}
#status p {margin: 0}
#original img, #accelerated img {width: 100%; height: 100%; object-fit: contain}
"""


class _Errors:
    """The last error of each session, for the status line (gr.Error toasts fade)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_session: dict[str, str] = {}

    def set(self, session: str, message: str) -> None:
        with self._lock:
            self._by_session[session] = message

    def pop(self, session: str) -> str | None:
        with self._lock:
            return self._by_session.pop(session, None)


def _session(request: gr.Request | None) -> str:
    return (getattr(request, "session_hash", None) or "default") if request is not None else "default"


def build_demo(engine: DemoEngine) -> gr.Blocks:
    errors = _Errors()
    presets = engine.presets()
    native_h, native_w = engine.native_size()
    preset_labels = [label for label, _ in presets]
    default_preset = next((label for label, size in presets if size == (native_w, native_h)), CUSTOM)
    methods = engine.methods
    default_method = methods[0][1]
    zero_shot = not engine.bundled
    highres_ok, highres_note = highres_support(engine.pipe)
    device = engine.device.type.upper() if engine.device.type == "cpu" else str(engine.device)

    with gr.Blocks(title="LinFusion demo") as demo:
        gr.Markdown(
            "## LinFusion: original vs accelerated\n"
            f"Model **{engine.model_name}** on **{device}**. The same pipeline runs first with its own softmax "
            "self-attention, then patched with LinFusion attention; both use the same seed."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red fox in the snow, golden hour",
                                    elem_id="prompt")
                negative_prompt = gr.Textbox("", label="Negative prompt", placeholder="blurry, low quality",
                                             visible=engine.has_negative_prompt, elem_id="negative-prompt")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
                status = gr.Markdown("Ready.", elem_id="status")
                method = gr.Radio(methods, value=default_method, label="Method", elem_id="method")
                with gr.Row():
                    window = gr.Slider(1, 64, value=16, step=1, label="Window radius (latent tokens)",
                                       visible=zero_shot and default_method == "local", elem_id="window")
                    shape = gr.Radio(["circle", "tile"], value="circle", label="Window shape",
                                     visible=zero_shot and default_method == "local", elem_id="shape")
                    feature_map = gr.Radio(["elu1", "relu"], value="elu1", label="Feature map",
                                           visible=zero_shot and default_method == "linear", elem_id="feature-map")
                preset = gr.Dropdown(preset_labels + [CUSTOM], value=default_preset, label="Resolution",
                                     info="presets up to what this server's memory allows, or type a size",
                                     elem_id="preset")
                with gr.Row():
                    width = gr.Number(value=native_w, precision=0, label="Width (px)", min_width=90, elem_id="width")
                    height = gr.Number(value=native_h, precision=0, label="Height (px)", min_width=90, elem_id="height")
                    steps = gr.Number(value=engine.default_steps, precision=0, label=f"Steps ({MIN_STEPS}–{MAX_STEPS})",
                                      min_width=90, elem_id="steps")
                with gr.Row():
                    guidance = gr.Number(value=engine.default_guidance, label="Guidance", visible=engine.has_guidance,
                                         min_width=90, elem_id="guidance")
                    seed = gr.Number(value=0, precision=0, label="Seed", min_width=90, elem_id="seed")
                highres = gr.Checkbox(value=False, label="High-res mode", info=highres_note, interactive=highres_ok,
                                      elem_id="highres")
            with gr.Column(scale=3, min_width=480):
                with gr.Row():
                    original = gr.Image(label="Original (softmax attention)", type="pil", format="png",
                                        interactive=False, height=360, elem_id="original")
                    accelerated = gr.Image(label="Accelerated (LinFusion)", type="pil", format="png",
                                           interactive=False, height=360, elem_id="accelerated")
                timing = gr.Markdown("", label="timing", elem_id="timing")
                with gr.Accordion("Slider comparison", open=False):
                    slider = gr.ImageSlider(label="Original ↔ accelerated", type="pil", format="png",
                                            interactive=False, elem_id="slider")
                gallery = gr.Gallery(label="Recent results (original | accelerated)", columns=4, fit_columns=False, height=220,
                                     object_fit="contain", elem_id="gallery")
        history = gr.State([])

        # -- option visibility and resolution presets ------------------------------------------

        def on_method(value):
            local, linear = zero_shot and value == "local", zero_shot and value == "linear"
            return gr.update(visible=local), gr.update(visible=local), gr.update(visible=linear)

        method.change(on_method, method, [window, shape, feature_map], api_visibility="private", queue=False)

        sizes = dict(presets)

        def on_preset(label):
            if label in sizes:
                w, h = sizes[label]
                return w, h
            return gr.update(), gr.update()

        preset.input(on_preset, preset, [width, height], api_visibility="private", queue=False)
        for box in (width, height):
            box.input(lambda: CUSTOM, None, preset, api_visibility="private", queue=False)

        # -- generation ------------------------------------------------------------------------

        async def generate(prompt, negative_prompt="", method=default_method, window=16, shape="circle",
                           feature_map="elu1", width=native_w, height=native_h, steps=engine.default_steps,
                           guidance=engine.default_guidance, seed=0, highres=False,
                           request: gr.Request = None, progress=gr.Progress()):
            """Original and accelerated image of one prompt, and a line with both times and the speedup."""
            session = _session(request)
            job = engine.start_job(session)

            def report(done: int, total: int, desc: str) -> None:
                progress((done, total), desc=desc, unit="steps")

            progress(0, desc="waiting for the GPU" if engine.device.type == "cuda" else "starting")
            try:
                result = await asyncio.to_thread(
                    engine.generate, job, prompt, negative_prompt=negative_prompt, method=method, window=window,
                    shape=shape, feature_map=feature_map, width=width, height=height, steps=steps,
                    guidance=guidance, seed=seed, highres=bool(highres), progress=report,
                )
            except asyncio.CancelledError:  # the Cancel button, a client's job.cancel(), a closed tab
                job.cancel()
                raise
            except GenerationCancelled as error:
                errors.set(session, f"**Cancelled:** {error}")
                raise gr.Error(str(error), title="Cancelled", print_exception=False) from None
            except ValueError as error:
                errors.set(session, f"**Error:** {error}")
                raise gr.Error(str(error), print_exception=False) from None
            except Exception as error:  # a failure inside the pipeline: report it, stay up
                log.exception("generation failed")
                message = f"Generation failed: {type(error).__name__}: {error}"
                errors.set(session, f"**Error:** {message}")
                raise gr.Error(message, print_exception=False) from None
            # PNG text chunks: what made the image, and a per-request id. Gradio caches outputs by content
            # hash; unique bytes mean a file being served is never rewritten in place by a later output.
            request_id = uuid.uuid4().hex
            for image, kind in ((result.original, "original"), (result.accelerated, result.label)):
                image.info.update({"prompt": result.prompt, "attention": kind, "seed": str(result.seed),
                                   "linfusion-request": request_id})
            return result.original, result.accelerated, result.timing_text()

        event = generate_button.click(
            generate,
            [prompt, negative_prompt, method, window, shape, feature_map, width, height, steps, guidance, seed, highres],
            [original, accelerated, timing],
            api_name="generate",
            concurrency_id="gpu",
            concurrency_limit=1,
        )

        def record(history, original_image, accelerated_image, timing_text, prompt):
            from ..generation import side_by_side

            if original_image is None or accelerated_image is None:
                return history, history, gr.update(), gr.update()
            short = prompt if len(prompt) <= 40 else prompt[:37] + "…"
            entry = (side_by_side(original_image, accelerated_image), f"{short} — {timing_text.split(' · ')[2]}")
            history = ([entry] + list(history))[:GALLERY_SIZE]
            pair = []
            for image in (original_image, accelerated_image):
                image = image.copy()
                image.info["linfusion-view"] = "slider"  # other bytes than the files the page is loading
                pair.append(image)
            return history, history, tuple(pair), "Done. " + timing_text

        event.success(record, [history, original, accelerated, timing, prompt], [history, gallery, slider, status],
                      api_visibility="private", queue=False)

        def show_error(request: gr.Request):
            return errors.pop(_session(request)) or "**Error:** the request failed."

        event.failure(show_error, None, status, api_visibility="private", queue=False)

        def cancel(request: gr.Request):
            # cancels=[event] below may stop the job before this runs: report the job's outcome
            # either way (a race that showed "Nothing to cancel" after a real cancel)
            job = engine.cancel(_session(request), wait=60)
            if job is None:
                return "Nothing to cancel: no generation is running."
            if job.outcome == "cancelled":
                where = f" after step {job.step} of {job.total} ({job.phase})" if job.phase else " before it started"
                return f"**Cancelled**{where}. Ready for the next request."
            if job.outcome == "finished":
                return "The generation had already finished."
            return "Cancelling… the current step is still running."

        cancel_button.click(cancel, None, status, cancels=[event], api_visibility="private", concurrency_limit=None)

    return demo


def launch(engine: DemoEngine, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           block: bool = True, quiet: bool = False) -> gr.Blocks:
    """Queue the demo (one job at a time) and serve it; ``block=False`` returns once it is up."""
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=1)
    options = dict(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=quiet,
                   show_error=True, css=CSS, footer_links=["api"], run_history=False)
    accepted = inspect.signature(demo.launch).parameters  # footer_links/run_history are newer Gradio options
    demo.launch(**{key: value for key, value in options.items() if key in accepted})
    return demo
