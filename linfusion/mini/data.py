"""Training data for LinFusion-Mini: renders of the procedural world, made on CPU workers.

A *chunk* is ``n`` training scenes (held-out scenes are skipped, so the benchmark's
prompts are never seen) rendered at 128 px, with one prompt wording each and the
scene-parse targets of :func:`linfusion.mini.model.scene_targets`. Chunk ``i`` is a
pure function of ``(seed, i)``.

:class:`RenderStream` renders chunks on a process pool in the background, in order, so
training consumes them while more are being made. Only numpy is used in the workers.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
from dataclasses import dataclass

import numpy as np

from . import world
from .model import scene_targets


@dataclass
class Chunk:
    images: np.ndarray  # (n, H, W, 3) uint8
    prompts: list[str]
    targets: np.ndarray  # (n, T) int64
    crop: bool = False  # crops of 2x renders: pixels only, the prompts do not describe them
    objects: np.ndarray | None = None  # (n, H, W) uint8 object codes, see object_codes (None for crops)


#: rank of each size in the object map (larger rank = smaller object)
SIZE_CODES = {"large": 1, "medium": 2, "small": 3}


def object_code(size: str, textured: bool) -> int:
    """Object-map code (1..6; 0 = background): 2 x size rank, less one for a plain object. Where
    objects overlap the highest code wins: the smallest object, and of equal sizes the textured
    one, so a loss can weight small and textured objects on their own (train.object_scales)."""
    return 2 * SIZE_CODES[size] - (not textured)


#: every (size, textured) -> code, for the loss's per-code table
OBJECT_CODES = {(size, textured): object_code(size, textured) for size in SIZE_CODES for textured in (False, True)}


def object_codes(scene: world.Scene, masks: list[world.ObjectMask], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 map: 0 where no object is drawn, else the highest :func:`object_code` there."""
    codes = np.zeros(shape, np.uint8)
    for m in masks:
        obj = scene.objects[m.placement.obj_index]
        codes[m.mask] = np.maximum(codes[m.mask], object_code(obj.size, obj.texture != "plain"))
    return codes


def render_chunk(task: tuple[int, int, int, int]) -> Chunk:
    """``task = (seed, index, n, size)``: ``n`` training scenes at ``size`` px, or random
    ``size``-px crops of 2x renders when ``size`` is negative (scale variety for the VAE)."""
    seed, index, n, size = task
    rng = np.random.default_rng([seed, index])
    images, prompts, targets, objects = [], [], [], []
    while len(images) < n:
        scene = world.sample_scene(rng)
        if world.scene_split(scene) != "train":
            continue
        if size > 0:
            image, masks = world.render_with_masks(scene, size, size, rng)
            objects.append(object_codes(scene, masks, (size, size)))
        else:
            big = world.render(scene, -2 * size, -2 * size, rng)
            y, x = rng.integers(0, -size + 1, 2)
            image = big[y : y - size, x : x - size]
        images.append(image)
        prompts.append(world.scene_to_prompt(scene, rng))
        targets.append(scene_targets(scene))
    return Chunk(np.stack(images), prompts, np.stack(targets), crop=size < 0,
                 objects=np.stack(objects) if objects else None)


def prompt_chunk(task: tuple[int, int, int]) -> tuple[list[str], np.ndarray]:
    """Prompts and targets only (text-encoder pre-training needs no pixels)."""
    seed, index, n = task
    rng = np.random.default_rng([seed, index, 7])
    prompts, targets = [], []
    while len(prompts) < n:
        scene = world.sample_scene(rng)
        if world.scene_split(scene) != "train":
            continue
        prompts.append(world.scene_to_prompt(scene, rng))
        targets.append(scene_targets(scene))
    return prompts, np.stack(targets)


class RenderStream:
    """Chunks ``(seed, start), (seed, start+1), ...`` rendered by ``workers`` processes
    (0 = in the calling thread, on demand), buffered up to ``max_ready`` chunks."""

    def __init__(self, seed: int, chunk: int = 64, size: int = 128, workers: int = 0, start: int = 0,
                 max_ready: int = 4096, crop_every: int = 0) -> None:
        self.seed, self.chunk, self.size, self.workers = seed, chunk, size, workers
        self.next_index = start
        self.crop_every = crop_every  # every k-th chunk is 2x-render crops (0: never)
        self._ready: queue.Queue = queue.Queue(maxsize=max_ready)
        self._stop = threading.Event()
        self._pool = None
        if workers > 0:
            method = "fork" if "fork" in mp.get_all_start_methods() and not _cuda_initialized() else "spawn"
            self._pool = mp.get_context(method).Pool(workers)
            self._thread = threading.Thread(target=self._produce, daemon=True)
            self._thread.start()

    def _task(self, index: int) -> tuple[int, int, int, int]:
        crop = self.crop_every and index % self.crop_every == self.crop_every - 1
        return (self.seed, index, self.chunk, -self.size if crop else self.size)

    def _tasks(self):
        while not self._stop.is_set():
            yield self._task(self.next_index)
            self.next_index += 1

    def _produce(self) -> None:
        try:
            for result in self._pool.imap(render_chunk, self._tasks(), chunksize=1):
                while not self._stop.is_set():
                    try:
                        self._ready.put(result, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except Exception:  # pool closed under us at shutdown
            return

    def get(self, block: bool = True) -> Chunk | None:
        """The next chunk (``None`` if not ``block`` and none is ready)."""
        if self._pool is None:
            chunk = render_chunk(self._task(self.next_index))
            self.next_index += 1
            return chunk
        try:
            return self._ready.get(block=block, timeout=120 if block else None)
        except queue.Empty:
            return None

    def drain(self, limit: int = 1 << 30) -> list[Chunk]:
        """Every chunk ready now (at most ``limit``), without waiting."""
        out = []
        while len(out) < limit:
            chunk = self.get(block=False) if self._pool is not None else None
            if chunk is None:
                break
            out.append(chunk)
        return out

    def close(self) -> None:
        self._stop.set()
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> RenderStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cuda_initialized() -> bool:
    try:
        import torch

        return torch.cuda.is_initialized()
    except ImportError:
        return False


def to_tensor(images):
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1] (the VAE's range). ``images``: a numpy
    array, or a uint8 tensor already on its device (the conversion then runs there)."""
    import torch

    return torch.as_tensor(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images) -> np.ndarray:
    """float (n, 3, H, W) in [-1, 1] -> uint8 (n, H, W, 3): the inverse of :func:`to_tensor`."""
    import torch

    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
