"""benchmarks/validation_prompts.py: `lesa bench` prompts drawn from `lesa train`'s held-out split only."""

import importlib.util
from pathlib import Path

from lesa.embedded import scenes
from lesa.training import split_indices

spec = importlib.util.spec_from_file_location(
    "validation_prompts", Path(__file__).parents[1] / "benchmarks" / "validation_prompts.py"
)
validation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(validation)


def test_validation_prompts_are_fresh_captions_of_the_held_out_scenes() -> None:
    prompts = scenes.prompts("predictor")
    train_idx, held_idx = split_indices(len(prompts), 0.2, prompts)
    lines = validation.validation_prompts(prompts, per_prompt=4)
    assert len(lines) == 4 * len(held_idx)
    assert not set(lines) & set(prompts)  # never verbatim a recorded prompt (from its seed: the same trajectory)
    held_scenes = [scenes.parse_caption(prompts[i]) for i in held_idx]
    # scene-major: each held-out scene in the split's order, per_prompt times, and no training scene
    assert [scenes.parse_caption(line) for line in lines] == [s for s in held_scenes for _ in range(4)]
    assert not {scenes.parse_caption(prompts[i]) for i in train_idx} & set(held_scenes)
    assert len(set(lines)) > len(held_idx)  # the captions vary within a scene
    assert validation.validation_prompts(prompts, per_prompt=4) == lines  # seeded
