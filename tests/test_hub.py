"""Predictors on the Hugging Face Hub: `from_pretrained(repo_id)`, `push_to_hub` and `LESAConfig(predictor=repo_id)`,
against a fake Hub (no network): `huggingface_hub.hf_hub_download` and `HfApi` replaced where lesa looks them up."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from conftest import SIGMAS, tiny_predictor
from huggingface_hub import errors

import lesa
from lesa.predictor import LESAPredictor

REPO = "user/lesa-tiny"


def hub_error(cls: type[Exception], message: str) -> Exception:
    """An instance of a huggingface_hub error: the HTTP ones take the response they came with (a stub here)."""
    try:
        return cls(message, response=SimpleNamespace(headers={}, request=None, status_code=404))
    except TypeError:  # a plain exception (EntryNotFoundError in huggingface_hub >= 1.0)
        return cls(message)


class FakeHub:
    """Repos as local directories; downloads copied into a cache directory as the Hub client caches them: fetched
    again when the repo's file changed (its etag) or with force_download, else served from the cache as it is."""

    def __init__(self, root: Path) -> None:
        self.root, self.repos, self.calls, self.etags = root, {}, [], {}
        self.fail: Exception | None = None  # raised by the next download instead
        self.uploaded_from: Path | None = None  # the folder the last `upload_folder` read

    def hf_hub_download(self, repo_id: str, filename: str, *, cache_dir=None, force_download=False, **kwargs) -> str:
        self.calls.append({"repo_id": repo_id, "filename": filename, "cache_dir": cache_dir, **kwargs})
        if self.fail is not None:
            raise self.fail
        if repo_id not in self.repos:
            raise hub_error(errors.RepositoryNotFoundError, f"404 Client Error. Repository Not Found for {repo_id}")
        source = self.repos[repo_id] / filename
        if not source.is_file():
            raise hub_error(getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError), "404 Entry")
        cached = Path(cache_dir or self.root / "cache") / repo_id / filename
        etag = hashlib.sha256(source.read_bytes()).hexdigest()
        if force_download or self.etags.get(cached) != etag:
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, cached)
            self.etags[cached] = etag
        return str(cached)

    def publish(self, repo_id: str, predictor: LESAPredictor) -> None:
        self.repos[repo_id] = self.root / "repos" / repo_id
        predictor.save_pretrained(self.repos[repo_id])


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    return fake


def assert_same_forecasts(p: LESAPredictor, q: LESAPredictor) -> None:
    sigmas, history = torch.tensor(SIGMAS), [torch.randn(3, 6) for _ in range(8)]
    for step in range(p.config.num_steps):
        assert torch.equal(p.forecast(history, "cond", step, sigmas), q.forecast(history, "cond", step, sigmas))


def test_a_hub_repo_id_loads_as_a_directory_would(hub, tmp_path):
    original = tiny_predictor(seed=1)
    hub.publish(REPO, original)
    kwargs = dict(revision="v1", cache_dir=tmp_path / "c", token="hf_x", local_files_only=False)
    loaded = LESAPredictor.from_pretrained(REPO, **kwargs)
    assert_same_forecasts(original, loaded)
    assert [c["filename"] for c in hub.calls] == ["config.json", "model.safetensors"]
    assert all(c["repo_id"] == REPO and c["library_name"] == "lesa" for c in hub.calls)
    assert all(c[k] == v for c in hub.calls for k, v in kwargs.items())  # passed through as given
    # and through LESAConfig, whose schedule defaults to the downloaded predictor's
    config = lesa.LESAConfig(predictor=REPO).resolve()
    assert_same_forecasts(original, config.predictor)
    assert (config.interval, config.warmup) == (original.config.interval, original.config.warmup)


def test_an_existing_local_directory_wins_over_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tiny_predictor(seed=2)
    local.save_pretrained(REPO)  # ./user/lesa-tiny
    hub.publish(REPO, tiny_predictor(seed=3))
    assert_same_forecasts(local, LESAPredictor.from_pretrained(REPO))
    assert hub.calls == []


@pytest.mark.parametrize("name", ["runs/a/pred", "pred-n7", Path(REPO)])
def test_a_missing_path_that_is_no_repo_id_stays_a_missing_directory(hub, tmp_path, monkeypatch, name):
    # a bare name or a Path is a local directory: a predictor repo always has an owner, a Path is never a repo id
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"^predictor directory {name} does not exist$"):
        LESAPredictor.from_pretrained(name)
    assert hub.calls == []


@pytest.mark.parametrize(
    ("error", "match"),
    [
        (None, "repo user/lesa-tiny was not found \\(a private repo needs token= or a login\\)"),
        (hub_error(errors.GatedRepoError, "403 gated"), "repo user/lesa-tiny is gated: accept its conditions"),
        (hub_error(errors.RevisionNotFoundError, "404 revision"), "repo user/lesa-tiny has no revision 'v9'"),
        (
            errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache"),
            "config.json of repo user/lesa-tiny is not in the local Hub cache and the Hub could not be reached "
            "\\(no network, HF_HUB_OFFLINE=1 or local_files_only=True\\)",
        ),
        (
            hub_error(errors.HfHubHTTPError, "401 Client Error: Unauthorized\nrequest id: abc"),
            "config.json of repo user/lesa-tiny could not be downloaded: 401 Client Error: Unauthorized$",
        ),
    ],
)
def test_hub_errors_become_one_clear_error(hub, error, match):
    hub.fail = error  # None: the repo is unknown to the fake Hub, which raises RepositoryNotFoundError
    with pytest.raises(FileNotFoundError) as caught:
        LESAPredictor.from_pretrained(REPO, revision="v9")
    prefix = "predictor directory user/lesa-tiny does not exist, and loading it from the Hugging Face Hub failed: "
    assert str(caught.value).startswith(prefix)
    assert caught.match(match)
    assert caught.value.__cause__ is None and caught.value.__context__ is None  # no traceback of the Hub client


def test_a_repo_without_weights_names_the_missing_file(hub):
    hub.publish(REPO, tiny_predictor())
    (hub.repos[REPO] / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="failed: repo user/lesa-tiny has no model.safetensors$"):
        LESAPredictor.from_pretrained(REPO)


def test_damaged_downloaded_weights_are_refused_by_the_checksum(hub, tmp_path):
    original = tiny_predictor(seed=4)
    hub.publish(REPO, original)
    cache = tmp_path / "c"
    LESAPredictor.from_pretrained(REPO, cache_dir=cache)
    weights = cache / REPO / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8 + int.from_bytes(raw[:8], "little")] ^= 1  # one bit of the first tensor's data: readable, finite, wrong
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as caught:
        LESAPredictor.from_pretrained(REPO, cache_dir=cache)
    assert caught.match("model.safetensors does not match .*config.json: its SHA-256 differs")
    assert caught.match(r"\(downloaded from the Hub repo user/lesa-tiny; force_download=True fetches it again\)$")
    assert_same_forecasts(original, LESAPredictor.from_pretrained(REPO, cache_dir=cache, force_download=True))


class FakeApi:
    """Records what `push_to_hub` asks of `HfApi` and publishes the uploaded folder on the fake Hub."""

    def __init__(self, hub: FakeHub, token=None) -> None:
        self.hub, self.token = hub, token

    def create_repo(self, repo_id: str, **kwargs) -> SimpleNamespace:
        self.hub.calls.append({"create_repo": repo_id, "token": self.token, **kwargs})
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"user/{repo_id}")

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs) -> str:
        folder = Path(folder_path)
        self.hub.calls.append({"upload_folder": repo_id, "files": sorted(p.name for p in folder.iterdir()), **kwargs})
        self.hub.repos[repo_id] = self.hub.root / "repos" / repo_id
        shutil.copytree(folder, self.hub.repos[repo_id], dirs_exist_ok=True)
        self.hub.uploaded_from = folder
        return f"https://huggingface.co/{repo_id}/commit/0"


def test_push_to_hub_uploads_what_save_pretrained_writes(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: FakeApi(hub, token))
    original = tiny_predictor(seed=5)
    card = "---\nlibrary_name: lesa\n---\n# LESA predictor for `tiny`\n"
    commit = original.push_to_hub("lesa-tiny", card=card, private=True, token="hf_x", commit_message="first")
    assert commit == f"https://huggingface.co/{REPO}/commit/0"
    create, upload = hub.calls
    assert create == {"create_repo": "lesa-tiny", "token": "hf_x", "private": True, "exist_ok": True}
    assert upload == {
        "upload_folder": REPO,  # the repo id as create_repo resolved it
        "files": ["README.md", "config.json", "model.safetensors"],
        "commit_message": "first",
        "revision": None,
        "create_pr": False,
    }
    assert not hub.uploaded_from.exists()  # the temporary directory is gone
    repo = hub.repos[REPO]
    assert (repo / "README.md").read_text() == card
    saved = json.loads((repo / "config.json").read_text())
    assert saved["_class_name"] == "LESAPredictor" and set(saved["_checksums"]) == {"model.safetensors"}
    hub.calls.clear()
    assert_same_forecasts(original, LESAPredictor.from_pretrained(REPO))
    # without a card no README.md is uploaded, so the repo's card stays as it is
    retrained = tiny_predictor(seed=6)
    retrained.push_to_hub(REPO)
    assert hub.calls[-1]["files"] == ["config.json", "model.safetensors"]
    assert (repo / "README.md").read_text() == card
    assert_same_forecasts(retrained, LESAPredictor.from_pretrained(REPO))
