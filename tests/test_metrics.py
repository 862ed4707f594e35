"""Image-quality metrics: PSNR, SSIM, MS-SSIM against hand-checkable values; LPIPS, CLIPScore, ImageReward with tiny
random weights or stand-ins written to temporary files (no network, no real checkpoints)."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lesa.evaluate.metrics import (
    LPIPS,
    LPIPS_MIN_SIDE,
    MS_SSIM_MIN_SIDE,
    CLIPScore,
    ImageRewardScore,
    MetricUnavailable,
    ms_ssim,
    psnr,
    ssim,
)


def _image(side: int, seed: int = 0, height: int | None = None) -> np.ndarray:
    """A smooth random RGB image (so SSIM of a noisy copy stays well above 0)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, ((height or side) // 4 + 1, side // 4 + 1, 3)).astype(np.uint8)
    big = Image.fromarray(coarse).resize((side, height or side), Image.BILINEAR)
    return np.asarray(big).copy()


def _noisy(x: np.ndarray, amount: int, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-amount, amount + 1, x.shape)
    return np.clip(x.astype(np.int64) + noise, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_identical_is_inf_and_constant_offset_is_exact():
    a = np.full((8, 9, 3), 100, dtype=np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, a + 10) == pytest.approx(10 * math.log10(255**2 / 100))  # MSE 100 -> 28.13 dB
    assert psnr(a + 1, a) == pytest.approx(20 * math.log10(255))  # MSE 1


def test_inputs_are_validated():
    a = _image(16)
    with pytest.raises(ValueError, match="uint8"):
        psnr(a.astype(np.float32) / 255, a)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        ssim(a[..., 0], a[..., 0])
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, a[:15])
    with pytest.raises(TypeError, match="numpy array or PIL"):
        psnr([[0]], a)
    assert psnr(Image.fromarray(a), a) == math.inf  # PIL images are accepted


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Direct per-window SSIM (Wang et al. 2004) with centred moments, written independently of the module."""
    weights = np.array([0.299, 0.587, 0.114])
    x, y = a.astype(np.float64) @ weights, b.astype(np.float64) @ weights
    r = np.arange(11) - 5.0
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_direct_formula_and_basic_properties():
    a = _image(16, seed=3, height=17)
    b = _noisy(a, 40)
    assert ssim(a, b) == pytest.approx(_ssim_reference(a, b), abs=1e-10)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert 1.0 > ssim(a, _noisy(a, 10)) > ssim(a, _noisy(a, 40)) > ssim(a, _noisy(a, 120))


def test_ssim_rejects_images_smaller_than_the_window():
    a = _image(10, height=20)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a, a)


def test_ms_ssim_needs_161_px_and_behaves():
    assert MS_SSIM_MIN_SIDE == 161
    small = _image(32)
    assert ms_ssim(small, small) is None
    edge = _image(MS_SSIM_MIN_SIDE - 1, height=200)
    assert ms_ssim(edge, edge) is None  # the shorter side decides
    a = _image(176)
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    noisy = ms_ssim(a, _noisy(a, 40))
    assert noisy is not None and 0.0 < noisy < 1.0
    assert ms_ssim(a, _noisy(a, 80)) < noisy
    odd = _image(MS_SSIM_MIN_SIDE)  # odd sides are rounded up when halved: 161 -> 81 -> 41 -> 21 -> 11
    assert ms_ssim(odd, _noisy(odd, 40)) is not None


# ----------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random weights split like the real checkpoints: torchvision-style AlexNet .pth and lpips-style lin file."""
    torch.manual_seed(0)
    state = LPIPS().state_dict()
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    features["classifier.1.weight"] = torch.zeros(4, 9216)  # present in torchvision's file; must be ignored
    lins = {k: v.abs().contiguous() for k, v in state.items() if k.startswith("lin")}  # lpips' lins are >= 0
    root = tmp_path_factory.mktemp("lpips")
    torch.save(features, root / "alexnet.pth")
    save_file(lins, str(root / "alex.safetensors"))
    return root / "alexnet.pth", root / "alex.safetensors", features, lins


def test_lpips_loads_merged_files_and_measures(lpips_files):
    feat_path, lin_path, features, lins = lpips_files
    model = LPIPS.from_files([feat_path, str(lin_path)])
    loaded = model.state_dict()
    assert torch.equal(loaded["features.10.weight"], features["features.10.weight"])
    assert torch.equal(loaded["lin2.model.1.weight"], lins["lin2.model.1.weight"])
    x, y = _image(32, seed=1), _image(32, seed=2)
    assert model.distance(x, x) == pytest.approx(0.0, abs=1e-12)
    d = model.distance(x, y)
    assert d > 0.0 and d == pytest.approx(model.distance(y, x), rel=1e-5)
    assert model.distance(x, _noisy(x, 10)) < model.distance(x, _noisy(x, 120))


def test_lpips_minimum_size(lpips_files):
    assert LPIPS_MIN_SIDE == 31
    model = LPIPS.from_files(lpips_files[:2])
    x = _image(LPIPS_MIN_SIDE)
    assert model.distance(x, _noisy(x, 30)) >= 0.0  # every tap is at least 1x1
    y = _image(LPIPS_MIN_SIDE - 1, height=64)
    with pytest.raises(ValueError, match="at least 31x31"):
        model.distance(y, y)


def test_lpips_missing_key_and_wrong_shape(lpips_files, tmp_path):
    feat_path, _, _, lins = lpips_files
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in lins.items() if not k.startswith("lin3")}, partial)
    with pytest.raises(ValueError, match=r"lin3\.model\.1\.weight") as info:
        LPIPS.from_files([feat_path, partial])
    assert "partial.pth" in str(info.value) and "alexnet.pth" in str(info.value)

    bad = tmp_path / "bad.pth"
    torch.save({"features.3.weight": torch.zeros(192, 64, 3, 3)}, bad)
    with pytest.raises(ValueError, match=r"features\.3\.weight.*\(192, 64, 3, 3\).*\(192, 64, 5, 5\)"):
        LPIPS.from_files([bad])

    with pytest.raises(MetricUnavailable, match="nowhere.pth"):
        LPIPS.from_files([feat_path, tmp_path / "nowhere.pth"])
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        LPIPS.from_files([junk])


# ----------------------------------------------------------------------------------------------- CLIPScore


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel with a letter-level BPE tokenizer and a 32-px image processor, saved to disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters)]:
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    text.update(num_attention_heads=2, max_position_embeddings=12, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=32, patch_size=16)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_clip_score_matches_model_cosine(clip_dir):
    scorer = CLIPScore.from_pretrained(clip_dir)
    image = _image(40, seed=5, height=48)
    for caption in ["a red cat", "sky", "x"]:  # within the 12-token context
        value = scorer.score(image, caption)
        inputs = scorer.processor(text=[caption], images=[Image.fromarray(image)], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = scorer.model(**inputs)
        cosine = float(out.logits_per_image[0, 0] / scorer.model.logit_scale.detach().exp())
        assert value == pytest.approx(100 * max(cosine, 0.0), abs=1e-3)
        assert 0.0 <= value <= 100.0
    assert scorer.score(Image.fromarray(image), "a red cat") == pytest.approx(scorer.score(image, "a red cat"))
    long_caption = " ".join(["many words"] * 20)  # longer than the 12-token context: truncated, not an error
    assert 0.0 <= scorer.score(image, long_caption) <= 100.0


def test_clip_score_missing_or_broken_directory(tmp_path):
    with pytest.raises(MetricUnavailable, match="CLIP model directory not found"):
        CLIPScore.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="cannot load a CLIPModel"):
        CLIPScore.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------- ImageReward


def test_image_reward_without_package_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # makes `import ImageReward` fail even if installed
    with pytest.raises(MetricUnavailable, match="pip install image-reward"):
        ImageRewardScore.from_path(tmp_path / "ImageReward.pt")


def test_image_reward_with_a_stand_in_package(monkeypatch, tmp_path):
    calls = []

    class _Model:
        def score(self, prompt, image):
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            return 0.5 + len(prompt)

    def load(name, device="cpu", download_root=None, med_config=None):
        calls.append((name, device, med_config))
        return _Model()

    fake = types.ModuleType("ImageReward")
    fake.load = load
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    with pytest.raises(MetricUnavailable, match="checkpoint not found"):
        ImageRewardScore.from_path(tmp_path)
    (tmp_path / "ImageReward.pt").write_bytes(b"")
    (tmp_path / "med_config.json").write_text(json.dumps({}))
    scorer = ImageRewardScore.from_path(tmp_path)
    assert calls == [(str(tmp_path / "ImageReward.pt"), "cpu", str(tmp_path / "med_config.json"))]
    assert scorer.score("abc", _image(16)) == 3.5
