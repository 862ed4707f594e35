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
            run("LESA N=7", "lesa", "10/50", [30.0, 32.0, 34.0], "runs/n7"),
            run("LESA N=7", "lesa", "10/50", [32.0, 32.0, 30.0], "runs/n7-seed1"),
            run("FORA N=7", "fora", "10/50", [30.0, 31.0, 33.0]),
            run("FORA N=10", "fora", "8/50", [20.0, 20.0, 20.0]),
        ],
    )
    paired.main([str(first)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # header, rule, one pairing: the 8-step FORA is not paired with a 10-step LESA
    # seed mean per prompt 31, 32, 32 -> differences +1, +1, -1: mean +0.33, s.e. 0.67; seeds +0.67, 0.00
    row = "| LESA N=7: 31.67 (32.00, 31.33) | FORA N=7 | 31.33 | +0.33 ± 0.67 (+0.67, +0.00) | 2 of 3 |"
    row += " +1.00; +0.00 from 0 |"
    assert row in lines


def test_splits_the_mean_into_jumps_and_the_rest(tmp_path, capsys):
    lesa = run("LESA N=7", "lesa", "10/50", [40.0, 30.0, 30.0, 30.0], "p0")
    fora = run("FORA N=7", "fora", "10/50", [28.0, 29.5, 30.5, 29.0])
    paired.main([str(write(tmp_path / "a.json", [lesa, fora], n=4)), "--jump", "5"])
    # differences +12, +0.5, -0.5, +1: median +0.75; the one jump carries 12 / 4 = +3.00 of the mean +3.25
    assert capsys.readouterr().out.splitlines()[-1].endswith("| 3 of 4 | +0.75; +3.00 from 1 |")


def test_variants_benched_together_get_a_row_each(tmp_path, capsys):
    runs = [
        run("LESA N=7", "lesa", "10/50", [31.0, 31.0], "runs/a-n7-s0"),
        run("LESA N=7", "lesa", "10/50", [33.0, 31.0], "runs/a-n7-s1"),
        run("LESA N=7", "lesa", "10/50", [20.0, 20.0], "runs/b-n7"),
        run("FORA N=7", "fora", "10/50", [30.0, 30.0]),
    ]
    paired.main([str(write(tmp_path / "a.json", runs, n=2))])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith(
        "| LESA N=7 [a-n7]: 31.50 (31.00, 32.00) | FORA N=7 | 30.00 | +1.50 ± 0.50 (+1.00, +2.00)"
    )
    assert lines[3].startswith("| LESA N=7 [b-n7]: 20.00 (20.00) | FORA N=7 | 30.00 | -10.00 ± 0.00")


def test_later_files_merge_a_variants_seeds_and_pair_it_with_the_first_files_lesa(tmp_path, capsys):
    shipped = run("LESA N=7", "lesa", "10/50", [30.0, 30.0], "src/predictors/n7")
    first = write(tmp_path / "a.json", [shipped, run("FORA N=7", "fora", "10/50", [29.0, 29.0])], n=2)
    b = write(tmp_path / "b.json", [run("LESA N=7", "lesa", "10/50", [31.0, 30.0], "runs/x-n7-s0")], n=2)
    c = write(tmp_path / "c.json", [run("LESA N=7", "lesa", "10/50", [33.0, 30.0], "runs/x-n7-s2")], n=2)
    paired.main([str(first), str(b), str(c)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 1 + 2  # the first file's row against FORA; the merged variant against FORA and it
    # seeds 0 and 2 of x-n7 from two runs: per prompt 32, 30 -> +1.00 over the shipped row (seeds +0.50, +1.50)
    assert lines[3].startswith("| LESA N=7 (x-n7): 31.00 (30.50, 31.50) | FORA N=7 | 29.00 | +2.00 ± 1.00")
    assert lines[4].startswith("|  | LESA N=7 | 30.00 | +1.00 ± 1.00 (+0.50, +1.50) | 1 of 2 |")


def test_later_files_variants_are_paired_with_each_other(tmp_path, capsys):
    first = write(tmp_path / "a.json", [run("FORA N=7", "fora", "10/50", [29.0, 29.0])], n=2)
    b = write(tmp_path / "b.json", [run("LESA N=7", "lesa", "10/50", [31.0, 30.0], "runs/old-n7")], n=2)
    c = write(tmp_path / "c.json", [run("LESA N=7 searched", "lesa", "10/50", [33.0, 32.0], "runs/new-n7")], n=2)
    paired.main([str(first), str(b), str(c)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 2 + 2  # each variant against FORA and against the other
    assert lines[3].startswith("|  | LESA N=7 searched (new-n7) | 32.50 | -2.00 ± 0.00 (-2.00) | 0 of 2 |")
    assert lines[5].startswith("|  | LESA N=7 (old-n7) | 30.50 | +2.00 ± 0.00 (+2.00) | 2 of 2 |")


def test_refuses_results_of_other_prompt_counts(tmp_path):
    a = write(tmp_path / "a.json", [run("FORA N=7", "fora", "10/50", [1.0, 2.0, 3.0])])
    b = write(tmp_path / "b.json", [], n=4)
    with pytest.raises(SystemExit, match="4 prompts, the first file has 3"):
        paired.main([str(a), str(b)])
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(SystemExit, match="c.json: not a `lesa bench` results.json"):
        paired.main([str(tmp_path / "c.json")])
