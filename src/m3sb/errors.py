"""Errors meant for people: each carries one line that names the culprit."""

from __future__ import annotations


class M3SBError(Exception):
    """Base class of every error m3sb reports to a user as one line."""


class ConfigError(M3SBError):
    """A configuration file or parameter is malformed or not allowed."""


class CheckpointError(M3SBError):
    """A checkpoint cannot be found, read or trusted."""


class MergeError(M3SBError):
    """The inputs cannot be merged as asked (shapes, values, weights)."""
