"""systemd integration: ``sd_notify`` datagrams and the watchdog keep-alive.

``Type=notify`` units learn from ``$NOTIFY_SOCKET`` that the port is bound (READY=1),
what the daemon is doing (STATUS=), that it is draining (STOPPING=1), and — when
``WatchdogSec=`` is set — that the reactor is still turning (WATCHDOG=1, sent from a
reactor timer, so a blocked reactor is what systemd notices).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


class Notifier:
    """Sends notify messages to ``$NOTIFY_SOCKET``; does nothing when it is unset."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):
            path = "\0" + path[1:]  # abstract namespace
        self._address = path or None
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; True if it was sent."""
        if self._address is None:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.sendto("\n".join(lines).encode("utf-8"), self._address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if the watchdog is on for this process."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000


class WatchdogService(Service):
    """Sends WATCHDOG=1 (and a STATUS= line) from a reactor LoopingCall."""

    def __init__(self, notifier: Notifier, interval: float, clock: IReactorTime,
                 status: Callable[[], str]) -> None:
        self._notifier = notifier
        self._interval = interval
        self._status = status
        self._loop = LoopingCall(self._beat)
        self._loop.clock = clock

    def _beat(self) -> None:
        self._notifier.notify("WATCHDOG=1", f"STATUS={self._status()}")

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:  # type: ignore[override]
        super().stopService()
        if self._loop.running:
            self._loop.stop()
