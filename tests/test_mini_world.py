"""Tests for the LinFusion-Mini procedural world (grammar, renderer) and its checker."""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pytest
from PIL import Image

from linfusion.mini import (
    AdherenceChecker,
    Obj,
    Relation,
    Scene,
    degrade,
    layout,
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
from linfusion.mini.world import CANONICAL_CELL_ORDER, POSITIONS, RELATIONS, position_cell


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


@pytest.mark.parametrize("placement", ["canonical", "random"])
def test_layout_respects_positions_and_relations(placement: str) -> None:
    scene = parse_prompt("a red circle above a blue square")
    for seed in range(10):
        _, masks = render_with_masks(scene, 64, 64, rng=seed, placement=placement)
        a, b = (m.placement for m in masks)
        assert a.cy < b.cy
    _, masks = render_with_masks(parse_prompt("a star in the bottom right"), 80, 120, placement=placement)
    p = masks[0].placement
    assert p.cell == (2, 2) and p.cx > 2 / 3 and p.cy > 2 / 3


# --------------------------------------------------------------------------- placement modes


def _cells(scene: Scene, rng=None, placement: str = "canonical") -> list[tuple[int, int]]:
    return [p.cell for p in layout(scene, rng, placement=placement)]


def _relations_hold(scene: Scene, placements) -> bool:
    holds = {"above": lambda a, b: a[0] < b[0], "below": lambda a, b: a[0] > b[0],
             "left of": lambda a, b: a[1] < b[1], "right of": lambda a, b: a[1] > b[1]}
    return all(holds[rel.relation](p.cell, q.cell) for rel in scene.relations
               for p in placements if p.obj_index == rel.subject
               for q in placements if q.obj_index == rel.target)


def _positions_hold(scene: Scene, placements) -> bool:
    return all(p.cell == position_cell(scene.objects[p.obj_index].position)
               for p in placements if p.instance == 0 and scene.objects[p.obj_index].position is not None)


def _scenes_for_layout() -> list[Scene]:
    rng = np.random.default_rng(11)
    scenes = [sample_scene(rng) for _ in range(300)]
    scenes += [parse_prompt(p) for p in (
        "four green squares and a red star in the center",
        "three small green squares and a red ring above a blue star",
        "two red circles to the right of three blue squares on a black background",
        "a red circle above a blue square in the center",
    )]
    return scenes


def test_canonical_cells_ignore_the_seed_and_jitter_stays_in_cell() -> None:
    moved = 0
    for scene in _scenes_for_layout():
        ref = layout(scene, 0)
        for seed in (1, 2, 3, None, np.random.default_rng(4)):
            other = layout(scene, seed, aspect=1.0)
            assert [p.cell for p in other] == [p.cell for p in ref]
            moved += any(abs(p.cx - q.cx) > 1e-9 for p, q in zip(other, ref))
        for aspect in (0.6, 1.0, 1.7):
            for p in layout(scene, 7, aspect=aspect):
                r, c = p.cell
                assert c / 3 < p.cx < (c + 1) / 3 and r / 3 < p.cy < (r + 1) / 3
    assert moved > 0  # the rng still drives the jitter


def test_canonical_layout_draws_only_the_jitter_from_rng() -> None:
    scene = parse_prompt("three small green squares and a red ring above a blue star")
    g = np.random.default_rng(5)
    layout(scene, g)
    h = np.random.default_rng(5)
    h.random(2 * 5)  # two uniforms (x, y) per instance, nothing for the cells
    assert g.random() == h.random()


def test_canonical_examples_honour_relations_and_positions() -> None:
    # Free objects fill the priority order: centre, then middle right satisfies "left of".
    assert _cells(parse_prompt("a red circle to the left of a blue square")) == [(1, 1), (1, 2)]
    assert _cells(parse_prompt("a red circle above a blue square")) == [(1, 1), (2, 1)]
    # A counted group around a positioned object (which keeps its cell).
    assert _cells(parse_prompt("four green squares and a red star in the center")) == [
        (1, 0), (1, 2), (0, 1), (2, 1), (1, 1)]
    assert _cells(parse_prompt("four green squares and a red star")) == list(CANONICAL_CELL_ORDER[:5])
    # The fixed centre forces the search past the first candidates (middle left / right).
    scene = parse_prompt("a red circle above a blue square in the center")
    assert scene.objects[1].position == "center" and scene.relations == (Relation(0, "above", 1),)
    assert _cells(scene) == [(0, 1), (1, 1)]
    # Relation between groups: every instance of the subject right of every instance of the target.
    scene = parse_prompt("two red circles to the right of three blue squares")
    placements = layout(scene)
    assert _relations_hold(scene, placements)
    assert [p.cell for p in placements] == [(1, 1), (1, 2), (1, 0), (0, 0), (2, 0)]


def test_canonical_fallbacks_are_deterministic() -> None:
    # Impossible relation (nothing is left of the left column): kept position, relation ignored.
    scene = parse_prompt("a red circle on the left, to the right of a blue square")
    assert scene.objects[0].position == "center left"
    assert _cells(scene) == [(1, 0), (1, 1)]
    # Two objects claim the centre: both positions are dropped, as in random placement.
    scene = parse_prompt("a red circle in the center and a blue square in the center")
    assert _cells(scene) == [(1, 1), (1, 0)] == _cells(scene, 3)


def _first_permutation(scene: Scene) -> list[tuple[int, int]] | None:
    """The canonical rule written out naively: the first satisfying permutation."""
    instances = [(i, k) for i, o in enumerate(scene.objects) for k in range(o.count)]
    fixed = {(i, 0): position_cell(o.position) for i, o in enumerate(scene.objects) if o.position}
    if len(set(fixed.values())) < len(fixed):
        fixed = {}
    free = [c for c in CANONICAL_CELL_ORDER if c not in fixed.values()]
    slots = [n for n, inst in enumerate(instances) if inst not in fixed]
    for chosen in permutations(free, len(slots)):
        cells = [fixed.get(inst) for inst in instances]
        for n, cell in zip(slots, chosen):
            cells[n] = cell
        placements = [type("P", (), {"obj_index": i, "instance": k, "cell": c})()
                      for (i, k), c in zip(instances, cells)]
        if _relations_hold(scene, placements):
            return cells
    return None


def test_canonical_is_the_first_satisfying_permutation() -> None:
    rng = np.random.default_rng(3)
    scenes = _scenes_for_layout()
    for _ in range(150):  # multi-group scenes with chained relations and some positions
        counts = [int(c) for c in rng.integers(1, 3, int(rng.integers(2, 4)))]
        objects = tuple(Obj("circle", ("red", "blue", "green")[j], count=c,
                            position=str(rng.choice(POSITIONS)) if rng.random() < 0.3 else None)
                        for j, c in enumerate(counts))
        relations = tuple(Relation(j, str(rng.choice(RELATIONS)), j + 1) for j in range(len(objects) - 1))
        scenes.append(Scene(objects, relations))
    satisfiable = 0
    for scene in scenes:
        expected = _first_permutation(scene)
        placements = layout(scene, 0)
        if expected is not None:
            satisfiable += 1
            assert [p.cell for p in placements] == expected, scene
            assert _relations_hold(scene, placements)
            given = [o.position for o in scene.objects if o.position is not None]
            assert _positions_hold(scene, placements) or len(set(given)) < len(given)  # clashes are dropped
    assert satisfiable > 350


def test_random_placement_reproduces_the_old_layouts() -> None:
    scene = parse_prompt("three small green squares and a red ring above a blue star")
    # Cells of the random permutation search before canonical placement existed.
    old = {0: [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2)],
           1: [(0, 2), (2, 2), (1, 2), (1, 1), (2, 1)],
           2: [(0, 1), (0, 0), (1, 1), (1, 0), (2, 2)]}
    for seed, cells in old.items():
        assert _cells(scene, seed, "random") == cells
    assert [p.cx for p in layout(scene, 0, placement="random")[:2]] == pytest.approx([0.18482, 0.485654], abs=1e-6)
    counted = parse_prompt("four green squares")
    assert len({tuple(_cells(counted, seed, "random")) for seed in range(10)}) > 5
    assert len({tuple(_cells(counted, seed)) for seed in range(10)}) == 1
    for seed in range(10):
        placements = layout(scene, seed, placement="random")
        assert _relations_hold(scene, placements)


def test_render_placement_modes() -> None:
    scene = parse_prompt("four green squares")
    assert np.array_equal(render(scene, 64, 64, rng=0), render(scene, 64, 64, rng=0, placement="canonical"))
    img, masks = render_with_masks(scene, 64, 64, rng=0, placement="random")
    assert np.array_equal(img, render(scene, 64, 64, rng=0, placement="random"))
    assert [m.placement for m in masks] == layout(scene, 0, placement="random")


@pytest.mark.parametrize("call", [
    lambda s, pl: layout(s, 0, placement=pl),
    lambda s, pl: render(s, 32, 32, 0, placement=pl),
    lambda s, pl: render_with_masks(s, 32, 32, 0, placement=pl),
])
@pytest.mark.parametrize("bad", ["Canonical", "grid", ""])
def test_bad_placement_raises(call, bad: str) -> None:
    with pytest.raises(ValueError, match="placement must be one of"):
        call(parse_prompt("a red circle"), bad)


# --------------------------------------------------------------------------- checker


def _mean_adherence(checker: AdherenceChecker, images: list[np.ndarray], scenes: list[Scene]) -> float:
    return float(np.mean([checker.score(i, s)["adherence"] for i, s in zip(images, scenes)]))


@pytest.mark.parametrize("placement", ["canonical", "random"])
def test_checker_on_ground_truth(checker: AdherenceChecker, heldout_scenes: list[Scene], placement: str) -> None:
    sizes = [(128, 128), (96, 160), (256, 256)]
    images = [render(s, *sizes[i % 3], rng=i, placement=placement) for i, s in enumerate(heldout_scenes)]
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
