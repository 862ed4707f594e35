"""VAE decode (`lesa generate` only; record and train stop at the latent): FLOPs and peak activation bytes as linear
functions of the output's pixels, fitted on decodes of small latents at the real channel widths (random weights,
bf16, CPU, no tiling: the pipelines' default)."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from .measure import LiveBytes, _keep_fp32

# latent sizes (frames, height, width) decoded to fit each class's rule, and one to check it on
_IMAGE = {"fit": [(1, 16, 16), (1, 24, 32)], "held_out": [(1, 20, 28)]}
_VIDEO = {"fit": [(2, 8, 8), (3, 8, 8), (2, 12, 16)], "held_out": [(3, 12, 12)]}
VAE_SIZES = {
    "AutoencoderKL": _IMAGE,
    "AutoencoderKLQwenImage": _IMAGE,
    "AutoencoderKLHunyuanVideo": _VIDEO,
    "AutoencoderKLWan": _VIDEO,
}
VIDEO = ("AutoencoderKLHunyuanVideo", "AutoencoderKLWan")
SPATIAL = 8  # every shipped VAE: 8x spatial compression
TEMPORAL = 4  # video VAEs: 4x temporal compression, first frame alone


def latent_channels(vae_class: str, config: dict[str, Any]) -> int:
    return int(config.get("latent_channels") or config.get("z_dim") or 16)


def output_size(vae_class: str, latent: tuple[int, int, int]) -> tuple[int, int, int]:
    """(frames, height, width) in pixels of a decoded latent."""
    f, h, w = latent
    frames = (f - 1) * TEMPORAL + 1 if vae_class in VIDEO else 1
    return frames, h * SPATIAL, w * SPATIAL


def features(vae_class: str, latent: tuple[int, int, int]) -> list[float]:
    """[pixels of one frame, pixels of all frames] of the output: the rule is linear in them."""
    frames, h, w = output_size(vae_class, latent)
    return [float(h * w), float(frames * h * w)]


def build_vae(vae_class: str, config: dict[str, Any], dtype=torch.bfloat16) -> torch.nn.Module:
    import diffusers

    config = {k: v for k, v in copy.deepcopy(config).items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = getattr(diffusers, vae_class)(**config).to(dtype).eval()
    if dtype != torch.float32:
        _keep_fp32(vae)
    vae.requires_grad_(False)
    return vae


def measure_vae(vae_class: str, config: dict[str, Any], latent: tuple[int, int, int], dtype=torch.bfloat16) -> dict:
    """FLOPs and peak live bytes (weights and input not counted) of decoding one latent of `latent` size."""
    start = time.perf_counter()
    vae = build_vae(vae_class, config, dtype)
    f, h, w = latent
    c = latent_channels(vae_class, config)
    shape = (1, c, h, w) if vae_class == "AutoencoderKL" else (1, c, f, h, w)
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    tracker = LiveBytes()
    with torch.no_grad(), tracker:
        vae.decode(z)
    return {
        "vae_class": vae_class,
        "latent": list(latent),
        "flops": sum(tracker.flops.values()),
        "peak": tracker.peak,
        "params": sum(p.numel() for p in vae.parameters()),
        "seconds": time.perf_counter() - start,
    }


def fit_vae(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per VAE class: least-squares coefficients of FLOPs and peak bytes on `features` (minimum norm when the
    features coincide: images), from the rows of its fit sizes."""
    out = {}
    for vae_class in sorted({r["vae_class"] for r in rows}):
        fit_sizes = [list(s) for s in VAE_SIZES[vae_class]["fit"]]
        mine = [r for r in rows if r["vae_class"] == vae_class and r["latent"] in fit_sizes]
        x = torch.tensor([features(vae_class, tuple(r["latent"])) for r in mine], dtype=torch.float64)
        fit = {}
        for key in ("flops", "peak"):
            y = torch.tensor([[float(r[key])] for r in mine], dtype=torch.float64)
            fit[key] = torch.linalg.lstsq(x, y, driver="gelsd").solution.flatten().tolist()
        out[vae_class] = fit
    return out


def vae_estimate(rule: dict[str, list[float]], vae_class: str, latent: tuple[int, int, int]) -> dict[str, float]:
    x = features(vae_class, latent)
    return {key: max(0.0, sum(a * b for a, b in zip(rule[key], x, strict=True))) for key in ("flops", "peak")}


def vae_table(rows: list[dict], rules: dict[str, Any]) -> str:
    lines = [
        "| VAE | latent (f, h, w) -> pixels (f, h, w) | quantity | measured | estimated | ratio |",
        "|---|---|---|---|---|---|",
    ]

    def fitted(r: dict) -> bool:
        return r["latent"] in [list(s) for s in VAE_SIZES[r["vae_class"]]["fit"]]

    for r in sorted(rows, key=lambda r: (r["vae_class"], fitted(r))):
        latent = tuple(r["latent"])
        held = not fitted(r)
        est = vae_estimate(rules[r["vae_class"]], r["vae_class"], latent)
        for key, unit, scale in (("flops", "GFLOP", 1e9), ("peak", "MiB", 2**20)):
            lines.append(
                f"| {r['vae_class']}{'' if held else ' (fit)'} | {latent} -> {output_size(r['vae_class'], latent)} | "
                f"{key} | {r[key] / scale:,.1f} {unit} | {est[key] / scale:,.1f} {unit} | {est[key] / r[key]:.3f} |"
            )
    return "\n".join(lines)
