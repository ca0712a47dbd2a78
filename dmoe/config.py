"""Config dataclasses become CLI options, TOML keys and DMOE_* variables in one place.

Each component has one ``@dataclass(kw_only=True, slots=True)`` config whose fields carry their help
text in ``field(metadata={"help": ...})`` (made by :func:`option`). A field made by :func:`nested`
holds another config (the :class:`~dmoe.client.config.SwarmConfig` of ``dmoe train``, say) and names
which of its fields the outer config exposes, under which option names; their types, defaults and
help texts are those declared in the nested class, so nothing is declared twice.

:func:`click_options` turns the options into click options, and :func:`load_config` merges, in this
order of precedence, defaults < TOML file < ``<ENV_PREFIX><OPTION>`` environment variables < command
line. TOML keys are the option names with underscores; where a nested field allows it, a table
named after it (``[swarm]``) sets any field of the nested config by that field's own name. Unknown
TOML keys and options, and malformed values, raise :class:`~dmoe.errors.ConfigError`.
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


def nested(config_cls: type, options: Mapping[str, str], *, table: bool = False) -> Any:
    """A config field holding a ``config_cls`` config (its defaults unless set). ``options`` maps the
    outer config's option names to the fields of ``config_cls`` they set, e.g. ``{"swarm":
    "initial_peers", "host": "host"}``. With ``table``, a TOML table named after the field may set
    any field of ``config_cls``; otherwise the other fields are set only from Python."""
    metadata = {"nested": config_cls, "options": dict(options), "table": table}
    return dataclasses.field(default_factory=config_cls, metadata=metadata)


def check_nested(config: Any) -> None:
    """Raise ConfigError where a nested field holds something else than its config class (a list of
    peers where a SwarmConfig belongs, say). Called by the outer configs' ``__post_init__``."""
    for f in dataclasses.fields(config):
        inner = f.metadata.get("nested")
        if inner is not None and not isinstance(getattr(config, f.name), inner):
            raise ConfigError(f"{f.name} must be a {inner.__name__}, got {getattr(config, f.name)!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Option:
    """One option of a config class: the field of the outer config it sets, or with ``sub`` the field
    ``sub`` of the nested config in that field; ``declared`` is the dataclass field that declares it
    (type, default, help)."""

    field: str
    sub: str | None
    declared: dataclasses.Field
    annotation: Any


_Target = tuple[str, str | None]  # where a value goes: (field, None) or (nested field, its field)


def _tables(cls: type) -> dict[str, type]:
    """Nested field name -> its config class, for the nested fields a TOML table may set."""
    return {f.name: f.metadata["nested"] for f in dataclasses.fields(cls) if f.metadata.get("table")}


def _options(cls: type) -> dict[str, _Option]:
    """Option name -> _Option, in the order of the fields (a nested field's options where it stands)."""
    hints = typing.get_type_hints(cls)
    options: dict[str, _Option] = {}
    for f in dataclasses.fields(cls):
        inner = f.metadata.get("nested")
        if inner is None:
            entries = [(f.name, _Option(f.name, None, f, hints[f.name]))]
        else:
            inner_fields = {g.name: g for g in dataclasses.fields(inner)}
            inner_hints = typing.get_type_hints(inner)
            entries = []
            for name, sub in f.metadata["options"].items():
                if sub not in inner_fields or "nested" in inner_fields[sub].metadata:
                    raise TypeError(f"{cls.__name__}.{f.name}: {inner.__name__} has no option field {sub!r}")
                entries.append((name, _Option(f.name, sub, inner_fields[sub], inner_hints[sub])))
        for name, entry in entries:
            if name in options:
                raise TypeError(f"{cls.__name__}: option {name!r} declared twice")
            options[name] = entry
    return options


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


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
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
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
    """Decorator adding one click option per option of config dataclass ``cls`` (plus ``--config``)."""
    options = _options(cls)
    tables = _tables(cls)
    config_help = "TOML file with any of these options (its keys are the option names with underscores)"
    for name, inner in tables.items():
        config_help += f"; a [{name}] table in it sets any {inner.__name__} field"

    def decorate(command: Callable) -> Callable:
        for name, entry in reversed(options.items()):
            scalar, is_list, _ = _base_type(entry.annotation)
            declared = entry.declared
            flag = "--" + name.replace("_", "-")
            default = declared.default
            if default is dataclasses.MISSING:
                default = declared.default_factory()
            env = f"{cls.ENV_PREFIX}{name.upper()}"
            help_text = f"{declared.metadata.get('help', '')} [default: {default!r}; env {env}]"
            if scalar is bool:
                command = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(command)
            else:
                command = click.option(
                    flag, name, type=scalar, multiple=is_list, default=None, help=help_text
                )(command)
        return click.option(
            "--config",
            "config_path",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help=config_help + ".",
        )(command)

    return decorate


def _read_toml(cls: type, path: str | os.PathLike, options: dict[str, _Option]) -> dict[_Target, Any]:
    """The values a TOML file sets."""
    with open(path, "rb") as file:
        try:
            data = tomllib.load(file)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
    tables = _tables(cls)
    values: dict[_Target, Any] = {}
    given: dict[_Target, str] = {}  # where each value came from, to refuse it set twice
    unknown: list[str] = []

    def put(target: _Target, name: str, value: Any, annotation: Any) -> None:
        if target in given:
            raise ConfigError(f"{path}: {given[target]} and {name} set the same option")
        given[target] = name
        values[target] = _coerce(name, value, annotation)

    for key, value in data.items():
        if key in tables and isinstance(value, dict):
            inner = tables[key]
            inner_names = {f.name for f in dataclasses.fields(inner)}
            inner_hints = typing.get_type_hints(inner)
            for sub, sub_value in value.items():
                if sub in inner_names:
                    put((key, sub), f"{key}.{sub}", sub_value, inner_hints[sub])
                else:
                    unknown.append(f"{key}.{sub}")
        elif key in options:
            entry = options[key]
            put((entry.field, entry.sub), key, value, entry.annotation)
        else:
            unknown.append(key)
    if unknown:
        known = sorted(options) + [f"[{name}] table" for name in tables]
        raise ConfigError(f"{path}: unknown option(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(known)}")
    return values


def load_config(
    cls: type,
    *,
    toml_path: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """Build ``cls`` from defaults < TOML file < environment < ``overrides`` (CLI values by option name;
    None = unset)."""
    return _build(cls, _given_values(cls, toml_path, environ, overrides))


def _given_values(cls: type, toml_path: str | os.PathLike | None, environ: Mapping[str, str] | None,
                  overrides: Mapping[str, Any] | None) -> dict[_Target, Any]:
    """The values the TOML file, environment and ``overrides`` set, in that order of precedence."""
    options = _options(cls)
    values = {} if toml_path is None else _read_toml(cls, toml_path, options)
    environ = os.environ if environ is None else environ
    for name, entry in options.items():
        key = f"{cls.ENV_PREFIX}{name.upper()}"
        if key in environ:
            values[entry.field, entry.sub] = _coerce(key, environ[key], entry.annotation)
    for name, value in (overrides or {}).items():
        if name not in options:
            raise ConfigError(f"unknown option {name!r}")
        if value is None or (isinstance(value, tuple) and not value):
            continue
        entry = options[name]
        values[entry.field, entry.sub] = _coerce(name, list(value) if isinstance(value, tuple) else value,
                                                 entry.annotation)
    return values


def given_fields(
    cls: type,
    *,
    toml_path: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> frozenset[str]:
    """The fields of ``cls`` that the TOML file, environment or ``overrides`` set (those
    :func:`load_config` does not leave at their defaults), whatever their values."""
    return frozenset(field for field, _ in _given_values(cls, toml_path, environ, overrides))


def _build(cls: type, values: dict[_Target, Any]) -> Any:
    fields: dict[str, Any] = {}
    inner_values: dict[str, dict[str, Any]] = {}
    for (name, sub), value in values.items():
        if sub is None:
            fields[name] = value
        else:
            inner_values.setdefault(name, {})[sub] = value
    nested_classes = {f.name: f.metadata.get("nested") for f in dataclasses.fields(cls)}
    for name, sub_values in inner_values.items():
        fields[name] = nested_classes[name](**sub_values)
    return cls(**fields)
