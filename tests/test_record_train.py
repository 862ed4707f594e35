import dataclasses
import json
import shutil

import pytest
import torch
from conftest import PROMPTS, SIZE, STEPS, kill_at_score

import lesa
import lesa.record as record_module
from lesa.checkpoint import load_checkpoint, save_checkpoint
from lesa.record import read_prompts, record
from lesa.recording import Recording
from lesa.training import TrainConfig, Trainer, one_step_errors

QUIET = dict(progress=False, log=lambda *_: None)
# the `calibrated` recipe's settings at test size (closed loop only, final-latent loss, started at damped TaylorSeer O1)
QUICK_CALIBRATED = dict(
    memory="full",
    gain_init="damped",
    windows=(3, 3, 3),
    history=3,
    phases=("clar",),
    loss="final",
    select="psnr",
    batch_size=3,
    kan_hidden=(8,),
    val_fraction=0.25,
)


def rec_kwargs(**kw):
    out = dict(model="tiny", steps=10, height=SIZE, width=SIZE, dtype="bfloat16", **QUIET)
    out.update(kw)
    return out


def test_recording_holds_every_step(recording):
    assert len(recording) == len(PROMPTS)
    data = recording.load(0)
    assert data["cond.feature"].shape == (STEPS, 64, 32)
    assert data["cond.output"].shape == (STEPS, 64, 4)
    assert data["noise"].shape == data["final"].shape == (64, 4)
    assert len(recording.sigmas) == STEPS + 1
    # every step's latent input: the noise first, then each Euler step of the recorded velocity, then the final latent
    latents, sigmas = data["latents"], torch.tensor(recording.sigmas)
    assert latents.shape == (STEPS, 64, 4) and torch.equal(latents[0], data["noise"])
    after = latents + (sigmas[1:] - sigmas[:-1])[:, None, None] * data["cond.output"]
    assert torch.allclose(after[:-1], latents[1:], atol=1e-5) and torch.allclose(after[-1], data["final"], atol=1e-5)
    assert recording.entries[3]["seed"] == 3


def test_record_resumes_after_a_crash_without_losing_or_duplicating(pipe, tmp_path, monkeypatch):
    real = record_module._run_one
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:  # prompts 0 and 1 succeed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(record_module, "_run_one", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        record(pipe, PROMPTS[:4], tmp_path, **rec_kwargs())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["index"] for e in manifest["entries"]] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["000000.safetensors", "000001.safetensors"]
    before = (tmp_path / "shards" / "000000.safetensors").read_bytes()
    monkeypatch.setattr(record_module, "_run_one", real)
    result = record(pipe, PROMPTS[:4], tmp_path, **rec_kwargs())
    assert (result.recorded, result.skipped) == (2, 2)
    rec = Recording(tmp_path)
    assert [e["index"] for e in rec.entries] == [0, 1, 2, 3]
    assert (tmp_path / "shards" / "000000.safetensors").read_bytes() == before
    assert rec.load(3)["cond.feature"].dtype == torch.bfloat16


def test_a_failed_shard_write_leaves_nothing_that_looks_complete(pipe, tmp_path, monkeypatch):
    real_write = record_module.ShardWriter.write
    calls = []

    def broken_write(self, name, tensor, row=None):
        calls.append(name)
        if len(calls) == 7:  # a few steps are in, then the disk fills up
            self.file.write(b"partial")
            raise OSError("disk full")
        return real_write(self, name, tensor, row)

    monkeypatch.setattr(record_module.ShardWriter, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        record(pipe, PROMPTS[:2], tmp_path, **rec_kwargs())
    assert list((tmp_path / "shards").iterdir()) == []  # not even the temporary file is left
    assert json.loads((tmp_path / "manifest.json").read_text())["entries"] == []


def test_record_refuses_other_settings_and_nan(pipe, tmp_path, monkeypatch):
    record(pipe, PROMPTS[:2], tmp_path, **rec_kwargs())
    with pytest.raises(ValueError, match="recorded with steps=10, this run asks for 12"):
        record(pipe, PROMPTS[:2], tmp_path, **rec_kwargs(steps=12))
    with pytest.raises(ValueError, match="different prompt list"):
        record(pipe, PROMPTS[:3], tmp_path, **rec_kwargs())
    real = record_module._StreamingRecorder.__call__

    def nan_at_step_7(self, event):
        if event.step == 7:
            event.tap = torch.full_like(event.tap, float("nan"))
        return real(self, event)

    monkeypatch.setattr(record_module._StreamingRecorder, "__call__", nan_at_step_7)
    with pytest.raises(
        ValueError, match=r"prompt 0 .* step 7: tensor 'cond.feature' holds NaN or inf; nothing was written"
    ):
        record(pipe, PROMPTS[:2], tmp_path / "nan", **rec_kwargs())
    assert list((tmp_path / "nan" / "shards").iterdir()) == []
    assert json.loads((tmp_path / "nan" / "manifest.json").read_text())["entries"] == []


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file .*missing.txt does not exist"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "ok.txt").write_text("a cat\n\n a dog \n")
    assert read_prompts(tmp_path / "ok.txt") == ["a cat", "a dog"]


def test_corrupted_recordings_are_named(recording, tmp_path):
    copy = tmp_path / "rec"
    shutil.copytree(recording.dir, copy)
    shard = copy / "shards" / "000001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"000001.safetensors is corrupted: \d+ bytes, manifest says"):
        Recording(copy).load(1)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="000001.safetensors listed in .* is missing"):
        Recording(copy).load(1)
    shard.write_bytes(data)
    header_len = int.from_bytes(data[:8], "little")
    start = json.loads(data[8 : 8 + header_len])["cond.output"]["data_offsets"][0] + 8 + header_len
    inf = torch.tensor([float("inf")], dtype=torch.float32).view(torch.uint8).numpy().tobytes()
    shard.write_bytes(data[:start] + inf + data[start + 4 :])  # same size as before: only a value is bad
    with pytest.raises(ValueError, match="'cond.output' holds NaN or inf"):
        Recording(copy).load(1)
    (copy / "manifest.json").write_text('{"format_version": 1, "settings"')
    with pytest.raises(ValueError, match="manifest.json is corrupted"):
        Recording(copy)
    (copy / "manifest.json").write_text('{"format_version": 1, "settings": {}, "prompts": []}')
    with pytest.raises(ValueError, match="field 'entries' is missing"):
        Recording(copy)
    with pytest.raises(FileNotFoundError, match="is .* a `lesa record` output directory"):
        Recording(tmp_path / "nothing")


def test_trained_predictor_beats_fora_and_taylorseer_one_step_on_held_out(trained, recording):
    predictor, trainer, _ = trained
    errors = one_step_errors(predictor, recording, trainer.val_idx)
    print(
        f"held-out one-step L1 error on the tap: LESA {errors['lesa']:.5f}, FORA {errors['fora']:.5f}, "
        f"TaylorSeer O1 {errors['taylorseer_o1']:.5f}"
    )
    assert errors["lesa"] < errors["taylorseer_o1"] < errors["fora"]


def test_training_writes_the_artefact_and_keeps_the_best_epoch(trained):
    predictor, trainer, out = trained
    assert {"config.json", "model.safetensors", "README.md", "training_log.json"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "| FORA |" in card and "| TaylorSeer O1 |" in card
    assert "6 training trajectories" in card and "2 held-out trajectories" in card
    log = json.loads((out / "training_log.json").read_text())
    seed_log = log["seeds"]["0"]
    scores = [e["val"]["mse"] for e in seed_log["log"]]
    assert [e["phase"] for e in seed_log["log"]] == ["init"] + ["gt"] * 4 + ["clar"] * 2
    assert seed_log["best"]["mse"] == min(scores)
    assert log["validation"]["LESA (this predictor)"]["mse"] == pytest.approx(min(scores), rel=1e-4)


def test_training_resumes_exactly_where_it_stopped(pipe, recording, tmp_path, monkeypatch):
    config = TrainConfig(
        phases=("gt", "clar"), epochs_gt=2, epochs_clar=1, batch_size=3, kan_hidden=(8, 8), val_fraction=0.25
    )
    whole = Trainer(recording, pipe, tmp_path / "whole", config, progress=False, log=lambda *_: None).run()
    kill_at_score(monkeypatch, 4)  # init, gt 1, gt 2 scored; dies scoring clar 1
    with pytest.raises(KeyboardInterrupt):
        Trainer(recording, pipe, tmp_path / "cut", config, progress=False, log=lambda *_: None).run()
    monkeypatch.undo()
    messages = []
    resumed = Trainer(recording, pipe, tmp_path / "cut", config, progress=False, log=messages.append).run()
    assert any("resuming" in m and "gt epoch 2" in m for m in messages)
    # the same epochs ran once each, and the weights agree up to float noise (two uninterrupted runs already differ
    # by ~1e-8 through threaded reductions, which Adam's normalised steps amplify a little)
    log = json.loads((tmp_path / "cut" / "training_log.json").read_text())["seeds"]["0"]["log"]
    assert [(e["phase"], e["epoch"]) for e in log] == [("init", 0), ("gt", 1), ("gt", 2), ("clar", 1)]
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-3), (k, (a - b).abs().max())
    other = TrainConfig(**{**config.__dict__, "lr_clar": 1e-2})
    with pytest.raises(ValueError, match="made with other settings \\(lr_clar\\)"):
        Trainer(recording, pipe, tmp_path / "cut", other, progress=False, log=lambda *_: None).train_seed(0)
    # a checkpoint written before a setting existed resumes when the setting keeps its default
    ckpt_path = next((tmp_path / "cut" / "checkpoints").iterdir())
    ckpt = load_checkpoint(ckpt_path)
    del ckpt["fingerprint"]["history_grad"]
    save_checkpoint(ckpt_path, ckpt)
    assert Trainer(recording, pipe, tmp_path / "cut", config, progress=False, log=lambda *_: None).train_seed(0)["done"]
    exact = TrainConfig(**{**config.__dict__, "history_grad": True})
    with pytest.raises(ValueError, match="made with other settings \\(history_grad\\)"):
        Trainer(recording, pipe, tmp_path / "cut", exact, progress=False, log=lambda *_: None).train_seed(0)


def test_training_needs_a_held_out_trajectory(pipe, recording, tmp_path):
    from lesa.training import split_indices

    with pytest.raises(ValueError, match="at least 2 recorded trajectories"):
        split_indices(1, 0.2)
    train, val = split_indices(10, 0.2)
    assert len(val) == 2 and not set(train) & set(val)
    # one trajectory per prompt: grouping by prompt is the plain split
    assert split_indices(10, 0.2, [f"p{i}" for i in range(10)]) == (train, val)
    # a prompt recorded with several seeds lies wholly on one side
    prompts = [f"p{i % 5}" for i in range(15)]
    train, val = split_indices(15, 0.2, prompts)
    assert len(val) == 3 and len(train) == 12
    assert not {prompts[i] for i in train} & {prompts[i] for i in val}
    with pytest.raises(ValueError, match="at least 2 distinct prompts"):
        split_indices(3, 0.2, ["same"] * 3)


def damped_config(trainer: Trainer) -> lesa.TaylorSeerConfig:
    """Damped TaylorSeer O1 on a trainer's uniform schedule, its damping fitted on the training trajectories."""
    schedule = trainer.phases().schedule
    return lesa.TaylorSeerConfig(interval=7, warmup=3, order=1, damping=trainer.fits.damping(schedule))


def test_full_step_memory_starts_exactly_at_damped_taylorseer(pipe, recording, tmp_path):
    """memory "full" + gain_init "damped": before training, the predictor is TaylorSeer O1 with the damping fitted on
    the training trajectories; its history holds full-step features only."""
    from conftest import generate

    import lesa
    from lesa.calibrate import fit_damping
    from lesa.schedule import StepSchedule

    config = TrainConfig(memory="full", gain_init="damped", windows=(3, 3, 3), history=3, val_fraction=0.25)
    trainer = Trainer(recording, pipe, tmp_path / "p", config, **QUIET)
    predictor = trainer.phases().new_predictor(0)
    g = fit_damping(recording, StepSchedule(7, 3), trainer.train_idx)
    damping = trainer.fits.damping(trainer.phases().schedule)
    assert damping == pytest.approx(g) and predictor.config.gain_bias == pytest.approx(g)
    assert predictor.past_steps(20) == [3, 10, 17]  # the last three full steps (0, 1, 2, 3, 10, 17, ...)
    assert predictor.reach(20) == pytest.approx(3 / 7) and predictor.reach(5) == pytest.approx(2 / 1)
    try:
        lesa.enable(pipe, lesa.LESAConfig(predictor=predictor))
        ours = generate(pipe)
        lesa.enable(pipe, lesa.TaylorSeerConfig(interval=7, warmup=3, order=1, damping=g))
        damped = generate(pipe)
        lesa.enable(pipe, lesa.TaylorSeerConfig(interval=7, warmup=3, order=1))
        plain = generate(pipe)
    finally:
        lesa.disable(pipe)
    assert (ours - damped).abs().max() < 1e-4 < (ours - plain).abs().max()
    # gain_init "reuse": exactly FORA until trained
    reuse = Trainer(recording, pipe, tmp_path / "r", dataclasses.replace(config, gain_init="reuse"), **QUIET)
    predictor = reuse.phases().new_predictor(0)
    assert predictor.config.gain_bias == 0.0
    try:
        lesa.enable(pipe, lesa.LESAConfig(predictor=predictor))
        ours = generate(pipe)
        lesa.enable(pipe, lesa.FORAConfig(interval=7, warmup=3))
        fora = generate(pipe)
    finally:
        lesa.disable(pipe)
    assert (ours - fora).abs().max() < 1e-4 < (ours - damped).abs().max()
    # "best" (no step filters): whichever of reuse and damped TaylorSeer scores higher on the held-out split
    best = Trainer(recording, pipe, tmp_path / "b", dataclasses.replace(config, gain_init="best"), **QUIET)
    scores = {
        "reuse": best.scorer.score(lesa.FORAConfig(interval=7, warmup=3))["psnr"],
        "damped": best.scorer.score(damped_config(best))["psnr"],
    }
    assert best.phases().start.kind == max(scores, key=scores.get)
    with pytest.raises(ValueError, match="need memory 'full'"):
        TrainConfig(gain_init="damped")
    with pytest.raises(ValueError, match="loss must be one of step, cycle"):
        TrainConfig(loss="trajectory")


def test_cycle_loss_updates_once_per_cache_cycle_and_selects_by_psnr(pipe, recording, tmp_path):
    config = TrainConfig(**{**QUICK_CALIBRATED, "loss": "cycle"}, epochs_clar=2, target="output")
    trainer = Trainer(recording, pipe, tmp_path / "p", config, **QUIET)
    # 50 steps, N = 7, E = 3: cycles after full steps 3, 10, 17, 24, 31, 38, 45 -> 7 cycles, one context
    assert trainer.phases().updates_per_rollout("clar") == 7 and trainer.phases().updates_per_rollout("gt") == 40
    start = {k: v.clone() for k, v in trainer.phases().new_predictor(0).state_dict().items()}
    trained = trainer.run()
    assert any(not torch.equal(v, trained.state_dict()[k]) for k, v in start.items())
    log = json.loads((tmp_path / "p" / "training_log.json").read_text())
    seed_log = log["seeds"]["0"]
    assert seed_log["best"]["psnr"] == max(e["val"]["psnr"] for e in seed_log["log"])
    damped = next(k for k in log["validation"] if k.startswith("TaylorSeer O1 damped"))
    # the kept predictor is no worse than where it started: damped TaylorSeer on the same held-out trajectories
    assert log["validation"]["LESA (this predictor)"]["psnr"] >= log["validation"][damped]["psnr"] - 1e-3


def test_schedule_search_is_stored_in_the_artefact_and_run(pipe, recording, tmp_path, monkeypatch):
    """schedule "search": a predictor is trained on every candidate placement (uniform, planned, searched), the
    placement whose predictor scores best on the held-out split goes into schedule.json and the predictor's config
    (trained here with the recipe's early-cycle loss, which the model card names), and a pipeline accelerated with the
    predictor runs exactly those steps; a resumed run does not search."""
    from conftest import generate

    import lesa.training.placement as train_module
    from lesa.evaluate.methods import bench_schedules, fixed_methods, lesa_methods
    from lesa.runtime import get_runtime

    # interval 20: full steps 0..3, 23, 43, two to place, a quick search
    config = TrainConfig(**QUICK_CALIBRATED, interval=20, epochs_clar=1, schedule="search", loss_cycles=1)
    out = tmp_path / "p"
    monkeypatch.setattr(train_module, "SEARCH_TRAJECTORIES", 3)  # one minibatch per candidate
    predictor = Trainer(recording, pipe, out, config, **QUIET).run()
    saved = json.loads((out / "schedule.json").read_text())
    held_out = saved["held_out_psnr"]
    assert saved["uniform"] == [0, 1, 2, 3, 23, 43] and set(held_out) == {"uniform", "dynamic programming", "searched"}
    trained = saved["trained_held_out_psnr"]
    assert len(trained) >= 2 and set(trained) <= set(held_out)  # placements that differ, each trained on
    assert trained[saved["kept"]] == max(trained.values())
    assert saved["full_steps"] == saved[saved["kept"]] != saved["uniform"]  # on this recording
    log = json.loads((out / "training_log.json").read_text())
    assert log["validation"]["LESA (this predictor)"]["psnr"] == pytest.approx(trained[saved["kept"]])
    card = (out / "README.md").read_text()
    assert "predictors trained on each candidate: uniform" in card
    assert "plus that of the latent closing each of the first 1 cache cycles" in card
    assert predictor.full_steps == saved["full_steps"]
    assert predictor.config.explicit_full_steps == saved["full_steps"][4:]
    # the pipeline runs exactly those steps, with the predictor and with a baseline on the bench's budget of it
    assert bench_schedules([(20, 3, tuple(saved["full_steps"][4:])), (7, 3, ())]) == [
        (20, 3, tuple(saved["full_steps"][4:])),
        (20, 3, ()),  # the baselines also run on the uniform placement of the same budget
        (7, 3, ()),
    ]
    (learned,) = lesa_methods([str(out)], 50).values()
    budget = learned[0].budget
    assert learned[0].row == "LESA N=20 searched" and budget.label == "6/50 searched"
    (fora,) = fixed_methods("fora", budget, None, None)
    for method in (learned[0], fora):
        full = []
        method.enable(pipe)
        observers = get_runtime(pipe.transformer).observers
        observers.append(lambda event, full=full: full.append(event.step) if event.full else None)
        try:
            generate(pipe)
        finally:
            method.disable(pipe)
        assert full == saved["full_steps"], method.row
    assert any(k.endswith("uniform schedule") for k in log["validation"])

    def no_search(*_args, **_kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(train_module, "refine_schedule", no_search)
    assert Trainer(recording, pipe, out, config, **QUIET).run().full_steps == saved["full_steps"]


@pytest.fixture(scope="module")
def validation(pipe, tmp_path_factory) -> Recording:
    """A recording of three other prompts with the settings of the `recording` fixture."""
    out = tmp_path_factory.mktemp("validation")
    prompts = [f"a validation prompt number {i}" for i in range(3)]
    record(pipe, prompts, out, model="tiny", steps=STEPS, height=SIZE, width=SIZE, dtype="float32", **QUIET)
    return Recording(out)


def test_a_validation_recording_replaces_the_held_out_split(pipe, recording, validation, tmp_path):
    """With a validation recording every trajectory of the training recording is trained on (val_fraction 0) or all
    but its split; the held-out trajectories, scored exactly as a trainer on that recording alone scores them, are the
    validation recording's, and the artefact names it. A validation recording of other settings or of a prompt that
    is trained on is refused, naming the field or the prompt."""
    from lesa.config import FORAConfig
    from lesa.training import check_validation_recording, split_indices

    config = TrainConfig(**{**QUICK_CALIBRATED, "val_fraction": 0.0}, epochs_clar=1)
    with pytest.raises(ValueError, match="val_fraction 0 holds nothing out"):
        Trainer(recording, pipe, tmp_path / "none", config, **QUIET)
    trainer = Trainer(recording, pipe, tmp_path / "p", config, validation=validation, **QUIET)
    n = len(recording)
    assert trainer.train_idx == list(range(n)) and trainer.val_idx == [n, n + 1, n + 2]
    assert trainer.data.prompt(n + 1) == validation.entries[1]["prompt"]
    assert torch.equal(trainer.data.load(n + 2)["final"], validation.load(2)["final"])
    fora = FORAConfig(interval=7, warmup=3, count_flops=False)
    alone = Trainer(validation, pipe, tmp_path / "unused", TrainConfig(**QUICK_CALIBRATED), **QUIET)
    assert trainer.scorer.score(fora) == alone.scorer.score(fora, [0, 1, 2])
    trainer.run()
    log = json.loads((tmp_path / "p" / "training_log.json").read_text())
    assert log["train_trajectories"] == n and log["val_trajectories"] == 3
    assert log["validation_recording"] == str(validation.dir)
    assert f"3 held-out trajectories from `{validation.dir}`" in (tmp_path / "p" / "README.md").read_text()
    # a val_fraction leaves the recording's own split out of training
    split = Trainer(recording, pipe, tmp_path / "q", TrainConfig(**QUICK_CALIBRATED), validation=validation, **QUIET)
    assert split.train_idx == split_indices(n, 0.25, PROMPTS)[0] and split.val_idx == [n, n + 1, n + 2]

    other = Recording(validation.dir)
    other.settings = {**other.settings, "steps": 20}
    with pytest.raises(ValueError, match=r"settings field 'steps' is 20, the training recording's is 50"):
        check_validation_recording(recording, other)
    other = Recording(validation.dir)
    other.entries = [{**e, "prompt": PROMPTS[3], "seed": 3} for e in other.entries]  # a trajectory trained on
    with pytest.raises(ValueError, match="also in the training recording, e.g. 'a test prompt number 3'"):
        Trainer(recording, pipe, tmp_path / "r", config, validation=other, **QUIET)


def test_correction_auto_trains_both_and_keeps_the_better(pipe, recording, validation, tmp_path, monkeypatch):
    """Correction "auto" trains each placement with and without the learned correction, keeps the best of the four
    on validation, and stores the choice with the placement: another seed trains only that variant."""
    import lesa.training.placement as train_module

    monkeypatch.setattr(train_module, "SEARCH_TRAJECTORIES", 3)
    config = TrainConfig(**QUICK_CALIBRATED, interval=20, epochs_clar=1, schedule="plan", correction="auto")
    out = tmp_path / "p"
    predictor = Trainer(recording, pipe, out, config, validation=validation, **QUIET).run()
    saved = json.loads((out / "schedule.json").read_text())
    trained = saved["trained_held_out_psnr"]
    placements = [name for name in saved["held_out_psnr"] if name == "uniform" or saved[name] != saved["uniform"]]
    assert set(trained) == {f"{p}, {c} correction" for p in placements for c in ("with", "no")}
    assert {p.name for p in (out / "checkpoints").iterdir()} == {
        f"{name.replace(',', '').replace(' ', '-')}-seed0.safetensors" for name in trained
    }
    best = max(trained, key=trained.get)
    assert saved["kept"] == best.split(",")[0] and saved["correction"] == ("with" in best)
    assert predictor.config.correction == saved["correction"] and predictor.full_steps == saved["full_steps"]
    log = json.loads((out / "training_log.json").read_text())
    assert log["validation"]["LESA (this predictor)"]["psnr"] == pytest.approx(trained[best])
    assert log["config"]["correction"] == saved["correction"]
    assert "predictors trained on each candidate: uniform, with correction" in (out / "README.md").read_text()

    seed1 = Trainer(recording, pipe, out, dataclasses.replace(config, seed=1), validation=validation, **QUIET)
    assert seed1.variants() == [(best, saved["kept"], saved["full_steps"], saved["correction"])]


def test_linear_start_is_exactly_the_least_squares_forecaster(pipe, recording, tmp_path):
    """gain_init "linear": per-step filters on top of the damped start make the untrained predictor the
    least-squares linear forecaster of the last three full-step features; saved and loaded, it stays that."""
    from conftest import generate

    import lesa
    from lesa.calibrate import fit_linear
    from lesa.config import LinearForecastConfig
    from lesa.predictor import LESAPredictor
    from lesa.schedule import StepSchedule

    with pytest.raises(ValueError, match="needs step_filters"):
        TrainConfig(memory="full", gain_init="linear")
    config = TrainConfig(
        memory="full", gain_init="linear", step_filters=True, windows=(2, 3, 3), history=3, val_fraction=0.25
    )
    trainer = Trainer(recording, pipe, tmp_path / "p", config, **QUIET)
    predictor = trainer.phases().new_predictor(0)
    assert predictor.config.step_filters and set(predictor.step_filters) == {"cond"}
    predictor.save_pretrained(tmp_path / "saved")
    loaded = LESAPredictor.from_pretrained(tmp_path / "saved")
    weights = fit_linear(recording, StepSchedule(7, 3), history=3, indices=trainer.train_idx)
    outputs = []
    try:
        for cache in (
            lesa.LESAConfig(predictor=predictor),
            lesa.LESAConfig(predictor=loaded),
            LinearForecastConfig(interval=7, warmup=3, weights=weights),
            lesa.TaylorSeerConfig(
                interval=7, warmup=3, order=1, damping=trainer.fits.damping(trainer.phases().schedule)
            ),
        ):
            lesa.enable(pipe, cache)
            outputs.append(generate(pipe))
    finally:
        lesa.disable(pipe)
    ours, reloaded, linear, damped = outputs
    assert (ours - linear).abs().max() < 1e-4 < (ours - damped).abs().max()
    assert torch.equal(ours, reloaded)
    # "best" starts from whichever of reuse, damped TaylorSeer and the linear forecaster scores highest on the
    # held-out split
    best = Trainer(recording, pipe, tmp_path / "b", dataclasses.replace(config, gain_init="best"), **QUIET)
    scores = {
        "reuse": best.scorer.score(lesa.FORAConfig(interval=7, warmup=3))["psnr"],
        "damped": best.scorer.score(damped_config(best))["psnr"],
        "linear": best.scorer.score(LinearForecastConfig(interval=7, warmup=3, weights=weights))["psnr"],
    }
    assert best.phases().start.kind == max(scores, key=scores.get)
    # the differentiable training path gives the same forecast as the folded inference table
    history = [torch.randn(5) for _ in range(3)]
    table = predictor.coefficient_table("cond", trainer.data.sigmas())
    c, c0 = table[12]
    folded = LESAPredictor.apply_coefficients([h.clone() for h in history], c, c0)
    assert torch.allclose(predictor.forecast(history, "cond", 12, trainer.data.sigmas()), folded, atol=1e-5)


def test_final_loss_back_propagates_through_the_sampler(pipe, recording, tmp_path):
    """loss "final": one update per rollout, on the log MSE of the final latent, with gradients through the sampler:
    for the cached steps after the last full step the gradient is exact (a central difference agrees); earlier
    cached steps get gradients too, through the latents (their features in the history stay detached)."""
    config = TrainConfig(**QUICK_CALIBRATED, step_filters=True, epochs_clar=1)
    trainer = Trainer(recording, pipe, tmp_path / "p", config, **QUIET)
    assert trainer.phases().updates_per_rollout("clar") == 1
    predictor = trainer.phases().new_predictor(0)
    (table,) = predictor.step_filters.values()  # one context: a (steps x K) filter table, one row per step
    last_full = max(trainer.variant().full_steps)
    batch = trainer.train_idx[:2]
    data = [recording.load(i) for i in batch]
    lesa.enable(pipe, lesa.LESAConfig(predictor=predictor, differentiable=True, count_flops=False))
    try:
        (grad,) = torch.autograd.grad(trainer.phases().final_loss(batch, data), [table])
        assert grad[trainer.phases().cached_steps[0]].abs().sum() > 0  # the first cache cycle reaches the final latent
        direction = torch.zeros_like(grad)
        direction[last_full + 1 :] = grad[last_full + 1 :]
        norm = float(direction.norm())
        assert norm > 0

        def loss_at(t: float) -> float:
            with torch.no_grad():
                table.add_(t * direction / norm)
                value = float(trainer.phases().final_loss(batch, data))
                table.sub_(t * direction / norm)
            return value

        h = 1e-3
        assert (loss_at(h) - loss_at(-h)) / (2 * h) == pytest.approx(norm, rel=0.02)
    finally:
        lesa.disable(pipe)
    # trained: the kept predictor is no worse than its start on the held-out trajectories
    trainer.run()
    log = json.loads((tmp_path / "p" / "training_log.json").read_text())
    assert log["seeds"]["0"]["best"]["psnr"] >= log["seeds"]["0"]["log"][0]["val"]["psnr"]
    assert "train_loss" in log["seeds"]["0"]["log"][1]


def test_anchor_pulls_every_update_back_toward_the_start(pipe, recording, tmp_path):
    """--anchor: after each update every weight moves lr * anchor of its way back to its start (decoupled, like
    AdamW's decay but toward the start); lr * anchor >= 1 keeps the start exactly, a smaller one shrinks the way."""

    def moved(anchor: float) -> float:
        config = TrainConfig(**QUICK_CALIBRATED, anchor=anchor)
        trainer = Trainer(recording, pipe, tmp_path / f"a{anchor}", config, **QUIET)
        predictor = trainer.phases().new_predictor(0)
        start = [p.detach().clone() for p in predictor.parameters()]
        optimizer = torch.optim.AdamW(predictor.parameters(), lr=1e-2, weight_decay=0.0)
        state = {"t": 0, "anchor": start}
        for _ in range(5):
            loss = sum((p - 1).pow(2).sum() for p in predictor.parameters())
            trainer.phases().update(predictor, optimizer, state, loss, 1, 1e-2, 5)
        return sum(float((p.detach() - s).abs().sum()) for p, s in zip(predictor.parameters(), start, strict=True))

    free, held, kept = moved(0.0), moved(20.0), moved(1e6)
    assert kept == 0.0 < held < 0.8 * free
    with pytest.raises(ValueError, match="anchor must be >= 0"):
        TrainConfig(anchor=-1.0)


def filter_gradient(pipe, recording, out, check: bool = False, **settings) -> tuple[torch.Tensor, Trainer]:
    """The gradient of `final_loss` over a new predictor's per-step filter table, on two training trajectories, with
    the calibrated settings plus `settings`; `check`: assert it against a central difference along itself."""
    config = TrainConfig(**QUICK_CALIBRATED, step_filters=True, epochs_clar=1, **settings)
    trainer = Trainer(recording, pipe, out, config, **QUIET)
    predictor = trainer.phases().new_predictor(0)
    (table,) = predictor.step_filters.values()
    batch = trainer.train_idx[:2]
    data = [recording.load(i) for i in batch]
    lesa.enable(pipe, lesa.LESAConfig(predictor=predictor, differentiable=True, history_grad=config.history_grad))
    try:
        (grad,) = torch.autograd.grad(trainer.phases().final_loss(batch, data), [table])
        if check:
            norm, h, values = float(grad.norm()), 1e-3, []
            with torch.no_grad():
                for t in (h, -h):
                    table.add_(t * grad / norm)
                    values.append(float(trainer.phases().final_loss(batch, data)))
                    table.sub_(t * grad / norm)
            assert (values[0] - values[1]) / (2 * h) == pytest.approx(norm, rel=0.02)
    finally:
        lesa.disable(pipe)
    return grad, trainer


def test_history_grad_makes_the_whole_gradient_exact(pipe, recording, tmp_path):
    """--history-grad: the features in the predictor's history keep their gradients, so a forecast also reaches the
    loss through every later forecast: the gradient over every step's filter agrees with a central difference, and
    differs from the detached one on the early cycles."""

    exact, trainer = filter_gradient(pipe, recording, tmp_path / "exact", check=True, history_grad=True)
    detached, _ = filter_gradient(pipe, recording, tmp_path / "detached", history_grad=False)
    first = trainer.phases().cached_steps[0]
    assert not torch.allclose(exact[first], detached[first])


def test_loss_cycles_adds_the_early_latents_to_the_final_loss(pipe, recording, tmp_path):
    """--loss-cycles K: the final loss plus the log MSE of the latent closing each of the first K cache cycles. The
    added term depends only on the forecasts before it: its gradient covers the first cycle's steps and no later
    one. A recording without per-step latents is refused by name."""

    final_only, trainer = filter_gradient(pipe, recording, tmp_path / "c0", loss_cycles=0)
    extra = filter_gradient(pipe, recording, tmp_path / "c1", loss_cycles=1)[0] - final_only
    first_full = trainer.variant().full_steps[trainer.config.warmup + 1]  # closes the first cycle
    assert extra[trainer.phases().cached_steps[0]].abs().sum() > 0
    assert extra[first_full:].abs().max() == 0

    with pytest.raises(ValueError, match="needs loss 'final'"):
        TrainConfig(loss="cycle", loss_cycles=1)
    old = tmp_path / "old"
    shutil.copytree(recording.dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["shapes"]["latents"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    config = TrainConfig(**QUICK_CALIBRATED, loss_cycles=1)
    with pytest.raises(ValueError, match=f"which {old} does not hold"):
        Trainer(Recording(old), pipe, tmp_path / "o", config, **QUIET)
