"""Supervised Redis connections on the reactor: reconnect, heartbeat, bounded waits.

:class:`RedisConnection` keeps one TCP (or verified TLS) connection to Redis up: it
connects, authenticates, selects the database, optionally subscribes to channels, and
then answers :meth:`~RedisConnection.execute` and :meth:`~RedisConnection.pipeline`.
Its rules are what keep Redis trouble away from calls:

- **fail fast**: while not connected a command fails at once with
  :class:`RedisUnavailableError` — nothing queues behind a dead Redis;
- **bounded waits**: every command (and the connection's handshake) has a deadline on
  the injected clock; a missed deadline fails the command and drops the connection
  (later replies would be out of step), which then reconnects;
- **heartbeat**: a PING every ``ping_interval`` notices a Redis that stopped answering
  (``SIGSTOP``, a stalled network) even when nothing else is being sent;
- **reconnect** with backoff (0.1 s doubling to 2 s), forever, until stopped;
- ``on_up_change(True/False)`` tells the owner when Redis comes and goes.

Why not txredisapi: it schedules its timeouts on the global reactor (no injected
clock, so no deterministic tests), its TLS takes an old-style context factory with no
certificate verification, and a command issued while it is disconnected waits for a
connection with no deadline.  The parser is ``hiredis`` (:mod:`gateway.cluster.resp`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from gateway.cluster.resp import Arg, RedisError, RedisProtocolError, ReplyReader, encode_command
from gateway.config import ClusterSettings
from gateway.logs import get_logger

log = get_logger("gateway.cluster")

#: Reconnect backoff: first delay, and the most it grows to.
FIRST_RETRY_SECONDS = 0.1
MAX_RETRY_SECONDS = 2.0

__all__ = ["RedisConnection", "RedisError", "RedisTarget", "RedisUnavailableError"]


class RedisUnavailableError(Exception):
    """Redis cannot answer now: not connected, too slow, or the connection dropped."""


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is and how to log in (from ``[cluster]``)."""

    host: str
    port: int = 6379
    db: int = 0
    tls: bool = False
    username: str = ""
    password: str = ""
    ca_file: str = ""

    @classmethod
    def from_settings(cls, cluster: ClusterSettings) -> RedisTarget:
        parts = urlsplit(cluster.backend)
        db = parts.path.strip("/")
        return cls(host=parts.hostname or "127.0.0.1", port=parts.port or 6379,
                   db=int(db) if db else 0, tls=parts.scheme == "rediss",
                   username=cluster.username,
                   password=cluster.password.reveal() if cluster.password else "",
                   ca_file=cluster.tls_ca_file)

    def __str__(self) -> str:  # never the password
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


class _RedisWire(Protocol):
    """One Redis connection's bytes: commands out, replies matched to them in order.

    Replies that answer no command — pub/sub ``message`` pushes — go to ``on_push``.
    """

    def __init__(self, on_push: Callable[[list[Any]], None] | None,
                 on_lost: Callable[[_RedisWire], None]) -> None:
        self._reader = ReplyReader()
        self._waiting: deque[Deferred[Any]] = deque()
        self._on_push = on_push
        self._on_lost = on_lost
        self.lost = False

    def send(self, commands: Sequence[Sequence[Arg]]) -> list[Deferred[Any]]:
        """Write ``commands`` in one write; one Deferred per reply."""
        if self.lost or self.transport is None:
            return [fail(RedisUnavailableError("connection lost")) for _ in commands]
        self.transport.write(b"".join(encode_command(c) for c in commands))
        answers: list[Deferred[Any]] = [Deferred() for _ in commands]
        self._waiting.extend(answers)
        return answers

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._reader.feed(data)
        except RedisProtocolError as exc:
            log.error("redis sent bytes that are not RESP; dropping the connection",
                      error=str(exc))
            self.abort()
            return
        for reply in replies:
            if (self._on_push is not None and type(reply) is list and len(reply) == 3
                    and reply[0] == b"message"):
                self._on_push(reply)
            elif self._waiting:
                answer = self._waiting.popleft()
                if isinstance(reply, RedisError):
                    answer.errback(reply)
                else:
                    answer.callback(reply)
            else:
                log.warning("redis reply matched no command; dropping the connection")
                self.abort()
                return

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def close(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost = True
        waiting, self._waiting = self._waiting, deque()
        for answer in waiting:
            answer.errback(RedisUnavailableError("connection lost"))
        self._on_lost(self)


Connect = Callable[[Factory], "Deferred[Any]"]


def endpoint_connector(reactor: Any, target: RedisTarget, timeout: float) -> Connect:
    """Connect over TCP, or TLS with the certificate and host name verified."""
    endpoint: Any = HostnameEndpoint(reactor, target.host, target.port, timeout=timeout)
    if target.tls:
        trust = None
        if target.ca_file:
            trust = Certificate.loadPEM(Path(target.ca_file).read_bytes())
        endpoint = wrapClientTLS(optionsForClientTLS(target.host, trustRoot=trust), endpoint)

    def connect(factory: Factory) -> Deferred[Any]:
        return endpoint.connect(factory)  # type: ignore[no-any-return]

    return connect


class RedisConnection:
    """One supervised Redis connection (see the module docstring)."""

    def __init__(self, target: RedisTarget, clock: IReactorTime, connect: Connect, *,
                 name: str, command_timeout: float, ping_interval: float = 1.0,
                 subscribe: Sequence[bytes] = (),
                 on_message: Callable[[bytes, bytes], None] | None = None,
                 on_up_change: Callable[[bool], None] | None = None) -> None:
        self.target = target
        self.name = name
        self._clock = clock
        self._connect = connect
        self._timeout = command_timeout
        self._channels = tuple(subscribe)
        self._on_message = on_message
        self._on_up_change = on_up_change
        self._wire: _RedisWire | None = None
        self._ready = False
        self._running = False
        self._retry: IDelayedCall | None = None
        self._retry_delay = FIRST_RETRY_SECONDS
        self._attempt: Deferred[Any] | None = None
        self._lost_waiters: list[Deferred[None]] = []
        self._heartbeat = LoopingCall(self._ping)
        self._heartbeat.clock = clock
        self._ping_interval = ping_interval
        self._was_up = False
        self._warned_down = False
        #: handshakes Redis answered with an error (wrong password, unknown database)
        self.refusals = 0
        self.log = log.bind(redis=str(target), connection=name)

    @property
    def up(self) -> bool:
        """Connected, logged in (and subscribed): commands can be sent."""
        return self._ready

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._open()

    def stop(self) -> Deferred[None]:
        """Stop reconnecting and close; fires when the connection is gone."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        if self._heartbeat.running:
            self._heartbeat.stop()
        wire = self._wire
        if wire is None or wire.lost:
            self._set_ready(False)
            return succeed(None)
        gone: Deferred[None] = Deferred()
        self._lost_waiters.append(gone)
        wire.close()
        return gone

    def _open(self) -> None:
        if not self._running:
            return
        factory = Factory.forProtocol(lambda: _RedisWire(  # type: ignore[arg-type]
            self._push if self._channels else None, self._wire_lost))
        attempt = self._connect(factory)  # type: ignore[arg-type]
        self._attempt = attempt
        attempt.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, wire: _RedisWire) -> None:
        self._attempt = None
        self._wire = wire
        if not self._running:
            wire.close()
            return
        commands: list[list[Arg]] = []
        if self.target.password:
            commands.append(["AUTH", self.target.username, self.target.password]
                            if self.target.username else ["AUTH", self.target.password])
        if self.target.db and not self._channels:
            commands.append(["SELECT", self.target.db])
        # one channel per SUBSCRIBE: one confirmation each, answered in order
        commands.extend([b"SUBSCRIBE", channel] for channel in self._channels)
        commands.append(["PING"])
        answers = self._send_on(wire, commands)
        answers.addCallbacks(lambda _: self._handshake_done(wire),
                             lambda f: self._handshake_failed(wire, f))

    def _handshake_done(self, wire: _RedisWire) -> None:
        if wire is not self._wire or wire.lost:
            return
        self._retry_delay = FIRST_RETRY_SECONDS
        self._set_ready(True)
        if not self._heartbeat.running and self._ping_interval > 0:
            self._heartbeat.start(self._ping_interval, now=False)

    def _handshake_failed(self, wire: _RedisWire, failure: Failure) -> None:
        if isinstance(failure.value, RedisError):
            self.refusals += 1
            self.log.error("redis refused the connection's set-up", error=str(failure.value))
        wire.abort()

    def _connect_failed(self, failure: Failure) -> None:
        self._attempt = None
        if not self._running:
            return
        self._note_down(failure.getErrorMessage())
        self._schedule_retry()

    def _wire_lost(self, wire: _RedisWire) -> None:
        if wire is not self._wire:
            return
        self._wire = None
        if self._heartbeat.running:
            self._heartbeat.stop()
        self._set_ready(False)
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._running:
            self._note_down("connection lost")
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            return
        delay = self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, MAX_RETRY_SECONDS)
        self._retry = self._clock.callLater(delay, self._open)

    def _set_ready(self, ready: bool) -> None:
        if ready == self._ready:
            return
        self._ready = ready
        if ready:
            self._warned_down = False
            self.log.info("redis connected" if not self._was_up else "redis reconnected")
            self._was_up = True
        if self._on_up_change is not None:
            self._on_up_change(ready)

    def _note_down(self, reason: str) -> None:
        if not self._warned_down:  # one line per outage, not one per retry
            self._warned_down = True
            self.log.warning("redis unavailable; retrying", reason=reason)

    # -- commands -----------------------------------------------------------------------

    def execute(self, *args: Arg) -> Deferred[Any]:
        """Send one command; its reply, or RedisUnavailableError / RedisError."""
        return self.pipeline([list(args)]).addCallback(lambda replies: replies[0])

    def pipeline(self, commands: Sequence[Sequence[Arg]]) -> Deferred[list[Any]]:
        """Send ``commands`` in one write; all their replies (the first error fails it)."""
        wire = self._wire
        if not self._ready or wire is None:
            return fail(RedisUnavailableError("not connected"))
        return self._send_on(wire, commands)

    def _send_on(self, wire: _RedisWire, commands: Sequence[Sequence[Arg]]
                 ) -> Deferred[list[Any]]:
        """Send on ``wire`` under one deadline; a missed deadline drops the connection."""
        answers = wire.send(commands)
        result: Deferred[list[Any]] = Deferred()
        replies: list[Any] = [None] * len(answers)
        remaining = [len(answers)]

        def expire() -> None:
            if not result.called:
                self.log.warning("redis did not answer in time; dropping the connection",
                                 timeout_s=self._timeout, commands=len(commands))
                result.errback(RedisUnavailableError(
                    f"no answer from redis within {self._timeout:g} s"))
                wire.abort()

        timer = self._clock.callLater(self._timeout, expire)

        def one(reply: Any, index: int) -> None:
            replies[index] = reply
            remaining[0] -= 1
            if remaining[0] == 0 and not result.called:
                timer.cancel()
                result.callback(replies)

        def failed(failure: Failure) -> None:
            if not result.called:
                if timer.active():
                    timer.cancel()
                result.errback(failure)

        for index, answer in enumerate(answers):
            answer.addCallbacks(one, failed, callbackArgs=(index,))
        return result

    def _ping(self) -> None:
        self.execute("PING").addErrback(lambda _: None)  # a miss drops the connection

    def _push(self, message: list[Any]) -> None:
        if self._on_message is None:
            return
        _, channel, data = message
        try:
            self._on_message(channel, data)
        except Exception:
            self.log.error("redis message could not be handled", exc_info=True)
