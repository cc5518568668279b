"""Configuration: pydantic-settings with `VESSA_` environment variables, YAML files and CLI flags.

Precedence, highest first: explicit CLI flags (passed as keyword overrides), environment variables,
the YAML file, then the defaults in the settings class. Every command that writes an output saves the
resolved configuration next to it (`save_resolved`).
"""

from __future__ import annotations

import contextvars
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic_settings import BaseSettings, SettingsConfigDict, YamlConfigSettingsSource

_YAML_PATH: contextvars.ContextVar[Path | None] = contextvars.ContextVar("vessa_yaml_path", default=None)

S = TypeVar("S", bound="VessaSettings")


class VessaSettings(BaseSettings):
    """Base of every VESSA settings class: `VESSA_` env prefix, `__` for nested fields, YAML support."""

    model_config = SettingsConfigDict(
        env_prefix="VESSA_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        sources = [init_settings, env_settings]
        yaml_path = _YAML_PATH.get()
        if yaml_path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_path))
        return tuple(sources)


def load_settings(cls: type[S], yaml_path: str | Path | None = None, **overrides: Any) -> S:
    """Resolve settings of `cls` from flags (`overrides`, None values ignored), env and a YAML file."""
    path = None
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a YAML mapping, got {type(loaded).__name__}")
    token = _YAML_PATH.set(path)
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _YAML_PATH.reset(token)


def settings_dict(settings: BaseSettings) -> dict[str, Any]:
    """The settings as plain JSON-able data (paths as strings)."""
    return json.loads(settings.model_dump_json())


def dump_yaml(settings: BaseSettings) -> str:
    return yaml.safe_dump(settings_dict(settings), sort_keys=False)


def save_resolved(settings: BaseSettings, out_dir: str | Path, name: str = "config.resolved.yaml") -> Path:
    """Write the resolved config next to an output, so every result can be reproduced."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(dump_yaml(settings))
    return path
