"""Typed, validated configuration shared by every stage.

Every config is a pydantic model that forbids unknown keys, so a misspelled key is an
error that names the key, never a silently ignored setting. YAML goes through
``yaml.safe_load`` only.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class RaysysError(Exception):
    """An error the user can fix; the message names the problem and the fix.

    The CLI prints these without a traceback.
    """


class ConfigError(RaysysError):
    pass


class Config(BaseModel):
    """Base of every raysys config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


C = TypeVar("C", bound=Config)


def _describe(err: ValidationError, cls: type[Config], source: str) -> str:
    lines = [f"invalid {cls.__name__} in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent: type[BaseModel] | None = cls
            for p in e["loc"][:-1]:
                field = parent.model_fields.get(str(p)) if isinstance(parent, type) else None
                ann = getattr(field, "annotation", None)
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if parent is None:
                    break
            known = sorted(parent.model_fields) if parent is not None else []
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - unknown key '{where}'{hint} Known keys here: {', '.join(known)}.")
        else:
            lines.append(f"  - {where}: {e['msg']} (got {e.get('input')!r})")
    lines.append("Fix the config file (or the --set override) and run again.")
    return "\n".join(lines)


def validate(cls: type[C], data: Any, source: str = "config") -> C:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of keys to values at the top level, got {type(data).__name__}. "
            f"Write the config as 'key: value' lines."
        )
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, cls, source)) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist. Pass the path of a YAML config (see configs/).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', err)}. Fix the syntax and run again.") from None
    return {} if data is None else data


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML scalars/lists)."""
    data = dict(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' has no '='. Write it as key=value, e.g. --set train.epochs=5.")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return data


def load(cls: type[C], path: str | Path, overrides: list[str] | None = None) -> C:
    data = read_yaml(path)
    if isinstance(data, dict):
        data = apply_overrides(data, overrides)
    return validate(cls, data, source=str(path))


def dump(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
