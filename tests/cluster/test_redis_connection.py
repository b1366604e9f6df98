"""RedisConnection's rules on a fake clock and an in-memory transport: fail fast while
down, a deadline on every command (a miss drops the connection), reconnect with
backoff, the handshake (AUTH, SELECT, SUBSCRIBE), pub/sub pushes, bad bytes."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.cluster.redis_client import (
    FIRST_RETRY_SECONDS,
    MAX_RETRY_SECONDS,
    RedisConnection,
    RedisError,
    RedisTarget,
    RedisUnavailableError,
)
from gateway.cluster.resp import ReplyReader, encode_command


class FakeRedis:
    """Hands out in-memory connections; records what each one was sent."""

    def __init__(self) -> None:
        self.attempts = 0
        self.refuse = False
        self.wires: list[tuple[Any, StringTransport]] = []

    def connect(self, factory: Factory) -> Deferred[Any]:
        self.attempts += 1
        if self.refuse:
            return fail(ConnectionRefusedError())
        protocol: Any = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.wires.append((protocol, transport))
        return succeed(protocol)

    @property
    def wire(self) -> Any:
        return self.wires[-1][0]

    @property
    def transport(self) -> StringTransport:
        return self.wires[-1][1]

    def sent(self) -> list[list[bytes]]:
        """The commands written on the current connection (and clear them)."""
        data = self.transport.value()
        self.transport.clear()
        commands: list[list[bytes]] = []
        reader = ReplyReader()  # a command is a RESP array: the reply parser reads it
        for command in reader.feed(data):
            commands.append(command)
        return commands

    def answer(self, *replies: bytes) -> None:
        self.wire.dataReceived(b"".join(replies))

    def drop(self) -> None:
        self.wire.connectionLost(Failure(ConnectionError("gone")))


def connection(fake: FakeRedis, clock: Clock, **kwargs: Any) -> tuple[RedisConnection,
                                                                        list[bool]]:
    changes: list[bool] = []
    target = kwargs.pop("target", RedisTarget("127.0.0.1"))
    conn = RedisConnection(target, clock, fake.connect, name="test", command_timeout=0.25,
                           ping_interval=1.0, on_up_change=changes.append, **kwargs)
    return conn, changes


def up(fake: FakeRedis, clock: Clock, **kwargs: Any) -> tuple[RedisConnection, list[bool]]:
    conn, changes = connection(fake, clock, **kwargs)
    conn.start()
    assert fake.sent() == [[b"PING"]]
    fake.answer(b"+PONG\r\n")
    assert conn.up and changes == [True]
    return conn, changes


def test_encode_command() -> None:
    assert encode_command(["SET", b"k", 5, 0.5]) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$3\r\n0.5\r\n")
    with pytest.raises(TypeError):
        encode_command(["SET", True])
    with pytest.raises(ValueError):
        encode_command([])


def test_commands_fail_at_once_while_not_connected() -> None:
    clock, fake = Clock(), FakeRedis()
    fake.refuse = True
    conn, changes = connection(fake, clock)
    conn.start()
    failures: list[Failure] = []
    conn.execute("PING").addErrback(failures.append)
    assert failures and failures[0].check(RedisUnavailableError)
    assert changes == [] and not conn.up
    clock.advance(MAX_RETRY_SECONDS * 10)
    conn.stop()
    assert clock.getDelayedCalls() == []


def test_reconnect_backoff_doubles_to_its_limit_and_resets() -> None:
    clock, fake = Clock(), FakeRedis()
    fake.refuse = True
    conn, changes = connection(fake, clock)
    conn.start()
    delays = []
    for _ in range(8):
        (pending,) = clock.getDelayedCalls()
        delays.append(round(pending.getTime() - clock.seconds(), 3))
        clock.advance(pending.getTime() - clock.seconds())
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]
    assert delays[0] == FIRST_RETRY_SECONDS
    fake.refuse = False
    clock.advance(MAX_RETRY_SECONDS)
    assert fake.sent() == [[b"PING"]]
    fake.answer(b"+PONG\r\n")
    assert changes == [True]
    fake.drop()
    assert changes == [True, False]
    (retry,) = [c for c in clock.getDelayedCalls() if c.getTime() - clock.seconds() < 1]
    assert round(retry.getTime() - clock.seconds(), 3) == FIRST_RETRY_SECONDS
    conn.stop()
    assert clock.getDelayedCalls() == []


def test_a_missed_deadline_fails_the_command_and_drops_the_connection() -> None:
    clock, fake = Clock(), FakeRedis()
    conn, changes = up(fake, clock)
    replies: list[Any] = []
    failures: list[Failure] = []
    conn.execute("GET", "k").addCallbacks(replies.append, failures.append)
    second: list[Failure] = []
    conn.execute("GET", "j").addErrback(second.append)
    assert fake.sent() == [[b"GET", b"k"], [b"GET", b"j"]]
    clock.advance(0.2)
    assert not failures
    clock.advance(0.06)
    assert failures[0].check(RedisUnavailableError)
    assert fake.transport.disconnecting or fake.wire.lost
    fake.drop()  # the transport's close arrives
    assert second and second[0].check(RedisUnavailableError)
    assert changes == [True, False] and not conn.up
    conn.stop()
    assert clock.getDelayedCalls() == []


def test_replies_match_commands_in_order_and_errors_fail_only_theirs() -> None:
    clock, fake = Clock(), FakeRedis()
    conn, _ = up(fake, clock)
    got: list[Any] = []
    conn.pipeline([["SET", "a", "1"], ["GET", "a"]]).addCallback(got.append)
    bad: list[Failure] = []
    conn.execute("NOPE").addErrback(bad.append)
    fake.sent()
    fake.answer(b"+OK\r\n$1\r", b"\n1\r\n-ERR unknown command\r\n")
    assert got == [[b"OK", b"1"]]
    assert bad[0].check(RedisError) and "unknown command" in str(bad[0].value)
    assert conn.up  # an error reply is an answer; the connection is fine
    conn.stop()
    assert clock.getDelayedCalls() == []


def test_the_heartbeat_notices_a_redis_that_stopped_answering() -> None:
    clock, fake = Clock(), FakeRedis()
    conn, changes = up(fake, clock)
    clock.advance(1.0)
    assert fake.sent() == [[b"PING"]]
    fake.answer(b"+PONG\r\n")
    clock.advance(1.0)
    assert fake.sent() == [[b"PING"]]
    clock.advance(0.25)  # no answer: Redis is stopped
    fake.drop()
    assert changes == [True, False]
    conn.stop()
    assert clock.getDelayedCalls() == []


def test_handshake_logs_in_selects_and_subscribes() -> None:
    clock, fake = Clock(), FakeRedis()
    messages: list[tuple[bytes, bytes]] = []
    target = RedisTarget("127.0.0.1", db=3, username="gw", password="pw")
    conn, _changes = connection(fake, clock, target=target)
    conn.start()
    assert fake.sent() == [[b"AUTH", b"gw", b"pw"], [b"SELECT", b"3"], [b"PING"]]
    fake.answer(b"+OK\r\n+OK\r\n+PONG\r\n")
    assert conn.up
    conn.stop()

    sub = RedisConnection(target, clock, fake.connect, name="bus", command_timeout=0.25,
                          subscribe=[b"vgw:bus:a"],
                          on_message=lambda ch, data: messages.append((ch, data)))
    sub.start()
    assert fake.sent() == [[b"AUTH", b"gw", b"pw"], [b"SUBSCRIBE", b"vgw:bus:a"],
                           [b"PING"]]
    fake.answer(b"+OK\r\n*3\r\n$9\r\nsubscribe\r\n$9\r\nvgw:bus:a\r\n:1\r\n"
                b"*3\r\n$7\r\nmessage\r\n$9\r\nvgw:bus:a\r\n$2\r\nhi\r\n"
                b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")
    assert sub.up and messages == [(b"vgw:bus:a", b"hi")]
    sub.stop()
    assert clock.getDelayedCalls() == []


def test_a_refused_login_is_counted_and_retried() -> None:
    clock, fake = Clock(), FakeRedis()
    conn, _changes = connection(fake, clock, target=RedisTarget("h", password="bad"))
    conn.start()
    fake.sent()
    fake.answer(b"-WRONGPASS invalid username-password pair\r\n+PONG\r\n")
    assert conn.refusals == 1 and not conn.up
    fake.drop()
    clock.advance(FIRST_RETRY_SECONDS)
    assert fake.attempts == 2
    conn.stop()


def test_bytes_that_are_not_resp_drop_the_connection() -> None:
    clock, fake = Clock(), FakeRedis()
    conn, changes = up(fake, clock)
    failures: list[Failure] = []
    conn.execute("GET", "k").addErrback(failures.append)
    fake.answer(b"?what\r\n")
    fake.drop()
    assert failures and failures[0].check(RedisUnavailableError)
    assert changes == [True, False]
    conn.stop()
    assert clock.getDelayedCalls() == []
