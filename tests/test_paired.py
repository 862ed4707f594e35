"""benchmarks/paired.py: paired per-prompt differences between LESA rows and the other methods of a `lesa bench`."""

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("paired", Path(__file__).parents[1] / "benchmarks" / "paired.py")
paired = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired)


def run(row, family, budget, psnr, seed=None):
    return {"row": row, "family": family, "budget": budget, "seed": seed, "per_prompt": {"psnr": psnr}}


def write(path, runs, n=3):
    path.write_text(json.dumps({"n_prompts": n, "runs": {f"r{i}": r for i, r in enumerate(runs)}}))
    return path


def test_pairs_the_seed_mean_against_methods_with_as_many_full_steps(tmp_path, capsys):
    first = write(
        tmp_path / "a.json",
        [
            {"row": "full compute", "family": "none", "budget": None, "seed": None, "per_prompt": {}},
            run("LESA N=7", "lesa", "10/50", [30.0, 32.0, 34.0], "p0"),
            run("LESA N=7", "lesa", "10/50", [32.0, 32.0, 30.0], "p1"),
            run("FORA N=7", "fora", "10/50", [30.0, 31.0, 33.0]),
            run("FORA N=10", "fora", "8/50", [20.0, 20.0, 20.0]),
        ],
    )
    paired.main([str(first)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # header, rule, one pairing: the 8-step FORA is not paired with a 10-step LESA
    # seed mean per prompt 31, 32, 32 -> differences +1, +1, -1: mean +0.33, s.e. 0.67; seeds +0.67, 0.00
    assert "| LESA N=7: 31.67 (32.00, 31.33) | FORA N=7 | 31.33 | +0.33 ± 0.67 (+0.67, +0.00) | 2 of 3 |" in lines


def test_refuses_results_of_other_prompt_counts(tmp_path):
    a = write(tmp_path / "a.json", [run("FORA N=7", "fora", "10/50", [1.0, 2.0, 3.0])])
    b = write(tmp_path / "b.json", [], n=4)
    with pytest.raises(SystemExit, match="4 prompts, the first file has 3"):
        paired.main([str(a), str(b)])
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(SystemExit, match="c.json: not a `lesa bench` results.json"):
        paired.main([str(tmp_path / "c.json")])
