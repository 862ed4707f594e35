"""Bad input (issue 35): a failed call leaves the pipeline usable; bad values are refused up front; every user-facing
error is one line on stderr naming what is at fault, exit status 2, with nothing written."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import SIZE

import lesa
from lesa.cli import main
from lesa.embedded.loading import PREDICTORS_DIR, SHIPPED_DIR, load_embedded
from lesa.evaluate.bench import BenchConfig
from lesa.predictor import LESAPredictor, PredictorConfig
from lesa.record import read_prompts, record
from lesa.recording import Recording
from lesa.training import TrainConfig

needs_embedded = pytest.mark.skipif(
    not (SHIPPED_DIR / "transformer").is_dir(), reason="the embedded model's weights are not shipped in this checkout"
)


def run_cli(capsys, *argv) -> tuple[int, str]:
    """`lesa ARGV`: the exit status (argparse's refusals exit through SystemExit) and stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, command: str, *names: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"lesa {command}: error: "), err
    for name in names:
        assert name in lines[0], (name, err)


# -- class 5: broken after an error ------------------------------------------------------------------------------
def embedded_latents(pipe, steps: int = 50) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=steps, height=SIZE, width=SIZE, generator=generator, output_type="latent")
    return pipe("a red circle on a white background", **kw).images


def format_1_predictor(pipe) -> LESAPredictor:
    """A format-1 predictor of the embedded model's 50-step schedule (untrained: reuse), which refuses other step
    counts."""
    from lesa.adapters import pipeline_sigmas

    config = PredictorConfig(
        model_class="FluxTransformer2DModel",
        tap="t",
        num_steps=50,
        sigmas=pipeline_sigmas(pipe, 50).tolist(),
        feature_dim=128,
        contexts=["cond", "uncond"],
        kan_hidden=[8, 8],
        windows=[3, 3, 3],
        history=3,
        memory="full",
    )
    return LESAPredictor(config)


@pytest.fixture(scope="module")
def fresh_result():
    """Latents of a 50-step format-1 predictor on a freshly loaded embedded pipeline, and its summary."""
    pipe = load_embedded()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    predictor = format_1_predictor(pipe)
    lesa.enable(pipe, lesa.LESAConfig(predictor=predictor))
    return embedded_latents(pipe), lesa.summary(pipe), predictor


@pytest.fixture
def embedded(fresh_result):
    pipe = load_embedded()
    pipe.set_progress_bar_config(disable=True)
    lesa.enable(pipe, lesa.LESAConfig(predictor=fresh_result[2]))
    return pipe


@needs_embedded
def test_a_refused_step_count_leaves_the_pipeline_as_it_was(embedded, fresh_result):
    """A 50-step format-1 predictor refuses a 28-step call; the next valid call then runs as on a fresh pipeline,
    and the refused call left the last generation's counts alone."""
    latents, info, _ = fresh_result
    with pytest.raises(ValueError, match=r"51 values \(50 steps\).*29 values"):
        embedded_latents(embedded, steps=28)
    assert torch.equal(embedded_latents(embedded), latents)
    assert lesa.summary(embedded) == info
    with pytest.raises(ValueError, match="29 values"):
        embedded_latents(embedded, steps=28)
    assert lesa.summary(embedded) == info  # still the last generation's counts
    assert torch.equal(embedded_latents(embedded), latents)


@needs_embedded
def test_a_raise_inside_a_generation_starts_the_next_call_afresh(embedded, fresh_result):
    """An error in the unconditional pass of step 0 (after the conditional one ran) must not leave the conditional
    context one step into a generation that never finished."""
    latents, info, _ = fresh_result
    runtime = lesa.get_runtime(embedded.transformer)

    def fails(event) -> None:
        if event.context == "uncond":
            raise RuntimeError("observer failed")

    runtime.observers.append(fails)
    with pytest.raises(RuntimeError, match="observer failed"):
        embedded_latents(embedded)
    runtime.observers.remove(fails)
    assert torch.equal(embedded_latents(embedded), latents)
    assert lesa.summary(embedded) == info


# -- class 6: values refused up front -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("record", "--guidance-scale", "nan"),
        ("record", "--true-cfg-scale", "inf"),
        ("generate", "--guidance-scale", "nan"),
        ("generate", "--true-cfg-scale", "-inf"),
        ("generate", "--damping", "nan"),
        ("bench", "--guidance-scale", "nan"),
        ("train", "--set lr_gt", "nan"),
        ("train", "--set anchor", "inf"),
    ],
)
def test_non_finite_float_options_are_refused(tmp_path, capsys, command, option, value):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    args = {
        "record": ["--prompts", prompts, "--out", out],
        "generate": ["--prompt", "x", "--out", out / "x.png"],
        "bench": ["--prompts", prompts, "--out", out],
        "train": ["--data", tmp_path, "--out", out],
    }[command]
    code, err = run_cli(capsys, command, "--model", "tiny-random-flux", *args, *f"{option}={value}".split(" "))
    assert_one_line_error(code, err, command, option, value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(lr_gt=math.nan), "lr_gt must be a finite number"),
        (dict(lr_clar=0.0), "lr_clar must be > 0"),
        (dict(lr_correction=-1e-2), "lr_correction must be > 0"),
        (dict(lr_min=-1e-4), "lr_min must be >= 0"),
        (dict(lr_min=math.inf), "lr_min must be a finite number"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(epochs_gt=-1), "epochs_gt must be >= 0"),
        (dict(epochs_clar=-2), "epochs_clar must be >= 0"),
        (dict(seeds=0), "seeds must be >= 1"),
        (dict(windows=(4, 0, 8)), "windows must be >= 1"),
        (dict(thresholds=(0.9, math.nan)), "thresholds must be a finite number"),
    ],
)
def test_train_config_refuses_bad_numbers(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_recipe(**overrides)


def test_train_config_takes_a_zero_floor_and_the_cli_names_the_option(tmp_path, capsys):
    assert TrainConfig(lr_min=0.0, epochs_gt=0).lr_min == 0.0  # a cosine decay to zero is a choice, not an error
    settings = [("lr_min", "-0.0001"), ("--batch-size", "0"), ("--seeds", "0"), ("epochs_gt", "-1")]
    for option, value in settings:
        given = [f"{option}={value}"] if option.startswith("--") else ["--set", f"{option}={value}"]
        code, err = run_cli(capsys, "train", "--data", tmp_path / "none", "--out", tmp_path / "p", *given)
        assert_one_line_error(code, err, "train", f"{option} must be", value)  # the option, not the config field
    assert not (tmp_path / "p").exists()


def test_record_refuses_zero_steps_before_writing(pipe, tmp_path, capsys):
    """A manifest of a 0-step recording used to block the corrected rerun: nothing is written now."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    for option, value in [("--steps", 0), ("--height", 0), ("--num-frames", -1)]:
        code, err = run_cli(capsys, "record", "--prompts", prompts, "--out", tmp_path / "rec", option, value)
        assert_one_line_error(code, err, "record", f"{option} must be", str(value))
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        record(pipe, ["x"], tmp_path / "rec", model="tiny", steps=0, height=SIZE, width=SIZE, progress=False)
    with pytest.raises(ValueError, match="--record-dtype 'int8' is not a floating-point torch dtype"):
        record(pipe, ["x"], tmp_path / "rec", model="tiny", steps=2, dtype="int8", progress=False)
    assert not (tmp_path / "rec").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--limit", "0", "--limit must be >= 1, got 0"),
        ("--limit", "-3", "--limit must be >= 1, got -3"),
        ("--repeats", "0", "--repeats must be at least 1, got 0"),
        ("--fit-count", "0", "--fit-count must be >= 1, got 0"),
        ("--intervals", "7,0", "--intervals must be >= 1, got 0"),
        ("--warmup", "-1", "--warmup must be >= 0, got -1"),
    ],
)
def test_bench_refuses_empty_or_negative_counts(tmp_path, capsys, option, value, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    code, err = run_cli(capsys, "bench", "--prompts", prompts, "--out", tmp_path / "b", f"{option}={value}")
    assert_one_line_error(code, err, "bench", message)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="limit must be >= 1"):
        BenchConfig(prompts=str(prompts), out=str(tmp_path / "b"), limit=0)


def required_fields() -> list[str]:
    return sorted({f.name for f in fields(PredictorConfig)} - {"base_model", "format_version"})


def test_predictor_config_requires_every_field_that_changes_the_forecast(tmp_path, capsys):
    """A config.json without e.g. `interval` would silently load an N = 10 predictor as N = 7."""
    from conftest import tiny_predictor

    from lesa.predictor import ScheduleFreeConfig

    shipped = PREDICTORS_DIR / "schedule-free" / "config.json"
    ScheduleFreeConfig.from_dict(json.loads(shipped.read_text()), source=str(shipped))
    n10 = tmp_path / "n10"
    tiny_predictor(interval=10, feature_dim=32).save_pretrained(n10)
    data = json.loads((n10 / "config.json").read_text())
    for name in ["interval", "warmup", "gain_bias", "memory", "windows", "correction", "dtype", *required_fields()]:
        partial = {k: v for k, v in data.items() if k != name}
        with pytest.raises(ValueError, match=rf"n10/config.json: missing required field\(s\) \['{name}'\]"):
            PredictorConfig.from_dict(partial, source="n10/config.json")
    with pytest.raises(ValueError, match="n10/config.json: .*interval must be >= 1"):
        PredictorConfig.from_dict({**data, "interval": 0}, source="n10/config.json")
    # through the CLI: one line naming the file and the field, no image written
    broken = tmp_path / "pred"
    shutil.copytree(n10, broken)
    (broken / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k != "gain_bias"}))
    out = tmp_path / "x.png"
    code, err = run_cli(
        capsys, "generate", "--model", "tiny-random-flux", "--prompt", "x", "--predictor", broken, "--out", out
    )
    assert_one_line_error(code, err, "generate", str(broken / "config.json"), "gain_bias")
    assert not out.exists()
    (broken / "config.json").write_text(json.dumps({**data, "windows": "abc"}))
    with pytest.raises(ValueError, match="pred/config.json"):
        LESAPredictor.from_pretrained(broken)


# -- class 7: one line instead of a traceback ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--device", "cuda", "--device cuda: no cuda device is available on this machine"),
        ("--device", "gpu", "--device 'gpu' is not a torch device"),
        ("--device", "cpu:x", "--device 'cpu:x' is not a torch device"),
        ("--dtype", "int8", "--dtype 'int8' is not a floating-point torch dtype"),
        ("--dtype", "cuda", "--dtype 'cuda' is not a floating-point torch dtype"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "record", "bench"])
def test_unavailable_device_and_non_float_dtype_are_one_line(tmp_path, capsys, command, option, value, message):
    if value == "cuda" and option == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    args = {
        "generate": ["--prompt", "x", "--cache", "none", "--out", out / "x.png"],
        "record": ["--prompts", prompts, "--out", out],
        "bench": ["--prompts", prompts, "--out", out],
    }[command]
    code, err = run_cli(capsys, command, "--model", "tiny-random-flux", *args, option, value)
    assert_one_line_error(code, err, command, message)
    assert not out.exists()


def write_manifest(directory: Path, **fields_) -> Path:
    """A recording manifest with one listed trajectory and the given top-level fields replacing the defaults."""
    manifest = {
        "format_version": 1,
        "settings": {"model": "tiny-random-flux", "model_class": "FluxTransformer2DModel", "steps": 2},
        "prompts": ["x"],
        "entries": [{"index": 0, "prompt": "x", "seed": 0, "file": "shards/000000.safetensors", "bytes": 1}],
        "sigmas": [1.0, 0.5, 0.0],
        "contexts": ["cond"],
        "shapes": {"cond.feature": [2, 4, 6]},
    }
    manifest.update(fields_)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    return directory / "manifest.json"


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (dict(sigmas=None), "field 'sigmas' is missing"),
        (dict(contexts=None), "field 'contexts' is missing"),
        (dict(shapes=None), "field 'shapes' is missing"),
        (dict(shapes={"uncond.feature": [2, 4, 6]}), "'shapes' lacks the feature shape"),
        (dict(sigmas="1,0"), "field 'sigmas' is not a JSON list"),
        (dict(settings={"model": "m", "steps": 2}), "field 'settings.model_class' is missing"),
        (dict(format_version="1"), "field 'format_version' is not a JSON int"),
    ],
)
def test_a_manifest_lacking_what_training_reads_is_one_line(tmp_path, capsys, broken, message):
    path = write_manifest(tmp_path / "rec", **broken)
    with pytest.raises(ValueError, match=message):
        Recording(path.parent)
    code, err = run_cli(capsys, "train", "--data", path.parent, "--out", tmp_path / "pred")
    assert_one_line_error(code, err, "train", str(path), message)
    assert not (tmp_path / "pred").exists()


def test_a_manifest_that_is_not_utf8_or_not_an_object_is_one_line(tmp_path, capsys):
    path = write_manifest(tmp_path / "rec")
    path.write_bytes(b"\xff\xfe{}")
    code, err = run_cli(capsys, "train", "--data", path.parent, "--out", tmp_path / "pred")
    assert_one_line_error(code, err, "train", str(path), "corrupted")
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="a JSON object expected, got list"):
        Recording(path.parent)


@pytest.mark.parametrize("command", ["record", "bench"])
def test_a_prompt_file_that_is_not_utf8_names_the_file(tmp_path, capsys, command):
    prompts = tmp_path / "latin1.txt"
    prompts.write_bytes("une cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8 text"):
        read_prompts(prompts)
    out = tmp_path / "out"
    code, err = run_cli(capsys, command, "--model", "tiny-random-flux", "--prompts", prompts, "--out", out)
    assert_one_line_error(code, err, command, str(prompts), "not UTF-8")
    assert not out.exists()


def test_malformed_integer_lists_are_one_line(tmp_path, capsys):
    code, err = run_cli(capsys, "train", "--data", tmp_path, "--out", tmp_path / "p", "--set", "windows=4,a,8")
    assert_one_line_error(code, err, "train", "--set windows", "'a'")
    code, err = run_cli(capsys, "bench", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "b", "--intervals", "x")
    assert_one_line_error(code, err, "bench", "--intervals expects comma-separated integers")
    assert "----" not in err
