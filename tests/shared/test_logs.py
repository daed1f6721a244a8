"""The log format: JSON lines with the request id where a line is about one request, or plain text."""

from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest

from shared.logs import logging_config


def emit(log_format: str, *calls) -> list[str]:
    config = logging_config(log_format)
    stream = io.StringIO()
    config["handlers"]["main"]["stream"] = stream
    logging.config.dictConfig(config)
    try:
        log = logging.getLogger("rocket_relay.test")
        for call in calls:
            call(log)
    finally:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "root": {"handlers": [], "level": "WARNING"}})
    return stream.getvalue().splitlines()


def test_json_lines_carry_the_request_id_and_the_traceback() -> None:
    def failing(log: logging.Logger) -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("settlement of %s failed", "req-1", extra={"request_id": "req-1"})

    lines = emit("json", lambda log: log.info("worker started: %d shards", 16), failing)
    started, failed = (json.loads(line) for line in lines)
    assert started["message"] == "worker started: 16 shards" and started["level"] == "INFO"
    assert started["logger"] == "rocket_relay.test" and "request_id" not in started
    assert started["time"][10] == "T" and isinstance(started["process"], int)
    assert failed["request_id"] == "req-1" and failed["level"] == "ERROR"
    assert "ValueError: boom" in failed["exc_info"]


def test_a_hostile_message_stays_one_json_line() -> None:
    (line,) = emit("json", lambda log: log.warning("odd %s", 'a"\n{"level": "CRITICAL"}\u2028'))
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["message"].startswith('odd a"\n')


def test_text_lines_and_unknown_formats() -> None:
    (line,) = emit("text", lambda log: log.warning("plain"))
    assert line.endswith("WARNING rocket_relay.test plain")
    with pytest.raises(ValueError):
        logging_config("xml")
