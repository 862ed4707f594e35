"""Multi-process record and train (torchrun, gloo on CPU), the streaming shard writer and resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SIZE, kill_at_score
from safetensors import safe_open
from safetensors.torch import load_file

import lesa
import lesa.record as record_module
from lesa.record import ShardWriter, record
from lesa.recording import Recording
from lesa.training import TrainConfig, Trainer, weights_digest

QUIET = dict(progress=False, log=lambda *_: None)
STEPS = 10
PROMPTS = [f"a distributed prompt {i}" for i in range(6)]
# the CLI flags and the TrainConfig of the same training run
TRAIN_FLAGS = (
    "--recipe paper --set epochs_gt=2 --set epochs_clar=1 --batch-size 3 --set val_fraction=0.25 --set kan_hidden=8,8 "
    "--interval 3 "
    "--warmup 2"
)
TRAIN_CONFIG = dict(
    epochs_gt=2, epochs_clar=1, batch_size=3, val_fraction=0.25, kan_hidden=(8, 8), interval=3, warmup=2
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread here too, as each torchrun rank has (the machine's cores are shared with the ranks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def torchrun(args: list[str], tmp_path: Path, kill_after: str | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m lesa ARGS` on CPU (gloo), one thread per rank; with `kill_after`
    "RANK:K", rank RANK dies abruptly after it wrote K shards (record_kill_worker.py runs the CLI then)."""
    src = str(Path(lesa.__file__).resolve().parents[1])
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    entry = [str(Path(__file__).with_name("record_kill_worker.py")), kill_after] if kill_after else ["-m", "lesa"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120)


def test_shard_writer_writes_a_valid_file_piece_by_piece_and_refuses_gaps(tmp_path):
    layout = {
        "a.feature": (torch.bfloat16, (3, 4, 2)),
        "noise": (torch.float32, (4, 2)),
        "sigmas": (torch.float32, (4,)),
    }
    torch.manual_seed(0)
    rows = torch.randn(3, 4, 2).to(torch.bfloat16)
    noise, sigmas = torch.randn(4, 2), torch.linspace(1, 0, 4)
    path = tmp_path / "x.safetensors"
    path.touch()
    writer = ShardWriter(path, layout, {"prompt": "p"})
    for i in (2, 0, 1):  # any order: each piece goes to its own offset
        writer.write("a.feature", rows[i], row=i)
    writer.write("sigmas", sigmas)
    writer.write("noise", noise)
    writer.close()
    loaded = load_file(path)
    assert torch.equal(loaded["a.feature"], rows) and torch.equal(loaded["noise"], noise)
    assert torch.equal(loaded["sigmas"], sigmas)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"prompt": "p"}

    (tmp_path / "y.safetensors").touch()
    gap = ShardWriter(tmp_path / "y.safetensors", layout, {})
    gap.write("a.feature", rows[0], row=0)
    gap.write("noise", noise)
    gap.write("sigmas", sigmas)
    with pytest.raises(RuntimeError, match=r"'a.feature' of the shard is missing row\(s\) \[1, 2\]"):
        gap.close()
    with pytest.raises(
        ValueError, match=r"'noise' is torch.float16 \(4, 2\), the shard's layout expects torch.float32"
    ):
        ShardWriter(tmp_path / "y.safetensors", layout, {}).write("noise", noise.half())


def test_record_streams_each_step_to_disk(pipe, tmp_path, monkeypatch):
    """While a prompt is being recorded, its steps are already in the (temporary) file, not held in RAM."""
    seen = []
    real = record_module._StreamingRecorder.__call__

    def spy(self, event):
        real(self, event)
        if event.step == 5:  # the temporary file already holds step 5's feature
            dtype, shape = self.writer.layout["cond.feature"]
            self.writer.file.flush()
            seen.append(Path(self.writer.file.name).read_bytes())
            seen.append((event.tap.detach()[0].to(dtype), self.writer.data_start + self.writer.offsets["cond.feature"]))

    monkeypatch.setattr(record_module._StreamingRecorder, "__call__", spy)
    record(pipe, PROMPTS[:1], tmp_path, model="tiny", steps=STEPS, height=SIZE, width=SIZE, dtype="float32", **QUIET)
    data, (tap, start) = seen
    n = tap.numel() * 4
    on_disk = torch.frombuffer(bytearray(data[start + 5 * n : start + 6 * n]), dtype=torch.float32)
    assert torch.equal(on_disk.view_as(tap), tap)
    assert torch.equal(Recording(tmp_path).load(0)["cond.feature"][5], tap)


def test_record_adopts_finished_shards_a_killed_run_left_unlisted(pipe, tmp_path):
    kw = dict(model="tiny", steps=STEPS, height=SIZE, width=SIZE, dtype="float32", **QUIET)
    record(pipe, PROMPTS[:4], tmp_path, **kw)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["entries"] = manifest["entries"][:2]  # shards 2 and 3 on disk, not yet listed (rank died)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "shards" / ".000004.safetensors.abc.tmp").write_bytes(b"half")  # a shard being written
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.safetensors")}
    messages = []
    result = record(pipe, PROMPTS[:4], tmp_path, **{**kw, "log": messages.append})
    assert (result.recorded, result.skipped) == (0, 4)
    assert any("2 finished shard(s) found on disk" in m for m in messages)
    assert [e["index"] for e in Recording(tmp_path).entries] == [0, 1, 2, 3]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.safetensors")}
    assert not list((tmp_path / "shards").glob(".*.tmp"))
    # a shard of another recording under a shard's name is refused, not silently adopted
    manifest["entries"] = manifest["entries"][:1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "shards" / "000001.safetensors").rename(tmp_path / "shards" / "000003.safetensors")
    with pytest.raises(ValueError, match="000003.safetensors belongs to another recording"):
        record(pipe, PROMPTS[:4], tmp_path, **kw)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, pipe) -> dict:
    """A 2-rank `lesa record` killed after rank 1's first shard and run again, then a 2-rank `lesa train`."""
    work = tmp_path_factory.mktemp("two-ranks")
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    rec_args = ["record", "--model", "tiny-random-flux", "--prompts", "prompts.txt", "--out", "rec"]
    rec_args += ["--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE), "--record-dtype", "float32"]
    shards = work / "rec" / "shards"
    run: dict = {"dir": work, "times": {}}
    t = time.perf_counter()
    # rank 1 dies abruptly after its first shard; torchrun then stops rank 0 wherever it is
    run["killed"] = torchrun(rec_args, work, kill_after="1:1")
    run["left"] = {p.name: p.read_bytes() for p in shards.glob("*.safetensors")}
    run["stamp"] = (shards / "000001.safetensors").stat().st_mtime_ns if (shards / "000001.safetensors").exists() else 0
    run["times"]["killed record"] = time.perf_counter() - t
    t = time.perf_counter()
    run["resumed"] = torchrun(rec_args, work)  # the same command again
    run["times"]["resumed record"] = time.perf_counter() - t
    t = time.perf_counter()
    run["trained"] = torchrun(["train", "--data", "rec", "--out", "pred", *TRAIN_FLAGS.split()], work)
    run["times"]["2-rank train"] = time.perf_counter() - t
    return run


@pytest.fixture(scope="module")
def one_process_run(two_rank_run, pipe) -> tuple[lesa.LESAPredictor, dict]:
    """The same training in this process, on the same recording."""
    work = two_rank_run["dir"]
    t = time.perf_counter()
    predictor = Trainer(Recording(work / "rec"), pipe, work / "pred1", TrainConfig(**TRAIN_CONFIG), **QUIET).run()
    two_rank_run["times"]["1-process train"] = time.perf_counter() - t
    return predictor, json.loads((work / "pred1" / "training_log.json").read_text())


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return max((x - y).abs().max().item() for x, y in pairs)


# Gradients are summed over ranks with each rank's loss normalised by the whole minibatch, so every update equals the
# single-process one up to float summation order (~1e-7 relative), which Adam's normalised steps can amplify where
# second moments are tiny. 1e-5 leaves room for that and is 100x below one step at lr 1e-3, so a missing or
# unsynchronised update, or a rank training on the wrong share, fails.
TOLERANCE = 1e-5


def test_two_ranks_record_and_resume_after_a_kill_without_losing_or_duplicating(two_rank_run, pipe, tmp_path):
    assert two_rank_run["killed"].returncode != 0, two_rank_run["killed"].stderr[-2000:]
    left = two_rank_run["left"]
    assert "000001.safetensors" in left and len(left) < len(PROMPTS), sorted(left)
    resumed = two_rank_run["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"recorded {len(PROMPTS) - len(left)} prompt(s) ({len(left)} already done)" in resumed.stdout
    work = two_rank_run["dir"]
    shards = work / "rec" / "shards"
    manifest = json.loads((work / "rec" / "manifest.json").read_text())
    assert [e["index"] for e in manifest["entries"]] == list(range(len(PROMPTS)))  # each prompt exactly once
    assert sorted(p.name for p in shards.iterdir()) == [f"{i:06d}.safetensors" for i in range(len(PROMPTS))]
    for name, data in left.items():  # whatever was under a shard's name was complete, and was kept
        load_file(shards / name)
        assert (shards / name).read_bytes() == data
    assert (shards / "000001.safetensors").stat().st_mtime_ns == two_rank_run["stamp"]  # not recorded twice
    rec = Recording(work / "rec")
    for i in range(len(PROMPTS)):
        rec.load(i)  # size, tensors, shapes and values checked
    # the shards are byte for byte those of a single-process recording (prompt i always uses seed + i)
    kw = dict(model="tiny-random-flux", steps=STEPS, height=SIZE, width=SIZE, dtype="float32", **QUIET)
    record(pipe, PROMPTS[:2], tmp_path, **kw)
    for name in ("000000.safetensors", "000001.safetensors"):
        assert (shards / name).read_bytes() == (tmp_path / "shards" / name).read_bytes(), name


def test_two_ranks_train_both_phases_like_one_process(two_rank_run, one_process_run):
    """4 training trajectories in minibatches of 3: rank shares of 2+1, then 1+0 (an empty share)."""
    trained = two_rank_run["trained"]
    assert trained.returncode == 0, trained.stderr[-3000:]
    work = two_rank_run["dir"]
    log = json.loads((work / "pred" / "training_log.json").read_text())
    assert log["world_size"] == 2
    digests = log["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks ended with bit-identical weights
    two = lesa.LESAPredictor.from_pretrained(work / "pred")
    assert weights_digest(two) == digests[0]
    one, log1 = one_process_run
    diff = max_abs_diff(one, two)
    times = ", ".join(f"{k} {v:.1f} s" for k, v in two_rank_run["times"].items())
    print(f"2-rank vs 1-process max abs weight difference {diff:.2e}; {times}")
    assert diff < TOLERANCE
    assert log["seeds"]["0"]["best_at"] == log1["seeds"]["0"]["best_at"]
    for a, b in zip(log["seeds"]["0"]["log"], log1["seeds"]["0"]["log"], strict=True):
        assert (a["phase"], a["epoch"]) == (b["phase"], b["epoch"])
        assert a.get("train_loss", 0) == pytest.approx(b.get("train_loss", 0), rel=1e-5)
        assert a["val"]["mse"] == pytest.approx(b["val"]["mse"], rel=1e-4)


def test_two_ranks_train_the_default_recipe_in_step(two_rank_run):
    """The default recipe starts with the closed loop (no DDP phase whose construction would sync the replicas):
    the ranks must start from, and keep, bit-identical weights."""
    flags = "--set epochs_clar=1 --batch-size 3 --set val_fraction=0.25 --set kan_hidden=8,8 --interval 3 --warmup 2"
    trained = torchrun(["train", "--data", "rec", "--out", "pred-default", *flags.split()], two_rank_run["dir"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    log = json.loads((two_rank_run["dir"] / "pred-default" / "training_log.json").read_text())
    assert log["config"]["memory"] == "full" and log["config"]["phases"] == ["clar"]
    assert len(set(log["replica_digests"])) == 1


def test_two_ranks_resume_a_checkpoint_cut_in_one_process(two_rank_run, one_process_run, pipe, tmp_path, monkeypatch):
    """A run killed after phase gt (one process) is finished by 2 ranks: rank 0 reads the checkpoint, both resume."""
    work = two_rank_run["dir"]
    kill_at_score(monkeypatch, 4)  # init, gt 1, gt 2 scored; dies scoring clar 1
    with pytest.raises(KeyboardInterrupt):
        Trainer(Recording(work / "rec"), pipe, tmp_path / "cut", TrainConfig(**TRAIN_CONFIG), **QUIET).run()
    monkeypatch.undo()
    args = ["train", "--data", str(work / "rec"), "--out", "cut", *TRAIN_FLAGS.split()]
    resumed = torchrun(args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "after gt epoch 2" in resumed.stdout
    log = json.loads((tmp_path / "cut" / "training_log.json").read_text())["seeds"]["0"]["log"]
    assert [(e["phase"], e["epoch"]) for e in log] == [("init", 0), ("gt", 1), ("gt", 2), ("clar", 1)]
    diff = max_abs_diff(one_process_run[0], lesa.LESAPredictor.from_pretrained(tmp_path / "cut"))
    print(f"resumed on 2 ranks vs 1-process max abs weight difference {diff:.2e}")
    assert diff < TOLERANCE


def test_two_ranks_train_a_schedule_free_predictor_like_one_process(two_rank_run, pipe):
    """The schedule-free trainer under torchrun: each rank rolls out its share of every minibatch (cells and
    placement powers drawn alike on every rank), gradients summed before each update, the replicas checked after
    every epoch; the result equals one process's up to float summation order."""
    from lesa.training import ScheduleFreeTrainer

    work = two_rank_run["dir"]
    settings = dict(epochs_clar=1, batch_size=3, val_fraction=0.25, min_full_steps=3, speedups=(2.5, 3.0))
    flags = [f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in settings.items()]
    trained = torchrun(["train", "--recipe", "schedule-free", "--data", "rec", "--out", "pred-sf", *flags], work)
    assert trained.returncode == 0, trained.stderr[-3000:]
    log = json.loads((work / "pred-sf" / "training_log.json").read_text())
    assert log["world_size"] == 2 and log["format"] == 2
    config = TrainConfig.from_recipe("schedule-free", **settings)
    ScheduleFreeTrainer([Recording(work / "rec")], pipe, work / "pred-sf1", config, **QUIET).run()
    two, one = (lesa.load_predictor(work / name) for name in ("pred-sf", "pred-sf1"))
    diff = max_abs_diff(one, two)
    print(f"schedule-free, 2-rank vs 1-process max abs weight difference {diff:.2e}")
    assert diff < TOLERANCE
    log1 = json.loads((work / "pred-sf1" / "training_log.json").read_text())
    a, b = log["seeds"]["0"]["log"], log1["seeds"]["0"]["log"]
    assert [e["mean_psnr"] for e in a] == pytest.approx([e["mean_psnr"] for e in b], abs=1e-3)
