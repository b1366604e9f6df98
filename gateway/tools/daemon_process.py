"""Run ``twistd -n vapi-gateway`` as a child process and follow its JSON log.

Used by ``make demo`` and the end-to-end tests.  Start-up is synchronised on the
daemon's own ``ready`` log line (never on sleeps or polling), and every line the daemon
wrote is kept for inspection.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def twistd_path() -> str:
    """The twistd script next to the running interpreter."""
    candidate = Path(sys.executable).with_name("twistd")
    return str(candidate) if candidate.exists() else "twistd"


def config_with(base: str | Path | None, overrides: Mapping[str, Mapping[str, str]]) -> str:
    """The ini text of ``base`` (a path, or none) with ``overrides`` applied."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    if base is not None:
        parser.read(base, encoding="utf-8")
        _rebase_files(parser, Path(base).resolve().parent)
    for section, values in overrides.items():
        if not parser.has_section(section):
            parser.add_section(section)
        for key, value in values.items():
            parser.set(section, key, value)
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def _rebase_files(parser: configparser.ConfigParser, folder: Path) -> None:
    """Make the ini's relative assistant files absolute, so a copy elsewhere still works."""
    if parser.has_option("assistant", "file") and parser.get("assistant", "file"):
        parser.set("assistant", "file", str(folder / parser.get("assistant", "file")))
    if parser.has_section("routing"):
        for number, value in parser.items("routing"):
            if value.startswith("file:"):
                parser.set("routing", number, "file:" + str(folder / value[5:].strip()))


def _log_event(line: str) -> dict[str, Any] | None:
    """One JSON log line (after any journald ``<N>`` prefix) as a dict; None if it is not."""
    try:
        value = json.loads(line.lstrip("<0123456789>"))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class DaemonProcess:
    """One gateway daemon child process with its own config file."""

    def __init__(self, config_text: str, *, env: Mapping[str, str] | None = None,
                 extra_args: tuple[str, ...] = (), workdir: str | None = None,
                 pass_fds: tuple[int, ...] = (), argv_prefix: tuple[str, ...] = ()) -> None:
        self.workdir = workdir or tempfile.mkdtemp(prefix="vapi-gateway-")
        os.makedirs(self.workdir, exist_ok=True)
        self.config_path = os.path.join(self.workdir, "gateway.ini")
        Path(self.config_path).write_text(config_text, encoding="utf-8")
        self.env = dict(os.environ if env is None else env)
        self.extra_args = extra_args
        self.pass_fds = pass_fds
        self.argv_prefix = argv_prefix
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process: subprocess.Popen[str] | None = None

    @property
    def argv(self) -> list[str]:
        return [*self.argv_prefix, twistd_path(), "-n", "--pidfile=", "vapi-gateway",
                "--config", self.config_path, *self.extra_args]

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=self.env, cwd=self.workdir, pass_fds=self.pass_fds, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far, parsed."""
        return [event for event in map(_log_event, self.lines) if event is not None]

    def wait_for(self, event: str, timeout: float = 20.0) -> dict[str, Any]:
        """Block until the daemon logs ``event`` (JSON format); raise if it exits first."""
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no {event!r} log line within {timeout}s") from None
            if line is None:
                raise RuntimeError(f"daemon exited before {event!r}:\n" + "\n".join(self.lines))
            value = _log_event(line)
            if value is not None and value.get("event") == event:
                return value

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for("ready", timeout)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
