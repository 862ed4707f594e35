"""Automatic check of whether an image follows its caption: background, colour, position, size and shape.

Built to be robust to generated images (noise, blur, slightly-off colours) and honest about failures:

1. Every pixel is classified to its nearest palette colour (shape colours + backgrounds). The background is the
   dominant class along the border.
2. The object is the largest 8-connected blob of non-background pixels. Its colour is the majority class among its
   "clean" pixels (those close to a palette colour), so blurred edges, whose mixtures of shape and background colour
   can be nearest to a third palette colour, do not vote. Drawing the wrong colour therefore fails `colour`, while
   position, size and shape are still judged on what was drawn.
3. A soft coverage map, each pixel's place between the background and the object colour (how much of the pixel
   the object covers once blurred), is measured with moments, which blur preserves and which average noise out: the
   centroid's 3x3 grid cell gives the position, vertical skewness and corner anisotropy the shape (see
   `shape_moments`), and the covered area over the detected shape's share of its box the size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from lesa.embedded.scenes import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    SIZE_PIXELS,
    Scene,
    parse_caption,
    shape_mask,
)

KEYS: tuple[str, ...] = ("background", "colour", "position", "size", "shape")

PALETTE_NAMES: tuple[str, ...] = tuple(COLOURS) + tuple(name for name in BACKGROUNDS if name not in COLOURS)
_PALETTE = np.array([{**COLOURS, **BACKGROUNDS}[name] for name in PALETTE_NAMES], dtype=np.float32)
# A pixel within this RGB distance of its nearest palette colour is "clean" and votes for the object's colour. Palette
# colours are >= 99 apart, so clean pixels are unambiguous; Gaussian noise of sigma 10 stays below it.
CLEAN_DISTANCE = 40.0
# Box side in pixels at 32x32 between small (SIZE_PIXELS 7-8) and large (11-12) shapes.
SIZE_THRESHOLD = (max(SIZE_PIXELS["small"]) + min(SIZE_PIXELS["large"])) / 2
# Share of its box a rendered shape fills (circle ~0.79, square 1, triangle ~0.6), to turn an area into a box side.
_FILL = {
    shape: float(np.mean([shape_mask(shape, side).mean() for sides in SIZE_PIXELS.values() for side in sides]))
    for shape in SHAPES
}
MIN_AREA = 4  # fewer object pixels than this is no object at all
# Shape rules on coverage moments (see `shape_moments`): measured on jittered renders with noise and blur, triangles
# have skewness <= -0.24 (circles and squares |skew| <= 0.1), squares anisotropy >= 0.32 (circles <= 0.04).
TRIANGLE_SKEW = -0.18
SQUARE_ANISOTROPY = 0.18

_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)


def _to_grid(image: np.ndarray | Image.Image) -> np.ndarray:
    """The image as float32 IMAGE_SIZE x IMAGE_SIZE x 3 in 0..255 (box-downsampled when larger).

    Integer arrays and PIL images are 0..255; floating arrays are 0..1, as diffusers' `output_type="np"` gives them.
    """
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.floating):
        image = np.rint(np.clip(image, 0.0, 1.0) * 255)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square HxWx3 image, got shape {image.shape}")
    if image.shape[0] < IMAGE_SIZE:
        raise ValueError(f"expected an image of at least {IMAGE_SIZE}x{IMAGE_SIZE}, got {image.shape[0]}")
    if image.shape[0] != IMAGE_SIZE:
        pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        image = np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    return image.astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False when the mask is empty)."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        stack, component = [start], []
        while stack:
            y, x = stack.pop()
            component.append((y, x))
            for dy, dx in _NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(component) > len(best):
            best = component
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation of a boolean mask."""
    height, width = mask.shape
    padded = np.pad(mask, 1)
    return np.any([padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], axis=0)


def shape_moments(coverage: np.ndarray) -> tuple[float, float, float, float]:
    """(centroid y, centroid x, vertical skewness, corner anisotropy) of a soft coverage map in [0, 1].

    Skewness is the third standardised moment of the rows (about -0.57 for an upward triangle, 0 for circles and
    squares). Anisotropy is the mean kurtosis of the projections on the two diagonals minus that on the two axes:
    a square projects to a uniform law on its axes (kurtosis 1.8) but a triangular one on its diagonals (2.4), so
    about +0.6; a circle projects alike in every direction, so about 0. A symmetric blur leaves the third cumulant
    unchanged and barely moves the fourth, and moments average pixel noise out, so both survive blur and noise far
    better than outline-based measures.
    """
    # Work on the covered box only: the same moments, a fraction of the arithmetic.
    rows, cols = np.nonzero(coverage.any(1))[0], np.nonzero(coverage.any(0))[0]
    top, left = rows[0], cols[0]
    coverage = coverage[top : rows[-1] + 1, left : cols[-1] + 1]
    y, x = np.mgrid[: coverage.shape[0], : coverage.shape[1]] + 0.5
    y, x = y + top, x + left
    mass = coverage.sum()
    cy, cx = (coverage * y).sum() / mass, (coverage * x).sum() / mass
    dy, dx = y - cy, x - cx

    def moment(t: np.ndarray, order: int) -> float:
        return float((coverage * t**order).sum() / mass)

    def kurtosis(t: np.ndarray) -> float:
        return moment(t, 4) / max(moment(t, 2), 1e-9) ** 2

    skew = moment(dy, 3) / max(moment(dy, 2), 1e-9) ** 1.5
    diagonal = (kurtosis((dx + dy) / np.sqrt(2)) + kurtosis((dx - dy) / np.sqrt(2))) / 2
    axial = (kurtosis(dx) + kurtosis(dy)) / 2
    return float(cy), float(cx), float(skew), float(diagonal - axial)


def _classify_shape(skew: float, anisotropy: float) -> str:
    if skew < TRIANGLE_SKEW:
        return "triangle"
    return "square" if anisotropy > SQUARE_ANISOTROPY else "circle"


def describe(image: np.ndarray | Image.Image) -> dict[str, str | None]:
    """What the image shows, as scene attribute values (None where no object is found)."""
    pixels = _to_grid(image)
    distances = ((pixels[:, :, None, :] - _PALETTE) ** 2).sum(-1)  # squared, H x W x palette
    classes = distances.argmin(-1)
    border = np.concatenate([classes[0], classes[-1], classes[1:-1, 0], classes[1:-1, -1]])
    background = int(np.bincount(border, minlength=len(PALETTE_NAMES)).argmax())
    found: dict[str, str | None] = dict.fromkeys(KEYS)
    found["background"] = PALETTE_NAMES[background]

    blob = _largest_component(classes != background)
    if blob.sum() < MIN_AREA:
        return found
    clean = blob & (distances.min(-1) < CLEAN_DISTANCE**2)
    votes = classes[clean] if clean.sum() >= MIN_AREA else classes[blob]
    colour = int(np.bincount(votes, minlength=len(PALETTE_NAMES)).argmax())
    found["colour"] = PALETTE_NAMES[colour]

    # Coverage: each pixel's position between the background and the object colour, i.e. how much of it the object
    # covers after blur; kept to the blob and a 1 px ring, so that noise elsewhere adds nothing.
    axis = _PALETTE[colour] - _PALETTE[background]
    coverage = np.clip((pixels - _PALETTE[background]) @ axis / (axis @ axis), 0.0, 1.0) * _dilate(blob)
    if coverage.sum() < MIN_AREA / 2:  # colours far off the background-object axis: fall back to the hard blob
        coverage = blob.astype(np.float32)
    cy, cx, skew, anisotropy = shape_moments(coverage)
    row, col = (min(max(int(c * 3 / IMAGE_SIZE), 0), 2) for c in (cy, cx))
    found["position"] = POSITIONS[3 * row + col]
    found["shape"] = _classify_shape(skew, anisotropy)
    # Size from the covered area (blur keeps it, noise averages out) over the detected shape's share of its box:
    # an estimate of the box side that is far steadier than the outline's extent.
    side = np.sqrt(coverage.sum() / _FILL[found["shape"]])
    found["size"] = "small" if side < SIZE_THRESHOLD else "large"
    return found


def check(image: np.ndarray | Image.Image, scene: Scene) -> dict[str, bool]:
    """Per attribute whether `image` shows `scene`, plus "all".

    `image`: square HxWx3, at least 32 px; uint8 (0..255), float (0..1) or a PIL image.
    """
    found = describe(image)
    result = {key: found[key] == getattr(scene, key) for key in KEYS}
    result["all"] = all(result.values())
    return result


def check_caption(image: np.ndarray | Image.Image, text: str) -> dict[str, bool]:
    """`check` against the scene parsed from a caption."""
    return check(image, parse_caption(text))


def score(images: Sequence[np.ndarray | Image.Image] | np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """Share of images passing each check key (and "all"), plus "n", the number of images."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    totals = dict.fromkeys((*KEYS, "all"), 0)
    for image, text in zip(images, captions, strict=True):
        for key, passed in check_caption(image, text).items():
            totals[key] += passed
    n = len(captions)
    return {**{key: total / n if n else 0.0 for key, total in totals.items()}, "n": float(n)}
