"""Training a LESA predictor from a recording: phase `gt` (teacher forcing) then phase `clar` (closed loop).

One idea per module, values passed between them: `config` (TrainConfig) and `recipes` (presets), `data` (the
training and held-out trajectories), `validation` (the closed-loop scorer), `start` (fitted baselines and where a
predictor starts), `placement` (variants, planned and searched full steps), `phases` (gt, clar, the final-latent loss,
the update step), `checkpoints` (one resumable seed), `card` (the model card) and `trainer` (`Trainer.run`);
`schedule_free` trains one schedule-free predictor (format 2) across step counts and budgets.

Example:
    >>> from lesa.training import TrainConfig, Trainer
    >>> config = TrainConfig.from_recipe("calibrated", epochs_clar=2)
    >>> Trainer(recording, pipe, "predictor-dir", config).run()  # doctest: +SKIP
"""

from .config import CHOICES, PHASES, TrainConfig
from .data import TrainingData, check_validation_recording, split_indices
from .recipes import DEFAULT_RECIPE, RECIPES
from .schedule_free import ScheduleFreeTrainer
from .trainer import Trainer, weights_digest
from .validation import Scorer, as_call_batch, latent_psnr, one_step_errors

__all__ = [
    "CHOICES",
    "DEFAULT_RECIPE",
    "PHASES",
    "RECIPES",
    "ScheduleFreeTrainer",
    "Scorer",
    "TrainConfig",
    "Trainer",
    "TrainingData",
    "as_call_batch",
    "check_validation_recording",
    "latent_psnr",
    "one_step_errors",
    "split_indices",
    "weights_digest",
]
