"""The shipped embedded model and its shipped schedule-free LESA predictor, on a handful of held-out evaluation
prompts, at several step counts and budgets."""

import numpy as np
import pytest
import torch

import lesa
from lesa.embedded.checker import score
from lesa.embedded.loading import SHIPPED_DIR, load_embedded
from lesa.embedded.scenes import prompts
from lesa.pipelines import shipped_predictor

PROMPTS = prompts("eval")[:8]
pytestmark = pytest.mark.skipif(
    not (SHIPPED_DIR / "transformer").is_dir(), reason="the embedded model's weights are not shipped in this checkout"
)


@pytest.fixture(scope="module")
def shipped():
    pipe = load_embedded()
    pipe.set_progress_bar_config(disable=True)
    noise = torch.stack([torch.randn(256, 12, generator=torch.Generator().manual_seed(i)) for i in range(8)])
    full = pipe(PROMPTS, latents=noise, output_type="np").images
    return pipe, noise, full


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_shipped_model_follows_held_out_prompts(shipped):
    _, _, full = shipped
    shares = score(full, PROMPTS)
    print("full compute, 8 evaluation prompts:", shares)
    # measured on all 200 evaluation prompts: background, colour, position, size 1.00; shape and all 0.995 (all 8
    # of these here)
    assert shares["background"] == shares["colour"] == shares["position"] == 1.0
    assert shares["all"] >= 0.875


# measured on these 8 prompts: 39.62 dB at x5 (10 of 50 full), 35.96 at x6.25 (8 of 50); the format-1 pair shipped
# before it 39.52 / 34.24
@pytest.mark.parametrize(("speedup", "full_steps", "floor"), [(5, 10, 35.0), (6.25, 8, 32.0)])
def test_shipped_predictor_accelerates_and_stays_close(shipped, speedup, full_steps, floor):
    pipe, noise, full = shipped
    lesa.enable(pipe, lesa.LESAConfig(predictor=shipped_predictor(), speedup=speedup))
    try:
        images = pipe(PROMPTS, latents=noise, output_type="np").images
        info = lesa.summary(pipe)
    finally:
        lesa.disable(pipe)
    assert info["full_steps"] == full_steps and info["contexts"]["uncond"]["full_steps"] == full_steps
    mean_psnr = sum(psnr(a, b) for a, b in zip(images, full, strict=True)) / len(full)
    shares = score(images, PROMPTS)
    print(f"LESA x{speedup}: PSNR vs full {mean_psnr:.2f} dB, prompt-following {shares}")
    assert mean_psnr > floor
    assert shares["all"] >= score(full, PROMPTS)["all"] - 0.125


@pytest.mark.parametrize(("steps", "floor"), [(20, 28.0), (28, 30.0)])  # measured 30.69 and 33.01 dB
def test_shipped_predictor_at_other_step_counts(shipped, steps, floor):
    """The same predictor at diffusers' FLUX default of 28 steps and at 20, a speed-up of 4: close to full compute
    of the same step count."""
    pipe, noise, _ = shipped
    full = pipe(PROMPTS, latents=noise, num_inference_steps=steps, output_type="np").images
    lesa.enable(pipe, lesa.LESAConfig(predictor=shipped_predictor(), speedup=4))
    try:
        images = pipe(PROMPTS, latents=noise, num_inference_steps=steps, output_type="np").images
        info = lesa.summary(pipe)
    finally:
        lesa.disable(pipe)
    assert info["steps"] == steps and info["trunk_executions"] == round(steps / 4)
    mean_psnr = sum(psnr(a, b) for a, b in zip(images, full, strict=True)) / len(full)
    print(f"LESA x4 at {steps} steps: PSNR vs full {mean_psnr:.2f} dB")
    assert mean_psnr > floor
