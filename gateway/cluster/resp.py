"""The Redis wire protocol (RESP2), sans-io: commands to bytes, bytes to replies.

Encoding is a few lines; parsing is ``hiredis.Reader`` (Redis's own C parser, kept by
the Redis project), which takes any split of the byte stream.  Nothing here touches a
socket or the reactor: :mod:`gateway.cluster.redis_client` feeds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hiredis

#: What a command argument may be: bytes go as they are, the rest as their text.
Arg = bytes | str | int | float


class RedisError(Exception):
    """Redis answered a command with an error reply (``-ERR …``)."""


class RedisProtocolError(Exception):
    """The byte stream is not RESP: the connection must be dropped."""


def encode_command(args: Iterable[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts: list[bytes] = []
    count = 0
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, bool):  # bool is an int; Redis has no booleans
            raise TypeError("Redis command arguments cannot be bool")
        elif isinstance(arg, int | float):
            data = repr(arg).encode("ascii")
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        count += 1
    if count == 0:
        raise ValueError("empty Redis command")
    return b"*%d\r\n" % count + b"".join(parts)


class ReplyReader:
    """Feed it bytes as they arrive; :meth:`replies` yields each complete reply.

    Error replies come out as :class:`RedisError` instances (not raised: they answer one
    command, the connection is fine); a malformed stream raises
    :class:`RedisProtocolError`.
    """

    __slots__ = ("_reader",)

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=RedisError)

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return every reply now complete, oldest first."""
        self._reader.feed(data)
        out: list[Any] = []
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                raise RedisProtocolError(str(exc)) from None
            if reply is False:
                return out
            out.append(reply)
