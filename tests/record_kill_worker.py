"""Run under torchrun by test_distributed.py in place of `python -m lesa`: `record_kill_worker.py RANK:K ARGS` runs
the CLI on ARGS with rank RANK killed abruptly (no clean-up) after it wrote K shards, as a killed job would be. The
crash is monkeypatched onto the recorder's real `_run_one`, from outside the library."""

from __future__ import annotations

import os
import sys

import pytest

import lesa.record as record_module
from lesa.cli import main


def main_killed(spec: str, args: list[str]) -> int:
    target, _, count = spec.partition(":")
    with pytest.MonkeyPatch.context() as monkeypatch:
        if int(os.environ.get("RANK", "0")) == int(target):
            real = record_module._run_one
            written = []

            def run_one_then_die(*run_args, **kwargs) -> None:
                real(*run_args, **kwargs)
                written.append(1)
                if len(written) >= int(count):
                    os._exit(17)

            monkeypatch.setattr(record_module, "_run_one", run_one_then_die)
        return main(args)


if __name__ == "__main__":
    raise SystemExit(main_killed(sys.argv[1], sys.argv[2:]))
