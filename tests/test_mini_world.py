"""Tests for the LinFusion-Mini procedural world (grammar, renderer) and its checker."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from linfusion.mini import (
    AdherenceChecker,
    Obj,
    Relation,
    Scene,
    degrade,
    parse_prompt,
    prompt_set,
    render,
    render_with_masks,
    sample_scene,
    scene_split,
    scene_to_prompt,
    validate_checker,
)
from linfusion.mini.checker import DEGRADATIONS


@pytest.fixture(scope="module")
def checker() -> AdherenceChecker:
    return AdherenceChecker()


@pytest.fixture(scope="module")
def heldout_scenes() -> list[Scene]:
    return [parse_prompt(p) for p in prompt_set("heldout", 40, seed=123)]


# --------------------------------------------------------------------------- grammar


def test_round_trip_many_scenes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(1000):
        scene = sample_scene(rng)
        prompt = scene_to_prompt(scene, rng)
        assert parse_prompt(prompt) == scene, prompt


def test_prompt_wording_is_deterministic_without_rng() -> None:
    scene = sample_scene(7)
    assert scene_to_prompt(scene) == scene_to_prompt(scene)


def test_parse_examples() -> None:
    scene = parse_prompt("A red circle above a blue square.")
    assert scene.objects == (Obj("circle", "red"), Obj("square", "blue"))
    assert scene.relations == (Relation(0, "above", 1),)
    assert scene.background == "white" and scene.background_texture == "plain"

    scene = parse_prompt("two small green triangles on a striped white background")
    assert scene.objects == (Obj("triangle", "green", "small", count=2),)
    assert scene.background_texture == "stripes"

    scene = parse_prompt("a big yellow star in the top left corner of the image, please")
    assert scene.objects == (Obj("star", "yellow", "large", position="top left"),)

    scene = parse_prompt("a purple ring to the right of an orange box on a checkered black backdrop")
    assert scene.relations == (Relation(0, "right of", 1),)
    assert (scene.background, scene.background_texture) == ("black", "checker")


def test_parse_ignores_unknown_words_and_defaults_colour() -> None:
    scene = parse_prompt("a gorgeous photorealistic circle, trending on artstation")
    assert len(scene.objects) == 1 and scene.objects[0].shape == "circle"
    assert scene.objects[0].colour != scene.background


@pytest.mark.parametrize("prompt", ["", "a cat sitting on a sofa", "hello world 42"])
def test_parse_errors_are_clear(prompt: str) -> None:
    with pytest.raises(ValueError, match="could not parse any shape or background"):
        parse_prompt(prompt)


def test_invalid_scene_values_raise() -> None:
    with pytest.raises(ValueError, match="unknown colour"):
        Obj("circle", "teal")
    with pytest.raises(ValueError, match="missing object"):
        Scene((Obj("circle", "red"),), (Relation(0, "above", 1),))


def test_heldout_split_is_fixed_and_disjoint() -> None:
    heldout = prompt_set("heldout", 30, seed=0)
    assert heldout == prompt_set("heldout", 30, seed=0)
    assert len(set(heldout)) == 30
    assert all(scene_split(parse_prompt(p)) == "heldout" for p in heldout)
    train = prompt_set("train", 100, seed=0)
    assert all(scene_split(parse_prompt(p)) == "train" for p in train)
    assert not set(heldout) & set(train)
    with pytest.raises(ValueError):
        prompt_set("test", 3)


def test_counted_prompt_set_holds_only_groups_and_stays_held_out() -> None:
    counted = prompt_set("heldout", 40, seed=0, scenes="counted")
    scenes = [parse_prompt(p) for p in counted]
    assert len(set(counted)) == 40 and all(scene_split(s) == "heldout" for s in scenes)
    assert all(any(o.count > 1 for o in s.objects) for s in scenes)
    assert {o.count for s in scenes for o in s.objects} >= {2, 3, 4}
    assert prompt_set("heldout", 30, seed=0, scenes="all") == prompt_set("heldout", 30, seed=0)  # default unchanged
    with pytest.raises(ValueError, match="counted"):
        prompt_set("heldout", 3, scenes="tall")


# --------------------------------------------------------------------------- renderer


@pytest.mark.parametrize("hw", [(64, 64), (128, 128), (96, 160), (200, 120), (512, 512)])
def test_render_shapes_and_determinism(hw: tuple[int, int]) -> None:
    scene = sample_scene(3)
    a = render(scene, *hw, rng=5)
    assert a.shape == (*hw, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render(scene, *hw, rng=5))
    assert np.array_equal(render(scene, *hw), render(scene, *hw))  # scene-derived default layout


def test_render_is_consistent_across_resolutions() -> None:
    scene = parse_prompt("a large red circle in the top left and a blue square at the bottom right")
    small = np.asarray(Image.fromarray(render(scene, 512, 512, rng=1)).resize((128, 128), Image.BOX))
    assert np.abs(small.astype(int) - render(scene, 128, 128, rng=1)).mean() < 3.0


def test_masks_match_objects_and_colours() -> None:
    scene = parse_prompt("three small green squares and a red ring on a white background")
    img, masks = render_with_masks(scene, 128, 192, rng=0)
    assert len(masks) == 4
    assert not np.any(np.sum([m.mask for m in masks], axis=0) > 1)  # no overlaps
    for m in masks:
        colour = scene.objects[m.placement.obj_index].colour
        expected = {"green": (40, 160, 70), "red": (220, 40, 40)}[colour]
        inner = img[m.mask]
        assert np.abs(inner.mean(0) - expected).max() < 25


def test_layout_respects_positions_and_relations() -> None:
    scene = parse_prompt("a red circle above a blue square")
    for seed in range(10):
        _, masks = render_with_masks(scene, 64, 64, rng=seed)
        a, b = (m.placement for m in masks)
        assert a.cy < b.cy
    _, masks = render_with_masks(parse_prompt("a star in the bottom right"), 80, 120)
    p = masks[0].placement
    assert p.cell == (2, 2) and p.cx > 2 / 3 and p.cy > 2 / 3


# --------------------------------------------------------------------------- checker


def _mean_adherence(checker: AdherenceChecker, images: list[np.ndarray], scenes: list[Scene]) -> float:
    return float(np.mean([checker.score(i, s)["adherence"] for i, s in zip(images, scenes)]))


def test_checker_on_ground_truth(checker: AdherenceChecker, heldout_scenes: list[Scene]) -> None:
    sizes = [(128, 128), (96, 160), (256, 256)]
    images = [render(s, *sizes[i % 3], rng=i) for i, s in enumerate(heldout_scenes)]
    assert _mean_adherence(checker, images, heldout_scenes) >= 0.97
    result = checker.score(images[0], heldout_scenes[0])
    assert set(result) >= {"adherence", "passed", "attributes"}
    assert 0.0 <= result["adherence"] <= 1.0


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_checker_on_degraded_ground_truth(checker: AdherenceChecker, heldout_scenes: list[Scene], kind: str) -> None:
    images = [degrade(render(s, 128, 128, rng=i), kind, rng=i) for i, s in enumerate(heldout_scenes)]
    assert _mean_adherence(checker, images, heldout_scenes) >= 0.9


def test_checker_rejects_noise_and_wrong_scenes(checker: AdherenceChecker, heldout_scenes: list[Scene]) -> None:
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in heldout_scenes]
    assert _mean_adherence(checker, noise, heldout_scenes) < 0.3
    wrong = [render(heldout_scenes[(i + 1) % len(heldout_scenes)], 128, 128, rng=i) for i in range(len(heldout_scenes))]
    assert _mean_adherence(checker, wrong, heldout_scenes) < 0.5
    assert not any(checker.check(img, s) for img, s in zip(noise + wrong, heldout_scenes * 2))


def test_checker_accepts_prompts_pil_and_float_images(checker: AdherenceChecker) -> None:
    prompt = "a small orange triangle to the left of a large purple star on a dotted yellow background"
    img = render(parse_prompt(prompt), 160, 160, rng=0)
    assert checker.check(img, prompt)
    assert checker.check(Image.fromarray(img), prompt)
    assert checker.check(img.astype(np.float32) / 255.0, prompt)
    # Swapping the relation must be caught.
    swapped = checker.score(img, prompt.replace("to the left of", "to the right of"))
    assert not swapped["attributes"]["rel0"] and not swapped["passed"]


def test_validate_checker_report() -> None:
    report = validate_checker(n=8, seed=1)
    assert report["ground_truth"]["mean_adherence"] >= 0.97
    assert report["noise"]["mean_adherence"] < 0.3
    assert 0.9 <= report["checker_accuracy"] <= 1.0
