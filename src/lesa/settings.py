"""Settings of a config dataclass from the command line: `--set key=value`, `--config FILE` (JSON or TOML) and
`--print-config`, all generated from the dataclass's fields, their types and their documented defaults (each field's
`metadata["doc"]`).

Example:
    >>> from lesa.training import TrainConfig
    >>> parse_setting(TrainConfig, "windows=3,3,3")
    ('windows', (3, 3, 3))
    >>> parse_setting(TrainConfig, "correction=auto")
    ('correction', 'auto')
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any

TRUE, FALSE = ("true", "on", "yes", "1"), ("false", "off", "no", "0")


def _fields(cls: type) -> dict[str, Any]:
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return {f.name: f for f in fields(cls)}


def _bool(text: str) -> bool:
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise ValueError(f"expects true or false, got {text!r}")


def _parse(annotation: str, text: str) -> Any:
    """`text` as a value of a field annotated `annotation` (the dataclass's annotations are strings)."""
    kinds = [k.strip() for k in annotation.split("|")]
    if "None" in kinds and text.lower() in ("none", "null", ""):
        return None
    kinds = [k for k in kinds if k != "None"]
    if kinds == ["bool", "str"]:  # a switch with a named mode (correction: true, false or auto)
        lowered = text.lower()
        return True if lowered in TRUE else False if lowered in FALSE else text
    (kind,) = kinds
    if kind.startswith("tuple["):
        item = kind.removeprefix("tuple[").split(",")[0].strip()
        return tuple(_parse(item, part.strip()) for part in text.split(",") if part.strip())
    if kind.startswith("dict["):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"expects a JSON object, got {text!r}")
        return value
    parsers = {"int": int, "float": float, "bool": _bool, "str": str}
    if kind not in parsers:
        raise ValueError(f"cannot parse a value of type {annotation}")
    return parsers[kind](text)


def parse_setting(cls: type, item: str) -> tuple[str, Any]:
    """One `key=value` of `--set` as (field, typed value); a clear error names the key and what it expects."""
    key, sep, text = item.partition("=")
    key = key.strip().replace("-", "_")
    known = _fields(cls)
    if not sep:
        raise ValueError(f"--set expects key=value, got {item!r}")
    if key not in known:
        raise ValueError(f"--set {key}: no such setting; the settings are {', '.join(known)} (--print-config)")
    try:
        return key, _parse(known[key].type, text.strip())
    except ValueError as e:
        raise ValueError(f"--set {key}={text}: {e} ({known[key].type})") from None


def _typed(cls: type, key: str, value: Any, where: str) -> Any:
    """A config file's value for field `key`: lists as tuples, strings parsed as on the command line."""
    annotation = _fields(cls)[key].type
    if isinstance(value, str) and not annotation.startswith("str"):
        return parse_setting(cls, f"{key}={value}")[1]
    if isinstance(value, list):
        return tuple(value)
    if value is not None and annotation in ("int", "float") and not isinstance(value, int | float):
        raise ValueError(f"{where}: {key} expects a number, got {value!r}")
    return value


def load_settings(cls: type, path: str | Path) -> dict[str, Any]:
    """The settings of a JSON or TOML file (an object of field: value; the output of `--print-config` is one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold an object of settings, got {type(data).__name__}")
    known = _fields(cls)
    unknown = sorted(set(data) - set(known))
    if unknown:
        names = ", ".join(known)
        raise ValueError(f"--config {path}: unknown setting(s) {', '.join(unknown)}; the settings are {names}")
    return {key: _typed(cls, key, value, f"--config {path}") for key, value in data.items()}


def settings_json(config: Any) -> str:
    """A config's every setting as JSON (readable back by `load_settings`)."""
    lines = [f" {json.dumps(f.name)}: {json.dumps(getattr(config, f.name))}" for f in fields(config)]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def settings_reference(cls: type, title: str, intro: str = "") -> str:
    """Markdown: every field of `cls` by group, with its type, default and documentation."""
    lines = [f"# {title}", "", intro]
    group = None
    for f in fields(cls):
        if f.metadata.get("group") != group:
            group = f.metadata.get("group")
            lines += ["", f"## {group}", "", "| setting | type | default | what it does |", "|---|---|---|---|"]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        doc = f.metadata.get("doc", "").replace("|", "\\|")
        lines.append(f"| `{f.name}` | `{f.type}` | `{json.dumps(default)}` | {doc} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
