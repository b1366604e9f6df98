"""Suite-wide fixtures: every log line of the run is captured and scanned for secrets.

All log events (the gateway's structlog events and Twisted's own) are written as JSON
lines to a capture file for the whole session; end-to-end tests append their daemons'
output to it.  When the session finishes, the file is searched for every secret value
the tests configure (``tests/known_secrets.py``); finding one fails the run.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import known_secrets

from gateway.logs import start_logging_to

_CAPTURE = Path(tempfile.mkdtemp(prefix="vapi-gateway-logs-")) / "captured.log"
_capture_file = _CAPTURE.open("a", encoding="utf-8")
start_logging_to(_capture_file, "json", "debug")


@pytest.fixture
def log_capture_path() -> Path:
    """The file every log line of the session goes to (append daemon output here)."""
    return _CAPTURE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _capture_file.flush()
    text = _CAPTURE.read_text(encoding="utf-8", errors="replace")
    leaked = [s for s in known_secrets.ALL if s in text]
    size = len(text.splitlines())
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaked:
        if reporter is not None:
            reporter.write_line(
                f"SECRET LEAK: {len(leaked)} configured secret value(s) found in the "
                f"captured logs ({_CAPTURE}, {size} lines)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    elif reporter is not None:
        reporter.write_line(f"log scan: {size} captured log lines, no secret values found")
