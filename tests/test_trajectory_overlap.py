"""Overlap checks compare trajectories (model, sampler settings, prompt, seed), not prompt strings; errors that used to
fall back silently (a damping of 1 from a corrupt shard, a skipped metric) propagate or name their cause."""

from __future__ import annotations

import json
import shutil
import sys
import types
from dataclasses import replace
from types import SimpleNamespace

import pytest
from conftest import PROMPTS, SIZE, STEPS

from lesa.cli import main
from lesa.recording import Recording
from lesa.training import TrainConfig, Trainer, check_validation_recording
from lesa.trajectories import recorded_key, trajectory_key

QUIET = dict(progress=False, log=lambda *_: None)
TINY_FLUX = {"model": "tiny-random-flux", "model_class": "FluxTransformer2DModel", "steps": STEPS}


def with_entries(recording: Recording, pairs: list[tuple[str, int]]) -> Recording:
    """A view of `recording` whose manifest lists these (prompt, seed) trajectories (on its own shards)."""
    view = Recording(recording.dir)
    view.entries = [{**e, "prompt": p, "seed": s} for e, (p, s) in zip(view.entries, pairs, strict=False)]
    return view


def notices(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice: ")]


# -- the key -----------------------------------------------------------------------------------------------------------
def test_trajectory_key_depends_on_what_the_trajectory_depends_on():
    base = {**TINY_FLUX, "height": SIZE, "width": SIZE, "seed": 0, "dtype": "bfloat16"}
    key = trajectory_key(base, "digit 3", 7)
    assert len(key) == 16 and key == trajectory_key(dict(reversed(base.items())), "digit 3", 7)
    # the seed base and the record dtype do not change a trajectory (its own seed and the run do)
    assert trajectory_key({**base, "seed": 5, "dtype": "float32"}, "digit 3", 7) == key
    for other in ({**base, "steps": 20}, {**base, "guidance_scale": 4.0}, {**base, "model": "x"}):
        assert trajectory_key(other, "digit 3", 7) != key
    assert trajectory_key(base, "digit 3", 8) != key and trajectory_key(base, "digit 4", 7) != key
    # the initial noise: shared by every prompt and sampler setting at one size and seed
    noise = trajectory_key(base, None, 7)
    assert trajectory_key({**base, "steps": 20}, None, 7) == noise != trajectory_key({**base, "height": 32}, None, 7)


# -- validation recordings (lesa train) --------------------------------------------------------------------------------
def test_a_class_conditional_validation_set_with_other_seeds_is_accepted(pipe, recording, tmp_path, capsys):
    """Prompts that necessarily repeat ("digit 3") validate when every seed differs: no refusal, no notice."""
    train = with_entries(recording, [(f"digit {i % 3}", i) for i in range(len(recording))])
    val = with_entries(recording, [(f"digit {i % 3}", 100 + i) for i in range(3)])
    check_validation_recording(train, val)
    config = TrainConfig(val_fraction=0.0)
    trainer = Trainer(train, pipe, tmp_path / "p", config, validation=val, **QUIET)
    assert trainer.val_idx == [8, 9, 10]
    assert notices(capsys) == []


def test_a_validation_trajectory_that_is_trained_on_is_refused(recording):
    val = with_entries(recording, [(PROMPTS[5], 5), (PROMPTS[6], 6), ("a new prompt", 50)])
    message = (
        r"validation recording .* \(for .*\): 2 trajectories are also in the training recording, e.g. "
        r"'a test prompt number 5' seed 5 \(same model, sampler settings, prompt and seed\); validation needs "
        r"trajectories that are not trained on: use other prompts or another seed base \(`lesa record --seed`\)"
    )
    with pytest.raises(ValueError, match=message):
        check_validation_recording(recording, val)


def test_a_reworded_validation_prompt_with_a_training_seed_gives_one_notice(pipe, recording, tmp_path, capsys):
    """Same model, size and seed, another prompt: the same initial noise (for a text model possibly the same
    trajectory), noticed once on stderr (by rank 0 of the trainer) with the count, not refused."""
    val = with_entries(recording, [("a reworded prompt number 0", 0), ("another one", 1), ("a third", 30)])
    Trainer(recording, pipe, tmp_path / "p", TrainConfig(val_fraction=0.0), validation=val, **QUIET)
    (line,) = notices(capsys)
    assert line.startswith(f"notice: validation recording {val.dir} (for {recording.dir}): 2 of its trajectories ")
    assert "start from the initial noise (same model, size and seed) of a trajectory of another prompt" in line
    assert "e.g. 'a reworded prompt number 0' seed 0" in line


def test_training_log_lists_the_trained_and_held_out_trajectories(trained, recording):
    _, trainer, out = trained
    field = json.loads((out / "training_log.json").read_text())["training_trajectories"]
    assert field["keys"] == [recorded_key(recording, i) for i in trainer.train_idx]
    assert field["held_out_keys"] == [recorded_key(recording, i) for i in trainer.val_idx]
    assert field["settings"]["model"] == "tiny" and "seed" not in field["settings"]


# -- corrupt data propagates -------------------------------------------------------------------------------------------
def test_a_corrupt_shard_propagates_out_of_the_damping_fit(pipe, recording, tmp_path):
    """The damping falls back to 1 only for a schedule without two full steps before a cached step, decided from the
    schedule; a corrupt training shard is an error, not a damping of 1."""
    copy = tmp_path / "rec"
    shutil.copytree(recording.dir, copy)
    rec = Recording(copy)
    trainer = Trainer(rec, pipe, tmp_path / "p", TrainConfig(val_fraction=0.25), **QUIET)
    shard = copy / rec.entries[trainer.train_idx[1]]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"\.safetensors is corrupted"):
        _ = trainer.fits.damping(trainer.phases().schedule)
    few_step = Trainer(rec, pipe, tmp_path / "q", TrainConfig(interval=STEPS, warmup=0, val_fraction=0.25), **QUIET)
    assert few_step.fits.damping(few_step.phases().schedule) == 1.0  # no shard read


def test_prompt_following_skip_names_the_prompts_it_cannot_check():
    import numpy as np

    from lesa.embedded.scenes import all_scenes, caption
    from lesa.evaluate.scoring import _checker

    good = caption(all_scenes()[0], np.random.default_rng(0))
    seen: list[str] = []
    assert _checker([good, good], seen.append) is not None and seen == []
    assert _checker([good, "a cat on a mat", good], seen.append) is None
    assert seen == [
        "prompt-following skipped: 1 of the 3 prompts are not captions of the embedded model's scene grammar, "
        "e.g. 'a cat on a mat'"
    ]


def test_an_image_reward_checkpoint_that_does_not_load_is_an_error(monkeypatch, tmp_path):
    from lesa.evaluate.metrics import ImageRewardScore

    def load(name, device="cpu", download_root=None, med_config=None):
        raise RuntimeError("truncated checkpoint")

    fake = types.ModuleType("ImageReward")
    fake.load = load
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    (tmp_path / "ImageReward.pt").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="ImageReward could not load .*RuntimeError: truncated checkpoint"):
        ImageRewardScore.from_path(tmp_path)


# -- lesa bench --------------------------------------------------------------------------------------------------------
def fit_recording(recording: Recording, tmp_path) -> Recording:
    """The fixture recording labelled as the bench's tiny-random-flux at 16x16 (it is that pipeline)."""
    copy = tmp_path / "fit"
    shutil.copytree(recording.dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["settings"]["model"] = "tiny-random-flux"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return Recording(copy)


def bench_argv(tmp_path, prompts: list[str], *extra: str) -> list[str]:
    (tmp_path / "eval.txt").write_text("".join(f"{p}\n" for p in prompts))
    argv = ["bench", "--model", "tiny-random-flux", "--prompts", str(tmp_path / "eval.txt"), "--out"]
    argv += [str(tmp_path / "bench"), "--height", str(SIZE), "--width", str(SIZE), "--repeats", "1"]
    return argv + ["--timing-prompts", "1", *extra]


def test_bench_refuses_fitting_trajectories_and_notices_shared_noise(recording, tmp_path, capsys):
    from lesa.evaluate.bench import Bench, BenchConfig

    fit = fit_recording(recording, tmp_path)
    argv = bench_argv(tmp_path, ["an unseen prompt", PROMPTS[1]], "--methods", "fora", "--fit-data", str(fit.dir))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        f"lesa bench: error: evaluation prompts {tmp_path / 'eval.txt'} (seed 0 + i): 1 trajectory is also in the "
        f"fitting recording {fit.dir}, e.g. 'a test prompt number 1' seed 1 (same model, sampler settings, prompt and "
        "seed); the evaluation must not be fitted on: use other prompts or another --seed\n"
    ) in err
    # another seed base: the fitting prompt is another trajectory (a class-conditional model's prompts repeat), and
    # every evaluation trajectory starts from the noise of a fitting one of another prompt
    config = dict(prompts=str(tmp_path / "eval.txt"), out=str(tmp_path / "b"), model="tiny-random-flux")
    bench = Bench(BenchConfig(**config, height=SIZE, width=SIZE, methods=["fora"], fit_data=str(fit.dir), seed=3))
    rec, pairs = bench.fitting()
    assert rec is not None and pairs[:2] == [(PROMPTS[0], 0), (PROMPTS[1], 1)]
    assert bench.overlap["fitting_same_noise"] == 2 and len(bench.notices) == 1
    assert notices(capsys) == [f"notice: {bench.notices[0]}"]
    assert "2 of its trajectories start from the initial noise" in bench.notices[0]
    assert "e.g. 'an unseen prompt' seed 3" in bench.notices[0]
    # --fit-prompts are refused before they are recorded (lesa record's seeds: prompt i, seed i)
    (tmp_path / "fit.txt").write_text(f"a fitting prompt\n{PROMPTS[1]}\n")
    methods = ["fora", "taylorseer-damped"]
    bench = Bench(
        BenchConfig(**config, height=SIZE, width=SIZE, methods=methods, fit_prompts=str(tmp_path / "fit.txt"))
    )
    with pytest.raises(ValueError, match=rf"also in the fitting prompts {tmp_path / 'fit.txt'}, e.g. '{PROMPTS[1]}'"):
        bench.fitting()
    assert not (tmp_path / "b" / "fit-data").exists()


def test_bench_seed_base_and_the_predictors_training_trajectories(trained, tmp_path, monkeypatch, capsys):
    """--seed s: evaluation prompt i (reference, every method, timing) uses seed s + i, stored in results.json; a
    predictor whose training_log.json lists an evaluation trajectory gets a notice and a count in results.json."""
    from lesa.evaluate.bench import Bench, BenchConfig

    _, _, predictor_dir = trained
    predictor = tmp_path / "pred"
    predictor.mkdir()
    for name in ("config.json", "model.safetensors"):
        (predictor / name).write_bytes((predictor_dir / name).read_bytes())
    prompts = ["an evaluation prompt", "another evaluation prompt"]
    # as `lesa train` writes it for a tiny-random-flux recording at 16x16 that held out prompts[1] at seed 1
    settings = {**TINY_FLUX, "height": SIZE, "width": SIZE}
    recorded = SimpleNamespace(settings=settings, entries=[{"prompt": p, "seed": i} for i, p in enumerate(prompts)])
    from lesa.trajectories import training_trajectories

    log = {"training_trajectories": training_trajectories(settings, [(recorded, 0)], [(recorded, 1)])}
    (predictor / "training_log.json").write_text(json.dumps(log))
    seeds: list[int] = []
    real_generate = Bench.generate
    monkeypatch.setattr(Bench, "generate", lambda self, p, s: seeds.append(s) or real_generate(self, p, s))
    argv = bench_argv(tmp_path, prompts, "--methods", "fora", "--predictor", str(predictor))
    assert main(argv) == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["config"]["seed"] == 0 and sorted(set(seeds)) == [0, 1]
    expected = (
        f"predictor {predictor}: 1 of the 2 evaluation trajectories are its training trajectories and 1 its held-out "
        "ones (same model, sampler settings, prompt and seed), e.g. 'an evaluation prompt' seed 0; its rows are not "
        "scored on unseen trajectories"
    )
    assert f"notice: {expected}" in capsys.readouterr().err.splitlines()
    assert expected in results["notices"]
    assert results["trajectory_overlap"]["predictors"] == {str(predictor): {"trained": 1, "held_out": 1}}

    # another seed base: other trajectories (a short run without the 50-step predictor; its check alone)
    seeds.clear()
    argv = bench_argv(tmp_path, prompts, "--methods", "fora", "--steps", "10", "--intervals", "5", "--seed", "40")
    assert main(argv) == 0
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["config"]["seed"] == 40 and sorted(set(seeds)) == [40, 41]
    config = BenchConfig(str(tmp_path / "eval.txt"), str(tmp_path / "b"), "tiny-random-flux", [str(predictor)], seed=40)
    bench = Bench(replace(config, height=SIZE, width=SIZE))
    assert bench.predictor_overlap() == {str(predictor): {"trained": 0, "held_out": 0}} and bench.notices == []
