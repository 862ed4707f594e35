"""The embedded model's data side: scenes, captions, splits, prompt files and the image-follows-caption checker.

Pure numpy, fast and deterministic; none of the torch fixtures of conftest.py are used.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import pytest
from PIL import Image

from lesa.embedded import checker, scenes
from lesa.embedded.scenes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    PROMPT_FILES,
    PROMPTS_DIR,
    SHAPES,
    SIZES,
    TEMPLATES,
    Scene,
    all_scenes,
    caption,
    parse_caption,
    prompts,
    render,
    sample_batch,
    splits,
)

VOCABULARIES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
SCENES = all_scenes()


def random_scenes(seed: int, n: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [SCENES[i] for i in rng.integers(len(SCENES), size=n)]


def box_blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 3x3 box blur, then Gaussian noise of sigma 10/255: a stand-in for a generated image."""
    noisy = box_blur(image) + rng.normal(0.0, 10.0, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------- scenes


def test_vocabulary_and_all_scenes():
    assert len(SCENES) == len(set(SCENES)) == 3 * len(COLOURS) * 2 * 9 * len(BACKGROUNDS)
    assert SCENES == all_scenes()
    assert 6 <= len(COLOURS) <= 8
    palette = {**COLOURS, **BACKGROUNDS}
    # Every colour is far from every other one, so a shape always stands out from its background.
    for a, b in itertools.combinations(palette, 2):
        assert np.linalg.norm(np.subtract(palette[a], palette[b])) > 90, (a, b)
    with pytest.raises(ValueError, match="hexagon"):
        Scene("hexagon", "red", "small", "top", "white")


def test_render_is_deterministic_and_stays_on_canvas():
    scene = Scene("triangle", "blue", "large", "top left", "gray")
    image = render(scene)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render(scene))
    a, b = render(scene, np.random.default_rng(7)), render(scene, np.random.default_rng(7))
    assert np.array_equal(a, b)

    rng = np.random.default_rng(0)
    variants = set()
    for scene in random_scenes(1, 400):
        image = render(scene, rng)
        background = np.array(BACKGROUNDS[scene.background], dtype=np.uint8)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == background).all(), scene  # the shape never touches or leaves the canvas
        object_pixels = (image != background).any(-1)
        assert object_pixels.sum() >= 20
        assert (image[object_pixels] == COLOURS[scene.colour]).all()
    for _ in range(30):  # jitter gives a distribution, not one image
        variants.add(render(Scene("circle", "red", "small", "center", "white"), rng).tobytes())
    assert len(variants) > 5


def test_render_other_sizes():
    for size in (48, 64):
        image = render(Scene("square", "green", "small", "bottom right", "black"), np.random.default_rng(0), size)
        assert image.shape == (size, size, 3)


# --------------------------------------------------------------------------------------------------------- captions


def test_caption_is_deterministic():
    scene = Scene("circle", "orange", "small", "bottom", "black")
    assert caption(scene, np.random.default_rng(3)) == caption(scene, np.random.default_rng(3))
    texts = {caption(scene, np.random.default_rng(seed)) for seed in range(40)}
    assert len(texts) >= 10  # paraphrase variety


@pytest.mark.parametrize("template", range(len(TEMPLATES)))
def test_parse_caption_inverts_every_template(template):
    rng = np.random.default_rng(template)
    for scene in random_scenes(100 + template, 300):
        text = caption(scene, rng, template)
        assert parse_caption(text) == scene, text
        # Case-insensitive and tolerant of stray spaces.
        messy = "  " + text.upper().replace(" ", "  ").replace(",", " ,") + " . "
        assert parse_caption(messy) == scene, messy


def test_parse_caption_examples_and_errors():
    expected = Scene("circle", "red", "small", "top left", "white")
    for text in (
        "a small red circle in the top left on a white background",
        "small red circle, top left, white background",
        "a red circle (small) at the top left corner over white",
        "Top left: a small red circle on white.",
        "a small red circle in the top  left on an white background",
    ):
        assert parse_caption(text) == expected, text
    assert parse_caption("centre: a large cyan square on grey") == Scene("square", "cyan", "large", "center", "gray")
    assert parse_caption("an orange triangle (large) in the middle over black").colour == "orange"
    for bad in ("a small red circle", "a small pink circle in the top left on a white background", ""):
        with pytest.raises(ValueError, match="cannot parse caption"):
            parse_caption(bad)


# ----------------------------------------------------------------------------------------------- splits and prompts


def test_splits_are_fixed_disjoint_and_covering():
    parts = splits()
    assert parts == splits()
    assert len(parts["predictor"]) == 100 and len(parts["eval"]) == 200
    assert len(parts["train"]) == len(SCENES) - 300
    sets = {name: set(part) for name, part in parts.items()}
    assert all(len(sets[name]) == len(parts[name]) for name in parts)  # no duplicates
    for a, b in itertools.combinations(sets, 2):
        assert not sets[a] & sets[b], (a, b)
    assert set.union(*sets.values()) == set(SCENES)
    for split in ("eval", "predictor"):
        for attribute, vocabulary in VOCABULARIES.items():
            assert {getattr(s, attribute) for s in parts[split]} == set(vocabulary), (split, attribute)
    assert splits(1)["eval"] != parts["eval"]


def test_prompts_match_splits_and_files():
    parts = splits()
    for split in ("predictor", "eval"):
        lines = prompts(split)
        assert lines == prompts(split)
        assert [parse_caption(line) for line in lines] == parts[split]
        on_disk = (PROMPTS_DIR / PROMPT_FILES[split]).read_text(encoding="utf-8").splitlines()
        assert on_disk == lines, f"regenerate with: python -m lesa.embedded.scenes ({split})"
    with pytest.raises(ValueError):
        prompts("nope")


def test_write_prompt_files(tmp_path):
    paths = scenes.write_prompt_files(tmp_path)
    assert paths["eval"].read_text(encoding="utf-8").splitlines() == prompts("eval")
    assert len(paths["predictor"].read_text(encoding="utf-8").splitlines()) == 100


def test_sample_batch_shape_captions_and_speed():
    train = splits()["train"]
    images, texts = sample_batch(np.random.default_rng(0), 64, train)
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.uint8
    assert len(texts) == 64
    allowed = set(train)
    assert all(parse_caption(text) in allowed for text in texts)
    again, texts_again = sample_batch(np.random.default_rng(0), 64, train)
    assert np.array_equal(images, again) and texts == texts_again
    timings = []
    for seed in range(3):
        start = time.perf_counter()
        sample_batch(np.random.default_rng(seed), 64, train)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.05, timings


# ---------------------------------------------------------------------------------------------------------- checker


@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "noise+blur"])
def test_checker_accepts_ground_truth(degraded):
    rng = np.random.default_rng(11)
    passed = []
    for scene in random_scenes(12, 300):
        image = render(scene, rng)
        if degraded:
            image = degrade(image, rng)
        result = checker.check(image, scene)
        assert set(result) == {"background", "colour", "position", "size", "shape", "all"}
        passed.append(result["all"])
    assert np.mean(passed) >= 0.99


@pytest.mark.parametrize("attribute", list(VOCABULARIES))
def test_checker_rejects_one_wrong_attribute(attribute):
    rng = np.random.default_rng(list(VOCABULARIES).index(attribute))
    rejected = []
    for scene in random_scenes(13, 120):
        # Render a scene differing from the caption's in exactly this attribute (and still valid).
        choices = [v for v in VOCABULARIES[attribute] if v != getattr(scene, attribute)]
        wrong = dataclasses.replace(scene, **{attribute: choices[int(rng.integers(len(choices)))]})
        result = checker.check(degrade(render(wrong, rng), rng), scene)
        rejected.append(not result[attribute] and not result["all"])
    assert np.mean(rejected) >= 0.95


def test_checker_honest_on_empty_and_larger_images():
    scene = Scene("square", "yellow", "large", "right", "black")
    blank = np.zeros((32, 32, 3), dtype=np.uint8)
    assert checker.check(blank, scene) == {
        "background": True,
        "colour": False,
        "position": False,
        "size": False,
        "shape": False,
        "all": False,
    }
    assert checker.check(render(scene, np.random.default_rng(0), 64), scene)["all"]
    image = render(scene, np.random.default_rng(1))
    assert checker.check(image.astype(np.float32) / 255, scene)["all"]  # diffusers' float output in [0, 1]
    assert checker.check(Image.fromarray(image), scene)["all"]
    with pytest.raises(ValueError):
        checker.check(np.zeros((32, 16, 3), dtype=np.uint8), scene)


def test_check_caption_and_score():
    rng = np.random.default_rng(21)
    chosen = random_scenes(22, 40)
    texts = [caption(scene, rng) for scene in chosen]
    images = np.stack([render(scene, rng) for scene in chosen])
    assert checker.check_caption(images[0], texts[0])["all"]
    result = checker.score(images, texts)
    assert result["n"] == 40 and result["all"] == 1.0
    # Captions shifted by one: mostly wrong, and the score says so.
    shifted = checker.score(images, texts[1:] + texts[:1])
    assert shifted["all"] < 0.2
    assert set(shifted) == {"background", "colour", "position", "size", "shape", "all", "n"}
