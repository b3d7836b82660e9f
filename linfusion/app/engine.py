"""The demo's engine: one pipeline, original then accelerated in turn, cancellable, memory-checked.

Nothing here imports Gradio, so the logic is usable (and testable) on its own; ``linfusion.app.ui``
puts a web page on top of it.

* One pipeline object lives in memory. A comparison runs it unpatched, then patched with
  :func:`linfusion.generation.apply_patch`, and unpatches it again: never a deep copy.
* One job at a time holds the pipeline (a lock), whatever the web server's queue does.
* Every denoising step ends in a callback that reports progress and checks the job's cancel flag;
  a cancelled job raises :class:`GenerationCancelled` at the end of the current step.
* Requests are validated before the lock is taken: empty prompt, steps out of range, a resolution
  the pipeline cannot serve, or one that memory cannot hold (CUDA: free memory against a rough
  per-pixel activation model; CPU: a megapixel limit).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import threading
from typing import Any, Callable

import torch
from PIL import Image

from ..generation import (
    GenerationResult,
    apply_patch,
    check_resolution,
    is_video_pipeline,
    native_size,
    resolution_multiple,
    run_highres,
    run_pipeline,
)
from ..patch import denoisers, is_patched, patch_record, unpatch_pipeline

MIN_STEPS, MAX_STEPS = 1, 150
MAX_SIDE = 16384
#: rough peak activation bytes per output pixel and per batch element at a 2-byte dtype
#: (UNet/DiT activations plus the VAE decoder, which dominates at high resolution)
BYTES_PER_PIXEL = 1536
#: fraction of the free CUDA memory a request may plan to use
MEMORY_FRACTION = 0.85
#: default limit on CPU, where memory is rarely the problem but time is
CPU_MAX_PIXELS = 2048 * 2048
PRESET_SCALES = (1, 1.5, 2, 3, 4, 6, 8)
#: SDEdit strength of each high-res refinement pass
HIGHRES_STRENGTH = 0.6
ProgressFn = Callable[[int, int, str], None]


class GenerationCancelled(RuntimeError):
    """The user cancelled the job; raised from the step callback at the end of a step."""

    def __init__(self, phase: str, step: int, total: int):
        self.phase, self.step, self.total = phase, step, total
        where = f"after step {step} of {total} ({phase})" if phase else "before it started"
        super().__init__(f"Generation cancelled {where}. The server is ready for the next request.")


@dataclasses.dataclass
class Job:
    """One request of one browser session (or API client)."""

    session: str
    cancel_event: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    phase: str = ""
    step: int = 0
    total: int = 0
    outcome: str = "queued"  # queued, running, finished, cancelled, failed

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


@dataclasses.dataclass
class Comparison:
    """Both images of one request and what it cost."""

    prompt: str
    label: str
    width: int
    height: int
    steps: int
    seed: int
    original: Image.Image
    accelerated: Image.Image
    original_seconds: float
    accelerated_seconds: float
    original_peak_gb: float | None = None
    accelerated_peak_gb: float | None = None
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.original_seconds / self.accelerated_seconds if self.accelerated_seconds > 0 else math.nan

    def timing_text(self) -> str:
        text = (
            f"Original: {self.original_seconds:.2f} s · {self.label}: {self.accelerated_seconds:.2f} s · "
            f"speedup {self.speedup:.2f}×"
        )
        if self.original_peak_gb is not None and self.accelerated_peak_gb is not None:
            text += f" · peak GPU memory {self.original_peak_gb:.2f} GB → {self.accelerated_peak_gb:.2f} GB"
        text += f" · {self.width}×{self.height} px, {self.steps} steps, seed {self.seed}"
        if self.note:
            text += f" · {self.note}"
        if self.speedup < 1:  # say it plainly rather than leave a slower number unexplained
            text += " · no gain at this size: the replacement pays off at higher resolutions"
        return text

    def caption(self) -> str:
        short = self.prompt if len(self.prompt) <= 40 else self.prompt[:37] + "…"
        return f"{short} — {self.width}×{self.height}, {self.label}, {self.speedup:.2f}×"


def highres_support(pipe=None) -> tuple[bool, str]:
    """Whether high-res mode can run (for ``pipe``, when given), and what the page should say about it."""
    if importlib.util.find_spec("linfusion.pipelines.highres") is None:
        return False, "High-res mode is not available yet: this version of linfusion has no high-resolution pipeline."
    from ..pipelines import highres

    if pipe is not None and type(highres._denoiser(pipe)).__name__ not in highres.IMAGE_DENOISERS:
        return False, f"High-res mode is not available for {type(pipe).__name__} (image pipelines only)."
    return True, ("Native-size pass, then upscale + refinement passes up to the chosen size, with the same "
                  "(original or patched) model and a tiled VAE.")


def _call_defaults(pipe) -> dict[str, Any]:
    try:
        params = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in params.items()}


class DemoEngine:
    """A pipeline plus what the demo needs to compare it with its accelerated self."""

    def __init__(
        self,
        pipe,
        *,
        model_name: str = "LinFusion-Mini",
        adapter: str | None = None,
        bundled: bool = False,
        max_pixels: int | None = None,
        memory_fraction: float = MEMORY_FRACTION,
    ):
        self.pipe = pipe
        self.model_name = model_name
        self.adapter = adapter
        self.bundled = bundled
        self.memory_fraction = memory_fraction
        self.device = torch.device(getattr(pipe, "_execution_device", None) or getattr(pipe, "device", "cpu"))
        self.max_pixels = max_pixels if max_pixels is not None else (None if self.device.type == "cuda" else CPU_MAX_PIXELS)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._jobs_lock = threading.Lock()
        defaults = _call_defaults(pipe)
        self.has_negative_prompt = "negative_prompt" in defaults
        self.has_guidance = "guidance_scale" in defaults
        guidance = defaults.get("guidance_scale")
        self.default_guidance = float(guidance) if isinstance(guidance, (int, float)) else 5.0
        steps = defaults.get("num_inference_steps")
        self.default_steps = min(int(steps), 30) if isinstance(steps, int) else 25
        self.multiple = resolution_multiple(pipe)
        self.video = is_video_pipeline(pipe)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: str | None = None,
        *,
        adapter: str | None = None,
        device: str | None = None,
        dtype: str | None = "auto",
        max_pixels: int | None = None,
    ) -> DemoEngine:
        """Load through :func:`linfusion.generation.load_pipeline` (``model=None``: bundled LinFusion-Mini).

        Raises ``MiniNotBundledError`` when no model is given and Mini is not bundled.
        """
        from ..generation import load_pipeline

        pipe = load_pipeline(model, device=torch.device(device) if device else None, dtype=dtype)
        engine = cls(pipe, model_name=str(model) if model else "LinFusion-Mini", adapter=adapter, bundled=model is None,
                     max_pixels=max_pixels)
        if adapter:  # fail at start-up, not at the first request, when the adapter does not fit
            apply_patch(pipe, None, adapter)
            unpatch_pipeline(pipe)
        return engine

    # -- what the page offers -------------------------------------------------------------------

    @property
    def methods(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the method picker; the first is the default."""
        trained = " (distilled)" if self.bundled else " (zero-shot)"
        choices = [("Linear attention" + trained, "linear"), ("Local window attention" + trained, "local")]
        if self.adapter:
            choices.insert(0, ("Adapter (trained)", "adapter"))
        return choices

    def native_size(self) -> tuple[int, int]:
        return native_size(self.pipe)

    def presets(self) -> list[tuple[str, tuple[int, int]]]:
        """Square sizes from native up to what the model and memory allow, as ("W × H", (width, height))."""
        height, width = self.native_size()
        out: list[tuple[str, tuple[int, int]]] = []
        for scale in PRESET_SCALES:
            w = max(self.multiple, round(width * scale / self.multiple) * self.multiple)
            h = max(self.multiple, round(height * scale / self.multiple) * self.multiple)
            if (w, h) in [size for _, size in out]:
                continue
            try:
                check_resolution(self.pipe, h, w)  # e.g. SD3's positional embedding caps the side
                self.check_memory(h, w)
            except ValueError:
                break
            out.append((f"{w} × {h}" + (" (native)" if scale == 1 else ""), (w, h)))
        return out

    # -- validation -----------------------------------------------------------------------------

    def estimate_bytes(self, height: int, width: int, guidance: float | None = None) -> int:
        """Rough peak activation memory of one run at height×width (weights not included)."""
        dtype = getattr(self.pipe, "dtype", torch.float32)
        itemsize = torch.tensor([], dtype=dtype).element_size()
        batch = 2 if self.has_negative_prompt and (guidance is None or guidance > 1) else 1
        return int(height * width * BYTES_PER_PIXEL * (itemsize / 2) * batch)

    def check_memory(self, height: int, width: int, guidance: float | None = None) -> None:
        """Raise ``ValueError`` when height×width cannot be held (CUDA) or exceeds the pixel limit."""
        pixels = height * width
        if self.max_pixels is not None and pixels > self.max_pixels:
            raise ValueError(
                f"{width}×{height} is {pixels / 1e6:.1f} megapixels, more than this server allows on "
                f"{self.device.type.upper()} ({self.max_pixels / 1e6:.1f} megapixels); choose a smaller resolution"
            )
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            need = self.estimate_bytes(height, width, guidance)
            if need > free * self.memory_fraction:
                raise ValueError(
                    f"{width}×{height} needs about {need / 2**30:.1f} GB of GPU memory but only "
                    f"{free / 2**30:.1f} GB is free on {self.device}; choose a smaller resolution"
                )

    def validate(self, prompt: str, *, width: Any, height: Any, steps: Any, guidance: Any = None,
                 method: str = "linear", window: Any = 16, seed: Any = 0) -> None:
        """Raise ``ValueError`` with a message for a person, before any work starts."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("Please enter a prompt: it is empty.")
        for name, value in (("Width", width), ("Height", height), ("Steps", steps), ("Seed", seed)):
            if value is None or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if not MIN_STEPS <= int(steps) <= MAX_STEPS:
            raise ValueError(f"Steps must be between {MIN_STEPS} and {MAX_STEPS}, got {int(steps)}")
        if int(seed) < 0 or int(seed) >= 2**63:
            raise ValueError(f"Seed must be between 0 and 2^63-1, got {int(seed)}")
        if guidance is not None and not (0 <= float(guidance) <= 50):
            raise ValueError(f"Guidance must be between 0 and 50, got {guidance}")
        valid = [value for _, value in self.methods]
        if method not in valid:
            raise ValueError(f"Method must be one of {valid}, got {method!r}")
        if method == "local" and not (window and int(window) >= 1):
            raise ValueError(f"The local window radius must be at least 1 token, got {window!r}")
        width, height = int(width), int(height)
        if max(width, height) > MAX_SIDE:
            raise ValueError(f"{width}×{height} is larger than {MAX_SIDE} px on a side")
        try:
            check_resolution(self.pipe, height, width)
        except ValueError as error:
            raise ValueError(f"Resolution {width}×{height} cannot be served: {error}") from None
        self.check_memory(height, width, None if guidance is None else float(guidance))

    # -- jobs -----------------------------------------------------------------------------------

    def start_job(self, session: str) -> Job:
        job = Job(session)
        with self._jobs_lock:
            self._jobs[session] = job
        return job

    def job(self, session: str) -> Job | None:
        with self._jobs_lock:
            return self._jobs.get(session)

    def cancel(self, session: str, wait: float = 0.0) -> Job | None:
        """Flag the session's latest job if unfinished; optionally wait up to ``wait`` s until it has
        stopped. Returns that job, finished or not (its ``outcome`` says how it ended: the Cancel
        button's own cancellation of the request may have stopped it first), or None if the session
        has none."""
        job = self.job(session)
        if job is None:
            return None
        if not job.done.is_set():
            job.cancel()
            if wait:
                job.done.wait(wait)
        return job

    def _callback(self, job: Job, phase: str, offset: int, steps: int, progress: ProgressFn | None):
        """Step-end callback: count steps (over every pass of high-res mode), report, honour Cancel."""
        done = [0]

        def on_step_end(pipe, step_index, timestep, callback_kwargs):
            done[0] = min(done[0] + 1, steps)
            job.phase, job.step, job.total = phase, done[0], steps
            if progress is not None:
                progress(offset + done[0], 2 * steps, f"{phase}: step {done[0]}/{steps}")
            if job.cancelled:
                raise GenerationCancelled(phase, done[0], steps)
            return callback_kwargs

        return on_step_end

    def _dense_layers(self) -> tuple[int, int]:
        """(layers whose last call ran dense attention, patched layers) of the patched pipeline."""
        dense = total = 0
        for _, model in denoisers(self.pipe):
            record = patch_record(model)
            for processor in (record.processors().values() if record is not None else ()):
                total += 1
                dense += getattr(processor, "last_choice", None) == "dense"
        return dense, total

    @staticmethod
    def _total_steps(steps: int, plan: list[tuple[int, int]] | None) -> int:
        """Denoising steps of one run: ``steps``, or in high-res mode the base pass plus each refinement."""
        if not plan:
            return steps
        return steps + (len(plan) - 1) * max(1, int(steps * HIGHRES_STRENGTH))

    def _patch_args(self, method: str, window: int, shape: str, feature_map: str) -> tuple[str | None, str | None, dict]:
        if method == "adapter":
            return None, self.adapter, {}
        if self.bundled:
            from ..mini.bundle import bundled_adapter

            return None, bundled_adapter(method), {}
        if method == "local":
            return "local", None, {"window": int(window), "shape": shape}
        return "linear", None, {"feature_map": feature_map}

    def label(self, method: str) -> str:
        return {"adapter": "LinFusion (adapter)", "linear": "LinFusion linear", "local": "LinFusion local"}[method]

    def generate(
        self,
        job: Job,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        method: str = "linear",
        window: int = 16,
        shape: str = "circle",
        feature_map: str = "elu1",
        width: int,
        height: int,
        steps: int,
        guidance: float | None = None,
        seed: int = 0,
        highres: bool = False,
        progress: ProgressFn | None = None,
    ) -> Comparison:
        """Validate, then run original and accelerated on the one pipeline; ``job.done`` is set at the end."""
        try:
            self.validate(prompt, width=width, height=height, steps=steps, guidance=guidance, method=method,
                          window=window, seed=seed)
            width, height, steps, seed = int(width), int(height), int(steps), int(seed)
            note = ""
            plan = None
            if highres:
                available, message = highres_support(self.pipe)
                if not available:
                    raise ValueError(message)
                from ..pipelines.highres import plan_stages

                try:
                    plan = plan_stages(self.pipe, height, width)
                except ValueError as error:
                    raise ValueError(f"High-res mode cannot make {width}×{height}: {error}") from None
                if len(plan) > 1 and int(steps * HIGHRES_STRENGTH) < 1:
                    need = math.ceil(1 / HIGHRES_STRENGTH)
                    raise ValueError(f"High-res mode needs at least {need} steps: each refinement runs "
                                     f"{HIGHRES_STRENGTH:.0%} of them, and {steps} gives none")
                note = "high-res mode: " + " → ".join(f"{w}×{h}" for h, w in plan)
            common = dict(height=height, width=width, steps=steps, seed=seed,
                          guidance_scale=float(guidance) if guidance is not None and self.has_guidance else None,
                          negative_prompt=(negative_prompt or None) if self.has_negative_prompt else None)
            with self._lock:
                job.outcome = "running"
                if job.cancelled:
                    raise GenerationCancelled("", 0, steps)
                try:
                    apply_patch(self.pipe, None, None)  # original attention
                    total = self._total_steps(steps, plan)
                    original = self._run(prompt, common, plan, self._callback(job, "original", 0, total, progress))
                    method_name, adapter, options = self._patch_args(method, window, shape, feature_map)
                    apply_patch(self.pipe, method_name, adapter, options)
                    fast = self._run(prompt, common, plan, self._callback(job, "accelerated", total, total, progress))
                    dense, layers = self._dense_layers()
                finally:
                    if is_patched(self.pipe):
                        unpatch_pipeline(self.pipe)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
            job.outcome = "finished"
            if dense:  # layers="auto": where dense attention is estimated faster, the library keeps it
                fallback = f"dense attention kept in {dense} of {layers} layers at this size (estimated faster)"
                note = f"{note}; {fallback}" if note else fallback
            middle = len(original.images) // 2  # a video shows its middle frame
            return Comparison(prompt, self.label(method), width, height, steps, seed,
                              original.images[middle], fast.images[middle], original.seconds, fast.seconds,
                              original.peak_memory_gb, fast.peak_memory_gb, note)
        except GenerationCancelled:
            job.outcome = "cancelled"
            raise
        except BaseException:
            job.outcome = "failed"
            raise
        finally:
            job.done.set()

    def _run(self, prompt: str, common: dict, plan, callback) -> GenerationResult:
        if not plan:
            return run_pipeline(self.pipe, prompt, callback=callback, **common)
        return run_highres(self.pipe, prompt, height=common["height"], width=common["width"], steps=common["steps"],
                           seed=common["seed"], guidance_scale=common["guidance_scale"],
                           negative_prompt=common["negative_prompt"], strength=HIGHRES_STRENGTH, callback=callback)
