"""Run under torchrun by test_context_parallel.py: LESA on a tiny FLUX pipeline with diffusers' Ulysses context
parallelism (gloo, CPU), compared with the same pipeline and predictor in one process. Writes rank0.json."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig

import lesa
from lesa.predictor import LESAPredictor, PredictorConfig
from lesa.runtime import get_runtime
from lesa.testing import tiny_flux_pipeline

STEPS = 10


SUMMARIES: list[dict] = []


def generate(pipe, config=None, taps: list | None = None) -> torch.Tensor:
    """One generation with `config` enabled for it (None: lesa is already enabled, else no cache)."""
    owned = config is not None or not hasattr(pipe.transformer, "_lesa_runtime")
    if owned:
        lesa.enable(pipe, config or lesa.NoCacheConfig(count_flops=False))
    if taps is not None:
        get_runtime(pipe.transformer).observers.append(lambda e: taps.append(list(e.tap.shape)))
    try:
        kw = dict(num_inference_steps=STEPS, height=16, width=16, output_type="latent")
        images = pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        SUMMARIES.append(lesa.summary(pipe))
        return images
    finally:
        if owned:
            lesa.disable(pipe)


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    # diffusers 0.42.1 places rank r on accelerator r % device_count(), which is 0 on a CPU-only machine
    torch.accelerator.device_count = lambda: 1
    torch.manual_seed(3)
    config = PredictorConfig(
        model_class="FluxTransformer2DModel",
        tap="hidden state entering norm_out",
        num_steps=STEPS,
        sigmas=[1 - i / STEPS for i in range(STEPS + 1)],
        feature_dim=32,
        dtype="float32",
        interval=3,
        warmup=2,
        kan_hidden=[8, 8],
    )
    predictor = LESAPredictor(config)
    with torch.no_grad():  # a predictor whose forecasts differ clearly from reuse
        for p in predictor.parameters():
            p.add_(torch.randn_like(p) * 0.1)

    def cfg():
        return lesa.LESAConfig(predictor=predictor, count_flops=False)

    results = {}
    single = tiny_flux_pipeline()
    single.set_progress_bar_config(disable=True)
    ref_full = generate(single)
    ref = generate(single, cfg(), taps := [])
    results["single_tap_shapes"] = sorted({tuple(s) for s in taps})
    # order 1: context parallelism first, lesa on top
    cp = tiny_flux_pipeline()
    cp.set_progress_bar_config(disable=True)
    cp.transformer.set_attention_backend("native")
    cp.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    cp_full = generate(cp)
    cp_lesa = generate(cp, cfg(), taps := [])
    results["cp_tap_shapes"] = sorted({tuple(s) for s in taps})
    summary = SUMMARIES[-1]
    # order 2: lesa first, then context parallelism
    cp2 = tiny_flux_pipeline()
    cp2.set_progress_bar_config(disable=True)
    lesa.enable(cp2, cfg())
    cp2.transformer.set_attention_backend("native")
    cp2.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    cp2_lesa = generate(cp2)
    results.update(
        full_cp_vs_single=(cp_full - ref_full).abs().max().item(),
        lesa_cp_vs_single=(cp_lesa - ref).abs().max().item(),
        lesa_cp_other_order_vs_single=(cp2_lesa - ref).abs().max().item(),
        lesa_vs_full=(ref - ref_full).abs().max().item(),
        full_steps=summary["full_steps"],
        steps=summary["steps"],
    )
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
