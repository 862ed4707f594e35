"""A predictor as an artefact: config.json + model.safetensors (+ README.md), saved atomically, loaded with every
check, from a local directory or the Hugging Face Hub. Shared by both predictor formats; config.json's "_class_name"
says which class a directory holds."""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from torch import nn

from ..io import atomic_write_text, file_sha256, save_safetensors

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# config.json keys beside the config's fields: the class (as diffusers' "_class_name") and the weights' SHA-256
CLASS_KEY = "_class_name"
CHECKSUM_KEY = "_checksums"
_CARD_MARKS = ("library_name: lesa", "# LESA predictor")
# the saved classes by name (filled as they are defined); a config.json without "_class_name" is format 1's
_CLASSES: dict[str, type[PredictorArtefact]] = {}
_DEFAULT_CLASS = "LESAPredictor"


class PredictorArtefact(nn.Module):
    """What every predictor class shares: `save_pretrained`, `push_to_hub`, `from_pretrained`.

    A subclass names its config dataclass (`config_class`, with `from_dict(data, source)` and a `format_version`)."""

    config_class: ClassVar[Any]
    config: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CLASSES[cls.__name__] = cls

    def save_pretrained(
        self, directory: str | Path, card: str | None = None, files: dict[str, str] | None = None
    ) -> None:
        """Write model.safetensors (fp32), a README.md model card and the text `files` (name: content) if given, then
        config.json, each atomically. config.json comes last and names the weights' SHA-256, so a save interrupted
        part-way leaves either no config.json or one that `from_pretrained` finds does not match the weights.

        Example:
            >>> import tempfile
            >>> from lesa.pipelines import shipped_predictor
            >>> from lesa.predictor import LESAPredictor
            >>> predictor = LESAPredictor.from_pretrained(shipped_predictor())
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     predictor.save_pretrained(tmp, card="# LESA predictor")
            ...     LESAPredictor.from_pretrained(tmp).config == predictor.config
            True
        """
        directory = Path(directory)
        check_predictor_dir(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        metadata = {"format": "pt", "lesa_format_version": str(self.config.format_version)}
        save_safetensors(tensors, directory / WEIGHTS_NAME, metadata)
        digest = file_sha256(directory / WEIGHTS_NAME)
        for name, text in {**({CARD_NAME: card} if card is not None else {}), **(files or {})}.items():
            atomic_write_text(directory / name, text)
        config = {CLASS_KEY: type(self).__name__, **asdict(self.config), CHECKSUM_KEY: {WEIGHTS_NAME: digest}}
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        card: str | None = None,
        commit_message: str = "Upload LESA predictor",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
    ) -> CommitInfo:
        """Upload the predictor to the Hugging Face Hub repo `repo_id` (created if absent) as `save_pretrained` writes
        it, so `from_pretrained(repo_id)` loads it back. A README.md is uploaded only when `card` is given: without
        one, a card already in the repo is kept. Returns the commit's `CommitInfo`.

        Example (needs a Hub login or `token=`):
            >>> predictor = LESAPredictor.from_pretrained("runs/pred-n7")  # doctest: +SKIP
            >>> info = predictor.push_to_hub("user/lesa-flux-n7", private=True)  # doctest: +SKIP
        """
        import huggingface_hub  # looked up at call time (tests replace HfApi)

        api = huggingface_hub.HfApi(token=token)
        # create_repo names the repo as the Hub resolved it (a bare name gets the user's namespace)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory(prefix="lesa-push-") as tmp:
            self.save_pretrained(tmp, card=card)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> PredictorArtefact:
        """Load a predictor written by `save_pretrained` or `push_to_hub`: a local directory or, where no such path
        exists, a Hugging Face Hub repo id ("user/repo", a string), whose config.json and model.safetensors are
        downloaded with `huggingface_hub.hf_hub_download` (the keyword arguments are its own; a local directory
        ignores them). Both are checked alike: config fields, tensor names and shapes, finite values, the SHA-256.
        `LESAPredictor.from_pretrained` (and `load_predictor`) load either format, as the class config.json names.

        Example:
            >>> from lesa.pipelines import shipped_predictor
            >>> from lesa.predictor import LESAPredictor
            >>> predictor = LESAPredictor.from_pretrained(shipped_predictor())
            >>> type(predictor).__name__, predictor.config.model_class, predictor.config.format_version
            ('ScheduleFreePredictor', 'FluxTransformer2DModel', 2)
            >>> predictor = LESAPredictor.from_pretrained("user/lesa-flux-n7", revision="main")  # doctest: +SKIP
        """
        directory = Path(name_or_path)
        if isinstance(name_or_path, str) and not directory.exists() and is_hub_repo_id(name_or_path):
            hub = dict(
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                force_download=force_download,
            )
            # two downloads: should the revision move between them, the SHA-256 in config.json refuses the pair
            files = [hub_download(name_or_path, name, **hub) for name in (CONFIG_NAME, WEIGHTS_NAME)]
            try:
                return cls._load(*files)
            except ValueError as e:  # the message names files in the Hub cache: say which repo, and the remedy
                raise ValueError(
                    f"{e} (downloaded from the Hub repo {name_or_path}; force_download=True fetches it again)"
                ) from e
        config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not directory.is_dir():
            raise FileNotFoundError(f"predictor directory {directory} does not exist")
        for f in (config_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"predictor directory {directory} has no {f.name}")
        return cls._load(config_file, weights_file)

    @classmethod
    def refuse_other_format(cls, config_file: Path, found: type) -> str:
        """Why `cls.from_pretrained` does not load an artefact of class `found`."""
        return f"{config_file} holds a {found.__name__}, not a {cls.__name__}; load it with lesa.load_predictor"

    @classmethod
    def _load(cls, config_file: Path, weights_file: Path) -> PredictorArtefact:
        """The predictor of a config.json and its model.safetensors, every check passed."""
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{config_file} is not valid JSON: a JSON object was expected")
        target = _CLASSES.get(data.get(CLASS_KEY, _DEFAULT_CLASS))
        if target is None:
            raise ValueError(
                f"{config_file}: {CLASS_KEY} {data.get(CLASS_KEY)!r} is not a lesa predictor class "
                f"({', '.join(sorted(_CLASSES))})"
            )
        if not issubclass(target, cls) and cls.__name__ != _DEFAULT_CLASS:
            raise ValueError(cls.refuse_other_format(config_file, target))
        model = target(target.config_class.from_dict(data, source=str(config_file)))
        raw = weights_file.read_bytes()
        try:
            state = load_safetensors(raw)
        except Exception as e:  # safetensors raises several types for damaged files
            raise ValueError(f"{weights_file} is not a readable safetensors file: {e}") from e
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{weights_file} does not match {config_file}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(
                    f"{weights_file}: tensor {key} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(expected[key].shape)}"
                )
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{weights_file}: tensor {key} holds NaN or inf")
        # after the checks above, which name the tensor at fault when they can; artefacts saved before checksums
        # were recorded have none to compare
        expected_digest = (data.get(CHECKSUM_KEY) or {}).get(WEIGHTS_NAME)
        if expected_digest is not None and hashlib.sha256(raw).hexdigest() != expected_digest:
            raise ValueError(
                f"{weights_file} does not match {config_file}: its SHA-256 differs from the one the config records "
                "(the files of two different saves, e.g. an interrupted save, or damaged weights); save it again"
            )
        model.load_state_dict(state)
        return model.eval()


def is_predictor_config(path: Path) -> bool:
    """Whether `path` is a config.json that lesa wrote for a predictor (with or without the class key of newer
    saves)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(data, dict):
        return False
    return data.get(CLASS_KEY) in _CLASSES or {"model_class", "tap", "num_steps", "sigmas"} <= data.keys()


def check_predictor_dir(directory: str | Path) -> None:
    """Refuse a directory where saving a predictor would replace files that are not a lesa predictor's: a
    config.json of something else, or a README.md or model.safetensors there without a predictor's config.json."""
    directory = Path(directory)
    config = directory / CONFIG_NAME
    if config.exists():
        if is_predictor_config(config):
            return
        raise ValueError(f"{config} is not a lesa predictor's config; saving a predictor there would replace it")
    # without a config.json: the files of a save interrupted before it, or somebody else's
    card = directory / CARD_NAME
    if card.exists() and not any(mark in card.read_text(errors="replace")[:300] for mark in _CARD_MARKS):
        raise ValueError(f"{card} is not a lesa model card; saving a predictor there would replace it")
    weights = directory / WEIGHTS_NAME
    if weights.exists():
        try:
            with safe_open(str(weights), framework="pt") as f:
                ours = "lesa_format_version" in (f.metadata() or {})
        except Exception:  # safetensors raises several types for foreign or damaged files
            ours = False
        if not ours:
            raise ValueError(f"{weights} is not a lesa predictor's weights; saving a predictor there would replace it")


def is_hub_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face Hub model repo id "namespace/name". A bare name ("pred-n7"), which the
    Hub also accepts for its oldest repos, is taken for a local directory: a predictor repo always has an owner."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def hub_download(repo_id: str, filename: str, revision: str | None = None, **kwargs) -> Path:
    """`filename` of the Hub repo `repo_id`, downloaded (or from the Hub cache) with `huggingface_hub.hf_hub_download`
    and its `kwargs`; a Hub error becomes one FileNotFoundError naming the repo and what is missing."""
    import huggingface_hub  # looked up at call time (tests replace hf_hub_download)
    from huggingface_hub import errors

    try:
        return Path(
            huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, library_name="lesa", **kwargs)
        )
    # most specific first: GatedRepoError is a RepositoryNotFoundError, LocalEntryNotFoundError an EntryNotFoundError
    except errors.GatedRepoError:
        reason = f"repo {repo_id} is gated: accept its conditions on its Hub page and pass token= (or log in)"
    except errors.RepositoryNotFoundError:
        reason = f"repo {repo_id} was not found (a private repo needs token= or a login)"
    except errors.RevisionNotFoundError:
        reason = f"repo {repo_id} has no revision {revision!r}"
    except errors.LocalEntryNotFoundError:
        reason = (
            f"{filename} of repo {repo_id} is not in the local Hub cache and the Hub could not be reached "
            "(no network, HF_HUB_OFFLINE=1 or local_files_only=True)"
        )
    except errors.EntryNotFoundError:
        reason = f"repo {repo_id} has no {filename}"
    except (errors.HfHubHTTPError, OSError) as e:  # e.g. an expired token or a server error: say which
        first_line = (str(e).strip().splitlines() or [repr(e)])[0]
        reason = f"{filename} of repo {repo_id} could not be downloaded: {first_line}"
    # raised outside the except clauses, unchained: the Hub client's long traceback would bury what went wrong
    raise FileNotFoundError(
        f"predictor directory {repo_id} does not exist, and loading it from the Hugging Face Hub failed: {reason}"
    )


def load_predictor(name_or_path: str | Path | PredictorArtefact, **hub: Any) -> PredictorArtefact:
    """The predictor of a directory or Hub repo id, of whichever format it holds (`hub`: `from_pretrained`'s keyword
    arguments); an instance is returned as it is."""
    if isinstance(name_or_path, PredictorArtefact):
        return name_or_path
    return _CLASSES[_DEFAULT_CLASS].from_pretrained(name_or_path, **hub)
