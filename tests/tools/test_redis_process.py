"""``RedisProcess``: a real ``redis-server`` on loopback, paused, resumed, killed, restarted.

Runs Debian's ``redis-server``; skipped where it is not installed, except in CI (where
``.ci/run`` installs it) — there a missing server fails the run (``tests/redis_server.py``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from redis_server import require_redis_server, started_redis

from gateway.tools.redis_process import (
    RedisNotInstalledError,
    RedisProcess,
    RedisStartError,
    redis_server_path,
)

#: How long a paused server is given to (not) answer: waiting for an absence.
SILENCE_SECONDS = 0.5


@pytest.fixture
def redis() -> Iterator[RedisProcess]:
    with started_redis() as server:
        yield server


def connect(server: RedisProcess, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def send(sock: socket.socket, *words: str) -> None:
    """One command as a RESP array of bulk strings."""
    parts = [f"*{len(words)}\r\n".encode()]
    parts += [f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words]
    sock.sendall(b"".join(parts))


def reply(stream: BinaryIO) -> object:
    """One RESP reply: str (simple), int, bytes or None (bulk), list (array)."""
    line = stream.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise AssertionError(f"redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else stream.read(size + 2)[:-2]
    if kind == b"*":
        return [reply(stream) for _ in range(int(rest))]
    raise AssertionError(f"not a RESP reply: {line!r}")


def command(sock: socket.socket, *words: str) -> object:
    send(sock, *words)
    with sock.makefile("rb") as stream:
        return reply(stream)


def ping(server: RedisProcess) -> object:
    with connect(server) as sock:
        return command(sock, "PING")


def test_start_answers_ping_on_its_url(redis: RedisProcess) -> None:
    assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    with connect(redis) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
    assert ping(redis) == "PONG"
    assert any("Ready to accept connections" in line for line in redis.lines)


def test_persistence_is_off(redis: RedisProcess) -> None:
    with connect(redis) as sock:
        assert command(sock, "CONFIG", "GET", "save") == [b"save", b""]
        assert command(sock, "CONFIG", "GET", "appendonly") == [b"appendonly", b"no"]
        assert command(sock, "CONFIG", "GET", "bind") == [b"bind", b"127.0.0.1"]
        answer = command(sock, "CONFIG", "GET", "dir")
    assert isinstance(answer, list) and answer[0] == b"dir"
    assert os.path.realpath(answer[1]) == os.path.realpath(str(redis.workdir).encode())


def test_pause_silences_it_and_resume_answers_the_waiting_command(
        redis: RedisProcess) -> None:
    redis.pause()
    assert redis.paused and redis.running
    with connect(redis) as sock:  # the kernel still completes the handshake
        sock.settimeout(SILENCE_SECONDS)
        send(sock, "PING")
        with pytest.raises(TimeoutError):
            sock.recv(64)
        redis.resume()
        sock.settimeout(10)
        with sock.makefile("rb") as stream:
            assert reply(stream) == "PONG"  # the command that waited is answered
    assert not redis.paused
    assert ping(redis) == "PONG"
    redis.resume()  # resuming a running server is a no-op
    redis.pause()
    redis.pause()  # and so is pausing a paused one
    redis.resume()
    assert ping(redis) == "PONG"


def test_kill_closes_the_port_and_restart_reopens_it_empty(redis: RedisProcess) -> None:
    url, port, first_pid = redis.url, redis.port, redis.pid
    with connect(redis) as sock:
        assert command(sock, "SET", "call:CA1", "worker-0") == "OK"
        assert command(sock, "GET", "call:CA1") == b"worker-0"
    redis.kill()
    assert not redis.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    redis.restart()
    assert (redis.url, redis.port) == (url, port) and redis.pid != first_pid
    with connect(redis) as sock:
        assert command(sock, "GET", "call:CA1") is None  # nothing was persisted
        assert command(sock, "PING") == "PONG"


def test_restart_of_a_paused_server(redis: RedisProcess) -> None:
    redis.pause()
    redis.restart()
    assert not redis.paused
    assert ping(redis) == "PONG"


def test_stop_terminates_a_paused_server_cleanly(redis: RedisProcess) -> None:
    workdir = redis.workdir
    assert workdir is not None and Path(workdir).is_dir()
    redis.pause()
    assert redis.stop() == 0
    assert not redis.running and not Path(workdir).exists()


def test_context_manager_starts_and_stops() -> None:
    require_redis_server()
    with RedisProcess() as server:
        assert ping(server) == "PONG"
        process = server.process
    assert process is not None and process.returncode == 0


def test_port_in_use_is_a_clear_error() -> None:
    require_redis_server()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = RedisProcess(port=busy.getsockname()[1])
        with pytest.raises(RedisStartError, match="exited before it was ready") as failed:
            server.start()
        server.stop()
    assert "Address already in use" in str(failed.value)
    assert not server.running


def test_missing_redis_server_tells_how_to_install(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RedisNotInstalledError, match=r"apt-get install redis-server"):
        RedisProcess(executable=str(tmp_path / "redis-server")).start()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("gateway.tools.redis_process.os.access", lambda path, mode: False)
    assert redis_server_path() is None
    with pytest.raises(RedisNotInstalledError, match=r"not on PATH.*apt-get install redis-server"):
        RedisProcess().start()


def test_extra_args_reach_the_server() -> None:
    require_redis_server()
    with (RedisProcess(extra_args=("--requirepass", "s3cret-redis")) as server,
          connect(server) as sock):
        send(sock, "PING")
        with sock.makefile("rb") as stream, pytest.raises(AssertionError, match="NOAUTH"):
            reply(stream)
        assert command(sock, "AUTH", "s3cret-redis") == "OK"
        assert command(sock, "PING") == "PONG"


def test_a_forgotten_server_dies_with_the_interpreter(tmp_path: Path) -> None:
    require_redis_server()
    script = ("from gateway.tools.redis_process import RedisProcess\n"
              "server = RedisProcess()\nserver.start()\nprint(server.pid, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    pid = int(out.stdout)
    with pytest.raises(ProcessLookupError):  # killed and reaped by the atexit hook
        os.kill(pid, 0)
