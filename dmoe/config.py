"""Config dataclasses become CLI options, TOML keys and DMOE_* variables in one place.

Each component has one ``@dataclass(kw_only=True, slots=True)`` config whose fields carry their help
text in ``field(metadata={"help": ...})`` (made by :func:`option`). :func:`click_options` turns the
fields into click options, and :func:`load_config` merges, in this order of precedence,
defaults < TOML file < ``<ENV_PREFIX><FIELD>`` environment variables < command line.
Unknown TOML keys and malformed values raise :class:`~dmoe.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import click

from dmoe.errors import ConfigError


def option(default: Any, help: str) -> Any:
    """A config field with a default and the help text that ``--help`` shows."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(annotation: Any) -> tuple[type, bool, bool]:
    """(scalar type, is_list, is_optional) of a field annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {annotation!r}")
        optional, annotation = True, args[0]
        origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return item, True, optional
    return annotation, False, optional


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    scalar, is_list, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    if is_list:
        if isinstance(value, str):
            value = [v for v in (part.strip() for part in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce_scalar(name, v, scalar) for v in value]
    return _coerce_scalar(name, value, scalar)


def _coerce_scalar(name: str, value: Any, scalar: type) -> Any:
    if scalar is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if scalar in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            number = scalar(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {scalar.__name__}, got {value!r}") from None
        if scalar is int and isinstance(value, float) and number != value:
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return number
    if scalar is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {scalar!r} for {name}")


def click_options(cls: type) -> Callable[[Callable], Callable]:
    """Decorator adding one click option per field of config dataclass ``cls`` (plus ``--config``)."""
    hints = _field_types(cls)

    def decorate(command: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            scalar, is_list, _ = _base_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            env = f"{cls.ENV_PREFIX}{f.name.upper()}"
            help_text = f"{f.metadata.get('help', '')} [default: {default!r}; env {env}]"
            if scalar is bool:
                decl = f"{flag}/--no-{f.name.replace('_', '-')}"
                command = click.option(decl, f.name, default=None, help=help_text)(command)
            else:
                command = click.option(
                    flag, f.name, type=scalar, multiple=is_list, default=None, help=help_text
                )(command)
        return click.option(
            "--config",
            "config_path",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="TOML file with any of these options (its keys are the option names with underscores).",
        )(command)

    return decorate


def load_config(
    cls: type,
    *,
    toml_path: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """Build ``cls`` from defaults < TOML file < environment < ``overrides`` (CLI values; None = unset)."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if toml_path is not None:
        with open(toml_path, "rb") as file:
            try:
                data = tomllib.load(file)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{toml_path}: {e}") from None
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{toml_path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values.update({k: _coerce(k, v, hints[k]) for k, v in data.items()})
    environ = os.environ if environ is None else environ
    for name in names:
        key = f"{cls.ENV_PREFIX}{name.upper()}"
        if key in environ:
            values[name] = _coerce(key, environ[key], hints[name])
    for name, value in (overrides or {}).items():
        if name not in names:
            raise ConfigError(f"unknown option {name!r}")
        if value is None or (isinstance(value, tuple) and not value):
            continue
        values[name] = _coerce(name, list(value) if isinstance(value, tuple) else value, hints[name])
    return cls(**values)
