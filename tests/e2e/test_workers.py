"""Several real daemons on one host behind one port, the way ``vapi-gateway@N`` runs.

One listening socket is made here (systemd's ``vapi-gateway.socket`` in production) and
handed to two ``twistd -n vapi-gateway --worker N`` processes as fd 3 with
``LISTEN_FDS``/``LISTEN_PID``, configured ``[gateway] listen =
systemd:domain=INET:index=0``.  Which worker can accept is chosen with SIGSTOP/SIGCONT,
each of which returns only once the kernel reports the change, so every step is
deterministic: a stopped worker can neither accept nor answer, so a request answered
while one worker is stopped was answered by the other.  The test's own copy of the
socket stays open throughout, as systemd's does: the port never closes, even between a
worker's death and its replacement.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import known_secrets
import pytest
from ini import minimal_ini

from gateway.tools.daemon_process import DaemonProcess, listening_socket

pytestmark = pytest.mark.e2e


@dataclass
class Workers:
    """The shared socket and the workers started on it."""

    socket: socket.socket
    config: str
    started: list[DaemonProcess] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    def start(self, worker: int) -> DaemonProcess:
        daemon = DaemonProcess(self.config, listen_socket=self.socket,
                               extra_args=("--worker", str(worker)))
        self.started.append(daemon)
        daemon.start()
        daemon.wait_ready()
        return daemon

    def health(self) -> dict[str, object]:
        """``GET /health`` through the shared port: a new connection each time."""
        url = f"http://127.0.0.1:{self.port}/health"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            body: dict[str, object] = json.loads(response.read())
        return body


def worker_config(port: int) -> str:
    return minimal_ini(
        gateway={"listen": "systemd:domain=INET:index=0",
                 "public_url": f"http://127.0.0.1:{port}", "drain_timeout": "5"},
        log={"format": "json", "level": "info"},
        admin={"listen": ""},  # one admin port per worker is the daemon's business
        vapi={"api_url": "local", "api_key": known_secrets.VAPI_API_KEY})


@pytest.fixture
def workers(log_capture_path: Path) -> Iterator[Workers]:
    with listening_socket() as shared:
        pool = Workers(shared, worker_config(shared.getsockname()[1]))
        try:
            yield pool
        finally:
            with log_capture_path.open("a", encoding="utf-8") as capture:
                for daemon in pool.started:
                    daemon.kill()
                    capture.write("\n".join(daemon.lines) + "\n")


def answered_by(body: dict[str, object], worker: int) -> bool:
    """The other worker was stopped, so ``worker`` answered, and ``/health`` says so."""
    return body["status"] == "ok" and body["worker"] == worker


def test_two_workers_take_turns_on_one_port(workers: Workers) -> None:
    zero, one = workers.start(0), workers.start(1)
    assert zero.pid != one.pid
    zero.pause()
    assert answered_by(workers.health(), 1)
    zero.resume()
    one.pause()
    assert answered_by(workers.health(), 0)
    one.resume()
    for _ in range(20):  # both accepting: every connection is taken by one of them
        assert workers.health()["status"] == "ok"
    for daemon in (zero, one):
        assert daemon.terminate(timeout=20) == 0
        assert [e["endpoint"] for e in daemon.events() if e["event"] == "listening"] == [
            "systemd:domain=INET:index=0"]
        assert not any("Traceback" in line for line in daemon.lines)


def test_a_connection_queued_when_a_worker_dies_is_served_by_another(
        workers: Workers) -> None:
    zero, one = workers.start(0), workers.start(1)
    zero.pause()
    one.pause()
    # nobody accepts: the kernel completes the handshake and queues the connection (and
    # its request) on the one shared socket, not on either worker
    waiting = http.client.HTTPConnection("127.0.0.1", workers.port, timeout=10)
    waiting.request("GET", "/health")
    zero.kill()  # SIGKILL: with SO_REUSEPORT, a connection in its own queue would be reset
    one.resume()
    response = waiting.getresponse()
    assert response.status == 200
    assert answered_by(json.loads(response.read()), 1)
    waiting.close()
    assert one.terminate(timeout=20) == 0


def test_a_killed_worker_is_replaced_without_refusing_a_connection(
        workers: Workers) -> None:
    zero, one = workers.start(0), workers.start(1)
    zero.kill()
    for _ in range(20):  # one worker left: never "connection refused"
        assert answered_by(workers.health(), 1)
    replacement = workers.start(0)  # what systemd's Restart= does, on the same socket
    one.pause()
    assert answered_by(workers.health(), 0)
    one.resume()
    assert replacement.terminate(timeout=20) == 0
    for _ in range(5):  # a worker draining and gone: the other still takes every request
        assert answered_by(workers.health(), 1)
    assert one.terminate(timeout=20) == 0
    assert zero.process is not None and zero.process.returncode == -9
