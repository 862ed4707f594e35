import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lesa.cli import _parser, _train_config, main
from lesa.embedded.checker import check_caption
from lesa.embedded.loading import SHIPPED_DIR


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_record_train_generate_through_the_cli(pipe_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(5)) + "\n")
    size = ["--height", 16, "--width", 16]
    code, out, err = run_cli(
        capsys, "record", "--model", pipe_dir, "--prompts", prompts, "--out", tmp_path / "rec", "--steps", 30, *size
    )
    assert code == 0, err
    assert "MiB per prompt" in out and "recorded 5 prompt(s)" in out
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        tmp_path / "rec",
        "--out",
        tmp_path / "pred",
        "--interval",
        7,
        "--warmup",
        3,
        "--set",
        "phases=gt,clar",
        "--set",
        "epochs_gt=1",
        "--set",
        "epochs_clar=1",
        "--set",
        "kan_hidden=8,8",
        "--batch-size",
        2,
    )
    assert code == 0, err
    assert "validation TaylorSeer O1" in out and "saved predictor" in out
    config = json.loads((tmp_path / "pred" / "config.json").read_text())
    assert (config["num_steps"], config["interval"], config["warmup"]) == (30, 7, 3)
    image = tmp_path / "out.png"
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        pipe_dir,
        "--prompt",
        "a cat",
        "--cache",
        "lesa",
        "--predictor",
        tmp_path / "pred",
        "--steps",
        30,
        *size,
        "--out",
        image,
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    for key in ("steps", "full_steps", "flops_speedup", "seconds", "cache", "out"):
        assert key in result
    assert (result["steps"], result["full_steps"], result["cache"]) == (30, 7, "lesa")
    assert result["flops_speedup"] > 3.5
    assert Image.open(image).size == (16, 16)
    # a predictor trained for 30 steps is refused at 50, with both numbers named
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        pipe_dir,
        "--prompt",
        "a cat",
        "--cache",
        "lesa",
        "--predictor",
        tmp_path / "pred",
        "--steps",
        50,
        *size,
        "--out",
        tmp_path / "x.png",
    )
    assert code == 2 and "31 values (30 steps)" in err and "51 values" in err
    assert not (tmp_path / "x.png").exists()


def test_train_options_override_the_recipe():
    """The calibrated recipe trains with the exact gradient at lr 1e-4 and scores the latents of the first two cache
    cycles; the paper recipe detaches the history and scores neither; an option given explicitly wins over either
    (--set history_grad=false turns the recipe's on off), and a loss other than "final" drops the recipe's early
    cycles."""

    def config(*flags):
        return _train_config(_parser().parse_args(["train", "--data", "d", "--out", "o", *map(str, flags)]))

    default, paper = config(), config("--recipe", "paper")
    assert (default.history_grad, default.lr_clar, default.loss, default.loss_cycles) == (True, 1e-4, "final", 2)
    assert (paper.history_grad, paper.lr_clar, paper.loss, paper.loss_cycles) == (False, 3e-3, "step", 0)
    assert config("--set", "history_grad=false").history_grad is False
    assert config("--recipe", "paper", "--set", "history_grad=true", "--set", "lr_clar=1e-4").history_grad is True
    assert config("--recipe", "paper", "--set", "lr_clar=1e-4").lr_clar == 1e-4
    assert config("--set", "loss_cycles=0").loss_cycles == 0
    assert (config("--set", "loss=cycle").loss, config("--set", "loss=cycle").loss_cycles) == ("cycle", 0)
    with pytest.raises(ValueError, match="loss_cycles must be >= 0 and needs loss 'final'"):
        config("--set", "loss=cycle", "--set", "loss_cycles=2")
    # the correction: chosen on validation by default, on / off when asked; --val-data trains on all by default
    assert (default.correction, paper.correction) == ("auto", False)
    assert config("--set", "correction=true").correction is True and config("--set", "correction=on").correction is True
    assert (
        config("--set", "correction=false").correction is False
        and config("--set", "correction=off").correction is False
    )
    assert (default.val_fraction, config("--val-data", "v").val_fraction) == (0.2, 0.0)
    assert config("--val-data", "v", "--set", "val_fraction=0.2").val_fraction == 0.2


def test_cli_errors_are_specific(tmp_path, capsys):
    code, _, err = run_cli(capsys, "record", "--prompts", tmp_path / "none.txt", "--out", tmp_path / "r")
    assert code == 2 and "none.txt does not exist" in err
    code, _, err = run_cli(capsys, "train", "--data", tmp_path, "--out", tmp_path / "p")
    assert code == 2 and "manifest.json does not exist" in err
    code, _, err = run_cli(
        capsys,
        "generate",
        "--prompt",
        "x",
        "--cache",
        "lesa",
        "--predictor",
        tmp_path / "no",
        "--out",
        tmp_path / "x.png",
    )
    assert code == 2 and "predictor directory" in err and "does not exist" in err
    (tmp_path / "notapipe").mkdir()
    code, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        tmp_path / "notapipe",
        "--prompt",
        "x",
        "--cache",
        "none",
        "--out",
        tmp_path / "x.png",
    )
    assert code == 2 and "no model_index.json" in err


def test_generate_on_the_tiny_random_model(tmp_path, capsys):
    code, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        "tiny-random-flux",
        "--prompt",
        "a red circle",
        "--cache",
        "taylorseer",
        "--steps",
        20,
        "--height",
        32,
        "--width",
        32,
        "--out",
        tmp_path / "x.png",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == "tiny-random-flux" and result["full_steps"] == 6  # 0..3, 10, 17
    assert (tmp_path / "x.png").is_file()


@pytest.mark.skipif(
    not (SHIPPED_DIR / "transformer").is_dir(), reason="the embedded model's weights are not shipped in this checkout"
)
def test_readme_command_uses_the_shipped_model_and_predictor(tmp_path):
    """`lesa generate --prompt ... --out x.png`, offline, in a fresh process: embedded model, LESA N = 7."""
    out = tmp_path / "x.png"
    prompt = "a large blue square in the center on a white background"
    proc = subprocess.run(
        [sys.executable, "-m", "lesa", "generate", "--prompt", prompt, "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["model"], result["cache"], result["steps"], result["full_steps"]) == ("embedded", "lesa", 50, 10)
    assert 4.0 < result["flops_speedup"] <= 5.0
    image = Image.open(out)
    assert image.size == (32, 32)
    # the shipped model gets background, colour and position right on every evaluation prompt (shape on 44 %)
    checks = check_caption(np.asarray(image), prompt)
    assert checks["background"] and checks["colour"] and checks["position"]


@pytest.mark.skipif(
    not (SHIPPED_DIR / "transformer").is_dir(), reason="the embedded model's weights are not shipped in this checkout"
)
@pytest.mark.parametrize(
    ("options", "steps", "full"),
    [
        (["--steps", "28"], 28, [0, 1, 2, 3]),  # FLUX's diffusers default, at the predictor's default speed-up
        (["--steps", "20", "--speedup", "4"], 20, [0, 1, 2]),
        (["--height", "48", "--width", "48"], 50, [0, 1, 2, 3]),
        (["--steps", "30", "--full-steps", "6"], 30, [0, 1, 2, 3]),
    ],
)
def test_generate_any_steps_size_and_budget_with_the_shipped_predictor(tmp_path, capsys, options, steps, full):
    from lesa.pipelines import shipped_predictor
    from lesa.predictor import load_predictor

    code, out, err = run_cli(
        capsys,
        "generate",
        "--prompt",
        "a small blue square on the left on a white background",
        "--out",
        tmp_path / "x.png",
        "--json",
        *options,
    )
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    config = load_predictor(shipped_predictor()).config
    budget = (
        6 if "--full-steps" in options else round(steps / (4 if "--speedup" in options else config.default_speedup))
    )
    assert (result["steps"], result["full_steps"]) == (steps, budget)
    assert len(result["full_step_indices"]) == budget and result["full_step_indices"][: len(full)] == full
    assert Image.open(tmp_path / "x.png").size == ((48, 48) if "--height" in options else (32, 32))


def test_train_settings_come_from_the_config_and_its_docs(tmp_path, capsys):
    """`lesa train --set` parses every field by its type, --config reads what --print-config prints (a recipe's
    value is overridden only by what was given), and docs/train-settings.md lists every setting as the code has it."""
    from pathlib import Path

    from lesa.training.config import settings_doc

    def config(*flags):
        return _train_config(_parser().parse_args(["train", "--data", "d", "--out", "o", *map(str, flags)]))

    given = config("--set", "windows=4,8,8", "--set", "thresholds=0.9,0.4", "--set", "micro_batch=none")
    assert (given.windows, given.history, given.thresholds, given.micro_batch) == ((4, 8, 8), 8, (0.9, 0.4), None)
    code, out, _ = run_cli(
        capsys, "train", "--data", "d", "--out", "o", "--recipe", "paper", "--set", "seed=3", "--print-config"
    )
    assert code == 0 and json.loads(out)["seed"] == 3
    saved = tmp_path / "settings.json"
    saved.write_text(out)
    assert config("--config", saved) == config("--recipe", "paper", "--set", "seed=3")
    assert config("--config", saved, "--set", "seed=4").seed == 4  # the command line wins over the file
    toml = tmp_path / "settings.toml"
    toml.write_text("epochs_clar = 2\nwindows = [3, 3, 3]\n")
    assert (config("--config", toml).epochs_clar, config("--config", toml).windows) == (2, (3, 3, 3))
    for flags, message in [
        (("--set", "epochs"), "--set expects key=value"),
        (("--set", "epoch_clar=1"), "--set epoch_clar: no such setting"),
        (("--set", "history_grad=maybe"), "expects true or false"),
        (("--config", tmp_path / "none.json"), "none.json does not exist"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            config(*flags)
    bad = tmp_path / "bad.json"
    bad.write_text('{"epochs_clar": 1, "lr": 2}')
    with pytest.raises(ValueError, match="unknown setting\\(s\\) lr"):
        config("--config", bad)
    docs = Path(__file__).resolve().parents[1] / "docs" / "train-settings.md"
    assert docs.read_text() == settings_doc()
