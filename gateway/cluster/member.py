"""This instance as a member of the cluster: its records in Redis and its bus channel.

:class:`ClusterMember` is the one object of the cluster package that the rest of the
gateway talks to, and the only one that does I/O (through two supervised Redis
connections: commands, and the subscription to its own bus channel).

- **Registry** (:meth:`call_added` / :meth:`call_changed` / :meth:`call_removed`,
  called by :class:`~gateway.cluster.registry.ClusterRegistry`): each local call is
  written at once and refreshed with this instance's liveness key every
  ``refresh_interval``; a write that fails is not retried on the spot — the next
  refresh rewrites everything, and deletions that failed are replayed when Redis
  returns (the re-sync).
- **Control bus**: a request for a call held elsewhere (status callback, Vapi's end,
  admin hang-up) is published to the owner's channel; what arrives on ours is acted on
  through :class:`LocalCalls` (the switchboard).
- **Takeover**: when a call's media stream reaches this instance but another one
  answered its webhook, :meth:`take_over` asks the owner for the call's Vapi side.
- **Admission**: :meth:`reserve` counts a call against ``max_cluster_calls``.

Redis trouble never reaches a call in progress: every method returns a Deferred that
fails fast (``RedisUnavailableError``) or fires within ``command_timeout``; callers fall
back to local-only handling, counted in ``vapi_gateway_cluster_fallbacks_total``.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from gateway.cluster import records
from gateway.cluster.records import (
    BusMessage,
    CallRecord,
    EndCall,
    EndVapiCall,
    HandedOver,
    InstanceRecord,
    Keys,
    TakeOver,
)
from gateway.cluster.redis_client import Connect, RedisConnection, RedisTarget
from gateway.cluster.store import CallLookup, ClusterStore
from gateway.config import ClusterSettings
from gateway.logs import get_logger
from gateway.vapi.calls import CreatedCall, SocketUrl

log = get_logger("gateway.cluster")

#: How long a bus message may take to reach its owner before the sender gives up.
PUBLISH_TIMEOUT_S = 1.0


class RecordedCall(Protocol):
    """What the cluster records of a local call (``gateway.bridge.session.CallSession``)."""

    @property
    def call_sid(self) -> str: ...

    @property
    def ended(self) -> bool: ...

    cause: str | None
    state: str
    stream_sid: str | None
    vapi_call_id: str | None
    created_wall: float

    @property
    def info(self) -> Any: ...


HandOff = CreatedCall | Literal["none", "ended"]


class LocalCalls(Protocol):
    """What the member asks of this instance's calls (``Switchboard``)."""

    def end_call(self, call_sid: str, cause: str) -> Deferred[None] | None: ...

    def vapi_call_ended(self, vapi_call_id: str) -> bool: ...

    def hand_over(self, call_sid: str) -> Deferred[HandOff]: ...

    def end_orphan(self, created: CreatedCall) -> None: ...


@dataclass(frozen=True)
class Takeover:
    """The outcome of :meth:`ClusterMember.take_over`.

    ``created``: the Vapi call to open (handed over); ``ended``: the call already ended
    (refuse the stream); neither: create a Vapi call here.  ``reason`` says why (logs,
    metric label).
    """

    reason: str
    created: CreatedCall | None = None
    ended: bool = False


def default_instance_id(worker: int | None) -> str:
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-w{worker}" if worker is not None else f"{host}-{os.getpid()}"


class ClusterMember(Service):
    """This instance in the cluster (see the module docstring)."""

    def __init__(self, settings: ClusterSettings, clock: IReactorTime, connect: Connect, *,
                 instance_id: str, worker: int | None, ended_ttl_s: float,
                 events: Callable[[str, str], None] | None = None,
                 redis_state: Callable[[bool], None] | None = None) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.worker = worker
        self.clock = clock
        self.keys = Keys(settings.key_prefix)
        target = RedisTarget.from_settings(settings)
        timeout = settings.command_timeout
        self.redis = RedisConnection(target, clock, connect, name="commands",
                                     command_timeout=timeout,
                                     ping_interval=max(0.5, settings.refresh_interval / 2),
                                     on_up_change=self._redis_up_changed)
        self.subscriber = RedisConnection(target, clock, connect, name="bus",
                                          command_timeout=timeout,
                                          ping_interval=max(0.5, settings.refresh_interval / 2),
                                          subscribe=[self.keys.bus(instance_id).encode()],
                                          on_message=self._on_bus_message)
        self.store = ClusterStore(self.redis, self.keys, instance_id,
                                  call_ttl_ms=int(settings.call_ttl * 1000),
                                  ended_ttl_ms=int(ended_ttl_s * 1000))
        self.local: LocalCalls | None = None
        self._calls: dict[str, RecordedCall] = {}
        self._unsaved_deletes: dict[str, tuple[str | None, bool]] = {}
        self._takeovers: dict[str, tuple[Deferred[Takeover], IDelayedCall]] = {}
        self._refresh = LoopingCall(self.refresh)
        self._refresh.clock = clock
        self._events = events or (lambda kind, label: None)
        self._redis_state = redis_state or (lambda up: None)
        self.started_at = time.time()
        self.draining = False
        self.log = log.bind(instance=instance_id)

    @property
    def available(self) -> bool:
        """Redis is reachable (commands and bus)."""
        return self.redis.up and self.subscriber.up

    # -- life ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.log.info("joining the cluster", redis=str(self.redis.target))
        self.redis.start()
        self.subscriber.start()
        self._refresh.start(self.settings.refresh_interval, now=False)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        if self._refresh.running:
            self._refresh.stop()
        for waiting, timer in list(self._takeovers.values()):
            timer.cancel()
            waiting.callback(Takeover("stopping"))
        self._takeovers.clear()
        leaving: Deferred[Any] = (self.store.delete_instance() if self.redis.up
                                  else succeed(None))
        leaving.addErrback(lambda f: self.log.warning("could not remove the liveness key",
                                                      error=f.getErrorMessage()))

        def close(_: object) -> Deferred[Any]:
            return DeferredList([self.redis.stop(), self.subscriber.stop()])

        done: Deferred[None] = leaving.addCallback(close).addCallback(lambda _: None)
        return done

    def _redis_up_changed(self, up: bool) -> None:
        self._redis_state(up)
        if up:
            self.log.info("redis available: re-syncing the registry",
                          local_calls=len(self._calls),
                          unsaved_deletes=len(self._unsaved_deletes))
            self.refresh()
        elif self.running:  # not our own connections closing at shutdown
            self.log.warning("redis unavailable: calls in progress continue; new calls "
                             "are handled by this instance alone until it returns")

    # -- registry ----------------------------------------------------------------------------

    def record_of(self, call: RecordedCall) -> CallRecord:
        info = call.info
        return CallRecord(call_sid=call.call_sid, owner=self.instance_id,
                          started=call.created_wall, state=call.state,
                          stream_sid=call.stream_sid or "",
                          vapi_call_id=call.vapi_call_id or "",
                          caller=getattr(info, "caller", ""), called=getattr(info, "called", ""))

    def call_added(self, call: RecordedCall) -> None:
        self._calls[call.call_sid] = call
        self._unsaved_deletes.pop(call.call_sid, None)
        self._save([call])

    def call_changed(self, call: RecordedCall) -> None:
        if self._calls.get(call.call_sid) is call:
            self._save([call])

    def call_removed(self, call: RecordedCall) -> None:
        if self._calls.get(call.call_sid) is not call:
            return
        del self._calls[call.call_sid]
        ended = call.cause != "handed-over"
        if not self.redis.up:
            self._unsaved_deletes[call.call_sid] = (call.vapi_call_id, ended)
            return
        deleting = self.store.delete_call(call.call_sid, call.vapi_call_id, ended)

        def failed(failure: Failure) -> None:
            self._unsaved_deletes[call.call_sid] = (call.vapi_call_id, ended)
            self._failed("delete", failure)

        deleting.addErrback(failed)

    def _save(self, calls: list[RecordedCall]) -> None:
        if not self.redis.up:
            return  # the re-sync writes it when Redis returns
        self.store.put_calls([self.record_of(c) for c in calls]).addErrback(
            lambda f: self._failed("write", f))

    def instance_record(self) -> InstanceRecord:
        return InstanceRecord(instance_id=self.instance_id,
                              host=socket.gethostname(), pid=os.getpid(),
                              started=self.started_at, calls=len(self._calls),
                              worker=self.worker, draining=self.draining)

    def refresh(self) -> Deferred[None]:
        """Rewrite every local call and the liveness key; replay failed deletions."""
        if not self.redis.up:
            return succeed(None)
        work: list[Deferred[Any]] = [self.store.put_calls(
            [self.record_of(c) for c in self._calls.values() if not c.ended],
            self.instance_record())]
        unsaved, self._unsaved_deletes = self._unsaved_deletes, {}
        for sid, (vapi_call_id, ended) in unsaved.items():
            work.append(self.store.delete_call(sid, vapi_call_id, ended))
        done = DeferredList(work, consumeErrors=True)

        def report(results: list[tuple[bool, Any]]) -> None:
            for ok, value in results:
                if not ok:
                    self._failed("refresh", value)
                    break
            outcomes = zip(results[1:], unsaved, strict=True)
            for sid in [sid for (ok, _), sid in outcomes if not ok]:
                self._unsaved_deletes.setdefault(sid, unsaved[sid])

        return done.addCallback(report)

    def _failed(self, operation: str, failure: Failure) -> None:
        self._events("redis-error", operation)
        self.log.warning("redis operation failed", operation=operation,
                         error=failure.getErrorMessage())

    # -- reads (admin API, routes) --------------------------------------------------------

    def list_calls(self) -> Deferred[list[CallRecord]]:
        return self.store.list_calls()

    def list_instances(self) -> Deferred[list[InstanceRecord]]:
        return self.store.list_instances()

    def find_call(self, call_sid: str) -> Deferred[CallLookup]:
        return self.store.find_call(call_sid)

    def reserve(self, call_sid: str) -> Deferred[bool | None]:
        """Count a new call against ``max_cluster_calls``: True admitted, False full,
        None when Redis cannot say (the caller falls back to local admission)."""
        limit = self.settings.max_cluster_calls
        if limit <= 0:
            return succeed(True)
        if not self.redis.up:
            self._fallback("admission")
            return succeed(None)

        def unknown(failure: Failure) -> None:
            self._fallback("admission", failure)

        reserving: Deferred[Any] = self.store.reserve_call(call_sid, limit)
        decided: Deferred[bool | None] = reserving.addErrback(unknown)
        return decided

    def _fallback(self, what: str, failure: Failure | None = None) -> None:
        self._events("fallback", what)
        self.log.warning("redis unavailable: handling locally", operation=what,
                         error=failure.getErrorMessage() if failure else "not connected")

    # -- requests to other instances --------------------------------------------------------

    def end_elsewhere(self, call_sid: str, cause: str) -> Deferred[str | None]:
        """Ask the instance holding ``call_sid`` to end it; its id, or None if no
        instance holds it (or Redis cannot say)."""
        def send(found: CallLookup) -> Any:
            record = found.record
            if record is None or record.owner == self.instance_id:
                return None
            message = EndCall(call_sid, cause, sent_at=time.time())
            return self._send(record.owner, message).addCallback(
                lambda delivered: record.owner if delivered else None)

        return self._ask(self.store.find_call(call_sid).addCallback(send), "end-call")

    def vapi_ended_elsewhere(self, vapi_call_id: str) -> Deferred[str | None]:
        """Vapi's end of a Vapi call this instance does not hold: tell its owner."""
        def send(record: CallRecord | None) -> Any:
            if record is None or record.owner == self.instance_id:
                return None
            message = EndVapiCall(vapi_call_id, sent_at=time.time())
            return self._send(record.owner, message).addCallback(
                lambda delivered: record.owner if delivered else None)

        return self._ask(self.store.find_vapi_call(vapi_call_id).addCallback(send),
                         "vapi-ended")

    def _ask(self, asking: Deferred[Any], what: str) -> Deferred[str | None]:
        def unavailable(failure: Failure) -> None:
            self._fallback(what, failure)

        return asking.addErrback(unavailable)

    def _send(self, instance_id: str, message: BusMessage) -> Deferred[bool]:
        self._events("bus-sent", type(message).__name__)
        return self.store.publish(instance_id, message).addCallback(lambda n: n > 0)

    def take_over(self, call_sid: str) -> Deferred[Takeover]:
        """This instance got ``call_sid``'s media stream: ask the call's owner (if it is
        another live instance) to hand its Vapi call over.  Never fails; bounded by
        ``takeover_timeout``."""
        if not self.available:
            self._fallback("takeover")
            return succeed(Takeover("redis-unavailable"))
        request_id = secrets.token_hex(8)
        answer: Deferred[Takeover] = Deferred()

        def expire() -> None:
            self._takeovers.pop(request_id, None)
            self._events("takeover", "timeout")
            answer.callback(Takeover("owner-timeout"))

        def ask(found: CallLookup) -> None:
            if found.ended_by is not None and found.record is None:
                self._finish_takeover(request_id, Takeover("ended", ended=True))
                return
            record = found.record
            if record is None or record.owner == self.instance_id:
                self._finish_takeover(request_id, Takeover("no-owner"))
                return
            message = TakeOver(call_sid, request_id, reply_to=self.instance_id)

            def delivered(count: bool) -> None:
                if not count:  # the owner is gone: its records outlived it
                    self._finish_takeover(request_id, Takeover("owner-gone"))

            self._send(record.owner, message).addCallbacks(delivered, failed)

        def failed(failure: Failure) -> None:
            self._fallback("takeover", failure)
            self._finish_takeover(request_id, Takeover("redis-unavailable"))

        timer = self.clock.callLater(self.settings.takeover_timeout, expire)
        self._takeovers[request_id] = (answer, timer)
        self.store.find_call(call_sid).addCallbacks(ask, failed)
        return answer

    def _finish_takeover(self, request_id: str, outcome: Takeover) -> None:
        pending = self._takeovers.pop(request_id, None)
        if pending is None:
            return  # timed out already
        answer, timer = pending
        if timer.active():
            timer.cancel()
        self._events("takeover", outcome.reason)
        answer.callback(outcome)

    # -- what arrives on our channel ---------------------------------------------------------

    def _on_bus_message(self, channel: bytes, data: bytes) -> None:
        try:
            message = records.decode_bus_message(data)
        except ValueError as exc:
            self._events("bus-bad", "message")
            self.log.warning("bad message on the control bus; ignored", error=str(exc)[:200])
            return
        self._events("bus-received", type(message).__name__)
        local = self.local
        if local is None:
            return
        if isinstance(message, EndCall):
            latency_ms = (time.time() - message.sent_at) * 1000 if message.sent_at else None
            ending = local.end_call(message.call_sid, message.cause)
            self.log.info("end-call from the control bus", call_sid=message.call_sid,
                          cause=message.cause, held=ending is not None,
                          bus_latency_ms=round(latency_ms, 2) if latency_ms else None)
        elif isinstance(message, EndVapiCall):
            held = local.vapi_call_ended(message.vapi_call_id)
            self.log.info("vapi-ended from the control bus",
                          vapi_call_id=message.vapi_call_id, held=held)
        elif isinstance(message, TakeOver):
            self._hand_over(local, message)
        elif isinstance(message, HandedOver):
            self._handed_over(message)

    def _hand_over(self, local: LocalCalls, request: TakeOver) -> None:
        call_log = self.log.bind(call_sid=request.call_sid, to=request.reply_to)

        def reply(handed: HandOff) -> Deferred[Any]:
            if isinstance(handed, CreatedCall):
                message = HandedOver(request.request_id, "vapi-call",
                                     vapi_call_id=handed.call_id,
                                     socket_url=handed.socket_url.reveal())
                call_log.info("call handed over to the stream's instance",
                              vapi_call_id=handed.call_id)

                def undelivered(outcome: object) -> object:
                    if outcome is True:
                        return outcome
                    # nobody will open it: end it rather than leave it billing
                    call_log.warning("hand-over not delivered; ending its vapi call",
                                     vapi_call_id=handed.call_id)
                    local.end_orphan(handed)
                    return outcome  # a failure still reaches _failed("handover")

                return self._send(request.reply_to, message).addBoth(undelivered)
            message = HandedOver(request.request_id, handed)
            call_log.info("takeover asked; no vapi call to hand over", outcome=handed)
            return self._send(request.reply_to, message)

        handing = local.hand_over(request.call_sid).addCallback(reply)
        handing.addErrback(lambda f: self._failed("handover", f))

    def _handed_over(self, message: HandedOver) -> None:
        if message.outcome == "vapi-call":
            try:
                created = CreatedCall(message.vapi_call_id, SocketUrl(message.socket_url))
            except ValueError as exc:
                self.log.error("a handed-over vapi call has an unusable socket URL",
                               vapi_call_id=message.vapi_call_id, error=str(exc))
                self._finish_takeover(message.request_id, Takeover("owner-had-none"))
                return
            if message.request_id not in self._takeovers:
                # we stopped waiting and created our own: that Vapi call must not bill on
                if self.local is not None:
                    self.log.info("a vapi call was handed over too late; ending it",
                                  vapi_call_id=created.call_id)
                    self.local.end_orphan(created)
                return
            self._finish_takeover(message.request_id, Takeover("handed-over", created))
        elif message.outcome == "ended":
            self._finish_takeover(message.request_id, Takeover("ended", ended=True))
        else:
            self._finish_takeover(message.request_id, Takeover("owner-had-none"))
