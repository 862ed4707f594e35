"""Files lesa reads back are never trusted blindly: checkpoints are not unpickled, resumed work matches its data,
damaged shards are named, and artefacts are never half-written or written over somebody else's files."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, SIZE, tiny_predictor
from safetensors import safe_open

from lesa.checkpoint import load_checkpoint, save_checkpoint
from lesa.cli import main
from lesa.io import save_safetensors
from lesa.predictor import LESAPredictor
from lesa.record import record
from lesa.recording import Recording
from lesa.training import TrainConfig, Trainer

QUIET = dict(progress=False, log=lambda *_: None)
QUICK = TrainConfig(phases=("gt",), epochs_gt=1, batch_size=3, kan_hidden=(8, 8), val_fraction=0.25)


class _Payload:
    """Unpickling this creates `marker`: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"fingerprint": _Payload(marker)}))


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_line_error(capsys, *argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    return err


# -- 1. nothing runs from a file ------------------------------------------------------------------------------------
def test_checkpoints_round_trip_without_pickle(tmp_path):
    """Tensors, optimizer-style int keys, tuples and non-finite floats come back with their types; a value a
    checkpoint cannot hold is refused when saving."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
    optimizer.step()
    tree = {
        "optimizer": optimizer.state_dict(),
        "view": torch.arange(6.0).view(2, 3)[1],
        "log": [{"val": {"psnr": math.inf}, "phase": "gt"}, None, True],
        "pair": (1, "a"),
        "__tensor__": 5,  # a key that looks like the format's own tags
    }
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, tree)
    back = load_checkpoint(path)
    assert back["pair"] == (1, "a") and back["__tensor__"] == 5 and back["log"][0]["val"]["psnr"] == math.inf
    assert torch.equal(back["view"], torch.tensor([3.0, 4.0, 5.0]))
    state = back["optimizer"]["state"]
    assert list(state) == [0] and torch.equal(state[0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    with pytest.raises(TypeError, match=r"checkpoint value checkpoint.bad is a PosixPath"):
        save_checkpoint(tmp_path / "d.safetensors", {"bad": Path("x")})
    assert not (tmp_path / "d.safetensors").exists()


def test_the_same_contents_save_to_the_same_bytes(tmp_path):
    """safetensors orders its header by a hash map; lesa's files come out byte-identical for the same contents (a
    shipped predictor saved again is no change for git), and still load as safetensors."""
    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(5, dtype=torch.float16)}
    meta = {f"key{i}": str(i) for i in range(8)}
    save_safetensors(tensors, tmp_path / "one.safetensors", meta)
    save_safetensors(dict(reversed(tensors.items())), tmp_path / "two.safetensors", dict(reversed(meta.items())))
    one = (tmp_path / "one.safetensors").read_bytes()
    assert one == (tmp_path / "two.safetensors").read_bytes()
    size = int.from_bytes(one[:8], "little")
    assert size % 8 == 0 and list(json.loads(one[8 : 8 + size])["__metadata__"]) == sorted(meta)
    with safe_open(tmp_path / "one.safetensors", "pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("b"), tensors["b"])
    tree = {"log": [{"psnr": 1.0}], "w": torch.randn(3)}
    save_checkpoint(tmp_path / "c1.safetensors", tree)
    save_checkpoint(tmp_path / "c2.safetensors", tree)
    assert (tmp_path / "c1.safetensors").read_bytes() == (tmp_path / "c2.safetensors").read_bytes()
    predictor = tiny_predictor(seed=1)
    predictor.save_pretrained(tmp_path / "p1")
    predictor.save_pretrained(tmp_path / "p2")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()


def test_a_planted_pickle_never_runs(pipe, recording, tmp_path):
    """A pickle where `lesa train` keeps (or kept) its checkpoints is refused, and its payload does not run."""
    marker = tmp_path / "payload-ran"
    out = tmp_path / "out"
    plant_pickle(out / "checkpoints" / "seed0.pt", marker)  # where earlier versions wrote checkpoints
    with pytest.raises(ValueError, match=r"seed0.pt is a pickled checkpoint of an earlier lesa, which this version"):
        Trainer(recording, pipe, out, QUICK, **QUIET).train_seed(0)
    (out / "checkpoints" / "seed0.pt").unlink()
    plant_pickle(out / "checkpoints" / "seed0.safetensors", marker)  # where they are now
    with pytest.raises(ValueError, match=r"seed0.safetensors is not a readable lesa checkpoint"):
        Trainer(recording, pipe, out, QUICK, **QUIET).train_seed(0)
    assert not marker.exists()


def test_the_embedded_model_trainer_never_unpickles(tmp_path):
    from lesa.embedded import train_model

    marker = tmp_path / "payload-ran"
    args = ["--out", str(tmp_path / "run"), "--ship", str(tmp_path / "model"), "--steps", "1", "--batch", "2"]
    plant_pickle(tmp_path / "run" / "checkpoint.pt", marker)
    with pytest.raises(ValueError, match="checkpoint.pt is a pickled checkpoint"):
        train_model.main(args)
    (tmp_path / "run" / "checkpoint.pt").unlink()
    plant_pickle(tmp_path / "run" / "checkpoint.safetensors", marker)
    with pytest.raises(ValueError, match="checkpoint.safetensors is not a readable lesa checkpoint"):
        train_model.main(args)
    assert not marker.exists() and not (tmp_path / "model").exists()


# -- 2. nothing stale is trusted --------------------------------------------------------------------------------------
def test_a_checkpoint_of_other_data_is_not_resumed(pipe, recording, tmp_path):
    """Same --out, same settings, other recording (here: one trajectory fewer): the checkpoint is refused."""
    out = tmp_path / "out"
    assert Trainer(recording, pipe, out, QUICK, **QUIET).train_seed(0)["done"]
    messages = []
    assert Trainer(recording, pipe, out, QUICK, log=messages.append, progress=False).train_seed(0)["done"]
    assert not messages  # the same data: the finished checkpoint is taken as it is
    other = tmp_path / "other"
    shutil.copytree(recording.dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["entries"] = manifest["entries"][:-1]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"made with other settings \(data: the --data recording's content differs\)"):
        Trainer(Recording(other), pipe, out, QUICK, **QUIET).train_seed(0)


def record_small(pipe, out: Path, messages: list[str]):
    return record(
        pipe, PROMPTS[:3], out, model="tiny", steps=4, height=SIZE, width=SIZE, dtype="float32", progress=False,
        log=messages.append,
    )  # fmt: skip


def flip_low_bytes(shard: Path, tensor: str, count: int = 200) -> None:
    """Flip the lowest mantissa bit of `count` float32 values of `tensor`: same size, every value still finite."""
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = json.loads(data[8 : 8 + header_len])[tensor]["data_offsets"][0] + 8 + header_len
    for k in range(count):
        data[start + 4 * k] ^= 1
    shard.write_bytes(bytes(data))


def test_resumed_recording_verifies_the_shards_it_skips(pipe, tmp_path):
    out, messages = tmp_path / "rec", []
    record_small(pipe, out, messages)
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    entries = json.loads((out / "manifest.json").read_text())["entries"]
    assert all(len(e["sha256"]) == 64 for e in entries)
    shards = sorted((out / "shards").iterdir())
    shards[0].write_bytes(shards[0].read_bytes()[:-64])  # truncated
    shards[1].unlink()  # deleted
    flip_low_bytes(shards[2], "cond.output")  # damaged in place
    messages.clear()
    result = record_small(pipe, out, messages)
    assert (result.recorded, result.skipped) == (3, 0)
    assert sum("recording prompt" in m for m in messages) == 3, messages
    # recorded again, byte for byte what the first run wrote
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before
    assert json.loads((out / "manifest.json").read_text())["entries"] == entries
    assert record_small(pipe, out, []).skipped == 3


# -- 3. silent corruption -------------------------------------------------------------------------------------------
def test_damaged_shard_content_is_named(pipe, recording, tmp_path):
    copy = tmp_path / "rec"
    shutil.copytree(recording.dir, copy)
    shard = copy / "shards" / "000002.safetensors"
    flip_low_bytes(shard, "cond.output")
    rec = Recording(copy)
    with pytest.raises(ValueError, match=r"000002.safetensors is corrupted: its content differs .*SHA-256"):
        rec.load(2)
    assert rec.load(1)["cond.output"].shape  # the others still load
    with pytest.raises(ValueError, match=r"000002.safetensors is corrupted"):
        Trainer(Recording(copy), pipe, tmp_path / "out", QUICK, **QUIET).run()
    assert not (tmp_path / "out" / "config.json").exists()


# -- 4. half-written or clobbered outputs -----------------------------------------------------------------------------
def test_an_interrupted_save_is_not_taken_for_a_whole_one(tmp_path, monkeypatch):
    """A save that dies after the weights, before config.json: the old config no longer loads with the new weights."""
    import lesa.predictor.artefact as model_module

    old, new = tiny_predictor(seed=1), tiny_predictor(seed=2)
    old.save_pretrained(tmp_path)
    real = model_module.atomic_write_text

    def dies_at_config(path, text):
        if Path(path).name == "config.json":
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(model_module, "atomic_write_text", dies_at_config)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path, card="# LESA predictor\n")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="model.safetensors does not match .*config.json: its SHA-256 differs"):
        LESAPredictor.from_pretrained(tmp_path)
    new.save_pretrained(tmp_path)  # saving again repairs it
    loaded = LESAPredictor.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in new.state_dict().items())


def test_no_predictor_is_written_over_somebody_elses_files(capsys, recording, tmp_path):
    theirs = tmp_path / "project"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"my": "settings"}\n')
    (theirs / "README.md").write_text("# my project\n")
    before = files_of(theirs)
    err = one_line_error(capsys, "train", "--data", recording.dir, "--out", theirs)
    assert "config.json is not a lesa predictor's config" in err and files_of(theirs) == before
    (theirs / "config.json").unlink()
    err = one_line_error(capsys, "train", "--data", recording.dir, "--out", theirs)
    assert "README.md is not a lesa model card" in err
    # a lesa predictor's own directory can be saved into again
    pred = tmp_path / "pred"
    tiny_predictor().save_pretrained(pred, card="# LESA predictor\n")
    tiny_predictor(seed=5).save_pretrained(pred)


def test_an_ensemble_is_never_written_over_its_inputs(capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_predictor(seed=1).save_pretrained(a)
    tiny_predictor(seed=2).save_pretrained(b)
    before = files_of(tmp_path)
    err = one_line_error(capsys, "ensemble", a, b, "--out", tmp_path / "." / "b")
    assert "is one of the predictors to ensemble" in err and files_of(tmp_path) == before
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "ens")]) == 0
    assert LESAPredictor.from_pretrained(tmp_path / "ens").config.members == 2
