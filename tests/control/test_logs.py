"""Logging: JSON lines or plain lines with the extra fields; the access log is off unless asked for."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gateway.control.logs import ACCESS, setup_logging


@pytest.fixture
def stream():
    out = io.StringIO()
    yield out
    setup_logging(stream=None)  # back to stderr for the other tests


def test_json_lines_carry_message_fields_and_the_error(stream):
    setup_logging(json_lines=True, stream=stream)
    log = logging.getLogger("gateway.test")
    log.info("worker %d started", 3, extra={"port": 8080})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("flush failed")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{"))
    assert first["message"] == "worker 3 started" and first["port"] == 8080 and first["level"] == "info"
    assert first["logger"] == "gateway.test" and first["time"].endswith("Z") and isinstance(first["pid"], int)
    assert second["level"] == "error" and "ValueError: boom" in second["error"]


def test_plain_lines_show_fields_as_key_value(stream):
    setup_logging(stream=stream)
    logging.getLogger("gateway.test").warning("snapshot ignored", extra={"snapshot": "/tmp/v"})
    line = stream.getvalue().strip()
    assert "WARNING" in line and "gateway.test[" in line and line.endswith("snapshot ignored snapshot=/tmp/v")


def test_access_log_is_off_by_default_and_on_by_flag(stream):
    setup_logging(stream=stream)
    assert not ACCESS.isEnabledFor(logging.INFO)
    setup_logging(access_log=True, stream=stream)
    assert ACCESS.isEnabledFor(logging.INFO)
    setup_logging(stream=stream)
    assert not ACCESS.isEnabledFor(logging.INFO)
