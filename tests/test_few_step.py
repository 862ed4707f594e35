"""Few-step (distilled) schedules: refused with the reason when nothing can be cached, cached honestly otherwise."""

import pytest
import torch
from conftest import SIZE, generate

import lesa
from lesa.cli import main
from lesa.record import record
from lesa.recording import Recording
from lesa.training import TrainConfig, Trainer

QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, pipe) -> Recording:
    out = tmp_path_factory.mktemp("four-steps")
    prompts = [f"few step prompt {i}" for i in range(4)]
    record(pipe, prompts, out, model="tiny", steps=4, height=SIZE, width=SIZE, dtype="float32", **QUIET)
    return Recording(out)


def test_the_papers_warmup_leaves_nothing_to_cache_and_training_says_why(pipe, four_steps, tmp_path):
    with pytest.raises(ValueError, match=r"leave no cached step in 4 steps \(steps 0..3 are always full\)") as err:
        Trainer(four_steps, pipe, tmp_path, TrainConfig(interval=7, warmup=3), **QUIET)
    assert "--warmup 1 --interval 2" in str(err.value)


def test_a_short_schedule_caches_with_windows_shrunk_to_the_available_history(pipe, four_steps, tmp_path):
    config = TrainConfig(interval=2, warmup=0, epochs_gt=1, epochs_clar=1, kan_hidden=(4,), batch_size=2)
    trainer = Trainer(four_steps, pipe, tmp_path, config, **QUIET)
    assert trainer.phases().cached_steps == [1, 3]
    predictor = trainer.run()
    # step 3 can see at most 3 earlier features: K = 4 / 8 would never fill, so K shrinks to 3 (and history too)
    assert predictor.config.windows == [3, 3, 3] and predictor.config.history == 3
    reference = generate(pipe, steps=4)
    try:
        lesa.enable(pipe, lesa.LESAConfig(predictor=predictor))
        cached = generate(pipe, steps=4)
        info = lesa.summary(pipe)
        assert (info["steps"], info["full_steps"], info["trunk_executions"], info["trunk_speedup"]) == (4, 2, 2, 2.0)
        assert torch.isfinite(cached).all() and not torch.equal(cached, reference)
        # step 1 is forecast from a one-feature history (the window is padded), no refusal
        with pytest.warns(UserWarning, match="trained for interval 2, warmup 0; running with interval 1"):
            lesa.enable(pipe, lesa.LESAConfig(predictor=predictor, interval=1))
        assert torch.equal(generate(pipe, steps=4), reference)
    finally:
        lesa.disable(pipe)


def test_generate_notes_when_the_schedule_caches_nothing(tmp_path, capsys):
    argv = ["generate", "--model", "tiny-random-flux", "--prompt", "x", "--cache", "fora", "--steps", "4"]
    code = main([*argv, "--height", "16", "--width", "16", "--out", str(tmp_path / "x.png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "all 4 steps ran the trunk: nothing was cached" in captured.err and "--warmup 1 --interval 2" in captured.err
