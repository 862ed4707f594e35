"""LESA composed with diffusers' context parallelism (Ulysses, 2 ranks, gloo on CPU): each rank forecasts its own
token shard, and the result equals the single-process one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lesa


def test_lesa_forecasts_each_ranks_token_shard_under_ulysses_context_parallelism(tmp_path):
    src = str(Path(lesa.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    worker = Path(__file__).with_name("cp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    done = subprocess.run([*cmd, "rank0.json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((tmp_path / "rank0.json").read_text())
    print(r)
    # 16x16 latents -> 64 image tokens of width 32; under context parallelism each rank's tap holds its 32
    assert r["single_tap_shapes"] == [[1, 64, 32]]
    assert r["cp_tap_shapes"] == [[1, 32, 32]]
    assert (r["steps"], r["full_steps"]) == (10, len(lesa.StepSchedule(3, 2).full_steps(10)))
    assert r["lesa_vs_full"] > 1e-2  # the forecasts really replace trunk steps
    assert r["full_cp_vs_single"] < 1e-5  # context parallelism itself is exact up to float noise
    assert r["lesa_cp_vs_single"] < 1e-5  # and LESA on top of it stays so: no communication was needed
    assert r["lesa_cp_other_order_vs_single"] < 1e-5
