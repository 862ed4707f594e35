"""What every benchmark script needs: a command line (its docstring as help, the options they share, torch's CPU
threads), `lesa train`'s closed-loop scorer on a recording, comma-separated option values, and Markdown table rows.

The scripts run as `python benchmarks/NAME.py`, so `from harness import ...` finds this file; the tests that load a
script from its path find it through pytest's `pythonpath`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lesa.recording import Recording
from lesa.training import Scorer


def make_parser(doc: str, data: str | None = None, val_fraction: bool = False) -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring `doc`, line breaks kept; with `data`, a required --data (the
    recording, `data` its help); with `val_fraction`, --val-fraction (`lesa train`'s held-out share, default 0.2)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if data is not None:
        parser.add_argument("--data", required=True, help=data)
    if val_fraction:
        parser.add_argument("--val-fraction", type=float, default=0.2, help="as given to `lesa train`")
    return parser


def parse(
    parser: argparse.ArgumentParser, threads: int | None = None, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """The parsed command line (`argv`, default sys.argv); with `threads`, after the script's own options a --threads
    (`threads` its default), which sets torch's CPU threads before anything runs."""
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads)
    args = parser.parse_args(argv)
    if threads is not None:
        torch.set_num_threads(args.threads)
    return args


def held_out_scorer(data: str, val_fraction: float = 0.2) -> Scorer:
    """`lesa train`'s closed-loop scorer on the held-out split of the `lesa record` directory `data`, with the
    recording's model on the CPU (the recording: `.data.rec`, the split: `.data.train_idx` / `.data.val_idx`)."""
    return Scorer.for_recording(Recording(data), val_fraction)


def comma_list(text: str, kind: Callable[[str], Any] = str) -> list:
    """The values of a comma-separated option, each passed through `kind`, empty ones skipped: ("7,10", int) ->
    [7, 10]."""
    return [kind(item.strip()) for item in text.split(",") if item.strip()]


def table_row(*cells: object) -> None:
    """Print one row of a Markdown table."""
    print("| " + " | ".join(str(cell) for cell in cells) + " |")


def table_head(*columns: str) -> None:
    """Print a Markdown table's head: the column names, then the rule under them."""
    table_row(*columns)
    print("|" + "---|" * len(columns))
