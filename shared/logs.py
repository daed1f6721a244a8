"""Log lines of every process: one JSON object per line (python-json-logger) — `time`, `level`, `logger`,
`message`, `process`, and `request_id` when the line is about one request (passed as
`extra={"request_id": …}`) — or plain text (`RR_LOG_FORMAT=text`).

What goes into a message is the caller's responsibility and the rule is the same in both formats: ids,
counts, error classes; never a body, a header value or a secret (tests/test_privacy_canary.py reads every
process's log for the canary and for every secret).
"""

from __future__ import annotations

import logging
import logging.config
from typing import Any

__all__ = ["configure_logging", "logging_config"]

_JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s"
_RENAMES = {"asctime": "time", "levelname": "level", "name": "logger"}
_TEXT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def logging_config(log_format: str, level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for `log_format` ("json" or "text"), covering the root logger and
    granian's own (granian is handed the same dict, so its lines are in the same format)."""
    if log_format == "json":
        formatter: dict[str, Any] = {"()": "pythonjsonlogger.json.JsonFormatter", "fmt": _JSON_FIELDS,
                                     "rename_fields": _RENAMES, "datefmt": "%Y-%m-%dT%H:%M:%S%z"}
    elif log_format == "text":
        formatter = {"()": "logging.Formatter", "fmt": _TEXT}
    else:
        raise ValueError(f"unknown log format {log_format!r}")
    handler = {"class": "logging.StreamHandler", "formatter": "main", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "root": {"handlers": ["main"], "level": level},
        "loggers": {
            "_granian": {"handlers": ["main"], "level": level, "propagate": False},
            "granian.access": {"handlers": ["main"], "level": level, "propagate": False},
        },
    }


def configure_logging(log_format: str, level: str = "INFO") -> None:
    logging.config.dictConfig(logging_config(log_format, level))
