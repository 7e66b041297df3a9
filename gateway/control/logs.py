"""Logging setup: plain lines for people, JSON lines for log pipelines; the access log off by default.

Modules log lifecycle events and errors through `logging.getLogger(__name__)`; fields passed
as `extra={...}` become JSON keys (and `key=value` pairs in plain mode). Requests are logged
only on the `gateway.access` logger, which stays silent unless the access log is switched on,
so the request path can test `ACCESS.isEnabledFor(logging.INFO)` once and skip the rest.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from ..http.proxy import ACCESS

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid, the extra fields, the error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        entry.update(_extra(record))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    """`time level logger[pid]: message key=value ...` with the traceback below, if any."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _extra(record).items())
        line = f"{_iso(record.created)} {record.levelname:<7} {record.name}[{record.process}]: {record.getMessage()}"
        if fields:
            line += " " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _iso(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def setup_logging(
    *, json_lines: bool = False, access_log: bool = False, level: str | int | None = None, stream: TextIO | None = None
) -> None:
    """Configure the root logger once per process (call it again in each worker: it replaces, not adds).

    The level defaults to GATEWAY_LOG_LEVEL or INFO. aiokafka's chatter is kept at WARNING, and
    its "Unable connect to" lines are dropped: our reconnect warning says it once per attempt.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper())
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("aiokafka").addFilter(not_a_connect_error)
    ACCESS.setLevel(logging.INFO if access_log else logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.INFO if access_log else logging.WARNING)


def not_a_connect_error(record: logging.LogRecord) -> bool:
    """False for aiokafka's connection-refused line (the caller's retry line tells the same)."""
    return not str(record.msg).startswith("Unable connect to")
