"""The trajectories a predictor trains and is validated on, as one value: `TrainingData`."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..recording import Recording
from ..trajectories import Trajectories, check_disjoint, stderr_notice, training_trajectories


@dataclass(frozen=True)
class TrainingData:
    """A recording's training trajectories and the held-out ones, addressed by one index: those of the validation
    recording (if any) follow the recording's own (n, n + 1, ...).

    Without `validation`, a fixed split of the recording's prompts is held out; with it, its trajectories are the
    held-out ones and every trajectory of `recording` is trained on (val_fraction 0) or all but that split of it.

    Example:
        >>> data = TrainingData.split(recording, val_fraction=0.2)  # doctest: +SKIP
        >>> data.load(data.val_idx[0])["final"].shape  # doctest: +SKIP
    """

    rec: Recording
    val_rec: Recording | None
    train_idx: list[int]
    val_idx: list[int]

    @classmethod
    def split(
        cls,
        recording: Recording,
        val_fraction: float,
        validation: Recording | None = None,
        notice: Callable[[str], None] = stderr_notice,
    ) -> TrainingData:
        prompts = [entry["prompt"] for entry in recording.entries]
        if validation is None:
            if val_fraction == 0:
                raise ValueError("val_fraction 0 holds nothing out: give a validation recording (--val-data)")
            train_idx, val_idx = split_indices(len(recording), val_fraction, prompts)
            return cls(recording, None, train_idx, val_idx)
        check_validation_recording(recording, validation, notice)
        # a val_fraction still leaves that split of the recording out of training (e.g. when the validation prompts
        # describe its scenes afresh); it is not scored either
        train = split_indices(len(recording), val_fraction, prompts)[0] if val_fraction else None
        train_idx = train if train is not None else list(range(len(recording)))
        return cls(recording, validation, train_idx, list(range(len(recording), len(recording) + len(validation))))

    @property
    def settings(self) -> dict[str, Any]:
        return self.rec.settings

    @property
    def num_steps(self) -> int:
        return self.rec.settings["steps"]

    @property
    def contexts(self) -> list[str]:
        return self.rec.contexts

    def sigmas(self) -> torch.Tensor:
        return torch.tensor(self.rec.sigmas, dtype=torch.float32)

    def trajectory(self, i: int) -> tuple[Recording, int]:
        """The recording holding trajectory `i` and its index there."""
        n = len(self.rec)
        return (self.rec, i) if i < n or self.val_rec is None else (self.val_rec, i - n)

    def load(self, i: int) -> dict[str, torch.Tensor]:
        rec, j = self.trajectory(i)
        return rec.load(j)

    def prompt(self, i: int) -> str:
        rec, j = self.trajectory(i)
        return rec.entries[j]["prompt"]

    def elements(self, key: str) -> int:
        """Elements of one trajectory's `key` tensor at one step."""
        return math.prod(self.rec.shapes[key][1:])

    def fingerprint(self) -> dict[str, Any]:
        """The content of the recordings trained and validated on (other data under the same path is other data)."""
        validation = None if self.val_rec is None else self.val_rec.fingerprint
        return {"data": self.rec.fingerprint, "validation_data": validation}

    def trajectory_keys(self) -> dict[str, Any]:
        """What `lesa bench` checks its evaluation trajectories against (`trajectories.training_trajectories`)."""
        return training_trajectories(
            self.settings, map(self.trajectory, self.train_idx), map(self.trajectory, self.val_idx)
        )


def split_indices(n: int, val_fraction: float, groups: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """A fixed train / held-out split of n trajectories (independent of the training seed).

    `groups` (e.g. each trajectory's prompt): trajectories of one group land on the same side, so a prompt recorded
    with several seeds never is both trained on and held out; the split is drawn over groups, and with one
    trajectory per group it is the plain split.
    """
    if n < 2:
        raise ValueError(f"training needs at least 2 recorded trajectories (one held out for validation), got {n}")
    keys = list(groups) if groups is not None else list(range(n))
    if len(keys) != n:
        raise ValueError(f"split_indices: {len(keys)} groups for {n} trajectories")
    members: dict = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    if len(members) < 2:
        raise ValueError(
            f"training needs at least 2 distinct prompts (one held out for validation), got {len(members)}"
        )
    order = list(members.values())
    random.Random(1234).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    return sorted(i for m in order[n_val:] for i in m), sorted(i for m in order[:n_val] for i in m)


def check_validation_recording(train: Recording, val: Recording, notice: Callable[[str], None] = stderr_notice) -> None:
    """Raise a ValueError unless `val` can validate predictors trained on `train`: the same model, sampler settings,
    sigmas, contexts and tensor shapes, and none of `train`'s trajectories (one trained on would not be held out);
    `notice` one line when some start from the initial noise of a training trajectory of another prompt.

    Trajectories, not prompt strings, are compared (`lesa.trajectories`): a class-conditional model's prompts repeat
    with other seeds, and a reworded prompt with a training trajectory's seed is another string."""
    where = f"validation recording {val.dir} (for {train.dir})"
    for key in sorted({*train.settings, *val.settings} - {"seed"}):  # the noise seed may differ
        if train.settings.get(key) != val.settings.get(key):
            raise ValueError(
                f"{where}: settings field {key!r} is {val.settings.get(key)!r}, the training recording's is "
                f"{train.settings.get(key)!r}; record the validation prompts with the same settings"
            )
    for name in ("sigmas", "contexts", "shapes"):
        if getattr(train, name) != getattr(val, name):
            raise ValueError(f"{where}: its {name} differ from the training recording's")
    check_disjoint(
        Trajectories.of(val),
        [Trajectories.of(train)],
        where,
        "the training recording",
        "validation needs trajectories that are not trained on",
        "seed base (`lesa record --seed`)",
        notice,
    )


def minibatches(indices: Sequence[int], size: int, seed: int | None = None) -> list[list[int]]:
    """Minibatches of `indices` of `size`, shuffled by `seed` (None: in order)."""
    order = list(indices)
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [order[i : i + size] for i in range(0, len(order), size)]
