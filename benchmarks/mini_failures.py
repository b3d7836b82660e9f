"""Where a bundled LinFusion-Mini model fails (CPU analysis: 96 held-out prompts, 128 px, seed 0).

    python benchmarks/mini_failures.py teacher [--grid failures.png] > failures_teacher.json
    python benchmarks/mini_failures.py linear  > failures_linear.json      (or local)

Prints JSON: strict adherence; object groups drawn in the wrong shape by shape and by size asked,
and what the checker saw instead; prompts passed by the texture of their objects ("checker" if any
object is checkered, else "dots/stripes" if any is textured, else "plain"); each failing prompt
with its failing attributes. ``--grid`` also writes the failing images with their prompts.
Students run their bundled adapter in every layer, as in the quality benchmark. (Attempt 6's
``shape_failures.py`` was this script's first half; its outputs are in results/mini_attempt6/.)
"""

from __future__ import annotations

import argparse
import collections
import json

import numpy as np
import torch

from linfusion.mini import bundled_adapter
from linfusion.mini.bundle import load_mini_pipeline
from linfusion.mini.checker import AdherenceChecker
from linfusion.mini.quality import apply_patch, generate
from linfusion.mini.world import parse_prompt, prompt_set


def texture_class(scene) -> str:
    textures = {obj.texture for obj in scene.objects}
    return "checker" if "checker" in textures else ("dots/stripes" if textures - {"plain"} else "plain")


def analyse(prompts: list[str], images: list[np.ndarray], checker: AdherenceChecker) -> tuple[dict, list]:
    """(the JSON summary, [(index, prompt, failing attributes, image)] of the failing prompts)."""
    asked, failed, by_size, failed_by_size, seen_as = (collections.Counter() for _ in range(5))
    by_texture, passed_by_texture = collections.Counter(), collections.Counter()
    failures = []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        scene = parse_prompt(prompt)
        result = checker.score(image, scene)
        bad = [name for name, ok in result["attributes"].items() if not ok]
        by_texture[texture_class(scene)] += 1
        passed_by_texture[texture_class(scene)] += not bad
        if bad:
            failures.append((i, prompt, bad, image))
        for n, obj in enumerate(scene.objects):
            asked[obj.shape] += 1
            by_size[obj.size] += 1
            if not result["attributes"][f"obj{n}.shape"]:
                failed[obj.shape] += 1
                failed_by_size[obj.size] += 1
                for c in result["analysis"].components:
                    if c.colour == obj.colour and c.shape != obj.shape:
                        seen_as[f"{obj.shape} -> {c.shape}"] += 1
    summary = {
        "strict": (len(prompts) - len(failures)) / len(prompts),
        "shape_fail_rate_by_shape": {s: f"{failed[s]}/{asked[s]}" for s in sorted(asked)},
        "shape_fail_rate_by_size": {s: f"{failed_by_size[s]}/{by_size[s]}" for s in sorted(by_size)},
        "confusions": dict(seen_as.most_common()),
        "passed_by_object_texture": {t: f"{passed_by_texture[t]}/{by_texture[t]}" for t in sorted(by_texture)},
        "failures": [{"index": i, "prompt": p, "failing": bad} for i, p, bad, _ in failures],
    }
    return summary, failures


def failure_grid(failures: list, path: str, tile: int = 256, columns: int = 2) -> None:
    """The failing images (nearest-neighbour ×2), each with its prompt and failing attributes."""
    from PIL import Image, ImageDraw

    rows = max(1, -(-len(failures) // columns))
    canvas = Image.new("RGB", (columns * (tile + 20), rows * (tile + 60)), "white")
    draw = ImageDraw.Draw(canvas)
    for n, (i, prompt, bad, image) in enumerate(failures):
        x, y = (n % columns) * (tile + 20), (n // columns) * (tile + 60)
        canvas.paste(Image.fromarray(np.asarray(image)).resize((tile, tile), Image.NEAREST), (x, y))
        for line, start in enumerate(range(0, min(len(prompt), 150), 50)):
            draw.text((x, y + tile + 2 + 12 * line), (f"#{i} " if line == 0 else "") + prompt[start:start + 50],
                      fill="black")
        draw.text((x, y + tile + 40), "fails: " + ", ".join(bad)[:60], fill="red")
    canvas.save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default="teacher", choices=("teacher", "linear", "local"))
    parser.add_argument("--grid", default=None, help="PNG of the failing images")
    parser.add_argument("--adapter", default=None, help="a student adapter folder (default: the bundled one)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_mini_pipeline(torch_dtype=torch.float32)
    if args.model != "teacher":
        apply_patch(pipe, None, args.adapter or str(bundled_adapter(args.model)))
    elif args.adapter:
        parser.error("--adapter needs a student model (linear or local)")
    prompts = prompt_set("heldout", 96, seed=0)
    images = generate(pipe, prompts, size=128, steps=20, seed=0)
    summary, failures = analyse(prompts, images, AdherenceChecker())
    if args.grid:
        failure_grid(failures, args.grid)
    print(json.dumps({"model": args.model, **summary}, indent=1))


if __name__ == "__main__":
    main()
