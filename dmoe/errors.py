"""Errors that dmoe raises for its users. Bad user input is a ValueError (or a subclass here)."""

from __future__ import annotations


class DmoeError(Exception):
    """Base class of dmoe's own errors."""


class ConfigError(DmoeError, ValueError):
    """A configuration value (CLI option, TOML key, DMOE_* variable) is missing or wrong."""


class WireError(DmoeError, ValueError):
    """A message read from the network does not decode to a valid tensor or request."""


class CheckpointError(DmoeError):
    """A checkpoint exists but cannot be used for the expert it is meant for."""


class MessageTooLarge(WireError):
    """A streamed message grew past the size its receiver accepts."""
