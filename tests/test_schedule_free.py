"""The schedule-free predictor (format 2): coefficients continuous in sigma, any step count and budget, the trunk
executions a budget names, per-request isolation, format-1 handling, training across step counts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SIZE, generate

import lesa
from lesa.adapters import pipeline_sigmas
from lesa.predictor import LESAPredictor, ScheduleFreeConfig, ScheduleFreePredictor, load_predictor
from lesa.record import record
from lesa.recording import Recording
from lesa.schedule import StepSchedule, full_step_count, sigma_budget, uniform_budget

FEATURE = 32  # the tiny FLUX's tapped feature width


def sf_predictor(seed: int = 0, **overrides) -> ScheduleFreePredictor:
    """A schedule-free predictor with random (nonzero) coefficient networks, as a trained one has."""
    torch.manual_seed(seed)
    fields = dict(model_class="FluxTransformer2DModel", tap="t", feature_dim=FEATURE, gain_bias=0.5, hidden=8)
    fields.update(overrides)
    predictor = ScheduleFreePredictor(ScheduleFreeConfig(**fields))
    with torch.no_grad():
        for p in predictor.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return predictor.eval()


# -- budgets and placement -------------------------------------------------------------------------------------------
def test_budget_counts_and_placements():
    assert full_step_count(50, speedup=5) == 10 and full_step_count(28, speedup=4) == 7
    assert full_step_count(20, full_steps=30) == 20
    with pytest.raises(ValueError, match="exactly one"):
        full_step_count(20, 4, 5)
    # where an interval rule gives the count, the uniform budget is that rule (today's N = 7 / 10 at 50 steps)
    assert uniform_budget(50, 10, 3) == StepSchedule(7, 3)
    assert uniform_budget(50, 8, 3) == StepSchedule(10, 3)
    for steps in (10, 20, 28, 50):
        sigmas = [1 - i / steps for i in range(steps + 1)]
        for budget in range(1, steps):
            for schedule in (uniform_budget(steps, budget, 3), sigma_budget(sigmas, budget, 3, 1.3)):
                full = schedule.full_steps(steps)
                assert len(full) == budget, (steps, budget, schedule)
                assert full == sorted(set(full)) and full[0] == 0
    # small budgets keep half of their full steps after the warm-up
    assert sigma_budget([1 - i / 20 for i in range(21)], 4, 3).full_steps(20)[:3] == [0, 1, 2]


# -- the predictor ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_coefficients_continuous_in_sigma():
    predictor = sf_predictor()
    past = [0.9, 0.8, 0.7]
    base = predictor.coefficients("cond", 0.62, past)
    assert base.abs().sum() > 0.1  # a real forecast, not reuse
    # a slightly shifted schedule (every sigma moved by 1e-4, as a nearby FLUX resolution's mu does) gives slightly
    # shifted coefficients
    shifted = predictor.coefficients("cond", 0.62 + 1e-4, [s + 1e-4 for s in past])
    assert 0 < float((shifted - base).abs().max()) < 1e-2
    # continuous in the step's own sigma within a stage, and zero extrapolation at the last full step's sigma
    near = predictor.coefficients("cond", 0.62 - 1e-5, past)
    assert float((near - base).abs().max()) < 1e-3
    assert float(predictor.coefficients("cond", 0.7 - 1e-9, past).abs().max()) < 1e-3


def test_forecast_and_coefficient_list_agree():
    predictor = sf_predictor()
    history = [torch.randn(3, FEATURE) for _ in range(3)]
    past = [0.95, 0.85, 0.8]
    exact = predictor.forecast(history, "cond", 0.7, past)
    folded = ScheduleFreePredictor.apply_coefficients(history, predictor.coefficient_list("cond", 0.7, past))
    assert torch.allclose(exact, folded, atol=1e-5)
    # fewer than two full steps: the last feature, unchanged
    assert torch.equal(predictor.forecast(history[:1], "cond", 0.7, past[:1]), history[0])


def test_save_load_roundtrip_and_size(tmp_path):
    predictor = sf_predictor(contexts=["cond", "uncond"], hidden=16)
    predictor.save_pretrained(tmp_path)
    loaded = load_predictor(tmp_path)
    assert isinstance(loaded, ScheduleFreePredictor) and loaded.config == predictor.config
    for (k, a), (_, b) in zip(predictor.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert json.loads((tmp_path / "config.json").read_text())["format_version"] == 2
    # LESAPredictor.from_pretrained loads either format
    assert isinstance(LESAPredictor.from_pretrained(tmp_path), ScheduleFreePredictor)
    assert (tmp_path / "model.safetensors").stat().st_size <= 256 * 1024


def test_format_checks(tmp_path):
    sf_predictor().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "format_version": 3}))
    with pytest.raises(ValueError, match="format_version 3"):
        load_predictor(tmp_path)
    del config["window"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing required field.*window"):
        load_predictor(tmp_path)


# -- running -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [10, 28, 50])
def test_one_predictor_any_step_count(pipe, steps):
    predictor = sf_predictor()
    lesa.enable(pipe, lesa.LESAConfig(predictor=predictor, speedup=4))
    try:
        out = generate(pipe, steps=steps)
        info = lesa.summary(pipe)
    finally:
        lesa.disable(pipe)
    assert torch.isfinite(out).all()
    budget = full_step_count(steps, speedup=4)
    sigmas = pipeline_sigmas(pipe, steps, SIZE, SIZE).tolist()
    # counted trunk executions equal the budget, on the predictor's own placement
    assert info["trunk_executions"] == budget == info["full_steps"]
    assert info["full_step_indices"] == predictor.config.full_steps(sigmas, speedup=4)


def test_full_steps_budget_and_interval(pipe):
    predictor = sf_predictor()
    for config, expected in (
        (lesa.LESAConfig(predictor=predictor, full_steps=6), 6),
        (lesa.LESAConfig(predictor=predictor, interval=5, warmup=2), len(StepSchedule(5, 2).full_steps(20))),
        (lesa.LESAConfig(predictor=predictor), full_step_count(20, predictor.config.default_speedup)),
        (lesa.FORAConfig(speedup=4), 5),
    ):
        lesa.enable(pipe, config)
        try:
            generate(pipe, steps=20)
            assert lesa.summary(pipe)["trunk_executions"] == expected, config
        finally:
            lesa.disable(pipe)


def test_interleaved_requests_are_isolated(pipe):
    """One pipeline serving requests of other step counts, budgets and batch sizes in turn, one of them raising
    part-way: each gives exactly what it gives alone."""
    predictor = sf_predictor()
    requests = [
        dict(steps=10, speedup=2.5, prompts=["a red circle"]),
        dict(steps=28, speedup=4.0, prompts=["a blue square", "a green dot"]),
        dict(steps=20, speedup=6.25, prompts=["a red circle"]),
    ]

    def run(request):
        with lesa.budget(pipe, speedup=request["speedup"]):
            out = generate(pipe, steps=request["steps"], prompt=request["prompts"])
        return out, lesa.summary(pipe)["full_step_indices"]

    lesa.enable(pipe, lesa.LESAConfig(predictor=predictor))
    try:
        alone = [run(r) for r in requests]

        def fail_at_step(p, step, timestep, kwargs):
            if step == 6:
                raise RuntimeError("client went away")
            return kwargs

        order = [1, 0, 2, 1, 2, 0]
        for k, i in enumerate(order):
            if k == 3:  # a request that raised part-way through
                with lesa.budget(pipe, speedup=5), pytest.raises(RuntimeError, match="client went away"):
                    generate(pipe, steps=28, callback_on_step_end=fail_at_step)
            out, full = run(requests[i])
            assert torch.equal(out, alone[i][0]) and full == alone[i][1], (k, i)
    finally:
        lesa.disable(pipe)


def test_budget_refusals(pipe):
    with pytest.raises(ValueError, match="speedup or full_steps, not both"):
        lesa.LESAConfig(predictor="x", speedup=4, full_steps=5)
    with pytest.raises(ValueError, match="at least 1"):
        lesa.FORAConfig(speedup=0.5)
    lesa.enable(pipe, lesa.FORAConfig(speedup=4))
    try:
        with pytest.raises(ValueError, match="needs speedup or full_steps"), lesa.budget(pipe):
            pass
    finally:
        lesa.disable(pipe)
    with pytest.raises(ValueError, match="decides its full steps as it goes"):
        lesa.enable(pipe, lesa.TeaCacheConfig(speedup=4)) if hasattr(lesa, "TeaCacheConfig") else _teacache(pipe)


def _teacache(pipe):
    from lesa.config import TeaCacheConfig

    lesa.enable(pipe, TeaCacheConfig(speedup=4))


# -- format 1 --------------------------------------------------------------------------------------------------------
def test_format_1_stays_loadable_and_says_what_it_serves(tmp_path, pipe):
    from conftest import tiny_predictor

    v1 = tiny_predictor(feature_dim=FEATURE)
    v1.save_pretrained(tmp_path)
    assert isinstance(load_predictor(tmp_path), LESAPredictor)
    with pytest.raises(ValueError, match="format-1 LESAPredictor.*lesa train --recipe schedule-free"):
        ScheduleFreePredictor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a schedule-free predictor"):
        lesa.LESAConfig(predictor=tmp_path, speedup=4).resolve()
    lesa.enable(pipe, lesa.LESAConfig(predictor=v1))
    try:
        generate(pipe, steps=20)  # its own schedule (the tiny pipe's 20-step sigmas differ: a warning, no error)
        with pytest.raises(ValueError, match="schedule-free predictor .format 2"):
            generate(pipe, steps=28)
        with lesa.budget(pipe, speedup=4), pytest.raises(ValueError, match="needs a schedule-free predictor"):
            generate(pipe, steps=20)
    finally:
        lesa.disable(pipe)


# -- training across step counts -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recordings(tmp_path_factory, pipe):
    prompts = [f"a prompt {i}" for i in range(5)]
    out = []
    for steps in (12, 20):
        path = tmp_path_factory.mktemp(f"rec{steps}")
        record(
            pipe,
            prompts,
            path,
            model="tiny",
            steps=steps,
            height=SIZE,
            width=SIZE,
            dtype="float32",
            progress=False,
            log=lambda *_: None,
        )
        out.append(Recording(path))
    return out


def test_train_across_step_counts_and_resume(tmp_path, pipe, recordings):
    from lesa.training import ScheduleFreeTrainer, TrainConfig

    config = TrainConfig.from_recipe(
        "schedule-free",
        epochs_clar=1,
        batch_size=2,
        val_fraction=0.4,
        speedups=(2.5, 4.0),
        min_full_steps=3,
        lr_clar=1e-3,
    )
    logs = []
    trainer = ScheduleFreeTrainer(recordings, pipe, tmp_path, config, log=logs.append, progress=False)
    assert [c.name for c in trainer.cells] == [
        "12 steps x2.5 (5 full)",
        "12 steps x4 (3 full)",
        "20 steps x2.5 (8 full)",
        "20 steps x4 (5 full)",
    ]
    predictor = trainer.run()
    saved = load_predictor(tmp_path)
    assert isinstance(saved, ScheduleFreePredictor) and saved.config.trained_steps == [12, 20]
    assert saved.config.placement_power in config.placement_powers
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert set(log["placements"]["uniform"]) == {c.name for c in trainer.cells}  # every covered schedule reported
    assert all(len(rows) == 4 for rows in log["baselines"].values())
    # after the closed loop no parameter outside the predictor holds a gradient
    assert all(p.grad is None for p in pipe.transformer.parameters())
    # resumed: the finished checkpoint is taken as it is, nothing trains again
    again = ScheduleFreeTrainer(recordings, pipe, tmp_path, config, log=logs.append, progress=False)
    assert again.train_seed(0, again.choose_start())["done"]
    assert torch.equal(
        torch.cat([p.flatten() for p in predictor.parameters()]),
        torch.cat([p.flatten() for p in saved.parameters()]),
    )


def test_trainer_refuses_mixed_recordings(tmp_path, tmp_path_factory, pipe, recordings):
    from lesa.training import ScheduleFreeTrainer, TrainConfig

    config = TrainConfig.from_recipe("schedule-free")
    other = tmp_path_factory.mktemp("rec-other-size")
    record(
        pipe,
        ["a prompt 0"],
        other,
        model="tiny",
        steps=12,
        height=2 * SIZE,
        width=2 * SIZE,
        dtype="float32",
        progress=False,
        log=lambda *_: None,
    )
    with pytest.raises(ValueError, match="differ in \\['height', 'width'\\]"):
        ScheduleFreeTrainer([recordings[1], Recording(other)], pipe, tmp_path, config)
    with pytest.raises(ValueError, match="same step count"):
        ScheduleFreeTrainer([recordings[0], recordings[0]], pipe, tmp_path, config)
    with pytest.raises(ValueError, match="trains format 2"):
        ScheduleFreeTrainer(recordings, pipe, tmp_path, TrainConfig.from_recipe("calibrated"))


def test_bench_budgets_by_speedup(tmp_path, pipe_dir, recordings, capsys):
    """`lesa bench --speedups`: per speed-up, the predictor's rows on its own placement and every fixed method on it
    and on the uniform one, each with the budget's count of full steps."""
    from lesa.cli import main

    predictor = sf_predictor(placement_power=1.3)
    predictor.save_pretrained(tmp_path / "sf")
    prompts = tmp_path / "eval.txt"
    prompts.write_text("an evaluation prompt\nanother one\n")
    fit = recordings[1]  # 20 steps
    code = main(
        [
            "bench", "--model", str(pipe_dir), "--prompts", str(prompts), "--out", str(tmp_path / "b"),
            "--predictor", str(tmp_path / "sf"), "--steps", "20", "--speedups", "2.5,4", "--seed", "100",
            "--methods", "lesa,fora,taylorseer-damped-corrected", "--fit-data", str(fit.dir),
            "--height", str(SIZE), "--width", str(SIZE), "--repeats", "1", "--timing-prompts", "1",
        ]
    )  # fmt: skip
    assert code == 0
    runs = json.loads((tmp_path / "b" / "results.json").read_text())["runs"].values()
    rows = {r["row"]: r for r in runs}
    for speedup, count in ((2.5, 8), (4, 5)):
        for placement in (" planned", ""):
            for method in ("FORA", "TaylorSeer O1 damped + correction"):
                row = rows[f"{method} x{speedup:g}{placement}"]
                assert row["trunk_executions"] == count and row["budget"].startswith(f"{count}/20")
        assert rows[f"LESA x{speedup:g} planned"]["trunk_executions"] == count
    capsys.readouterr()
    code = main(["bench", "--model", str(pipe_dir), "--prompts", str(prompts), "--out", str(tmp_path / "c"),
                 "--predictor", str(tmp_path / "sf"), "--steps", "20", "--methods", "lesa"])  # fmt: skip
    assert code == 2 and "schedule-free: bench it at budgets by speed-up (--speedups)" in capsys.readouterr().err
