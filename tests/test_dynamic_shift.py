"""Dynamic-shifting schedulers (FLUX.1-dev's config: `use_dynamic_shifting=True`): the sigma schedule computed ahead
of a pipeline call (`lesa.adapters.pipeline_sigmas`, mu from the image's token count as diffusers' FluxPipeline
computes it) is the one the pipeline then uses, and benchmarks/step_cost.py and `lesa bench` run on such a pipeline.
Also the transformer's class name through a torch.compile wrapper (`model_class_name`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import generate, tiny_predictor
from diffusers import FlowMatchEulerDiscreteScheduler

import lesa
from lesa.adapters import get_adapter, model_class_name, pipeline_sigmas, set_timesteps_kwargs

try:  # the tiny pipelines are moving from lesa.models to lesa.testing
    from lesa import testing as tiny
except ImportError:  # pragma: no cover
    from lesa import models as tiny

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
HEIGHT, WIDTH = 32, 48  # 16 x 24 = 384 packed tokens (the tiny VAE does not downsample): mu is not the base shift's


def dynamic(pipe):
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dyn_flux():
    return dynamic(tiny.tiny_flux_pipeline())


def pipeline_schedule(pipe, **kwargs) -> torch.Tensor:
    """The sigmas the pipeline itself set at its call."""
    generate(pipe, steps=STEPS, height=HEIGHT, width=WIDTH, **kwargs)
    return pipe.scheduler.sigmas.float().cpu()


def test_set_timesteps_without_mu_is_what_fails_on_dynamic_shifting(dyn_flux):
    with pytest.raises(ValueError, match="mu"):
        dyn_flux.scheduler.set_timesteps(STEPS)


def test_the_schedule_computed_ahead_is_the_pipelines_with_dynamic_shifting(dyn_flux):
    kwargs = set_timesteps_kwargs(dyn_flux, STEPS, HEIGHT, WIDTH)
    # FluxPipeline's rule: calculate_shift(384 tokens, 256, 4096, 0.5, 1.15)
    assert kwargs["mu"] == pytest.approx(0.5 + (384 - 256) * (1.15 - 0.5) / (4096 - 256))
    ahead = pipeline_sigmas(dyn_flux, STEPS, HEIGHT, WIDTH)
    assert len(ahead) == STEPS + 1
    assert torch.equal(ahead, pipeline_schedule(dyn_flux))
    # another size, another shift: the schedule depends on the token count
    assert not torch.equal(pipeline_sigmas(dyn_flux, STEPS, 64, 64), ahead)


def test_the_schedule_computed_ahead_is_the_pipelines_without_dynamic_shifting(pipe):
    assert not pipe.scheduler.config.use_dynamic_shifting
    assert "mu" not in set_timesteps_kwargs(pipe, STEPS, HEIGHT, WIDTH)
    assert torch.equal(pipeline_sigmas(pipe, STEPS, HEIGHT, WIDTH), pipeline_schedule(pipe))


@pytest.mark.parametrize("build", ["tiny_qwenimage_pipeline", "tiny_sd3_pipeline"])
def test_other_dynamic_shifting_pipelines_get_their_own_schedule(build):
    p = dynamic(getattr(tiny, build)())
    assert torch.equal(pipeline_sigmas(p, STEPS, HEIGHT, WIDTH), pipeline_schedule(p, negative_prompt=None))


def test_an_unknown_dynamic_shifting_rule_is_refused():
    p = dynamic(tiny.tiny_wan_pipeline())
    with pytest.raises(ValueError, match="dynamic shifting"):
        pipeline_sigmas(p, STEPS, HEIGHT, WIDTH)


def test_a_predictor_on_the_schedule_computed_ahead_runs_in_the_pipeline(dyn_flux):
    sigmas = pipeline_sigmas(dyn_flux, STEPS, HEIGHT, WIDTH).tolist()
    predictor = tiny_predictor(num_steps=STEPS, sigmas=sigmas, feature_dim=dyn_flux.transformer.inner_dim, interval=2)
    lesa.enable(dyn_flux, lesa.LESAConfig(predictor=predictor))
    try:
        generate(dyn_flux, steps=STEPS, height=HEIGHT, width=WIDTH)
        info = lesa.summary(dyn_flux)
    finally:
        lesa.disable(dyn_flux)
    assert info["steps"] == STEPS and info["full_steps"] < STEPS


def test_the_model_class_name_of_a_compiled_transformer(dyn_flux):
    compiled = torch.compile(dyn_flux.transformer, backend="eager")  # wraps only: nothing compiles until called
    assert type(compiled).__name__ == "OptimizedModule"
    assert model_class_name(compiled) == model_class_name(dyn_flux.transformer) == "FluxTransformer2DModel"
    assert get_adapter(compiled) is get_adapter("FluxTransformer2DModel")


def test_step_cost_benchmark_runs_on_a_dynamic_shifting_flux(dyn_flux, tmp_path):
    model = tmp_path / "tiny-flux-dynamic"
    dyn_flux.save_pretrained(model)
    command = [sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), "--model", str(model)]
    command += ["--height", str(HEIGHT), "--width", str(WIDTH), "--steps", str(STEPS), "--interval", "2"]
    command += ["--warmup", "1", "--repeats", "1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| lesa |" in done.stdout


def test_the_bench_runs_on_a_dynamic_shifting_flux(dyn_flux, tmp_path):
    from lesa.evaluate import bench_pipeline

    sigmas = pipeline_sigmas(dyn_flux, STEPS, HEIGHT, WIDTH).tolist()
    predictor = tiny_predictor(num_steps=STEPS, sigmas=sigmas, feature_dim=dyn_flux.transformer.inner_dim, interval=3)
    predictor.save_pretrained(tmp_path / "predictor")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("an evaluation prompt\n")
    results = bench_pipeline(
        dyn_flux, prompts, tmp_path / "b", model="tiny-flux-dynamic", methods=["lesa", "fora"],
        predictors=[str(tmp_path / "predictor")], steps=STEPS, warmup=3, height=HEIGHT, width=WIDTH, repeats=1,
        timing_prompts=1,
    )  # fmt: skip
    rows = {r["row"] for r in results["rows"]}
    assert "full compute" in rows and any(r.startswith("FORA") for r in rows) and len(rows) == 3, rows
    written = json.loads((tmp_path / "b" / "results.json").read_text())
    assert written["config"]["model"] == "tiny-flux-dynamic"
