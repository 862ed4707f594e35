"""benchmarks/latent_errors.py: the held-out PSNR of the latent at each full step and of the final latent."""

import importlib.util
from pathlib import Path

import pytest

import lesa
from lesa.training import TrainConfig, Trainer

spec = importlib.util.spec_from_file_location(
    "latent_errors", Path(__file__).parents[1] / "benchmarks" / "latent_errors.py"
)
latent_errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(latent_errors)


def test_latent_errors_match_the_recording_and_the_trainers_score(pipe, recording, tmp_path):
    trainer = Trainer(recording, pipe, tmp_path, TrainConfig(val_fraction=0.25), progress=False, log=lambda *_: None)
    steps = [s for s in trainer.variant().full_steps if s > 3]
    # every step full: each latent is the recorded one (up to the rounding of another batch size)
    assert min(latent_errors.latent_errors(trainer.scorer, lesa.NoCacheConfig(count_flops=False), steps)) > 120
    fora = lesa.FORAConfig(interval=7, warmup=3, count_flops=False)
    values = latent_errors.latent_errors(trainer.scorer, fora, steps)
    assert values[-1] == pytest.approx(trainer.scorer.score(fora)["psnr"])
    # the error builds up along the sampler: the first cycle's latent is the closest to the recording
    assert 120 > values[0] > values[-1]
