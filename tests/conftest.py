"""Shared fixtures: a tiny FluxPipeline of the real diffusers classes (random weights), a recording, a predictor."""

from __future__ import annotations

import warnings

import pytest
import torch

from lesa.predictor import LESAPredictor, PredictorConfig
from lesa.record import record
from lesa.recording import Recording
from lesa.testing import tiny_flux_pipeline

warnings.filterwarnings("ignore", message=".*torchvision.*")
torch.set_num_threads(2)

STEPS = 50
SIZE = 16  # 16x16 pixels -> 16x16 latents (vae factor 1) -> 64 packed tokens: fast, still a real FluxPipeline
PROMPTS = [f"a test prompt number {i}" for i in range(8)]
SIGMAS = [1 - i / 20 for i in range(21)]  # the schedule of `tiny_predictor`


def tiny_predictor(seed: int = 0, **overrides) -> LESAPredictor:
    """A small predictor on a 20-step schedule (feature width 6), seeded; `overrides` go to its PredictorConfig."""
    torch.manual_seed(seed)
    fields = dict(
        model_class="FluxTransformer2DModel",
        tap="t",
        num_steps=20,
        sigmas=SIGMAS,
        feature_dim=6,
        kan_hidden=[8, 8],
        windows=[4, 8, 8],
    )
    fields.update(overrides)
    return LESAPredictor(PredictorConfig(**fields))


def generate(pipe, seed: int = 0, steps: int = STEPS, **kwargs) -> torch.Tensor:
    kw = dict(num_inference_steps=steps, height=SIZE, width=SIZE, output_type="latent")
    kw.update(kwargs)
    kw.setdefault("prompt", "a red circle")
    return pipe(generator=torch.Generator().manual_seed(seed), **kw).images


def kill_at_score(monkeypatch, call: int) -> None:
    """Make `Scorer.score_predictor` raise KeyboardInterrupt on its `call`-th call, as a run killed mid-training
    would stop (`monkeypatch.undo()` restores it). Scores come at init and after every epoch."""
    from lesa.training import Scorer

    real_score = Scorer.score_predictor
    calls = []

    def dies(self, predictor, **options):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real_score(self, predictor, **options)

    monkeypatch.setattr(Scorer, "score_predictor", dies)


@pytest.fixture(scope="session")
def pipe():
    p = tiny_flux_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="session")
def pipe_dir(tmp_path_factory, pipe):
    path = tmp_path_factory.mktemp("tiny-flux")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def recording(tmp_path_factory, pipe) -> Recording:
    out = tmp_path_factory.mktemp("recording")
    record(
        pipe,
        PROMPTS,
        out,
        model="tiny",
        steps=STEPS,
        height=SIZE,
        width=SIZE,
        dtype="float32",
        progress=False,
        log=lambda *_: None,
    )
    return Recording(out)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, pipe, recording):
    """A small predictor trained on the recording (both phases); returns (predictor, trainer)."""
    from lesa.training import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("predictor")
    config = TrainConfig(epochs_gt=4, epochs_clar=2, batch_size=3, val_fraction=0.25, kan_hidden=(16, 16), lr_gt=3e-3)
    trainer = Trainer(recording, pipe, out, config, log=lambda *_: None, progress=False)
    return trainer.run(), trainer, out
