"""A procedural text-image world with known ground truth.

Three parts, in reading order:

1. **Scene model** -- frozen dataclasses :class:`Obj`, :class:`Relation`, :class:`Scene`
   built from small closed vocabularies (shapes, palette colours, sizes, textures,
   3x3 grid positions, pairwise relations).
2. **Grammar** -- :func:`sample_scene`, :func:`scene_to_prompt` (varied English templates)
   and :func:`parse_prompt` (a forgiving left-to-right parser), plus the fixed
   train / held-out split :func:`prompt_set`.
3. **Renderer** -- :func:`layout` places objects in normalised coordinates and
   :func:`render` / :func:`render_with_masks` rasterise them with supersampling, so
   the same scene looks the same at 64, 128, 512 px or non-square sizes.

Placement is *canonical* by default: an object instance whose position the prompt leaves
open takes the first free cell of :data:`CANONICAL_CELL_ORDER` (centre first) that keeps
the relations true, so the grid cells are a function of the scene and only a small
jitter inside each cell is random. A prompt that leaves positions open then maps to one
layout, and a small model learns that one mode instead of averaging the C(9, n) cell
sets of n objects into extra copies. ``placement="random"`` restores the old layout
(a random cell permutation per render; same seed, same layout as before).

Only numpy is needed. Everything is deterministic given a seed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------- vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")

# Well separated in CIELAB (min pairwise distance ~35), so blur, noise and small
# colour shifts do not move a pixel to a different palette entry.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 35),
    "green": (40, 160, 70),
    "blue": (35, 85, 225),
    "purple": (145, 50, 175),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

SIZES: tuple[str, ...] = ("small", "medium", "large")
# Object "radius" as a fraction of the image's shorter side. Grid cells are 1/3 wide,
# so even "large" objects leave a gap between neighbouring cells.
SIZE_RADIUS: dict[str, float] = {"small": 0.085, "medium": 0.12, "large": 0.15}

TEXTURES: tuple[str, ...] = ("plain", "stripes", "dots", "checker")
TEXTURE_PERIOD = 0.1  # pattern period as a fraction of the shorter side

ROWS: tuple[str, ...] = ("top", "center", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
POSITIONS: tuple[str, ...] = tuple(
    "center" if (r, c) == ("center", "center") else f"{r} {c}" for r in ROWS for c in COLS
)
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

DEFAULT_BACKGROUND = "white"
DEFAULT_SIZE = "medium"
MAX_OBJECTS = 9  # one per grid cell


def position_cell(position: str) -> tuple[int, int]:
    """(row, col) of a grid position name, e.g. ``"top left" -> (0, 0)``."""
    return divmod(POSITIONS.index(position), 3)


# --------------------------------------------------------------------------- scene model


@dataclass(frozen=True)
class Obj:
    """A group of ``count`` identical objects (count > 1 means "two red circles")."""

    shape: str
    colour: str
    size: str = DEFAULT_SIZE
    texture: str = "plain"
    count: int = 1
    position: str | None = None  # one of POSITIONS, or None = anywhere

    def __post_init__(self) -> None:
        _check(self.shape, SHAPES, "shape")
        _check(self.colour, COLOURS, "colour")
        _check(self.size, SIZES, "size")
        _check(self.texture, TEXTURES, "texture")
        if self.position is not None:
            _check(self.position, POSITIONS, "position")
        if not 1 <= self.count <= MAX_OBJECTS:
            raise ValueError(f"count must be in 1..{MAX_OBJECTS}, got {self.count}")


@dataclass(frozen=True)
class Relation:
    """``objects[subject]`` is ``relation`` ``objects[target]`` (e.g. 0 "above" 1)."""

    subject: int
    relation: str
    target: int

    def __post_init__(self) -> None:
        _check(self.relation, RELATIONS, "relation")


@dataclass(frozen=True)
class Scene:
    """Everything a prompt can say: object groups, relations and the background."""

    objects: tuple[Obj, ...] = ()
    relations: tuple[Relation, ...] = ()
    background: str = DEFAULT_BACKGROUND
    background_texture: str = "plain"

    def __post_init__(self) -> None:
        _check(self.background, COLOURS, "background colour")
        _check(self.background_texture, TEXTURES, "background texture")
        for rel in self.relations:
            if not (0 <= rel.subject < len(self.objects) and 0 <= rel.target < len(self.objects)):
                raise ValueError(f"relation {rel} refers to a missing object")
        if sum(o.count for o in self.objects) > MAX_OBJECTS:
            raise ValueError(f"at most {MAX_OBJECTS} objects fit on the 3x3 grid")

    def key(self) -> str:
        """Stable textual identity (``repr`` of frozen dataclasses is deterministic)."""
        return repr(self)


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


def _as_rng(rng: np.random.Generator | int | None, fallback: str = "") -> np.random.Generator:
    """Accept a Generator, an int seed, or None (seed derived from ``fallback``)."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        rng = _stable_hash(fallback)
    return np.random.default_rng(rng)


def _stable_hash(text: str) -> int:
    """Process-independent hash (Python's ``hash`` is salted per run)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


# --------------------------------------------------------------------------- sampling


def sample_scene(rng: np.random.Generator | int | None = None) -> Scene:
    """Draw a random scene: one object, a related pair, a counted group, or two groups.

    Groups get distinct colours, all different from the background, so every object is
    identifiable by colour alone (which keeps the checker unambiguous).
    """
    rng = _as_rng(rng)
    kind = rng.choice(["single", "relation", "count", "pair"], p=[0.3, 0.3, 0.2, 0.2])
    background = str(rng.choice(COLOURS))
    bg_texture = str(rng.choice(TEXTURES, p=[0.55, 0.15, 0.15, 0.15]))
    colours = [str(c) for c in rng.permutation([c for c in COLOURS if c != background])]

    def obj(colour: str, count: int = 1, position: str | None = None) -> Obj:
        return Obj(
            shape=str(rng.choice(SHAPES)),
            colour=colour,
            size=str(rng.choice(SIZES)),
            texture=str(rng.choice(TEXTURES, p=[0.75, 0.25 / 3, 0.25 / 3, 0.25 / 3])),
            count=count,
            position=position,
        )

    relations: tuple[Relation, ...] = ()
    if kind == "single":
        pos = str(rng.choice(POSITIONS)) if rng.random() < 0.8 else None
        objects: tuple[Obj, ...] = (obj(colours[0], position=pos),)
    elif kind == "relation":
        objects = (obj(colours[0]), obj(colours[1]))
        relations = (Relation(0, str(rng.choice(RELATIONS)), 1),)
    elif kind == "count":
        objects = (obj(colours[0], count=int(rng.integers(2, 5))),)
    else:  # two groups, either both placed on the grid or both counted
        if rng.random() < 0.5:
            cells = rng.choice(len(POSITIONS), size=2, replace=False)
            objects = tuple(obj(colours[i], position=POSITIONS[c]) for i, c in enumerate(cells))
        else:
            objects = tuple(obj(colours[i], count=int(rng.integers(1, 4))) for i in range(2))
    return Scene(objects, relations, background, bg_texture)


# --------------------------------------------------------------------------- scene -> prompt

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
_SIZE_PHRASES = {"small": ("small", "little"), "medium": ("", "medium", "medium-sized"), "large": ("large", "big")}
_TEXTURE_PHRASES = {"plain": ("",), "stripes": ("striped",), "dots": ("dotted", "polka-dot"), "checker": ("checkered", "checkerboard")}
_RELATION_PHRASES = {
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
}
_ROW_WORDS = {"top": ("top", "upper"), "center": ("middle", "center"), "bottom": ("bottom", "lower")}


def _position_phrase(position: str, rng: np.random.Generator) -> str:
    r, c = position_cell(position)
    row, col = ROWS[r], COLS[c]
    if position == "center":
        return str(rng.choice(["in the center", "in the middle", "in the centre"]))
    if row == "center":
        return str(rng.choice([f"on the {col}", f"at the {col} side", f"in the middle {col}"]))
    if col == "center":
        return str(rng.choice([f"at the {row}", f"at the {row} center", f"in the {row} middle"]))
    vertical = str(rng.choice(_ROW_WORDS[row]))
    return str(rng.choice([f"in the {vertical} {col} corner", f"at the {vertical} {col}"]))


def _object_phrase(obj: Obj, rng: np.random.Generator) -> str:
    adjectives = [str(rng.choice(_TEXTURE_PHRASES[obj.texture])), obj.colour]
    if rng.random() < 0.5:
        adjectives.reverse()  # "striped red" and "red striped" both parse
    words = [str(rng.choice(_SIZE_PHRASES[obj.size])), *adjectives]
    noun = obj.shape + ("s" if obj.count > 1 else "")
    body = " ".join(w for w in [*words, noun] if w)
    if obj.count > 1:
        det = _NUMBER_WORDS[obj.count]
    else:
        det = "one" if rng.random() < 0.1 else ("an" if body[0] in "aeiou" else "a")
    phrase = f"{det} {body}"
    if obj.position is not None:
        phrase += " " + _position_phrase(obj.position, rng)
    return phrase


def _background_phrase(scene: Scene, rng: np.random.Generator) -> str:
    plain_default = scene.background == DEFAULT_BACKGROUND and scene.background_texture == "plain"
    if plain_default and rng.random() < 0.5:
        return ""  # the default background may go unmentioned
    adjectives = [str(rng.choice(_TEXTURE_PHRASES[scene.background_texture])), scene.background]
    if rng.random() < 0.5:
        adjectives.reverse()
    adj = " ".join(a for a in adjectives if a)
    lead = str(rng.choice(["on", "with", "against"]))
    article = "an" if adj[0] in "aeiou" else "a"
    noun = str(rng.choice(["background", "background", "backdrop"]))
    return f"{lead} {article} {adj} {noun}"


def scene_to_prompt(scene: Scene, rng: np.random.Generator | int | None = None) -> str:
    """Describe ``scene`` in natural English; ``parse_prompt`` inverts it exactly.

    Without ``rng`` the wording is a deterministic function of the scene.
    """
    rng = _as_rng(rng, scene.key())
    phrases = [_object_phrase(o, rng) for o in scene.objects]
    if scene.relations:
        # Supported layout: a chain "A rel B" per relation, in object order.
        parts = [phrases[scene.relations[0].subject]]
        for rel in scene.relations:
            parts += [str(rng.choice(_RELATION_PHRASES[rel.relation])), phrases[rel.target]]
        body = " ".join(parts)
    elif len(phrases) > 1:
        body = ", ".join(phrases[:-1]) + str(rng.choice([" and ", " and ", ", "])) + phrases[-1]
    else:
        body = phrases[0] if phrases else ""
    background = _background_phrase(scene, rng)
    if not body:
        return background.split(" ", 1)[1] if background else f"a plain {scene.background} background"
    opener = str(rng.choice(["", "", "", "there is ", "an image of ", "a picture of "]))
    if opener == "there is " and scene.objects[0].count > 1:
        opener = "there are "
    return " ".join(p for p in [opener + body, background] if p)


# --------------------------------------------------------------------------- prompt -> scene

_WORD_COUNTS = {"a": 1, "an": 1, "one": 1, "single": 1, "pair": 2, "couple": 2, "both": 2, "several": 3}
_WORD_COUNTS.update({w: n for n, w in _NUMBER_WORDS.items()})
_WORD_SIZES = {"small": "small", "little": "small", "tiny": "small", "medium": "medium",
               "large": "large", "big": "large", "huge": "large"}
_WORD_COLOURS = {c: c for c in COLOURS} | {"violet": "purple", "magenta": "purple"}
_WORD_TEXTURES = {"plain": "plain", "solid": "plain", "striped": "stripes", "stripes": "stripes",
                  "stripy": "stripes", "dotted": "dots", "dots": "dots", "dot": "dots", "polka": "dots",
                  "spotted": "dots", "checkered": "checker", "checkerboard": "checker",
                  "chequered": "checker", "checked": "checker", "checker": "checker"}
_WORD_SHAPES = {s: s for s in SHAPES} | {"disc": "circle", "disk": "circle", "box": "square",
                                          "donut": "ring", "doughnut": "ring", "annulus": "ring"}
_WORD_BACKGROUND = {"background", "backdrop", "backgrounds"}
_WORD_RELATIONS = {"above": "above", "over": "above", "below": "below", "under": "below",
                   "beneath": "below", "underneath": "below"}
_WORD_ROWS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_WORD_CENTER = {"center", "centre", "middle"}
_WORD_FRAME = {"image", "picture", "canvas", "frame", "scene", "photo"}


def _shape_word(word: str) -> tuple[str, bool] | None:
    """Return (shape, is_plural) for a shape noun, else None."""
    if word in _WORD_SHAPES:
        return _WORD_SHAPES[word], False
    for suffix in ("es", "s"):
        if word.endswith(suffix) and word[: -len(suffix)] in _WORD_SHAPES:
            return _WORD_SHAPES[word[: -len(suffix)]], True
    return None


@dataclass
class _Pending:
    """Modifiers seen since the last noun (they attach to the next noun)."""

    count: int | None = None
    size: str | None = None
    colour: str | None = None
    texture: str | None = None
    row: str | None = None
    col: str | None = None
    has_position: bool = False


def parse_prompt(prompt: str) -> Scene:
    """Parse a prompt of the grammar into a :class:`Scene`.

    Left to right: modifiers (count, size, colour, texture) attach to the next shape or
    "background" noun; position words attach to the last object; "above"/"left of"/...
    relate the last object to the next one. Unknown words are ignored, missing
    attributes take defaults (medium, plain, white background; an object with no colour
    gets the first palette colour that differs from the background).

    Raises:
        ValueError: if the prompt names neither a shape nor a background.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    tokens = re.findall(r"[a-z]+|\d+", prompt.lower())
    objects: list[dict] = []
    relations: list[tuple[int, str]] = []  # (subject index, relation); target = subject's next object
    pending_rel: tuple[int, str] | None = None
    mods = _Pending()
    background: str | None = None
    bg_texture: str | None = None
    saw_background = False
    last_obj_since_mods = False  # position words go to the last object unless new modifiers began

    def set_position(row: str | None = None, col: str | None = None) -> None:
        target = objects[-1] if (objects and last_obj_since_mods) else None
        holder = target["pos"] if target is not None else mods
        if isinstance(holder, _Pending):
            holder.has_position = True
            holder.row = row or holder.row
            holder.col = col or holder.col
        else:
            holder["any"] = True
            holder["row"] = row or holder["row"]
            holder["col"] = col or holder["col"]

    def followed_by_frame(i: int) -> bool:
        """True for "left of the image" (a position, not a relation)."""
        rest = [t for t in tokens[i + 1 : i + 3] if t != "the"]
        return bool(rest) and rest[0] in _WORD_FRAME

    i = 0
    while i < len(tokens):
        w = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        shape = _shape_word(w)
        if w.isdigit() or w in _WORD_COUNTS:
            mods.count = int(w) if w.isdigit() else _WORD_COUNTS[w]
            last_obj_since_mods = False
        elif w in _WORD_SIZES:
            mods.size, last_obj_since_mods = _WORD_SIZES[w], False
        elif w in _WORD_COLOURS:
            mods.colour, last_obj_since_mods = _WORD_COLOURS[w], False
        elif w in _WORD_TEXTURES:
            mods.texture, last_obj_since_mods = _WORD_TEXTURES[w], False
        elif shape is not None:
            name, plural = shape
            count = mods.count if (mods.count is not None and mods.count > 1) else (2 if plural else 1)
            objects.append({"shape": name, "colour": mods.colour, "size": mods.size or DEFAULT_SIZE,
                            "texture": mods.texture or "plain", "count": min(count, MAX_OBJECTS),
                            "pos": {"any": mods.has_position, "row": mods.row, "col": mods.col}})
            if pending_rel is not None:
                relations.append(pending_rel)
                pending_rel = None
            mods, last_obj_since_mods = _Pending(), True
        elif w in _WORD_BACKGROUND:
            saw_background = True
            background = mods.colour or background
            bg_texture = mods.texture or bg_texture
            mods, last_obj_since_mods = _Pending(), False
        elif w in ("left", "right", "top") and nxt == "of" and not followed_by_frame(i + 1):
            if objects:
                pending_rel = (len(objects) - 1, {"left": "left of", "right": "right of", "top": "above"}[w])
            i += 1  # consume "of"
        elif w in _WORD_RELATIONS:
            if objects:
                pending_rel = (len(objects) - 1, _WORD_RELATIONS[w])
        elif w in _WORD_ROWS:
            set_position(row=_WORD_ROWS[w])
        elif w in ("left", "right"):
            set_position(col=w)
        elif w in _WORD_CENTER:
            set_position()
        i += 1

    if not objects and not saw_background and background is None:
        raise ValueError(
            f"could not parse any shape or background from prompt {prompt!r}; "
            f"expected e.g. 'a red circle above a blue square' (shapes: {', '.join(SHAPES)}; "
            f"colours: {', '.join(COLOURS)})"
        )
    background = background or DEFAULT_BACKGROUND
    default_colour = next(c for c in COLOURS if c != background)
    objs = []
    for o in objects:
        pos = o.pop("pos")
        position = None
        if pos["any"]:
            row, col = pos["row"] or "center", pos["col"] or "center"
            position = "center" if (row, col) == ("center", "center") else f"{row} {col}"
        objs.append(Obj(**{**o, "colour": o["colour"] or default_colour}, position=position))
    # Trim groups that would not fit on the grid rather than failing on a user prompt.
    while sum(o.count for o in objs) > MAX_OBJECTS:
        objs.pop()
    rels = tuple(Relation(s, r, s + 1) for s, r in relations if s + 1 < len(objs))
    return Scene(tuple(objs), rels, background, bg_texture or "plain")


# --------------------------------------------------------------------------- train / held-out split


def scene_split(scene: Scene, heldout_fraction: float = 0.1) -> str:
    """"heldout" or "train", decided by a stable hash of the *scene* (not the wording),
    so a held-out scene is never seen in training under any paraphrase."""
    bucket = _stable_hash("split:" + scene.key()) % 10_000
    return "heldout" if bucket < heldout_fraction * 10_000 else "train"


#: prompt-set filters: "counted" keeps scenes with a group of two or more (the teacher's weak spot)
SCENE_FILTERS = {"all": lambda scene: True,
                 "counted": lambda scene: any(obj.count > 1 for obj in scene.objects)}


def prompt_set(split: str, n: int, seed: int = 0, scenes: str = "all") -> list[str]:
    """``n`` distinct prompts whose scenes all belong to ``split`` ("train" | "heldout") and pass the
    ``scenes`` filter (a key of :data:`SCENE_FILTERS`).

    Deterministic in (split, n, seed, scenes); a given prefix is stable as ``n`` grows.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if scenes not in SCENE_FILTERS:
        raise ValueError(f"scenes must be one of {sorted(SCENE_FILTERS)}, got {scenes!r}")
    keep = SCENE_FILTERS[scenes]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    prompts: list[str] = []
    seen: set[str] = set()
    for _ in range(200 * n + 1000):
        if len(prompts) >= n:
            break
        scene = sample_scene(rng)
        if scene_split(scene) != split or scene.key() in seen or not keep(scene):
            continue
        seen.add(scene.key())
        prompts.append(scene_to_prompt(scene, rng))
    return prompts


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Placement:
    """One drawn object instance in normalised coordinates.

    ``cx``/``cy`` are fractions of the image width/height; ``radius`` is a fraction of
    the shorter side (shapes keep their aspect on non-square canvases).
    """

    obj_index: int
    instance: int
    cell: tuple[int, int]
    cx: float
    cy: float
    radius: float


#: Cell priority of canonical placement, (row, col): centre, middle left/right, top/bottom
#: centre, then the corners. Unpositioned instances take the earliest cells that work.
CANONICAL_CELL_ORDER: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 0), (1, 2), (0, 1), (2, 1), (0, 0), (0, 2), (2, 0), (2, 2),
)
PLACEMENTS: tuple[str, ...] = ("canonical", "random")
#: Cells tried by canonical placement's search before it gives up on the relations.
CANONICAL_SEARCH_LIMIT = 5000


def _relation_holds(rel: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    (ra, ca), (rb, cb) = a, b
    return {"above": ra < rb, "below": ra > rb, "left of": ca < cb, "right of": ca > cb}[rel]


def layout(scene: Scene, rng: np.random.Generator | int | None = None,
           aspect: float = 1.0, *, placement: str = "canonical") -> list[Placement]:
    """Assign every object instance a distinct grid cell satisfying positions and
    relations, then jitter it inside its cell. ``aspect`` = width / height, used to keep
    jitter in-cell.

    ``placement="canonical"`` (default): instances with a position take its cell; the
    others, in instance order, take the first cells of :data:`CANONICAL_CELL_ORDER` that
    satisfy the relations (the first such assignment in lexicographic order of the free
    cells' permutations, found by a pruned search; if none works, or none is found within
    :data:`CANONICAL_SEARCH_LIMIT` cells tried, the relations are ignored). The cells
    depend on the scene only; ``rng`` drives just the jitter. Why: a prompt that leaves
    positions open maps to one layout, so a small model learns one mode instead of
    averaging C(9, n) of them into extra copies.

    ``placement="random"``: the previous behaviour, a random cell permutation per call
    (random search; falls back to ignoring relations if impossible). It consumes ``rng``
    exactly as before, so old seeds reproduce old layouts.

    Positions that collide (a user prompt putting two objects in one cell) are dropped.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    rng = _as_rng(rng, "layout:" + scene.key())
    instances = [(i, k) for i, o in enumerate(scene.objects) for k in range(o.count)]
    if placement == "random":
        cells = _assign_cells(scene, instances, rng)
    else:
        cells = _canonical_cells(scene, instances)  # draws nothing from rng
    short = min(1.0, 1.0 / aspect), min(1.0, aspect)  # shorter side as a fraction of width, height
    placements = []
    for (i, k), (r, c) in zip(instances, cells):
        radius = SIZE_RADIUS[scene.objects[i].size]
        # Half a cell is 1/6 of each axis; the object's extent (plus a margin) is in
        # shorter-side units, converted to fractions of width / height here.
        room_x = max(0.0, 1 / 6 - (radius + 0.02) * short[0])
        room_y = max(0.0, 1 / 6 - (radius + 0.02) * short[1])
        cx = (c + 0.5) / 3 + rng.uniform(-room_x, room_x)
        cy = (r + 0.5) / 3 + rng.uniform(-room_y, room_y)
        placements.append(Placement(i, k, (r, c), float(cx), float(cy), radius))
    return placements


def _fixed_cells(scene: Scene) -> dict[tuple[int, int], tuple[int, int]]:
    """{(object, instance 0): cell} for every object the scene gives a position."""
    return {(i, 0): position_cell(o.position) for i, o in enumerate(scene.objects) if o.position is not None}


def _relation_pairs(scene: Scene, instances: list[tuple[int, int]]) -> list[tuple[int, int, str]]:
    """(subject instance, target instance, relation) for every relation and every pair of its instances
    (positions in ``instances``)."""
    return [(a, b, rel.relation) for rel in scene.relations
            for a, (ia, _) in enumerate(instances) if ia == rel.subject
            for b, (ib, _) in enumerate(instances) if ib == rel.target]


def _relations_hold(scene: Scene, instances: list[tuple[int, int]], cells: list[tuple[int, int]]) -> bool:
    """Every relation holds between every instance of its subject and of its target."""
    return all(_relation_holds(r, cells[a], cells[b]) for a, b, r in _relation_pairs(scene, instances))


def _assign_cells(scene: Scene, instances: list[tuple[int, int]],
                  rng: np.random.Generator) -> list[tuple[int, int]]:
    """Random placement: random cell permutations until the relations hold."""
    fixed = _fixed_cells(scene)
    for use_relations in (True, False):
        for _ in range(300):
            order = [divmod(int(c), 3) for c in rng.permutation(9)]
            free = [c for c in order if c not in fixed.values()]
            cells = [fixed.get(inst) or free.pop() for inst in instances]
            if len(set(cells)) < len(cells):
                fixed = {}  # conflicting positions in a user prompt: drop them
                continue
            if not use_relations or _relations_hold(scene, instances, cells):
                return cells
    raise AssertionError("unreachable: layout without constraints always succeeds")


def _canonical_cells(scene: Scene, instances: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Canonical placement (see :func:`layout`): deterministic, no randomness.

    A depth-first search over the open instances, each trying the free cells in priority
    order and backtracking as soon as a relation between two placed instances fails: it
    returns the first satisfying assignment in the lexicographic order of
    ``itertools.permutations(free cells, n open)``, but prunes, so it reaches deep
    solutions that a plain scan of that order (bounded) would miss.
    """
    fixed = _fixed_cells(scene)
    if len(set(fixed.values())) < len(fixed):
        fixed = {}  # conflicting positions in a user prompt: drop them
    free = [c for c in CANONICAL_CELL_ORDER if c not in fixed.values()]
    open_slots = [n for n, inst in enumerate(instances) if inst not in fixed]
    pairs = _relation_pairs(scene, instances)
    touching = {n: [p for p in pairs if n in p[:2]] for n in open_slots}
    cells: list[tuple[int, int] | None] = [fixed.get(inst) for inst in instances]
    budget = CANONICAL_SEARCH_LIMIT

    def consistent(checks: list[tuple[int, int, str]]) -> bool:
        return all(_relation_holds(r, cells[a], cells[b]) for a, b, r in checks
                   if cells[a] is not None and cells[b] is not None)

    def search(j: int, taken: frozenset) -> bool:
        nonlocal budget
        if j == len(open_slots):
            return True
        n = open_slots[j]
        for cell in free:
            if cell in taken or budget <= 0:
                continue
            budget -= 1
            cells[n] = cell
            if consistent(touching[n]) and search(j + 1, taken | {cell}):
                return True
        cells[n] = None
        return False

    if consistent(pairs) and search(0, frozenset()):  # first: relations between fixed instances
        return cells  # type: ignore[return-value]
    # Relations impossible (or the search too long): plain priority order, ignoring them.
    cells = [fixed.get(inst) for inst in instances]
    for n, cell in zip(open_slots, free):
        cells[n] = cell
    return cells  # type: ignore[return-value]


# --------------------------------------------------------------------------- rasterisation

# Unit geometry: shapes live in [-1, 1]^2 scaled by the object radius; polygons are
# shifted so their bounding box is centred on the placement.
RING_INNER = 0.55
SQUARE_HALF = 0.85


def _regular_polygon(n_points: int, outer: float, inner: float | None) -> np.ndarray:
    """Upright polygon (triangle) or star; y grows downwards as in images."""
    k = 2 * n_points if inner is not None else n_points
    angles = -np.pi / 2 + np.arange(k) * 2 * np.pi / k
    radii = np.where(np.arange(k) % 2 == 0, outer, inner if inner is not None else outer)
    pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    pts[:, 1] -= (pts[:, 1].max() + pts[:, 1].min()) / 2  # centre the bounding box
    return pts


POLYGONS: dict[str, np.ndarray] = {
    "triangle": _regular_polygon(3, 1.15, None),
    "star": _regular_polygon(5, 1.1, 0.55),
}


def _in_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd ray casting, vectorised over points."""
    inside = np.zeros(x.shape, bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_cross)
    return inside


def shape_inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Membership test in unit object coordinates (radius 1)."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "ring":
        d2 = x * x + y * y
        return (d2 <= 1.0) & (d2 >= RING_INNER**2)
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= SQUARE_HALF
    return _in_polygon(x, y, POLYGONS[shape])


def texture_pattern(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the texture's shade colour goes; ``u``, ``v`` in shorter-side units.

    Patterns are anchored to the image, not the object, so they tile seamlessly.
    """
    a, b = u / TEXTURE_PERIOD, v / TEXTURE_PERIOD
    if texture == "stripes":
        return (a % 1.0) < 0.5  # vertical stripes
    if texture == "checker":
        return (np.floor(a) + np.floor(b)) % 2 == 1
    if texture == "dots":
        return (a % 1.0 - 0.5) ** 2 + (b % 1.0 - 0.5) ** 2 < 0.3**2
    return np.zeros(np.broadcast(u, v).shape, bool)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, shape (..., 3)) to CIELAB (D65); perceptual distances for palette matching."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = (c @ m.T) / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


PALETTE_LAB = rgb_to_lab(np.array(list(PALETTE.values()), np.float64))


def _make_shade(name: str) -> tuple[int, int, int]:
    """Texture shade of a colour: lighter for dark colours, darker for light ones, as
    strong as possible while the nearest palette entry (in Lab) stays ``name``."""
    base = np.array(PALETTE[name], np.float64)
    lab = rgb_to_lab(base)
    target = np.full(3, 255.0) if lab[0] < 50 else np.zeros(3)
    for amount in (0.35, 0.3, 0.25, 0.2, 0.15):
        shade = base + amount * (target - base)
        d = np.linalg.norm(PALETTE_LAB - rgb_to_lab(shade), axis=1)
        own, other = d[COLOURS.index(name)], np.delete(d, COLOURS.index(name)).min()
        if own < 0.6 * other:  # keep a margin so noise cannot flip it
            return tuple(int(round(x)) for x in shade)
    raise AssertionError(f"no safe texture shade for {name}")


SHADES: dict[str, tuple[int, int, int]] = {c: _make_shade(c) for c in COLOURS}


def _textured(colour: str, texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-sample RGB (float) for a colour with a texture."""
    u, v = np.broadcast_arrays(u, v)
    base = np.array(PALETTE[colour], np.float32)
    if texture == "plain":
        return np.broadcast_to(base, (*u.shape, 3))
    shade = np.array(SHADES[colour], np.float32)
    return np.where(texture_pattern(texture, u, v)[..., None], shade, base)


def _box_downsample(a: np.ndarray, ss: int) -> np.ndarray:
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss, *a.shape[2:]).mean(axis=(1, 3))


@dataclass(frozen=True)
class ObjectMask:
    """Ground truth for one drawn instance: its placement and pixel mask (coverage >= 0.5)."""

    placement: Placement
    mask: np.ndarray  # bool, H x W


def render_with_masks(scene: Scene, height: int, width: int,
                      rng: np.random.Generator | int | None = None,
                      supersample: int = 4, *, placement: str = "canonical") -> tuple[np.ndarray, list[ObjectMask]]:
    """Render ``scene`` to a ``height x width x 3`` uint8 image plus per-instance masks.

    Coverage is estimated with ``supersample**2`` samples per pixel (anti-aliasing);
    ``rng`` (Generator or seed) only drives the layout, so the same seed gives the same
    composition at every resolution. Without ``rng`` the layout is derived from the scene.
    ``placement`` ("canonical" | "random") picks the cell assignment, see :func:`layout`.
    """
    if height < 8 or width < 8:
        raise ValueError(f"image too small: {height}x{width}")
    placements = layout(scene, rng, aspect=width / height, placement=placement)
    short = float(min(height, width))

    # Background: 2x2 supersampling is plenty for the axis-aligned patterns.
    bss = 2
    ys = (np.arange(height * bss, dtype=np.float32) + 0.5) / bss
    xs = (np.arange(width * bss, dtype=np.float32) + 0.5) / bss
    if scene.background_texture == "plain":
        img = np.empty((height, width, 3), np.float32)
        img[:] = PALETTE[scene.background]
    else:
        img = _box_downsample(
            _textured(scene.background, scene.background_texture, xs[None, :] / short, ys[:, None] / short), bss
        ).astype(np.float32)

    masks = []
    ss = supersample
    for p in placements:
        obj = scene.objects[p.obj_index]
        r_px = p.radius * short
        cx, cy = p.cx * width, p.cy * height
        x0, x1 = max(0, int(cx - 1.2 * r_px)), min(width, int(np.ceil(cx + 1.2 * r_px)))
        y0, y1 = max(0, int(cy - 1.2 * r_px)), min(height, int(np.ceil(cy + 1.2 * r_px)))
        if x1 <= x0 or y1 <= y0:
            continue
        sx = x0 + (np.arange((x1 - x0) * ss, dtype=np.float32) + 0.5) / ss
        sy = y0 + (np.arange((y1 - y0) * ss, dtype=np.float32) + 0.5) / ss
        X, Y = np.meshgrid(sx, sy)
        inside = shape_inside(obj.shape, (X - cx) / r_px, (Y - cy) / r_px)
        cov = _box_downsample(inside.astype(np.float32), ss)
        colour = _box_downsample(inside[..., None] * _textured(obj.colour, obj.texture, X / short, Y / short), ss)
        region = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = region * (1 - cov[..., None]) + colour
        mask = np.zeros((height, width), bool)
        mask[y0:y1, x0:x1] = cov >= 0.5
        masks.append(ObjectMask(p, mask))
    return np.clip(np.round(img), 0, 255).astype(np.uint8), masks


def render(scene: Scene, height: int, width: int,
           rng: np.random.Generator | int | None = None, *, placement: str = "canonical") -> np.ndarray:
    """Render ``scene`` as a ``height x width x 3`` uint8 array (see :func:`render_with_masks`)."""
    return render_with_masks(scene, height, width, rng, placement=placement)[0]
