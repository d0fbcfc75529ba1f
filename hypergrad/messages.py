"""Error lines that echo a user's value: one helper, so a 100 KB value is not a 100 KB line."""

from __future__ import annotations

from typing import Any

LIMIT = 80
"""The most characters of a user's value an error line echoes."""


def clip(text: str, limit: int = LIMIT) -> str:
    """``text`` cut to ``limit`` characters with ``…`` and its full length when longer,
    e.g. ``xxxx… (100000 characters)``."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - 1]}… ({len(text)} characters)"


def show(value: Any, limit: int = LIMIT) -> str:
    """``repr(value)`` for an error line, cut as :func:`clip` cuts it."""
    return clip(repr(value), limit)


def cut_line(line: str, limit: int = 300) -> str:
    """``line`` with its middle replaced by ``…`` when it is longer than ``limit``: the
    last resort for a message that echoes a long value without :func:`show`, keeping the
    start (the problem) and the end (the fix)."""
    if len(line) <= limit:
        return line
    half = (limit - 1) // 2
    return f"{line[:half]}…{line[len(line) - half:]}"
