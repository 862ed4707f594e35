import pytest
import torch
from conftest import generate
from test_record_train import QUICK_CALIBRATED, QUIET

import lesa
from lesa.config import TaylorSeerConfig, TeaCacheConfig
from lesa.correction import FullStepCorrector, first_cycles, reach
from lesa.predictor import LESAPredictor
from lesa.training import TrainConfig, Trainer

FULL = [0, 1, 2, 3, 10, 17, 24]


def test_reach_sums_the_growth_of_the_error_over_the_cycle():
    """Equal steps: (b - a - 1) / 2 step-sizes of E; unequal ones weigh each cached step by its step size; a cycle
    with fewer than two cached steps has nothing to extrapolate from."""
    uniform = [1 - i / 30 for i in range(31)]
    assert reach(uniform, FULL, 10) == pytest.approx(3.0)
    assert reach(None, FULL, 17) == 3.0
    assert reach(uniform, FULL, 3) == 0.0 and reach(uniform, [0, 1, 2, 3, 5], 5) == 0.0
    sigmas = [1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2]  # steps 4, 5 cached, 6 full: dsigma -0.2 at step 4
    expected = (1 / 3) * (-0.2 / -0.1) + (2 / 3) * (-0.1 / -0.1)
    assert reach(sigmas, [0, 1, 2, 3, 6], 6) == pytest.approx(expected)
    assert first_cycles(FULL, 3, 0.5, 2) == {10: 0.5, 17: 0.5}


def test_corrector_adds_strength_times_reach_times_the_forecast_error():
    """E = out(b) - (2 out(b-1) - out(b-2)); the full step's output gets strength * reach * E. Outputs that move
    linearly through the full step need no correction; a full step after a full one is left alone."""
    corrector = FullStepCorrector(lambda step: 0.5, None, FULL)
    for step in range(4, 10):
        corrector.cached(step, torch.full((2,), float(step)))
    assert torch.equal(corrector.full(10, torch.full((2,), 10.0)), torch.full((2,), 10.0))
    for step in range(11, 17):
        corrector.cached(step, torch.full((2,), float(step)))
    out = corrector.full(17, torch.full((2,), 20.0))  # E = 20 - 17 = 3, reach 3, strength 0.5
    assert torch.allclose(out, torch.full((2,), 20.0 + 0.5 * 3 * 3))
    assert torch.equal(corrector.full(18, torch.ones(2)), torch.ones(2))


def capture(pipe, config, seed=0):
    """The final latent and every call's output (as the pipeline received it) of one generation, and its counts."""
    outputs = {}
    runtime = lesa.enable(pipe, config)
    runtime.observers.append(lambda e: outputs.__setitem__((e.context, e.step), e.output.clone()))
    try:
        return generate(pipe, seed), outputs, runtime.summary()
    finally:
        lesa.disable(pipe)


def test_runtime_corrects_the_full_steps_it_is_given(pipe):
    """Only the named full steps change: every output before the first one is untouched, the first one is the
    uncorrected output plus strength * reach * E, and the trunk runs as often as without the correction."""
    plain_config = TaylorSeerConfig(order=1, damping=0.5, interval=7, count_flops=False)
    plain, plain_out, _ = capture(pipe, plain_config)
    corrected, out, info = capture(pipe, TaylorSeerConfig(order=1, damping=0.5, interval=7, correction={10: 0.4}))
    assert info["full_steps"] == 10 and info["trunk_executions"] == 10
    sigmas = pipe.scheduler.sigmas.tolist()
    r = reach(sigmas, plain_config.schedule().full_steps(50), 10)
    assert r > 2
    for context, step in plain_out:
        if step < 10:
            assert torch.equal(out[context, step], plain_out[context, step])
    for context in {c for c, _ in plain_out}:
        v = plain_out[context, 10]
        error = v - (2 * plain_out[context, 9] - plain_out[context, 8])
        assert torch.allclose(out[context, 10], v + 0.4 * r * error, atol=1e-6)
    assert not torch.equal(plain, corrected)
    zero, _, _ = capture(pipe, TaylorSeerConfig(order=1, damping=0.5, interval=7, correction={10: 0.0}))
    assert torch.equal(zero, plain)


def test_an_adaptive_method_refuses_a_correction(pipe):
    with pytest.raises(ValueError, match="needs a fixed schedule"):
        lesa.enable(pipe, TeaCacheConfig(correction={10: 0.3}))
    lesa.disable(pipe)


def test_learned_correction_trains_saves_and_averages(pipe, recording, tmp_path):
    """A predictor with a learned correction starts at the strength of the first cycles, gets a gradient for the
    strength of every corrected full step through the sampler, keeps it through save / load and a seed ensemble
    (the mean), and `learned_correction=False` turns it off."""
    config = TrainConfig(**QUICK_CALIBRATED, epochs_clar=1, correction=True, correction_start=0.25, correction_cycles=1)
    trainer = Trainer(recording, pipe, tmp_path / "p", config, **QUIET)
    phases = trainer.phases()
    predictor = phases.new_predictor(0)
    first = phases.cycle_ends()[0]
    assert phases.start.correction == {first: 0.25}
    assert predictor.correction[first] == 0.25 and predictor.correction.abs().sum() == 0.25
    batch = trainer.train_idx[:2]
    data = [recording.load(i) for i in batch]
    lesa.enable(pipe, lesa.LESAConfig(predictor=predictor, differentiable=True, count_flops=False))
    try:
        (grad,) = torch.autograd.grad(phases.final_loss(batch, data), [predictor.correction])
    finally:
        lesa.disable(pipe)
    corrected = [s for s in phases.cycle_ends() if reach(None, phases.schedule.full_steps(50), s)]
    assert all(grad[s] != 0 for s in corrected)
    assert all(grad[s] == 0 for s in range(50) if s not in corrected)

    predictor.save_pretrained(tmp_path / "saved")
    loaded = LESAPredictor.from_pretrained(tmp_path / "saved")
    assert loaded.config.correction and torch.equal(loaded.correction, predictor.correction)
    other = phases.new_predictor(1)
    with torch.no_grad():
        other.correction[first] = 0.75
    assert float(LESAPredictor.ensemble([predictor, other]).correction.detach()[first]) == pytest.approx(0.5)
    on, _, _ = capture(pipe, lesa.LESAConfig(predictor=loaded, count_flops=False))
    off, _, _ = capture(pipe, lesa.LESAConfig(predictor=loaded, count_flops=False, learned_correction=False))
    assert not torch.equal(on, off)
    with pytest.raises(ValueError, match="needs loss 'final'"):
        TrainConfig(loss="cycle", correction=True)
    # trained end to end: the model card names the learned strengths, the log the corrected baselines
    trainer.run()
    card = (tmp_path / "p" / "README.md").read_text()
    assert "Full-step correction" in card and "LESA without its correction" in card
    assert "TaylorSeer O1 damped + correction (strength 0.25" in card


def test_the_calibrated_recipe_chooses_the_correction():
    assert TrainConfig.from_recipe("calibrated").correction == "auto"
    assert not TrainConfig.from_recipe("paper").correction
    assert not TrainConfig.from_recipe("calibrated", loss="step").correction  # a term of the final loss only
