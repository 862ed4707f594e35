"""`lesa record` -> `lesa train` -> `lesa generate` through the CLI for Qwen-Image (true CFG), HunyuanVideo, Wan and
SD3 (FLUX: tests/test_cli.py)."""

import json

import pytest
from PIL import Image

import lesa.media
from lesa.cli import main


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def record_and_train(capsys, tmp_path, model, *call_args):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(4)) + "\n")
    code, out, err = cli(
        capsys, "record", "--model", model, "--prompts", prompts, "--out", tmp_path / "rec", "--steps", 10, *call_args
    )
    assert code == 0, err
    assert "MiB per prompt" in out and "recorded 4 prompt(s)" in out
    train = ["train", "--data", tmp_path / "rec", "--out", tmp_path / "pred", "--interval", 3, "--warmup", 1]
    train += ["--set", "epochs_gt=1", "--set", "epochs_clar=1", "--set", "kan_hidden=4", "--batch-size", 2]
    train += ["--set", "val_fraction=0.25"]
    code, out, err = cli(capsys, *train)
    assert code == 0, err
    return json.loads((tmp_path / "pred" / "config.json").read_text())


def test_qwenimage_true_cfg_through_the_cli(tmp_path, capsys):
    call = ["--height", 32, "--width", 32, "--negative-prompt", "blurry", "--true-cfg-scale", 4.0]
    config = record_and_train(capsys, tmp_path, "tiny-random-qwenimage", *call)
    assert config["model_class"] == "QwenImageTransformer2DModel"
    assert config["contexts"] == ["cond", "uncond"]  # one set of experts per CFG pass
    assert config["thresholds"] == [0.9, 0.4]  # the adapter's default for Qwen-Image
    results = {}
    for negative in ("blurry", "a dog"):
        out_file = tmp_path / f"{negative}.png"
        gen = ["generate", "--model", "tiny-random-qwenimage", "--prompt", "a cat", "--predictor", tmp_path / "pred"]
        gen += ["--steps", 10, *call[:4], "--negative-prompt", negative, "--true-cfg-scale", 4.0]
        code, out, err = cli(capsys, *gen, "--out", out_file, "--json")
        assert code == 0, err
        result = json.loads(out)
        assert (result["steps"], result["full_steps"]) == (10, 4)  # 0, 1, 4, 7
        results[negative] = Image.open(out_file).tobytes()
    assert results["blurry"] != results["a dog"]  # the negative prompt reaches the (cached) uncond pass


def test_hunyuanvideo_through_the_cli_writes_a_watchable_video(tmp_path, capsys, monkeypatch):
    call = ["--height", 16, "--width", 16, "--num-frames", 5]
    config = record_and_train(capsys, tmp_path, "tiny-random-hunyuanvideo", *call)
    assert config["model_class"] == "HunyuanVideoTransformer3DModel" and config["feature_dim"] == 4
    gen = ["generate", "--model", "tiny-random-hunyuanvideo", "--prompt", "a cat", "--predictor", tmp_path / "pred"]
    gen += ["--steps", 10, *call]
    code, out, err = cli(capsys, *gen, "--out", tmp_path / "v.gif", "--json")
    assert code == 0, err
    assert json.loads(out)["full_steps"] == 4
    gif = Image.open(tmp_path / "v.gif")
    assert (gif.format, gif.n_frames, gif.size) == ("GIF", 5, (16, 16))
    code, out, err = cli(capsys, *gen, "--out", tmp_path / "frames")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "frames").iterdir())[-1] == "frame_00004.png"
    # a name that cannot hold a video is refused before any work, and says what would work
    code, _, err = cli(capsys, *gen, "--out", tmp_path / "v.png")
    assert code == 2 and ".gif" in err and not (tmp_path / "v.png").exists()
    monkeypatch.setattr(lesa.media, "video_encoder_available", lambda: False)
    code, _, err = cli(capsys, *gen, "--out", tmp_path / "v.mp4")
    assert code == 2 and "needs a video encoder" in err and "--out NAME.gif" in err


@pytest.mark.parametrize(
    ("model", "model_class", "contexts", "call", "out"),
    [
        # Wan: CFG as two passes (cond / uncond contexts); 16x16 pixels, 5 frames -> 2x2x2 latents
        ("tiny-random-wan", "WanTransformer3DModel", ["cond", "uncond"], ["--num-frames", 5], "v.gif"),
        # SD3: CFG batched into one pass, so one context
        ("tiny-random-sd3", "SD3Transformer2DModel", ["default"], [], "x.png"),
    ],
)
def test_other_adapters_through_the_cli(tmp_path, capsys, model, model_class, contexts, call, out):
    call = ["--height", 16, "--width", 16, "--guidance-scale", 5.0, *call]
    config = record_and_train(capsys, tmp_path, model, *call)
    assert (config["model_class"], config["contexts"]) == (model_class, contexts)
    gen = ["generate", "--model", model, "--prompt", "a cat", "--predictor", tmp_path / "pred", "--steps", 10, *call]
    code, stdout, err = cli(capsys, *gen, "--out", tmp_path / out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert (result["steps"], result["full_steps"], result["cache"]) == (10, 4, "lesa")
    assert Image.open(tmp_path / out).size == (16, 16)


@pytest.mark.parametrize(
    ("model", "flag", "out"),
    [("tiny-random-flux", "--num-frames", "x.png"), ("tiny-random-wan", "--true-cfg-scale", "x.gif")],
)
def test_generate_refuses_arguments_the_pipeline_does_not_take(tmp_path, capsys, model, flag, out):
    small = ["--steps", 2, "--height", 16, "--width", 16]  # tiny, should the refusal ever fail
    code, _, err = cli(
        capsys,
        "generate",
        "--model",
        model,
        "--prompt",
        "x",
        "--cache",
        "none",
        *small,
        flag,
        3,
        "--out",
        tmp_path / out,
    )
    assert code == 2 and f"does not take {flag}" in err


def test_generate_with_cpu_offload_matches_the_plain_run(tmp_path, capsys):
    argv = ["generate", "--model", "tiny-random-flux", "--prompt", "x", "--cache", "fora", "--interval", 3]
    argv += ["--warmup", 1, "--steps", 10, "--height", 16, "--width", 16, "--device", "cpu", "--json"]
    images = []
    for extra in ([], ["--cpu-offload"]):
        out = tmp_path / f"x{len(extra)}.png"
        code, stdout, err = cli(capsys, *argv, *extra, "--out", out)
        assert code == 0, err
        assert json.loads(stdout)["full_steps"] == 4
        images.append(Image.open(out).tobytes())
    assert images[0] == images[1]
