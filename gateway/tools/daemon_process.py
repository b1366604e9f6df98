"""Run ``twistd -n vapi-gateway`` as a child process and follow its JSON log.

Used by ``make demo`` and the end-to-end tests.  Start-up is synchronised on the
daemon's own ``ready`` log line (never on sleeps or polling), and every line the daemon
wrote is kept for inspection.

Several daemons can share one listening socket the way systemd's socket activation
shares it between ``vapi-gateway@N`` workers: make it with :func:`listening_socket` and
give it to each :class:`DaemonProcess` as ``listen_socket``; each child then finds it as
fd 3 with ``LISTEN_FDS=1`` and ``LISTEN_PID`` set to its own pid, exactly as systemd
passes it (configure ``[gateway] listen = systemd:domain=INET:index=0``).
:meth:`DaemonProcess.pause` / :meth:`~DaemonProcess.resume` (SIGSTOP / SIGCONT) return
only once the kernel reports the state change, so tests can choose which worker is able
to accept without sleeping.
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


def listening_socket(host: str = "127.0.0.1", backlog: int = 128) -> socket.socket:
    """A TCP socket bound to a free port on ``host`` and listening: the one socket that
    several daemons share (``listen_socket=``), as systemd's ``vapi-gateway.socket`` is."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


#: Run in the child before twistd: put the shared socket at fd 3 and describe it in the
#: environment exactly as systemd does, with LISTEN_PID = this very process (exec keeps
#: the pid, and Twisted only adopts the descriptors when LISTEN_PID == os.getpid()).
SOCKET_ACTIVATION = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[3], sys.argv[3:])
"""

#: The name systemd gives the descriptor (``FileDescriptorName=``, default: the unit).
SOCKET_NAME = "vapi-gateway.socket"


def pause_process(process: subprocess.Popen[Any]) -> None:
    """SIGSTOP ``process`` (a child of this one); return once the kernel reports it stopped.

    From then on it accepts nothing and answers nothing; its sockets stay open.
    """
    process.send_signal(signal.SIGSTOP)
    _wait_state(process, os.WUNTRACED)


def resume_process(process: subprocess.Popen[Any]) -> None:
    """SIGCONT a stopped child; return once the kernel reports it running again."""
    process.send_signal(signal.SIGCONT)
    _wait_state(process, os.WCONTINUED)


def _wait_state(process: subprocess.Popen[Any], option: int) -> None:
    """Block until the child is stopped (``WUNTRACED``) or continued (``WCONTINUED``).

    ``waitpid`` with these options reports the change without reaping the child; if it
    died instead, its exit status is recorded on ``process`` and this raises.
    """
    _, status = os.waitpid(process.pid, option)
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        process.returncode = os.waitstatus_to_exitcode(status)
        raise RuntimeError(f"process {process.pid} exited (status {process.returncode})")


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
    """One gateway daemon child process with its own config file.

    ``extra_args`` go after the subcommand's ``--config`` (e.g. ``("--worker", "1")``).
    ``listen_socket`` (see :func:`listening_socket`) is passed as systemd passes an
    activated socket: fd 3, ``LISTEN_FDS=1``, ``LISTEN_PID`` = the daemon's own pid.
    """

    def __init__(self, config_text: str, *, env: Mapping[str, str] | None = None,
                 extra_args: tuple[str, ...] = (), workdir: str | None = None,
                 pass_fds: tuple[int, ...] = (), argv_prefix: tuple[str, ...] = (),
                 listen_socket: socket.socket | None = None) -> None:
        self.workdir = workdir or tempfile.mkdtemp(prefix="vapi-gateway-")
        os.makedirs(self.workdir, exist_ok=True)
        self.config_path = os.path.join(self.workdir, "gateway.ini")
        Path(self.config_path).write_text(config_text, encoding="utf-8")
        self.env = dict(os.environ if env is None else env)
        self.extra_args = extra_args
        self.pass_fds = pass_fds
        self.argv_prefix = argv_prefix
        if listen_socket is not None:
            fd = listen_socket.fileno()
            self.pass_fds = (*pass_fds, fd)
            self.argv_prefix = (sys.executable, "-c", SOCKET_ACTIVATION, str(fd), SOCKET_NAME,
                                *argv_prefix)
        self.paused = False
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
            if self.paused:  # SIGTERM stays pending until the daemon runs again
                self.process.send_signal(signal.SIGCONT)
                self.paused = False
        return self.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    @property
    def pid(self) -> int | None:
        """The daemon's pid (the socket-activation step execs twistd in place)."""
        return self.process.pid if self.process is not None else None

    def pause(self) -> None:
        """SIGSTOP; returns once the daemon is stopped (it accepts and answers nothing)."""
        assert self.process is not None
        if not self.paused:
            pause_process(self.process)
            self.paused = True

    def resume(self) -> None:
        """SIGCONT; returns once the daemon runs again."""
        assert self.process is not None
        if self.paused:
            resume_process(self.process)
            self.paused = False

    def kill(self) -> None:
        """SIGKILL (a paused daemon too) and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.paused = False
