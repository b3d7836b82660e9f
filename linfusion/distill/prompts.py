"""The built-in prompt list for data-free distillation, and reading a user's prompt file."""

from __future__ import annotations

import json
from pathlib import Path

#: Varied subjects, styles and compositions; the teacher's own samples on these are the data set.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of a red fox sitting in fresh snow, morning light",
    "an astronaut riding a horse on the moon, cinematic",
    "a bowl of ramen with a soft-boiled egg, top view, studio lighting",
    "a lighthouse on a rocky coast during a storm, dramatic waves",
    "a watercolor painting of a quiet village street in spring",
    "portrait of an old fisherman with a grey beard, 85mm photo",
    "a futuristic city skyline at night with neon reflections on wet streets",
    "a cozy reading nook with a window seat and a sleeping cat",
    "macro photo of a dew drop on a green leaf",
    "an oil painting of sunflowers in a blue vase",
    "a mountain lake surrounded by pine trees at sunrise, mist",
    "a cute robot watering plants in a greenhouse, 3d render",
    "a vintage car parked in front of a diner, 1950s style",
    "aerial view of a winding river through autumn forest",
    "a golden retriever puppy playing in a field of flowers",
    "a medieval castle on a hill under a starry sky",
    "close-up of a hummingbird feeding from a red flower",
    "a minimalist living room with large windows and wooden floor",
    "a steaming cup of coffee on a rainy window sill",
    "a desert landscape with sand dunes and a camel caravan",
    "an underwater coral reef with colorful fish, sunlight rays",
    "a pencil sketch of a ballerina mid-leap",
    "a snowy cabin in the woods with warm light in the windows",
    "a busy market street in Marrakech, vibrant colors",
    "a bowl of fresh fruit on a marble table, still life",
    "a dragon flying over a volcano, fantasy art",
    "a cyclist riding along a coastal road at sunset",
    "a japanese garden with a red bridge and koi pond",
    "a close-up portrait of a tabby cat with green eyes",
    "a stack of old books and a candle, dark academia",
    "a field of lavender in Provence under a blue sky",
    "a train crossing a stone viaduct in the highlands",
    "an elegant glass perfume bottle on silk, product photo",
    "a child flying a kite on a windy beach",
    "a neon sign reading open in a dark alley",
    "a herd of elephants walking across the savanna at dusk",
    "an isometric illustration of a tiny island with a house",
    "a chef plating a dessert in a professional kitchen",
    "northern lights over a frozen lake",
    "a paper origami crane on a white background",
    "a rainy street in Tokyo at night, people with umbrellas",
    "a majestic lion portrait, black and white photo",
    "a hot air balloon festival over green hills",
    "a science fiction spaceship interior with glowing panels",
    "a sailboat on calm water reflecting the clouds",
    "an impressionist painting of a garden party",
    "a plate of sushi on a wooden board",
    "a waterfall in a tropical rainforest",
)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a JSON list of strings, or one prompt per line (``#`` comments and blanks skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: a JSON prompt file must hold a list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts
