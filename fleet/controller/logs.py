"""The controller's log lines: text for people, or JSON objects like fleet-agent's ``--log-format json``.

JSON lines carry ``ts`` (unix seconds), ``level``, ``logger``, ``msg`` and, for an exception,
``exc``: the same fields as the agent's, so one log pipeline reads both.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a line is logged (not the stream of the moment it was
    made: a replaced and closed stderr, as under a test runner, must not break later lines)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure(fmt: str, level: str) -> Callable[[], None]:
    """Route every log line through one stderr handler in ``fmt`` (text or json) at ``level``;
    returns what puts the previous handlers and level back."""
    handler = StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    previous, previous_level = list(root.handlers), root.level
    for existing in previous:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())

    def restore() -> None:
        root.removeHandler(handler)
        for existing in previous:
            root.addHandler(existing)
        root.setLevel(previous_level)

    return restore
