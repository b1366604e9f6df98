"""Run a throw-away ``redis-server`` on a free loopback port, for tests of the cluster.

:class:`RedisProcess` starts Debian's ``redis-server`` (``apt-get install redis-server``)
with persistence off (no RDB snapshots, no append-only file, a temporary ``--dir``),
bound to 127.0.0.1 on a free port, and in the foreground.  Start-up is synchronised on
Redis's own "Ready to accept connections" log line, read from its stdout by a thread —
never on sleeps or polling.  Faults are injected with real signals: :meth:`pause`
(SIGSTOP: the port still accepts connections but nothing is answered), :meth:`resume`
(SIGCONT), :meth:`kill` (SIGKILL) and :meth:`restart` (a fresh, empty server on the same
port, so clients reconnect to the same URL)::

    with RedisProcess() as redis:
        connect(redis.url)        # redis://127.0.0.1:PORT/0
        redis.pause()
        ...
        redis.resume()
"""

from __future__ import annotations

import atexit
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from types import TracebackType

from gateway.tools.daemon_process import free_port, pause_process, resume_process

#: The line Redis logs once its port is open.
READY_LINE = "Ready to accept connections"


class RedisNotInstalledError(RuntimeError):
    """``redis-server`` is not on this machine."""


class RedisStartError(RuntimeError):
    """``redis-server`` exited, or never said it was ready; the message has its output."""


#: Every server started and not yet stopped: killed when the interpreter exits, so a
#: test run that forgets one (or fails before stopping it) leaves no orphan behind.
_live: set[RedisProcess] = set()


@atexit.register
def _kill_forgotten() -> None:
    for server in list(_live):
        server.kill()
        server.stop()  # now only removes its temporary directory


def redis_server_path() -> str | None:
    """The ``redis-server`` executable on ``PATH`` (or Debian's ``/usr/bin``), if any."""
    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    return found


class RedisProcess:
    """One ``redis-server`` child on ``127.0.0.1:port``, persistence off.

    ``port`` defaults to a free one, chosen once: :meth:`restart` reuses it.
    ``extra_args`` are more ``redis-server`` options (e.g. ``("--requirepass", "pw")``).
    ``lines`` holds everything the server wrote (all its runs).
    """

    def __init__(self, port: int | None = None, *, executable: str | None = None,
                 workdir: str | None = None, startup_timeout: float = 20.0,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = port if port is not None else free_port()
        self.executable = executable
        self.extra_args = extra_args
        self.workdir = workdir
        self._own_workdir = workdir is None
        self.startup_timeout = startup_timeout
        self.lines: list[str] = []
        self.process: subprocess.Popen[str] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        """The server's URL, database 0: ``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """True while the server process exists (paused counts as running)."""
        return self.process is not None and self.process.poll() is None

    def argv(self, executable: str) -> list[str]:
        assert self.workdir is not None
        return [executable, "--port", str(self.port), "--bind", "127.0.0.1",
                "--daemonize", "no", "--save", "", "--appendonly", "no",
                "--dir", self.workdir, "--logfile", "", "--loglevel", "notice",
                *self.extra_args]

    def start(self) -> None:
        """Start the server; return once it is ready (raise if it exits or times out)."""
        if self.running:
            raise RuntimeError(f"redis-server is already running on port {self.port}")
        executable = self.executable or redis_server_path()
        if executable is None or not os.access(executable, os.X_OK):
            raise RedisNotInstalledError(
                f"redis-server is not installed ({executable or 'not on PATH'}): "
                "install Debian's package with `apt-get install redis-server`")
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix="vapi-gateway-redis-")
        lines: queue.Queue[str | None] = queue.Queue()
        first = len(self.lines)
        self.process = subprocess.Popen(
            self.argv(executable), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, cwd=self.workdir, bufsize=1)
        _live.add(self)
        threading.Thread(target=self._read, args=(self.process, lines), daemon=True,
                         name=f"redis-server:{self.port}").start()
        try:
            self._wait_ready(lines, first)
        except BaseException:
            self.kill()
            raise

    def _read(self, process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        """This run's output, line by line, then None at its end (one thread per run)."""
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n")
            self.lines.append(line)
            lines.put(line)
        lines.put(None)

    def _wait_ready(self, lines: queue.Queue[str | None], start: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RedisStartError(
                    f"redis-server on port {self.port} not ready within "
                    f"{self.startup_timeout}s:\n" + "\n".join(self.lines[start:])) from None
            if line is None:
                raise RedisStartError(
                    f"redis-server on port {self.port} exited before it was ready:\n"
                    + "\n".join(self.lines[start:]))
            if READY_LINE in line:
                return

    def _running_process(self) -> subprocess.Popen[str]:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"redis-server on port {self.port} is not running")
        return self.process

    def pause(self) -> None:
        """SIGSTOP; returns once the kernel reports the server stopped.

        Connections are still accepted by the kernel (the listen backlog), but no command
        is answered until :meth:`resume`.
        """
        if not self.paused:
            pause_process(self._running_process())
            self.paused = True

    def resume(self) -> None:
        """SIGCONT; returns once the kernel reports the server running again."""
        if self.paused:
            resume_process(self._running_process())
            self.paused = False

    def kill(self) -> None:
        """SIGKILL (works on a paused server too) and reap: the port is closed on return."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.paused = False
        _live.discard(self)

    def restart(self) -> None:
        """Kill the server if it runs, then start an empty one on the same port."""
        self.kill()
        self.start()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (and SIGCONT if paused) and wait; SIGKILL if it takes longer than
        ``timeout``.  Returns the exit code (None if it never ran); removes the temporary
        directory."""
        code: int | None = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                if self.paused:  # SIGTERM stays pending until the server runs again
                    self.process.send_signal(signal.SIGCONT)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
            self.paused = False
            _live.discard(self)
            code = self.process.returncode
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        return code

    def __enter__(self) -> RedisProcess:
        """Start the server unless it already runs; :meth:`stop` it on leaving."""
        if not self.running:
            self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisProcess {self.url} {state} pid={self.pid}>"

