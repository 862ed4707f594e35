"""Procedural captioned scenes: one coloured shape on a plain background, in one cell of a 3x3 grid.

The data source of the embedded text-to-image model: a renderer with seeded jitter, a caption grammar with
paraphrases and its parser, fixed disjoint prompt splits, and the committed prompt files. Only numpy's
``default_rng`` is used for randomness, so images, captions, splits and prompt files are identical across runs and
machines.

Run ``python -m lesa.embedded.scenes`` to regenerate the prompt files in ``prompts/``.
"""

from __future__ import annotations

import itertools
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from math import ceil, floor
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Shape colours are all chromatic and pairwise >= 99 apart in RGB, also from the neutral backgrounds, so the checker
# can tell them apart after noise and blur, and a shape can never vanish into its background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 135, 0),
    "yellow": (240, 225, 40),
    "green": (30, 165, 60),
    "cyan": (0, 200, 210),
    "blue": (35, 70, 225),
    "purple": (140, 55, 195),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SIZES: tuple[str, ...] = ("small", "large")
# Side of the shape's bounding box in pixels at 32x32; jittered renders draw one of the two. Small shapes are 7-8 px
# rather than 6: a 6 px circle rasterises to a square with clipped corners, indistinguishable from a blurred square.
SIZE_PIXELS: dict[str, tuple[int, int]] = {"small": (7, 8), "large": (11, 12)}
# Row-major over the 3x3 grid: index // 3 is the row, index % 3 the column.
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
SPLIT_SIZES: dict[str, int] = {"eval": 200, "predictor": 100}
PROMPT_FILES: dict[str, str] = {"predictor": "predictor_train.txt", "eval": "eval.txt"}
PROMPTS_DIR = Path(__file__).with_name("prompts")

JITTER = 2  # max shift of the shape in pixels (at 32x32) around its cell's centre
EDGE_MARGIN = 1  # min free pixels between the shape and the canvas edge
CELL_MARGIN = 1.5  # min distance of the shape's centroid from its cell's borders, so the checker never sees it leave


@dataclass(frozen=True)
class Scene:
    """One shape of one colour and size at one grid position on a plain background."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for value, vocabulary in (
            (self.shape, SHAPES),
            (self.colour, COLOURS),
            (self.size, SIZES),
            (self.position, POSITIONS),
            (self.background, BACKGROUNDS),
        ):
            if value not in vocabulary:
                raise ValueError(f"{value!r} is not one of {list(vocabulary)} in {self}")
        if self.colour == self.background:
            raise ValueError(f"shape colour equals background in {self}")


def grid_cell(position: str) -> tuple[int, int]:
    """(row, column) of a position on the 3x3 grid."""
    return divmod(POSITIONS.index(position), 3)


# ----------------------------------------------------------------------------------------------------------- render


@cache
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Read-only hard-edged side x side mask of a shape filling its box (pixel centres tested against the outline)."""
    c = np.arange(side) + 0.5
    y, x = c[:, None], c[None, :]
    half = side / 2
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        mask = (x - half) ** 2 + (y - half) ** 2 <= half * half
    elif shape == "triangle":
        # Apex up, base = height = side; the +0.25 keeps a 1-2 px apex row on even sides.
        mask = np.abs(x - half) <= y / 2 + 0.25
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.flags.writeable = False
    return mask


def _scaled(pixels: float, size: int) -> float:
    return pixels * size / IMAGE_SIZE


@cache
def _placement(shape: str, side: int, position: str, size: int) -> tuple[tuple[int, int, int], ...]:
    """(lowest, nominal, highest) top-left pixel of the shape's box along y and along x.

    The range keeps the shape EDGE_MARGIN inside the canvas and its centroid (what the checker locates) CELL_MARGIN
    inside its grid cell; the nominal offset puts the centroid nearest the cell's centre.
    """
    ys, xs = np.nonzero(shape_mask(shape, side))
    centroid = (ys.mean() + 0.5, xs.mean() + 0.5)  # relative to the box's top-left corner
    cell, edge, margin = size / 3, max(1, round(_scaled(EDGE_MARGIN, size))), _scaled(CELL_MARGIN, size)
    ranges = []
    for index, offset in zip(grid_cell(position), centroid, strict=True):
        low = max(edge, ceil(index * cell + margin - offset))
        high = min(size - edge - side, floor((index + 1) * cell - margin - offset))
        if low > high:
            raise ValueError(f"a {side} px {shape} does not fit the {position} cell of a {size} px image")
        nominal = min(max(round((index + 0.5) * cell - offset), low), high)
        ranges.append((low, nominal, high))
    return tuple(ranges)


def _draw(image: np.ndarray, scene: Scene, rng: np.random.Generator | None) -> None:
    """Paint `scene` into the HxWx3 uint8 `image` in place (jittered when `rng` is given)."""
    size = image.shape[0]
    sides = SIZE_PIXELS[scene.size]
    side = sides[0] if rng is None else sides[int(rng.integers(len(sides)))]
    side = max(3, round(_scaled(side, size)))
    corner = []
    for low, nominal, high in _placement(scene.shape, side, scene.position, size):
        if rng is not None:
            jitter = max(1, round(_scaled(JITTER, size)))
            nominal = min(max(nominal + int(rng.integers(-jitter, jitter + 1)), low), high)
        corner.append(nominal)
    y0, x0 = corner
    image[...] = BACKGROUNDS[scene.background]
    image[y0 : y0 + side, x0 : x0 + side][shape_mask(scene.shape, side)] = COLOURS[scene.colour]


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw `scene` as a size x size x 3 uint8 image with hard edges.

    With `rng`, the shape's side (one of SIZE_PIXELS) and its position (+-JITTER px, clamped to stay in its cell)
    are drawn at random, so the model learns a distribution rather than one image per caption; without it the
    rendering is deterministic and centred in the cell.
    """
    image = np.empty((size, size, 3), dtype=np.uint8)
    _draw(image, scene, rng)
    return image


# ---------------------------------------------------------------------------------------------------------- caption


def _position_phrases() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per position: (prepositional phrases "in the top left", bare phrases "top left")."""
    phrases: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for vertical, horizontal in itertools.product(("top", "bottom"), ("left", "right")):
        alt = {"top": "upper", "bottom": "lower"}[vertical]
        phrases[f"{vertical} {horizontal}"] = (
            (f"in the {vertical} {horizontal}", f"at the {vertical} {horizontal} corner", f"in the {alt} {horizontal}"),
            (f"{vertical} {horizontal}", f"{alt} {horizontal}", f"{vertical} {horizontal} corner"),
        )
    for vertical in ("top", "bottom"):
        phrases[vertical] = (
            (f"at the {vertical}", f"in the {vertical} middle", f"at the {vertical} center"),
            (vertical, f"{vertical} middle", f"{vertical} center"),
        )
    for horizontal in ("left", "right"):
        phrases[horizontal] = (
            (f"on the {horizontal}", f"on the {horizontal} side", f"in the middle {horizontal}"),
            (horizontal, f"{horizontal} side", f"middle {horizontal}"),
        )
    phrases["center"] = (("in the center", "in the middle", "at the center"), ("center", "middle", "dead center"))
    return {position: phrases[position] for position in POSITIONS}


POSITION_PHRASES = _position_phrases()

# Each template is filled with the scene's words; `pos` is a prepositional position phrase, `where` a bare one. The
# article is always written "a" here and becomes "an" before a vowel.
TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {pos} on a {bg} background",
    "{size} {colour} {shape}, {where}, {bg} background",
    "a {colour} {shape} ({size}) {pos} over {bg}",
    "{where}: a {size} {colour} {shape} on {bg}",
    "a {bg} background with a {size} {colour} {shape} {pos}",
    "a {size} {shape} in {colour} {pos}, {bg} background",
    "there is a {size} {colour} {shape} {pos} and the background is {bg}",
)


def caption(scene: Scene, rng: np.random.Generator, template: int | None = None) -> str:
    """A random English caption of `scene` (a random template unless `template` picks one, random phrasings)."""
    index = int(rng.integers(len(TEMPLATES))) if template is None else template
    prepositional, bare = POSITION_PHRASES[scene.position]
    text = TEMPLATES[index].format(
        size=scene.size,
        colour=scene.colour,
        shape=scene.shape,
        bg=scene.background,
        pos=prepositional[int(rng.integers(len(prepositional)))],
        where=bare[int(rng.integers(len(bare)))],
    )
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _alternation(words: Sequence[str]) -> str:
    # Longest first, so that "top left" is tried before "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE_POSITION = {
    phrase: position for position, groups in POSITION_PHRASES.items() for group in groups for phrase in group
}
_FIELD_PATTERNS = {
    "size": _alternation(SIZES),
    "colour": _alternation(list(COLOURS)),
    "shape": _alternation(SHAPES),
    "bg": _alternation(list(BACKGROUNDS)),
    "pos": _alternation([p for prepositional, _ in POSITION_PHRASES.values() for p in prepositional]),
    "where": _alternation([p for _, bare in POSITION_PHRASES.values() for p in bare]),
}


def _template_regex(template: str) -> re.Pattern[str]:
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.sub(r"\ba\b", "an?", re.escape(literal)))  # accept either article
        if field:
            parts.append(f"(?P<{field}>{_FIELD_PATTERNS[field]})")
    return re.compile("".join(parts))


_TEMPLATE_REGEXES = tuple(_template_regex(t) for t in TEMPLATES)
_SYNONYMS = {"grey": "gray", "centre": "center"}


def _normalise(text: str) -> str:
    """Lower case, one space between words, canonical spacing around punctuation, no final full stop."""
    text = re.sub(r"\s+", " ", text.lower()).strip().rstrip(".").strip()
    text = re.sub(r"\s*([,;:)])", r"\1", text)  # nothing before , ; : )
    text = re.sub(r"([,;:])(?=\S)", r"\1 ", text)  # one space after , ; :
    text = re.sub(r"\s*\(\s*", " (", text).strip()  # one space before (, none after
    return re.sub(r"\b(" + "|".join(_SYNONYMS) + r")\b", lambda m: _SYNONYMS[m.group(1)], text)


def caption_scene(text: str) -> Scene | None:
    """The scene a caption describes, None when no template of `caption` matches it (`parse_caption` raises).

    Case-insensitive and tolerant of extra spaces, "an"/"a", "grey" and "centre".
    """
    normalised = _normalise(text)
    for regex in _TEMPLATE_REGEXES:
        match = regex.fullmatch(normalised)
        if match:
            fields = match.groupdict()
            phrase = fields.get("pos") or fields["where"]
            return Scene(fields["shape"], fields["colour"], fields["size"], _PHRASE_POSITION[phrase], fields["bg"])
    return None


def parse_caption(text: str) -> Scene:
    """The scene a caption describes; inverts every template of `caption` (see `caption_scene`). Raises ValueError
    naming the caption when no template matches."""
    scene = caption_scene(text)
    if scene is None:
        raise ValueError(f"cannot parse caption {text!r}")
    return scene


# ----------------------------------------------------------------------------------------------------------- splits


def all_scenes() -> list[Scene]:
    """Every valid attribute combination, in a fixed order."""
    return [
        Scene(shape, colour, size, position, background)
        for shape, colour, size, position, background in itertools.product(
            SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS
        )
        if colour != background
    ]


def _covers(scenes: Sequence[Scene]) -> bool:
    """Whether every value of every attribute occurs in `scenes`."""
    return all(
        {getattr(s, attribute) for s in scenes} == set(vocabulary)
        for attribute, vocabulary in (
            ("shape", SHAPES),
            ("colour", COLOURS),
            ("size", SIZES),
            ("position", POSITIONS),
            ("background", BACKGROUNDS),
        )
    )


@lru_cache(maxsize=8)
def _splits(seed: int) -> dict[str, tuple[Scene, ...]]:
    scenes = all_scenes()
    # Shuffle with a seeded generator and slice; redraw (deterministically) until both held-out splits cover every
    # attribute value, which the first draw already does for seed 0.
    for attempt in range(1000):
        order = np.random.default_rng([seed, attempt]).permutation(len(scenes))
        n_eval, n_predictor = SPLIT_SIZES["eval"], SPLIT_SIZES["predictor"]
        held_out = {
            "eval": tuple(scenes[i] for i in order[:n_eval]),
            "predictor": tuple(scenes[i] for i in order[n_eval : n_eval + n_predictor]),
        }
        if all(_covers(split) for split in held_out.values()):
            taken = set(order[: n_eval + n_predictor].tolist())
            train = tuple(s for i, s in enumerate(scenes) if i not in taken)
            return {"train": train, **held_out}
    raise RuntimeError(f"no covering split found for seed {seed}")


def splits(seed: int = 0) -> dict[str, list[Scene]]:
    """Fixed partition of `all_scenes()` into "train" (the rest), "predictor" (100) and "eval" (200).

    The three are disjoint as attribute combinations, so no predictor or evaluation scene is ever drawn in training,
    and each held-out split contains every value of every attribute.
    """
    return {name: list(scenes) for name, scenes in _splits(seed).items()}


_SPLIT_STREAM = {"train": 0, "predictor": 1, "eval": 2}


def prompts(split: str, seed: int = 0) -> list[str]:
    """One caption per scene of a split ("predictor" or "eval"; "train" works too), deterministic for a seed."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}, expected one of {list(_SPLIT_STREAM)}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    return [caption(scene, rng) for scene in _splits(seed)[split]]


def write_prompt_files(directory: str | Path = PROMPTS_DIR, seed: int = 0) -> dict[str, Path]:
    """Write the predictor and eval prompts, one caption per line, into `directory`; returns the paths by split."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, filename in PROMPT_FILES.items():
        paths[split] = directory / filename
        paths[split].write_text("".join(f"{line}\n" for line in prompts(split, seed)), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------------------------------------- training


def sample_batch(
    rng: np.random.Generator, n: int, scenes: Sequence[Scene], size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[str]]:
    """`n` random scenes from `scenes`, jittered renders (uint8 [n, size, size, 3]) and random captions."""
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions = []
    for i, index in enumerate(rng.integers(len(scenes), size=n)):
        scene = scenes[int(index)]
        _draw(images[i], scene, rng)
        captions.append(caption(scene, rng))
    return images, captions


if __name__ == "__main__":
    for split_name, path in write_prompt_files().items():
        print(f"{split_name}: {path}")
