"""From YAML files and `--set key=value` texts to one validated `Config`, and back from what a run saved.

    config = load_config([Path("jobs/configs/alexnet_imagenet.yaml")], ["optim.lr=0.02"])

Files merge left to right, overrides apply last, and validation runs once on the result, so the first problem is
reported as one line naming the key, the value and what is allowed. `--set` and Ray Tune's sampled values go
through the same `set_key`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config.schema import Config
from pipeline.errors import ConfigError

# This file sits in pipeline/config/: the project (jobs/, pyproject.toml) is three levels up.
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "jobs" / "configs" / "default.yaml"


def load_config(paths: list[Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Merge YAML files left to right, apply `key=value` overrides, validate once at the end."""
    merged: dict[str, Any] = {}
    for path in paths or [DEFAULT_CONFIG]:
        _deep_merge(merged, _read_yaml(Path(path)))
    for override in overrides or []:
        _apply_override(merged, override)
    return validate_config(merged)


def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_one_line(error)) from None


def validate_saved_config(data: dict[str, Any]) -> Config:
    """A config a run saved (a checkpoint's meta.json, a run's config.json), written by this or an older version."""
    model = data.get("model")
    # Saved before inits per model: every model carried init: paper, which meant something to alexnet only.
    if isinstance(model, dict) and model.get("init") == "paper" and model.get("name", "resnet18") != "alexnet":
        data = {**data, "model": {**model, "init": None}}
    return validate_config(data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text (a binary file?); give a YAML file") from None
    if "\x00" in text:
        raise ConfigError(f"config file {path} holds NUL bytes (a binary file?); give a YAML file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def _apply_override(merged: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. optim.lr=0.2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    set_key(merged, key.strip(), value, f"override {override!r}")


def set_key(data: dict[str, Any], key: str, value: Any, origin: str) -> None:
    """Set the dotted `key` in a raw config mapping: the one mechanism behind `--set` and Tune's sampled values.

    Unknown leaf keys are left to validation (`extra="forbid"`), which names them; `origin` prefixes the error
    when a section along the way is a value.
    """
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value.item() if hasattr(value, "item") else value  # numpy scalars from Tune's samplers


def with_text_overrides(config: Config, overrides: list[str]) -> Config:
    """`config` with `--set key=value` texts applied (YAML-typed, as on the command line), validated whole."""
    data = config.model_dump(mode="json")
    for override in overrides:
        _apply_override(data, override)
    return validate_config(data)


def with_overrides(config: Config, values: dict[str, Any]) -> Config:
    """`config` with dotted keys set to `values` (already typed, e.g. a Tune trial's samples), validated whole."""
    data = config.model_dump(mode="json")
    for key, value in values.items():
        set_key(data, key, value, key)
    return validate_config(data)


def _deep_merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _one_line(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling; see jobs/configs/default.yaml for every key)"
    if first["type"] == "missing":
        return f"{key}: this key is required here and missing (see jobs/configs/default.yaml)"
    if first["loc"] and not isinstance(first.get("input"), dict):  # a whole-section check names its keys itself
        shown = first.get("input")
        more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
        return f"{key} = {shown!r}: {message}{more}"
    return message
