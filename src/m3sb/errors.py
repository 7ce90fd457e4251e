"""Errors meant for people: each carries one line that names the culprit."""

from __future__ import annotations


class M3SBError(Exception):
    """Base class of every error m3sb reports to a user as one line.

    Line breaks in the message (a YAML key or value may hold one) are shown as ``\\n``.
    """

    def __init__(self, message: object = "", *rest: object) -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"), *rest)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ConfigError(M3SBError):
    """A configuration file or parameter is malformed or not allowed."""


class CheckpointError(M3SBError):
    """A checkpoint cannot be found, read or trusted."""


class MergeError(M3SBError):
    """The inputs cannot be merged as asked (shapes, values, weights)."""
