import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from lesa.cli import main


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
        "--phases",
        "gt,clar",
        "--epochs",
        1,
        "--epochs-clar",
        1,
        "--kan-hidden",
        "8,8",
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


@pytest.mark.parametrize("cache", ["taylorseer"])
def test_generate_module_entry_point_on_the_default_model(tmp_path, cache):
    out = tmp_path / "x.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lesa",
            "generate",
            "--prompt",
            "a red circle",
            "--cache",
            cache,
            "--steps",
            "20",
            "--height",
            "32",
            "--width",
            "32",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model"] == "tiny-random-flux" and result["full_steps"] == 6  # 0..3, 10, 17
    assert out.is_file()
