"""Limits twisted.web does not enforce by itself: body size, and time to send a request.

Out of the box, twisted.web reads a request's whole body (into memory, or a temporary
file beyond 100 kB) before any resource sees the request, so a route's own 413 comes
too late to protect anything but its parsing; and its only timeout is an idle one,
reset by every byte, which a client sending one byte every few seconds never trips.
Both listeners of the daemon (the public one and the admin one) are therefore a
:class:`LimitedSite`:

- **body size** (:class:`LimitedRequest`): the limit of the requested path is known
  as soon as the headers are in.  A ``Content-Length`` above it is answered
  ``413`` at once — not one byte of the body is read, and no ``100 Continue`` is
  sent; a chunked body is counted as it arrives and cut off with ``413`` the moment
  it passes the limit.  Either way the connection is closed and the resource never
  runs.  The routes keep their own checks (defence in depth).
- **time to send a request** (:class:`LimitedHTTPChannel`): a client has
  ``read_timeout`` seconds to send one whole request — request line, headers and
  body — counted from the connection opening, or from the previous answer on a
  kept-alive connection.  Past that, a client that had started a request gets
  ``408`` and the connection is closed (an idle kept-alive connection is just
  closed).  Once a request is complete the clock stops: the time taken to answer,
  and a WebSocket upgrade (which takes the connection over), are not limited here.

Closing after a refusal writes the answer and then closes; a peer that never reads
it is cut off after ``abortTimeout`` (Twisted's, 15 s).  Requests the channel
refuses never reach a resource, so they are not in the per-route request metrics:
each one is logged (path without its query, peer; never a header or the body).

Limits (:class:`HttpLimits`) are per path, exact match on the request target's path:
``public_http_limits`` gives each Twilio webhook ``[twilio] max_body_size`` and
``/vapi/events`` ``[vapi] max_message_size`` (a Vapi end-of-call report can be far
larger than a Twilio form), and every other path (health, the media upgrade, unknown
paths: none takes a body) ``[twilio] max_body_size``; ``admin_http_limits`` gives
every admin path the admin API's own limit.  Both use ``[gateway] request_read_timeout``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Final
from urllib.parse import urlsplit

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from gateway.config import Settings
from gateway.logs import get_logger

__all__ = [
    "BODY_TOO_LARGE_RESPONSE",
    "REQUEST_TIMEOUT_RESPONSE",
    "HttpLimits",
    "LimitedHTTPChannel",
    "LimitedRequest",
    "LimitedSite",
    "admin_http_limits",
    "public_http_limits",
]

log = get_logger("gateway.http")

BODY_TOO_LARGE_RESPONSE: Final = (
    b"HTTP/1.1 413 Content Too Large\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 23\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"request body too large\n"
)
REQUEST_TIMEOUT_RESPONSE: Final = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 19\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b"request timed out\r\n"
)
_MAX_LOGGED_PATH_CHARS: Final = 200


@dataclass(frozen=True)
class HttpLimits:
    """What one listener allows a request: its body size (per path) and its read time."""

    read_timeout: float
    """Seconds to send one whole request (line, headers, body)."""
    max_body_size: int
    """Bytes of body allowed on any path not in ``max_body_size_by_path``."""
    max_body_size_by_path: Mapping[bytes, int] = field(default_factory=dict)
    """Exact request paths (no query) with a limit of their own."""

    def __post_init__(self) -> None:
        if self.read_timeout <= 0:
            raise ValueError("read_timeout must be positive")
        if self.max_body_size < 0 or any(n < 0 for n in self.max_body_size_by_path.values()):
            raise ValueError("body size limits must not be negative")

    def body_limit(self, target: bytes) -> int:
        """The body limit for a request target as received (origin or absolute form)."""
        return self.max_body_size_by_path.get(request_path(target), self.max_body_size)


def request_path(target: bytes) -> bytes:
    """The path of a request target: no query, and no scheme and host (absolute form)."""
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    if path[:1] != b"/" and b"://" in path:
        try:
            path = urlsplit(path).path or b"/"
        except ValueError:
            return path
    return path


def public_http_limits(settings: Settings) -> HttpLimits:
    """The public listener: Twilio's webhooks, ``/vapi/events``, health and the media upgrade."""
    twilio, vapi = settings.twilio, settings.vapi
    by_path = {path.encode(): twilio.max_body_size
               for path in (twilio.voice_path, twilio.status_path, twilio.stream_status_path)}
    by_path[vapi.events_path.encode()] = vapi.max_message_size
    return HttpLimits(read_timeout=settings.gateway.request_read_timeout,
                      max_body_size=twilio.max_body_size, max_body_size_by_path=by_path)


def admin_http_limits(settings: Settings, max_body_size: int) -> HttpLimits:
    """The admin listener: one body limit (the admin API's) for every path."""
    return HttpLimits(read_timeout=settings.gateway.request_read_timeout,
                      max_body_size=max_body_size)


class LimitedRequest(Request):
    """A request whose body is refused (413) as soon as it is known to be too large.

    It works with :class:`LimitedHTTPChannel` (which knows the limit of the path and
    does the refusing); on any other channel it is a plain ``Request``.
    """

    _body_limit: int | None = None
    _body_received = 0

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        if not isinstance(channel, LimitedHTTPChannel):
            super().gotLength(length)
            return
        limit = self._body_limit = channel.body_limit()
        if length is not None and length > limit:
            # allHeadersReceived sends "100 Continue" after this unless Expect is gone
            self.requestHeaders.removeHeader(b"expect")
            self.content = BytesIO()
            channel.refuse_body(declared=length, limit=limit)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        limit = self._body_limit
        channel = self.channel
        if limit is not None and isinstance(channel, LimitedHTTPChannel):
            if channel.refusing:
                return
            self._body_received += len(data)
            if self._body_received > limit:
                channel.refuse_body(declared=None, limit=limit)
                return
        super().handleContentChunk(data)


class LimitedHTTPChannel(HTTPChannel):
    """An HTTP/1.1 channel with a deadline for reading each request, and the refusals.

    ``limits`` is set by :class:`LimitedSite` when it builds the channel.
    """

    limits: HttpLimits | None = None
    refusing = False
    """True once a refusal (413 or 408) was written: everything else is ignored."""

    _read_deadline: IDelayedCall | None = None
    _request_begun = False

    # -- the read deadline ----------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_read_deadline()

    def dataReceived(self, data: bytes) -> None:
        if self.refusing or self._closing():
            return  # answered and closing (a refusal, or Twisted's own 400)
        if data:
            self._request_begun = True
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        if self.refusing:
            return
        self._cancel_read_deadline()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # armed first: answering may hand a pipelined request to allContentReceived
        if self.persistent and not self.refusing:
            self._request_begun = False
            self._arm_read_deadline()
        super().requestDone(request)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_read_deadline()
        super().connectionLost(reason)

    def _arm_read_deadline(self) -> None:
        self._cancel_read_deadline()
        limits = self.limits
        if limits is not None:
            self._read_deadline = self.callLater(limits.read_timeout, self._read_timed_out)

    def _cancel_read_deadline(self) -> None:
        deadline, self._read_deadline = self._read_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        self._time_out()

    def _time_out(self) -> None:
        """The read deadline, or Twisted's idle timeout: 408 if a request had begun."""
        if self.refusing or self._closing():
            return  # already closing (e.g. Twisted's own idle timeout fired first)
        limits = self.limits
        if self._request_begun:
            log.warning("http request refused: not received in time",
                        path=self._logged_path(), peer=self._peer(),
                        read_timeout=limits.read_timeout if limits else None)
            self._refuse(REQUEST_TIMEOUT_RESPONSE)
        else:  # an idle (kept-alive or never used) connection: just close it
            self._refuse(b"")

    # -- the body limit (called by LimitedRequest) -----------------------------------

    def body_limit(self) -> int:
        """The body limit of the request being read (its path is known from line one)."""
        limits = self.limits
        if limits is None:
            raise RuntimeError("a LimitedHTTPChannel needs limits (built by LimitedSite)")
        return limits.body_limit(self._target())

    def refuse_body(self, *, declared: int | None, limit: int) -> None:
        """Answer 413 and close: the body is (or is declared) larger than ``limit``."""
        if self.refusing:
            return
        log.warning("http request refused: body too large", path=self._logged_path(),
                    peer=self._peer(), content_length=declared, max_body_size=limit,
                    chunked=declared is None)
        self._refuse(BODY_TOO_LARGE_RESPONSE)

    # -- internals ----------------------------------------------------------------------

    def _refuse(self, response: bytes) -> None:
        self.refusing = True
        self._cancel_read_deadline()
        self.persistent = False
        self.setTimeout(None)
        transport = self.transport
        if transport is None or self._closing():  # taken over, gone, or already closing
            return
        if response:
            transport.write(response)
        self._abort_later()
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # a chunked body cut off mid-buffer keeps decoding: no 400 after our 413
        if self.refusing or self._closing():
            return
        super()._respondToBadRequestAndDisconnect()

    def timeoutConnection(self) -> None:
        # Twisted's idle timeout (the Site's, also request_read_timeout): same answer
        if self._closing():  # already answered and closing (e.g. Twisted's own 400)
            self._abort_later()
            return
        self._time_out()

    def _abort_later(self) -> None:
        """Like HTTPChannel.timeoutConnection: a peer that never reads what we wrote is
        cut off ``abortTimeout`` seconds later (cancelled if the connection ends first)."""
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(  # type: ignore[assignment]
                self.abortTimeout, self.forceAbortClient)

    def _closing(self) -> bool:
        transport = self.transport
        return transport is None or bool(getattr(transport, "disconnecting", False))

    def _target(self) -> bytes:
        target = getattr(self, "_path", b"")
        return target if isinstance(target, bytes) else b""

    def _logged_path(self) -> str:
        return request_path(self._target()).decode("ascii", "replace")[:_MAX_LOGGED_PATH_CHARS]

    def _peer(self) -> str:
        transport = self.transport
        if transport is None:
            return ""
        peer = transport.getPeer()
        return str(getattr(peer, "host", peer))


class LimitedSite(Site):
    """A ``Site`` whose connections are :class:`LimitedHTTPChannel` and requests
    :class:`LimitedRequest` (HTTP/1.1 only: TLS, and so HTTP/2, ends in front).

    Tracebacks are never shown, and bodies are not parsed into ``request.args``
    (the routes read the raw body).
    """

    protocol = LimitedHTTPChannel  # type: ignore[assignment]

    def __init__(self, resource: IResource, limits: HttpLimits,
                 reactor: IReactorTime | None = None) -> None:
        super().__init__(resource, requestFactory=LimitedRequest,  # type: ignore[no-untyped-call]
                         timeout=limits.read_timeout, reactor=reactor,
                         parsePOSTFormSubmission=False)
        self.limits: Final = limits
        self.displayTracebacks = False

    def buildProtocol(self, addr: IAddress | None) -> Any:
        channel = super().buildProtocol(addr)
        if isinstance(channel, LimitedHTTPChannel):
            channel.limits = self.limits
        return channel
