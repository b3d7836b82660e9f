"""Analytic prompt-adherence checker for the procedural world.

It never looks at a model: it knows the palette, the shape geometry and the texture
patterns from :mod:`linfusion.mini.world` and measures them in the image.

Pipeline (at a fixed analysis scale, shorter side = 128 px):

1. 3x3 median filter, then every pixel -> nearest palette colour in CIELAB.
2. Background = most frequent colour. For each other colour: connected components,
   dropping thin ones (anti-aliasing rims between two colours can land on a third
   palette colour) and tiny ones (noise).
3. Each component gets a shape (a hole -> ring, else the dominant 3/4/5-fold harmonic
   of its radius-vs-angle profile -> triangle/square/star, none -> circle), a size from
   its area, a texture from a fit of the world's texture patterns, and a centroid.
4. The scene's claims (background colour/texture, per group colour, shape, size,
   texture, count, position, relations) are checked against the components.

:func:`validate_checker` measures how often this agrees with the known ground truth.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from .world import (
    COLOURS,
    PALETTE,
    PALETTE_LAB,
    SHADES,
    SIZE_RADIUS,
    SIZES,
    TEXTURE_PERIOD,
    Obj,
    Scene,
    parse_prompt,
    position_cell,
    prompt_set,
    render,
    rgb_to_lab,
    sample_scene,
    shape_inside,
    texture_pattern,
)

ANALYSIS_SIZE = 128  # shorter side of the analysis image, in pixels

# --------------------------------------------------------------------------- geometry


@lru_cache(maxsize=None)
def shape_area(shape: str) -> float:
    """Filled area (holes included) of a unit-radius shape, measured numerically once."""
    g = (np.arange(800) + 0.5) / 800 * 2.6 - 1.3
    x, y = np.meshgrid(g, g)
    filled = "circle" if shape == "ring" else shape
    return float(shape_inside(filled, x, y).mean() * 2.6**2)


@dataclass(frozen=True)
class Component:
    """One detected blob of a single palette colour."""

    colour: str
    shape: str
    size: str
    texture: str
    cx: float  # centroid, fraction of width
    cy: float  # centroid, fraction of height
    area: float  # filled area, fraction of (shorter side)^2


_HARMONIC_SHAPES = {3: "triangle", 4: "square", 5: "star"}
_MIN_HARMONIC = 0.05  # ideal amplitudes: square 0.13, triangle 0.27, star 0.27; circle < 0.015


def radial_harmonics(mask: np.ndarray, n_angles: int = 64) -> np.ndarray:
    """Relative Fourier amplitudes of the blob's radius-vs-angle profile.

    Element ``k - 1`` is harmonic ``k``: a shape with k-fold symmetry has a strong k-th
    harmonic whatever its rotation, size or blur (rounded corners only weaken it).
    """
    filled = ndimage.binary_fill_holes(mask).astype(np.float64)
    ys, xs = np.nonzero(filled)
    cy, cx = ys.mean(), xs.mean()
    radii = np.arange(0.0, np.hypot(*filled.shape), 0.25)
    theta = np.arange(n_angles) * 2 * np.pi / n_angles
    py = cy + radii[None, :] * np.sin(theta)[:, None]
    px = cx + radii[None, :] * np.cos(theta)[:, None]
    inside = ndimage.map_coordinates(filled, [py, px], order=1, cval=0.0) >= 0.5
    profile = radii[np.argmin(inside, axis=1)]  # first radius that leaves the blob
    spectrum = np.abs(np.fft.rfft(profile))
    if spectrum[0] == 0:  # centroid outside the blob (e.g. a "C"): no radial profile
        return np.zeros(len(spectrum) - 1)
    return 2 * spectrum[1:] / spectrum[0]


def classify_shape(mask: np.ndarray) -> str:
    """Shape of one blob: a hole makes a ring; otherwise the dominant 3/4/5-fold
    radial harmonic gives triangle/square/star, and no dominant harmonic a circle."""
    filled_area = float(ndimage.binary_fill_holes(mask).sum())
    if (filled_area - mask.sum()) / filled_area > 0.12:  # ideal ring: 0.30
        return "ring"
    harmonics = radial_harmonics(mask)
    k = max(_HARMONIC_SHAPES, key=lambda j: harmonics[j - 1])
    return _HARMONIC_SHAPES[k] if harmonics[k - 1] > _MIN_HARMONIC else "circle"


def classify_size(area: float, shape: str) -> str:
    """Nearest size class (in log radius) from the filled area in shorter-side units."""
    radius = np.sqrt(area / shape_area(shape))
    return min(SIZES, key=lambda s: abs(np.log(radius / SIZE_RADIUS[s])))


# --------------------------------------------------------------------------- texture

_TEXTURED = ("stripes", "dots", "checker")
_TEXTURE_MIN_CORR = 0.3  # below this the region counts as plain
_TEXTURE_MIN_GAIN = 0.4  # fitted pattern amplitude, as a fraction of the rendered contrast


@lru_cache(maxsize=None)
def _shade_contrast(colour: str) -> float:
    """Signed lightness step (Lab L) from a colour to its texture shade."""
    lab = rgb_to_lab(np.array([PALETTE[colour], SHADES[colour]], np.float64))
    return float(lab[1, 0] - lab[0, 0])


@lru_cache(maxsize=8)
def _templates(h: int, w: int) -> tuple[tuple[str, np.ndarray], ...]:
    """Every texture pattern at quarter-period phase shifts, rendered at (h, w).

    The phase search makes detection robust to patterns shifted relative to the
    renderer's anchor, e.g. in a generated image.
    """
    short = min(h, w)
    steps = np.arange(4) / 4 * TEXTURE_PERIOD
    out = []
    for kind in _TEXTURED:
        for dx in steps:
            for dy in steps if kind != "stripes" else steps[:1]:  # vertical stripes ignore y
                acc = np.zeros((h, w))
                for o in (0.25, 0.75):  # 2x2 supersampling matches anti-aliased renders
                    for p in (0.25, 0.75):
                        u = (np.arange(w)[None, :] + o) / short + dx
                        v = (np.arange(h)[:, None] + p) / short + dy
                        acc += texture_pattern(kind, u, v)
                out.append((kind, acc / 4))
    return tuple(out)


def classify_texture(lightness: np.ndarray, region: np.ndarray, colour: str) -> str:
    """Texture of ``region`` by fitting each world pattern to its lightness.

    A pattern is accepted if it correlates with the lightness *and* its fitted
    amplitude is a sizeable part of the contrast the renderer uses for ``colour`` --
    the second test rejects anti-aliasing and noise that happen to correlate.
    """
    if region.sum() < 40:
        return "plain"
    y = lightness[region]
    y = y - y.mean()
    norm_y = np.sqrt((y * y).sum())
    if norm_y < 1e-6:
        return "plain"
    contrast = _shade_contrast(colour)
    best, best_corr = "plain", _TEXTURE_MIN_CORR
    for kind, template in _templates(*lightness.shape):
        t = template[region]
        t = t - t.mean()
        tt = (t * t).sum()
        if tt < 1e-6:
            continue
        yt = (y * t).sum()
        corr = np.sign(contrast) * yt / (norm_y * np.sqrt(tt))
        gain = (yt / tt) / contrast
        if corr > best_corr and gain > _TEXTURE_MIN_GAIN:
            best, best_corr = kind, corr
    return best


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class Analysis:
    """What the checker sees in an image."""

    background: str
    background_texture: str
    components: tuple[Component, ...]


def _to_array(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)  # CHW -> HWC
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    if image.dtype != np.uint8:  # floats in [0, 1] (or [-1, 1] model outputs) -> uint8
        image = image.astype(np.float64)
        if image.min() < 0:
            image = (image + 1) / 2
        if image.max() <= 1.0:
            image = image * 255
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image[..., :3]


def analyse(image: np.ndarray | Image.Image, analysis_size: int = ANALYSIS_SIZE) -> Analysis:
    """Segment an image into background and coloured components (see module docstring)."""
    arr = _to_array(image)
    h, w = arr.shape[:2]
    scale = analysis_size / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray(arr).resize(size, Image.BICUBIC, reducing_gap=None)
    pil = pil.filter(ImageFilter.MedianFilter(3))  # removes speckle noise and JPEG ringing
    lab = rgb_to_lab(np.asarray(pil))
    d = ((lab[:, :, None, :] - PALETTE_LAB[None, None]) ** 2).sum(-1)
    labels = d.argmin(-1)
    short = min(labels.shape)

    counts = np.bincount(labels.ravel(), minlength=len(COLOURS))
    bg_idx = int(counts.argmax())
    bg_region = ndimage.binary_erosion(labels == bg_idx, iterations=2)
    bg_texture = classify_texture(lab[..., 0], bg_region, COLOURS[bg_idx])

    # A real object (even a small star) survives a 2-pixel erosion; rims and specks don't.
    min_area = 0.3 * shape_area("triangle") * (SIZE_RADIUS["small"] * short) ** 2
    components = []
    for idx, colour in enumerate(COLOURS):
        if idx == bg_idx or counts[idx] < min_area:
            continue
        mask = ndimage.binary_opening(labels == idx)
        comp, n = ndimage.label(mask, structure=np.ones((3, 3)))
        if n == 0:
            continue
        core = ndimage.binary_erosion(mask, iterations=2)
        thick = set(np.unique(comp[core]).tolist()) - {0}
        for lab_id, sl in enumerate(ndimage.find_objects(comp), start=1):
            if lab_id not in thick:
                continue
            blob = comp[sl] == lab_id
            if blob.sum() < min_area:
                continue
            shape = classify_shape(np.pad(blob, 1))
            filled_area = float(ndimage.binary_fill_holes(blob).sum()) / short**2
            ys, xs = np.nonzero(blob)
            region = np.zeros_like(mask)
            region[sl] = ndimage.binary_erosion(blob, iterations=2)
            components.append(Component(
                colour=colour,
                shape=shape,
                size=classify_size(filled_area, shape),
                texture=classify_texture(lab[..., 0], region, colour),
                cx=float((xs.mean() + sl[1].start + 0.5) / labels.shape[1]),
                cy=float((ys.mean() + sl[0].start + 0.5) / labels.shape[0]),
                area=filled_area,
            ))
    return Analysis(COLOURS[bg_idx], bg_texture, tuple(components))


# --------------------------------------------------------------------------- scoring

RELATION_MARGIN = 0.08  # centroids must differ by this fraction of the image side


def _relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    (ax, ay), (bx, by) = a, b
    m = RELATION_MARGIN
    return {"above": ay < by - m, "below": ay > by + m,
            "left of": ax < bx - m, "right of": ax > bx + m}[relation]


def _majority(values: list[bool]) -> bool:
    return bool(values) and sum(values) * 2 > len(values)


def _assign(obj: Obj, components: tuple[Component, ...], used: set[int]) -> tuple[list[int], int]:
    """Components standing for ``obj``: right colour, preferring the right shape.

    Returns (assigned component indices, number of colour+shape matches).
    """
    same_colour = [i for i, c in enumerate(components) if c.colour == obj.colour and i not in used]
    matches = [i for i in same_colour if components[i].shape == obj.shape]
    others = sorted(set(same_colour) - set(matches), key=lambda i: -components[i].area)
    return (matches + others)[: obj.count], len(matches)


def attribute_kind(claim: str) -> str:
    """The attribute one of :meth:`AdherenceChecker.score`'s claims tests: "obj1.count" -> "count",
    "rel0" -> "relation", "background.colour" -> "background.colour" (apart from the objects' colour)."""
    if claim.startswith("rel"):
        return "relation"
    return claim if claim.startswith("background.") else claim.split(".")[-1]


class AdherenceChecker:
    """Scores how well an image matches a scene (or a prompt of the grammar).

    Attributes checked: ``background.colour``, ``background.texture`` (only credited if
    the background colour is right), and per object group ``objN.colour`` (present),
    ``objN.shape``, ``objN.size``, ``objN.texture``, ``objN.count`` and
    ``objN.position`` (if the prompt gives one), plus ``relN`` per relation. Attributes
    of an object that was not found at all count as failed.
    """

    def __init__(self, analysis_size: int = ANALYSIS_SIZE) -> None:
        self.analysis_size = analysis_size

    def score(self, image: np.ndarray | Image.Image, scene_or_prompt: Scene | str) -> dict:
        """Return ``{"adherence": 0..1, "passed": bool, "attributes": {name: bool},
        "analysis": Analysis}``; adherence is the fraction of attributes satisfied."""
        scene = parse_prompt(scene_or_prompt) if isinstance(scene_or_prompt, str) else scene_or_prompt
        seen = analyse(image, self.analysis_size)
        comps = seen.components
        attrs: dict[str, bool] = {}
        bg_ok = seen.background == scene.background
        attrs["background.colour"] = bg_ok
        attrs["background.texture"] = bg_ok and seen.background_texture == scene.background_texture

        used: set[int] = set()
        centroids: list[tuple[float, float] | None] = []
        for n, obj in enumerate(scene.objects):
            assigned, n_matches = _assign(obj, comps, used)
            used.update(assigned)
            got = [comps[i] for i in assigned]
            attrs[f"obj{n}.colour"] = bool(got)
            attrs[f"obj{n}.shape"] = bool(got) and all(c.shape == obj.shape for c in got)
            attrs[f"obj{n}.size"] = _majority([c.size == obj.size for c in got])
            attrs[f"obj{n}.texture"] = _majority([c.texture == obj.texture for c in got])
            attrs[f"obj{n}.count"] = n_matches == obj.count
            if obj.position is not None:
                cell = position_cell(obj.position)
                attrs[f"obj{n}.position"] = any(
                    (min(int(c.cy * 3), 2), min(int(c.cx * 3), 2)) == cell for c in got
                )
            centroids.append(
                (float(np.mean([c.cx for c in got])), float(np.mean([c.cy for c in got]))) if got else None
            )
        for n, rel in enumerate(scene.relations):
            a, b = centroids[rel.subject], centroids[rel.target]
            attrs[f"rel{n}"] = a is not None and b is not None and _relation_holds(rel.relation, a, b)

        adherence = sum(attrs.values()) / len(attrs)
        return {"adherence": adherence, "passed": all(attrs.values()), "attributes": attrs, "analysis": seen}

    def check(self, image: np.ndarray | Image.Image, scene_or_prompt: Scene | str) -> bool:
        """True iff every attribute of the scene is satisfied."""
        return self.score(image, scene_or_prompt)["passed"]


# --------------------------------------------------------------------------- validation

DEGRADATIONS = ("blur", "pixel_noise", "jpeg", "colour_shift")


def degrade(image: np.ndarray, kind: str, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Moderate, resolution-relative corruptions that mimic a small diffusion model's output."""
    rng = np.random.default_rng(rng)
    scale = min(image.shape[:2]) / 128  # strengths are defined at 128 px
    if kind == "blur":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0 * scale)))
    if kind == "pixel_noise":
        return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=40)
        return np.asarray(Image.open(buf).convert("RGB"))
    if kind == "colour_shift":
        shift = rng.uniform(-15, 15, 3)
        gain = rng.uniform(0.92, 1.08)
        return np.clip(image.astype(np.float64) * gain + shift, 0, 255).astype(np.uint8)
    raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")


def _noise_image(h: int, w: int, rng: np.random.Generator, smooth: bool) -> np.ndarray:
    """Uniform RGB noise, or low-frequency "blob" noise (a harder negative)."""
    if not smooth:
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def validate_checker(n: int = 100, seed: int = 0,
                     sizes: tuple[tuple[int, int], ...] = ((128, 128), (128, 192), (256, 256))) -> dict:
    """Measure the checker against known ground truth on held-out prompts.

    Returns mean adherence and pass rate for: ground-truth renders, each degradation,
    uniform noise, blob noise and renders of a different scene, plus
    ``checker_accuracy``: how often ``check`` is right when it should pass
    (ground truth, degraded) or fail (noise, wrong scene), over all those images.
    """
    rng = np.random.default_rng(seed)
    checker = AdherenceChecker()
    groups: dict[str, list[dict]] = {k: [] for k in ("ground_truth", *DEGRADATIONS, "noise", "blob_noise", "wrong_scene")}
    for i, prompt in enumerate(prompt_set("heldout", n, seed)):
        scene = parse_prompt(prompt)
        h, w = sizes[i % len(sizes)]
        img = render(scene, h, w, rng)
        groups["ground_truth"].append(checker.score(img, scene))
        for kind in DEGRADATIONS:
            groups[kind].append(checker.score(degrade(img, kind, rng), scene))
        groups["noise"].append(checker.score(_noise_image(h, w, rng, smooth=False), scene))
        groups["blob_noise"].append(checker.score(_noise_image(h, w, rng, smooth=True), scene))
        other = sample_scene(rng)
        while other == scene:
            other = sample_scene(rng)
        groups["wrong_scene"].append(checker.score(render(other, h, w, rng), scene))

    report: dict = {"n": n, "seed": seed}
    for name, results in groups.items():
        report[name] = {
            "mean_adherence": float(np.mean([r["adherence"] for r in results])),
            "pass_rate": float(np.mean([r["passed"] for r in results])),
        }
    positives = ["ground_truth", *DEGRADATIONS]
    correct = sum(r["passed"] for k in positives for r in groups[k])
    correct += sum(not r["passed"] for k in ("noise", "blob_noise", "wrong_scene") for r in groups[k])
    total = sum(len(groups[k]) for k in groups)
    report["degraded"] = {
        "mean_adherence": float(np.mean([report[k]["mean_adherence"] for k in DEGRADATIONS])),
        "pass_rate": float(np.mean([report[k]["pass_rate"] for k in DEGRADATIONS])),
    }
    report["checker_accuracy"] = correct / total
    return report
