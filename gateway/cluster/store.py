"""The cluster's records in Redis: every read and write the cluster makes, as Deferreds.

A thin layer over one :class:`~gateway.cluster.redis_client.RedisConnection`: it names
the keys (:class:`~gateway.cluster.records.Keys`), runs the atomic scripts of
:mod:`gateway.cluster.records` (by SHA once loaded, by text if Redis lost them), and
turns replies into records.  Every call fails fast with ``RedisUnavailableError`` when Redis
is down; callers decide what that means (nothing on the media path ever waits here).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gateway.cluster import records
from gateway.cluster.records import CallRecord, InstanceRecord, Keys
from gateway.cluster.redis_client import RedisConnection
from gateway.cluster.resp import Arg, RedisError


class CallLookup:
    """What the cluster knows of a CallSid: its record, or that it ended, or nothing."""

    __slots__ = ("ended_by", "record")

    def __init__(self, record: CallRecord | None, ended_by: str | None) -> None:
        self.record = record
        self.ended_by = ended_by


class ClusterStore:
    """Reads and writes the cluster's keys (see :mod:`gateway.cluster.records`)."""

    def __init__(self, redis: RedisConnection, keys: Keys, instance_id: str,
                 call_ttl_ms: int, ended_ttl_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.instance_id = instance_id
        self.call_ttl_ms = call_ttl_ms
        self.ended_ttl_ms = ended_ttl_ms
        self._sha = {name: hashlib.sha1(text.encode()).hexdigest()
                     for name, text in records.SCRIPTS.items()}

    # -- scripts ------------------------------------------------------------------------

    def _script_command(self, name: str, keys: Sequence[str], args: Sequence[Arg]
                        ) -> list[Arg]:
        return ["EVALSHA", self._sha[name], len(keys), *keys, *args]

    def _run(self, commands: list[tuple[str, Sequence[str], Sequence[Arg]]]
             ) -> Deferred[list[Any]]:
        """Run scripts in one pipeline; if Redis does not know one (restarted, flushed),
        load them all and run again once."""
        pipeline = [self._script_command(name, keys, args) for name, keys, args in commands]

        def unknown_script(failure: Failure) -> Any:
            if failure.check(RedisError) and str(failure.value).startswith("NOSCRIPT"):
                loads: list[list[Arg]] = [["SCRIPT", "LOAD", text]
                                          for text in records.SCRIPTS.values()]
                return self.redis.pipeline(loads).addCallback(
                    lambda _: self.redis.pipeline(pipeline))
            return failure

        return self.redis.pipeline(pipeline).addErrback(unknown_script)

    # -- calls ----------------------------------------------------------------------------

    def _put_call(self, record: CallRecord) -> tuple[str, Sequence[str], Sequence[Arg]]:
        keys = self.keys
        vapi = keys.vapi(record.vapi_call_id) if record.vapi_call_id else ""
        return ("put_call", (keys.call(record.call_sid), keys.calls, vapi),
                (record.call_sid, records.encode(record), self.call_ttl_ms))

    def put_calls(self, calls: Sequence[CallRecord],
                  instance: InstanceRecord | None = None) -> Deferred[list[Any]]:
        """Write (or refresh) these calls' records, and this instance's liveness key."""
        commands = [self._put_call(record) for record in calls]
        if instance is not None:
            keys = self.keys
            commands.append(("put_instance",
                             (keys.instance(instance.instance_id), keys.instances),
                             (instance.instance_id, records.encode(instance),
                              self.call_ttl_ms)))
        return self._run(commands)

    def delete_call(self, call_sid: str, vapi_call_id: str | None, ended: bool
                    ) -> Deferred[bool]:
        """Forget a call this instance owned; ``ended``: remember that it ended (a late
        stream for it is refused on every instance)."""
        keys = self.keys
        vapi = keys.vapi(vapi_call_id) if vapi_call_id else ""
        command = ("delete_call", (keys.call(call_sid), keys.calls, vapi, keys.ended(call_sid)),
                   (call_sid, self.instance_id, self.ended_ttl_ms if ended else 0))
        return self._run([command]).addCallback(lambda replies: bool(replies[0]))

    def find_call(self, call_sid: str) -> Deferred[CallLookup]:
        keys = self.keys

        def lookup(replies: list[Any]) -> CallLookup:
            raw, ended_by = replies[0]
            record = records.decode_call(raw) if raw else None
            return CallLookup(record, ended_by.decode("utf-8", "replace") if ended_by else None)

        return self._run([("find_call", (keys.call(call_sid), keys.ended(call_sid)), ())]
                         ).addCallback(lookup)

    def find_vapi_call(self, vapi_call_id: str) -> Deferred[CallRecord | None]:
        """The record of the call a Vapi call belongs to."""
        def record(sid: bytes | None) -> Any:
            if not sid:
                return None
            return self.find_call(sid.decode("utf-8", "replace")).addCallback(
                lambda found: found.record)

        return self.redis.execute("GET", self.keys.vapi(vapi_call_id)).addCallback(record)

    def reserve_call(self, call_sid: str, max_calls: int) -> Deferred[bool]:
        """Count the call against the cluster-wide limit; False if the cluster is full."""
        return self._run([("reserve_call", (self.keys.calls,),
                           (call_sid, self.call_ttl_ms, max_calls))]
                         ).addCallback(lambda replies: bool(replies[0]))

    def list_calls(self) -> Deferred[list[CallRecord]]:
        def parse(replies: list[Any]) -> list[CallRecord]:
            found = (records.decode_call(raw) for raw in replies[0])
            return [record for record in found if record is not None]

        return self._run([("list_records", (self.keys.calls,), (self.keys.call(""),))]
                         ).addCallback(parse)

    # -- instances ------------------------------------------------------------------------

    def list_instances(self) -> Deferred[list[InstanceRecord]]:
        def parse(replies: list[Any]) -> list[InstanceRecord]:
            found = (records.decode_instance(raw) for raw in replies[0])
            return [record for record in found if record is not None]

        return self._run([("list_records", (self.keys.instances,),
                           (self.keys.instance(""),))]).addCallback(parse)

    def delete_instance(self) -> Deferred[list[Any]]:
        keys = self.keys
        return self._run([("delete_instance",
                           (keys.instance(self.instance_id), keys.instances),
                           (self.instance_id,))])

    # -- the bus ---------------------------------------------------------------------------

    def publish(self, instance_id: str, message: records.BusMessage) -> Deferred[int]:
        """Send ``message`` to ``instance_id``'s channel; how many subscribers got it."""
        return self.redis.execute("PUBLISH", self.keys.bus(instance_id),
                                  records.encode(message)).addCallback(int)
