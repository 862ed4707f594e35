"""benchmarks/schedule_free.py: issue 32's acceptance table from `lesa bench --speedups` results, LESA rows from a
LESA-only bench, and halves of one prompt set pooled per prompt."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "schedule_free_table", Path(__file__).parents[1] / "benchmarks" / "schedule_free.py"
)
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)


def run(row, family, psnr, seed=None, budget="8/20 planned"):
    return {"row": row, "family": family, "budget": budget, "seed": seed, "per_prompt": {"psnr": psnr}}


def write(path, runs, seed=0, prompts="eval.txt"):
    config = {"steps": 20, "speedups": [2.5], "prompts": prompts, "seed": seed, "limit": None}
    path.write_text(json.dumps({"config": config, "runs": {f"r{i}": r for i, r in enumerate(runs)}}))
    return str(path)


def rows(capsys):
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 20 |")]


def main(*args):
    argv, sys.argv = sys.argv, ["schedule_free.py", *map(str, args)]
    threads = torch.get_num_threads()  # the script sets its own
    try:
        table.main()
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)


def test_halves_of_one_prompt_set_pool_per_prompt(tmp_path, capsys):
    first = write(
        tmp_path / "a.json",
        [run("LESA", "lesa", [31.0, 33.0], "s0"), run("FORA x2.5 planned", "fora", [30.0, 30.0])],
    )
    second = write(
        tmp_path / "b.json",
        [run("LESA", "lesa", [30.0, 32.0], "s0"), run("FORA x2.5 planned", "fora", [31.0, 31.0])],
        seed=100,
    )
    main(first, second)
    # four prompts: differences +1, +3, -1, +1 -> +1.00 ± 0.82, three of four ahead
    (row,) = rows(capsys)
    assert "| FORA x2.5 planned | 30.50 | +1.00 ± 0.82 (+1.00) | 3 of 4 | met |" in row


def test_the_same_prompts_and_seeds_twice_are_refused(tmp_path):
    runs = [run("LESA", "lesa", [31.0], "s0"), run("FORA", "fora", [30.0])]
    a, b = write(tmp_path / "a.json", runs), write(tmp_path / "b.json", runs)
    with pytest.raises(SystemExit, match="same prompts and seeds"):
        main(a, b)
    with pytest.raises(SystemExit, match="given twice"):
        main(a, a)


def test_halves_with_other_rows_are_refused(tmp_path):
    a = write(tmp_path / "a.json", [run("LESA", "lesa", [31.0], "s0"), run("FORA", "fora", [30.0])])
    b = write(tmp_path / "b.json", [run("LESA", "lesa", [31.0], "s1"), run("FORA", "fora", [30.0])], seed=100)
    with pytest.raises(SystemExit, match="lesa rows"):
        main(a, b)


def test_lesa_only_rows_replace_the_full_benchs_of_the_same_prompts_and_seeds(tmp_path, capsys):
    full = write(tmp_path / "a.json", [run("LESA", "lesa", [10.0, 10.0], "old"), run("FORA", "fora", [30.0, 30.0])])
    second = write(tmp_path / "b.json", [run("LESA", "lesa", [10.0], "new"), run("FORA", "fora", [30.0])], seed=100)
    lesa = write(tmp_path / "l.json", [run("LESA", "lesa", [32.0, 31.0], "new")])
    main(full, second, "--lesa", lesa)
    # the first half's LESA rows from l.json (+2, +1), the second half's own (-20)
    (row,) = rows(capsys)
    assert "| FORA | 30.00 | -5.67 ±" in row and "| 2 of 3 |" in row
    other_seed = write(tmp_path / "m.json", [run("LESA", "lesa", [32.0, 31.0], "new")], seed=7)
    with pytest.raises(SystemExit, match="config 'seed' is 7"):
        main(full, "--lesa", other_seed)
