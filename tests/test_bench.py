"""`lesa bench` on the tiny pipeline, the calibrated baselines' fits, and TeaCache's adaptive skipping."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import SIZE, STEPS, generate

import lesa
from lesa.calibrate import fit_damping, fit_linear, fit_polynomial, search_threshold
from lesa.cli import main
from lesa.config import LinearForecastConfig, TeaCacheConfig
from lesa.evaluate.methods import Budget, diffusers_taylorseer_rhythm
from lesa.schedule import StepSchedule


def test_fitted_damping_and_linear_weights_beat_plain_taylorseer_on_their_data(recording):
    schedule = StepSchedule(7, 3)
    g = fit_damping(recording, schedule)
    weights = fit_linear(recording, schedule, history=3)
    assert set(weights) == set(schedule.cached_steps(STEPS))

    def error(forecast) -> float:
        total = 0.0
        for i in range(len(recording)):
            f = recording.load(i)["cond.feature"].double()
            for step in schedule.cached_steps(STEPS):
                fulls = [s for s in reversed(schedule.full_steps(STEPS)) if s < step]
                total += float(((forecast(f, step, fulls) - f[step]) ** 2).sum())
        return total

    def taylor(damping):
        return lambda f, s, fl: f[fl[0]] + damping * (s - fl[0]) * (f[fl[0]] - f[fl[1]]) / (fl[0] - fl[1])

    def linear(f, s, fl):
        return sum(w * f[j] for w, j in zip(weights[s], fl, strict=False))

    # least squares on the same data can only improve on the unfitted special cases
    assert error(taylor(g)) <= error(taylor(1.0))
    assert error(linear) <= error(taylor(g)) + 1e-9


def test_linear_forecaster_runs_in_the_pipeline_with_the_schedule(pipe, recording):
    schedule = StepSchedule(7, 3)
    config = LinearForecastConfig(interval=7, weights=fit_linear(recording, schedule))
    lesa.enable(pipe, config)
    try:
        out = generate(pipe, height=SIZE, width=SIZE)
        info = lesa.summary(pipe)
    finally:
        lesa.disable(pipe)
    assert torch.isfinite(out).all()
    assert info["full_steps"] == len(schedule.full_steps(STEPS)) == 10


def test_teacache_threshold_trades_full_steps_and_zero_threshold_is_exact(pipe):
    reference = generate(pipe)
    counts = []
    for threshold in (0.0, 0.3, 3.0):
        lesa.enable(pipe, TeaCacheConfig(threshold=threshold))
        try:
            out = generate(pipe)
            counts.append(lesa.summary(pipe)["full_steps"])
        finally:
            lesa.disable(pipe)
        if threshold == 0.0:
            torch.testing.assert_close(out, reference)
    assert counts[0] == STEPS
    assert counts[0] >= counts[1] >= counts[2] and counts[2] < STEPS


def test_polynomial_fit_and_threshold_search():
    pairs = [(x / 10, 2 * (x / 10) ** 2 + 0.5) for x in range(10)]
    coefficients = fit_polynomial(pairs, degree=2)
    assert coefficients == pytest.approx((2.0, 0.0, 0.5), abs=1e-6)
    threshold, count = search_threshold(lambda t: 50 - int(10 * t), target=20, low=0.0, high=10.0)
    assert count == 20 and 3.0 <= threshold < 3.1 + 1e-9
    threshold, count = search_threshold(lambda t: 50 if t < 0.002 else 8, target=8, low=0.0, high=20.0)
    assert count == 8 and threshold >= 0.002  # the log scale reaches small thresholds in few steps
    with pytest.raises(ValueError, match="pairs"):
        fit_polynomial([(0.1, 0.2)], degree=4)


def test_diffusers_taylorseer_rhythm_matches_the_budget_count():
    for interval in (5, 7, 10):
        budget = Budget(StepSchedule(interval, 3), 50)
        before, every = diffusers_taylorseer_rhythm(budget)
        count = sum(1 for s in range(50) if s < before or (s - before - 1) % every == 0)
        assert count == budget.full_steps


def test_bench_cli_writes_results_with_counts_matching_the_schedules(tmp_path, trained, recording):
    _, _, predictor_dir = trained
    prompts = tmp_path / "eval.txt"
    prompts.write_text("an evaluation prompt\nanother evaluation prompt\n")
    out = tmp_path / "bench"
    methods = (
        "lesa,fora,taylorseer-o1,taylorseer-damped,linear,taylorseer-damped-corrected,teacache,diffusers-taylorseer"
    )
    argv = ["bench", "--model", "tiny-random-flux", "--prompts", str(prompts), "--out", str(out)]
    argv += ["--predictor", str(predictor_dir), "--methods", methods, "--fit-data", str(recording.dir)]
    argv += ["--height", str(SIZE), "--width", str(SIZE), "--search-prompts", "1", "--search-iterations", "5"]
    argv += ["--repeats", "1", "--timing-prompts", "1"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# lesa bench")
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["row"]: r for r in results["rows"]}
    assert rows["full compute"]["trunk_executions"] == STEPS
    fixed = ["LESA N=7", "FORA N=7", "TaylorSeer O1 N=7", "TaylorSeer O1 damped N=7", "least-squares linear N=7"]
    fixed.append("TaylorSeer O1 damped + correction N=7")
    for name in [*fixed, "diffusers TaylorSeerCache lite O1 N=7"]:
        assert rows[name]["trunk_executions"] == pytest.approx(10), name
        assert rows[name]["flops_speedup"] > 2.0, name
        assert len(rows[name]["_psnr_per_prompt"]) == 2
        for key in ("psnr", "ssim", "wallclock_speedup"):
            assert key in rows[name], (name, key)
    assert 0 < rows["TaylorSeer O1 damped N=7"]["fitted"]["damping"] < 2
    corrected = rows["TaylorSeer O1 damped + correction N=7"]
    assert corrected["fitted"]["correction"] == {"10": 1 / 3, "17": 1 / 3}  # the first two cycles after the warm-up
    assert corrected["fitted"]["damping"] == rows["TaylorSeer O1 damped N=7"]["fitted"]["damping"]
    # LESA's once-per-generation coefficient folding is counted once, not charged to every full call
    assert rows["LESA N=7"]["flops_speedup"] == pytest.approx(rows["FORA N=7"]["flops_speedup"], rel=0.01)
    teacache = next(r for r in results["rows"] if r["family"] == "teacache")
    assert "threshold" in teacache["fitted"] and len(teacache["fitted"]["coefficients"]) == 5
    assert any("MS-SSIM skipped" in n for n in results["notices"])
    assert results["n_prompts"] == 2 and results["runs"]["full"]["per_prompt"] == {}


def test_bench_refuses_evaluation_prompts_used_for_fitting(tmp_path, recording):
    # the same trajectory: the recording is of this tiny FluxPipeline at this size, prompt 0 from seed 0
    fit = tmp_path / "fit"
    shutil.copytree(recording.dir, fit)
    manifest = json.loads((fit / "manifest.json").read_text())
    (fit / "manifest.json").write_text(
        json.dumps({**manifest, "settings": {**manifest["settings"], "model": "tiny-random-flux"}})
    )
    prompts = tmp_path / "eval.txt"
    prompts.write_text(recording.entries[0]["prompt"] + "\n")
    argv = ["bench", "--model", "tiny-random-flux", "--prompts", str(prompts), "--out", str(tmp_path / "b")]
    argv += ["--methods", "fora,taylorseer-damped", "--fit-data", str(fit), "--height", str(SIZE), "--width", str(SIZE)]
    assert main(argv) == 2


def test_bench_refuses_an_empty_timing_run_before_generating(tmp_path):
    from lesa.evaluate.bench import BenchConfig

    with pytest.raises(ValueError, match="timing_prompts must be at least 1, got 0"):
        BenchConfig(prompts="p.txt", out=str(tmp_path), timing_prompts=0)
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        BenchConfig(prompts="p.txt", out=str(tmp_path), repeats=0)


def test_bench_runs_baselines_on_a_predictors_placement_without_its_rows(tmp_path, trained):
    _, _, predictor_dir = trained
    placed = tmp_path / "placed"
    placed.mkdir()
    for name in ("config.json", "model.safetensors"):
        (placed / name).write_bytes((predictor_dir / name).read_bytes())
    config = json.loads((placed / "config.json").read_text())
    config["explicit_full_steps"] = [9, 17, 29, 40, 46]
    (placed / "config.json").write_text(json.dumps(config))
    prompts = tmp_path / "eval.txt"
    prompts.write_text("an evaluation prompt\n")
    out = tmp_path / "bench"
    argv = ["bench", "--model", "tiny-random-flux", "--prompts", str(prompts), "--out", str(out), "--methods", "fora"]
    argv += ["--predictor", str(placed), "--height", str(SIZE), "--width", str(SIZE), "--repeats", "1"]
    argv += ["--timing-prompts", "1"]
    assert main(argv) == 0
    rows = {r["row"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"full compute", "FORA N=7 searched", "FORA N=7"}
    assert rows["FORA N=7 searched"]["trunk_executions"] == pytest.approx(4 + 5)
    assert rows["FORA N=7"]["trunk_executions"] == pytest.approx(10)


def test_predictors_of_one_schedule_are_seeds_of_a_row_by_directory_name(tmp_path):
    """Predictors "x" and "x-seed1" are two seeds of one row; a third one, "y", of the same schedule gets a row of
    its own, and a schedule with one name keeps the plain row name."""
    from conftest import tiny_predictor

    from lesa.evaluate.methods import lesa_methods

    for name in ("x", "x-seed1", "y"):
        tiny_predictor(interval=7).save_pretrained(tmp_path / name)
    tiny_predictor(interval=5).save_pretrained(tmp_path / "z")
    grouped = lesa_methods([str(tmp_path / n) for n in ("x", "x-seed1", "y", "z")], 20)
    rows = {key: [m.row for m in methods] for key, methods in grouped.items()}
    assert rows == {(7, 3, ()): ["LESA N=7 (x)", "LESA N=7 (x)", "LESA N=7 (y)"], (5, 3, ()): ["LESA N=5"]}


def test_results_table_labels_ssim_as_luma():
    """The JSON keys stay `ssim` / `ms_ssim`; what readers see says the SSIMs are on luma."""
    from lesa.evaluate.report import results_table

    row = dict(row="full compute", budget=None, seeds=1, family="full", trunk_executions=50.0, fitted={})
    row.update(flops_speedup=1.0, wallclock_speedup=1.0, psnr=[40.0, 0.5], ssim=[0.98, 0.01], ms_ssim=[0.97, 0.01])
    machine = dict(platform="test", python="3", torch="2", device="cpu", threads=1)
    results = dict(rows=[row], machine=machine, model="m", n_prompts=1, config={"steps": 50}, command="c", notices=[])
    header = next(line for line in results_table(results).splitlines() if line.startswith("| method"))
    assert "| SSIM (luma) | MS-SSIM (luma) |" in header
    results["config"] = {"steps": 20}  # the full-compute row's budget is the bench's step count
    assert "| full compute | 20/20 |" in results_table(results)
