"""What identifies a sampled trajectory, and the overlap checks that keep evaluation and validation unseen.

A trajectory is fixed by the model, the sampler settings it depends on, the prompt and the seed of its initial noise
(`lesa record` stores each prompt's own seed in its manifest entry: the run's seed base plus the prompt's index).
The checks compare these, never prompt strings alone: a class-conditional model's prompts repeat ("digit 3") while
every seed differs, and a reworded prompt is another string yet, from the same noise, can be the same image.

Imports nothing of lesa, so that record, train and bench can all use it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The settings of a `lesa record` manifest that a trajectory depends on: all but the seed base (every trajectory
# carries its own seed) and the record dtype (the precision its features are stored in, not that of the run).
TRAJECTORY_SETTINGS = (
    "model",
    "model_class",
    "steps",
    "height",
    "width",
    "guidance_scale",
    "negative_prompt",
    "true_cfg_scale",
    "num_frames",
)
# The initial noise depends on the latent's shape and the seed only (not on the prompt, steps or guidance).
NOISE_SETTINGS = ("model", "model_class", "height", "width", "num_frames")

Pair = tuple[str, int]  # (prompt, seed)


def trajectory_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a trajectory depends on (unset ones None), from a manifest's or a bench's settings."""
    return {k: settings.get(k) for k in TRAJECTORY_SETTINGS}


def trajectory_key(settings: Mapping[str, Any], prompt: str | None, seed: int) -> str:
    """A short sha256 of the canonical JSON of a trajectory's settings, prompt and seed. With prompt None: the key of
    its initial noise (model, size and seed), which it shares with every prompt and sampler setting at that seed."""
    names = NOISE_SETTINGS if prompt is None else TRAJECTORY_SETTINGS
    payload = {"settings": {k: settings.get(k) for k in names}, "prompt": prompt, "seed": int(seed)}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def recorded_key(recording: Any, index: int) -> str:
    """The key of trajectory `index` of a recording (anything with a manifest's `settings` and `entries`)."""
    entry = recording.entries[index]
    return trajectory_key(recording.settings, entry["prompt"], entry["seed"])


@dataclass(frozen=True)
class Trajectories:
    """Trajectories of one set of settings, as (prompt, seed) pairs."""

    settings: Mapping[str, Any]
    pairs: Sequence[Pair]

    @classmethod
    def of(cls, recording: Any) -> Trajectories:
        """Every trajectory of a recording (anything with a manifest's `settings` and `entries`)."""
        return cls(recording.settings, [(e["prompt"], e["seed"]) for e in recording.entries])

    def keys(self) -> list[str]:
        return [trajectory_key(self.settings, prompt, seed) for prompt, seed in self.pairs]

    def noise_keys(self) -> list[str]:
        return [trajectory_key(self.settings, None, seed) for _, seed in self.pairs]


def training_trajectories(
    settings: Mapping[str, Any], trained: Iterable[tuple[Any, int]], held_out: Iterable[tuple[Any, int]]
) -> dict[str, Any]:
    """The `training_trajectories` of a predictor's training_log.json: the keys of the trajectories it was trained on
    and of the held-out ones it was selected on (checkpoint, start, placement), each given as (recording, index)."""
    return {
        "settings": trajectory_settings(settings),
        "keys": [recorded_key(rec, i) for rec, i in trained],
        "held_out_keys": [recorded_key(rec, i) for rec, i in held_out],
    }


def overlap(candidates: Trajectories, keys: Iterable[str], noise: Iterable[str] = ()) -> tuple[list[Pair], list[Pair]]:
    """The candidates among the trajectories of `keys`, and the others that start from the initial noise of `noise`
    (noise keys)."""
    keys, noise = set(keys), set(noise)
    same: list[Pair] = []
    shared: list[Pair] = []
    for pair, key, noise_key in zip(candidates.pairs, candidates.keys(), candidates.noise_keys(), strict=True):
        if key in keys:
            same.append(pair)
        elif noise_key in noise:
            shared.append(pair)
    return same, shared


def describe(pair: Pair) -> str:
    return f"{pair[0]!r} seed {pair[1]}"


def _count(n: int) -> str:
    return f"{n} trajectory is" if n == 1 else f"{n} trajectories are"


def stderr_notice(text: str) -> None:
    print(f"notice: {text}", file=sys.stderr)


def check_disjoint(
    candidates: Trajectories,
    reference: Sequence[Trajectories],
    where: str,
    source: str,
    rule: str,
    seed_option: str,
    notice: Callable[[str], None] = stderr_notice,
) -> int:
    """Raise a ValueError when a trajectory of `candidates` (named by `where`) is one of `reference` (named by
    `source`); `notice` one line when some only start from the initial noise of a reference trajectory of another
    prompt or sampler setting (for a text model a reworded prompt can be the same trajectory). Returns their count."""
    same, shared = overlap(
        candidates, [k for r in reference for k in r.keys()], [k for r in reference for k in r.noise_keys()]
    )
    if same:
        raise ValueError(
            f"{where}: {_count(len(same))} also in {source}, e.g. {describe(same[0])} (same model, sampler settings, "
            f"prompt and seed); {rule}: use other prompts or another {seed_option}"
        )
    if shared:
        notice(
            f"{where}: {len(shared)} of its trajectories start from the initial noise (same model, size and seed) of a "
            f"trajectory of another prompt or sampler setting in {source}, e.g. {describe(shared[0])}; for a text "
            f"model a reworded prompt can be the same trajectory: another {seed_option} rules that out"
        )
    return len(shared)
