"""What the cluster keeps in Redis and says on its bus, and the keys it uses (sans-io).

Keys (all under ``[cluster] key_prefix``, ``vgw:`` by default):

==========================  ==================================================  ==========
key                         value                                               expires
==========================  ==================================================  ==========
``call:<CallSid>``          :class:`CallRecord` as JSON (owner, stream, …)      call_ttl
``calls``                   sorted set: CallSid → expiry (ms, Redis time)       members
``vapi:<vapi call id>``     the CallSid that Vapi call belongs to               call_ttl
``ended:<CallSid>``         the instance that ended it                          token TTL
``instance:<id>``           :class:`InstanceRecord` as JSON (liveness)          call_ttl
``instances``               sorted set: instance id → expiry                    members
``bus:<id>``                pub/sub channel of that instance                    —
==========================  ==================================================  ==========

Owners refresh their records every ``refresh_interval``; when an instance dies its
records simply expire.  The sorted sets give admission a count and the admin API a
list without ``SCAN``; expired members are pruned by the scripts that read them.
Expiry times come from Redis's own clock (``TIME`` inside the scripts), so the
instances' clocks need not agree.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class CallRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """One active call as the cluster sees it."""

    call_sid: str
    owner: str
    started: float  # Unix time
    state: str = ""
    stream_sid: str = ""
    vapi_call_id: str = ""
    caller: str = ""
    called: str = ""


class InstanceRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """A live instance (its liveness key)."""

    instance_id: str
    host: str
    pid: int
    started: float
    calls: int = 0
    worker: int | None = None
    draining: bool = False


# -- the control bus: one channel per instance ---------------------------------------


class EndCall(msgspec.Struct, frozen=True, tag="end-call", tag_field="op"):
    """End this call (a status callback or admin request reached another instance)."""

    call_sid: str
    cause: str
    sent_at: float = 0.0  # sender's Unix time, for the latency figure in the log


class EndVapiCall(msgspec.Struct, frozen=True, tag="vapi-ended", tag_field="op"):
    """Vapi said (by webhook, to another instance) that this Vapi call ended."""

    vapi_call_id: str
    sent_at: float = 0.0


class TakeOver(msgspec.Struct, frozen=True, tag="take-over", tag_field="op"):
    """The call's media stream reached ``reply_to``: hand the call's Vapi side over."""

    call_sid: str
    request_id: str
    reply_to: str


class HandedOver(msgspec.Struct, frozen=True, tag="handed-over", tag_field="op"):
    """The answer to :class:`TakeOver`: the Vapi call to use, or none (create one).

    ``socket_url`` is the Vapi call's bearer capability; it crosses the bus once, from
    the instance that created the call to the one that will open its socket.
    """

    request_id: str
    outcome: Literal["vapi-call", "none", "ended"]
    vapi_call_id: str = ""
    socket_url: str = ""


BusMessage = EndCall | EndVapiCall | TakeOver | HandedOver

_encoder = msgspec.json.Encoder()
_bus_decoder = msgspec.json.Decoder(BusMessage)
_call_decoder = msgspec.json.Decoder(CallRecord)
_instance_decoder = msgspec.json.Decoder(InstanceRecord)

#: Largest bus message or record accepted from Redis.
MAX_MESSAGE_BYTES = 16 * 1024


def encode(value: msgspec.Struct) -> bytes:
    return _encoder.encode(value)


def decode_bus_message(data: bytes) -> BusMessage:
    """A bus message; ValueError if it is not one (too big, not JSON, unknown op)."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"bus message of {len(data)} bytes")
    try:
        message: BusMessage = _bus_decoder.decode(data)
        return message
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from None


def decode_call(data: bytes) -> CallRecord | None:
    """A stored call record, or None if it is unreadable."""
    try:
        return _call_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


def decode_instance(data: bytes) -> InstanceRecord | None:
    try:
        return _instance_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


class Keys:
    """Key and channel names under one prefix."""

    __slots__ = ("calls", "instances", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.calls = f"{prefix}calls"
        self.instances = f"{prefix}instances"

    def call(self, call_sid: str) -> str:
        return f"{self.prefix}call:{call_sid}"

    def vapi(self, vapi_call_id: str) -> str:
        return f"{self.prefix}vapi:{vapi_call_id}"

    def ended(self, call_sid: str) -> str:
        return f"{self.prefix}ended:{call_sid}"

    def instance(self, instance_id: str) -> str:
        return f"{self.prefix}instance:{instance_id}"

    def bus(self, instance_id: str) -> str:
        return f"{self.prefix}bus:{instance_id}"


# -- Lua scripts (run atomically in Redis; times from Redis's clock) --------------------

_NOW = "local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

#: KEYS: call, calls, vapi-or-empty · ARGV: sid, record JSON, ttl ms
PUT_CALL = _NOW + """
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[3]) end
return 1
"""

#: KEYS: call, calls, vapi-or-empty, ended · ARGV: sid, owner, ended ttl ms (0: none)
#: Deletes only what ``owner`` still owns (a taken-over call is the new owner's).
DELETE_CALL = """
local cur = redis.call('GET', KEYS[1])
local mine = false
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  mine = ok and type(rec) == 'table' and rec['owner'] == ARGV[2]
end
if mine then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if KEYS[3] ~= '' and redis.call('GET', KEYS[3]) == ARGV[1] and (mine or not cur) then
  redis.call('DEL', KEYS[3])
end
if tonumber(ARGV[3]) > 0 and (mine or not cur) then
  redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[3])
end
if mine then return 1 end
return 0
"""

#: KEYS: calls · ARGV: sid, ttl ms, max calls
#: 1: admitted (or already counted: a retried webhook); 0: the cluster is full.
RESERVE_CALL = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""

#: KEYS: sorted set · ARGV: key prefix of the members' records
#: Prunes expired members; returns the records still present.
LIST_RECORDS = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local out = {}
for _, member in ipairs(members) do
  local value = redis.call('GET', ARGV[1] .. member)
  if value then table.insert(out, value) end
end
return out
"""

#: KEYS: call, ended · the call's record and whether it ended (in one round trip)
FIND_CALL = """
return {redis.call('GET', KEYS[1]) or false, redis.call('GET', KEYS[2]) or false}
"""

#: KEYS: instance, instances · ARGV: id, record JSON, ttl ms
PUT_INSTANCE = _NOW + """
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""

#: KEYS: instance, instances · ARGV: id
DELETE_INSTANCE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

SCRIPTS = {
    "put_call": PUT_CALL, "delete_call": DELETE_CALL, "reserve_call": RESERVE_CALL,
    "list_records": LIST_RECORDS, "find_call": FIND_CALL, "put_instance": PUT_INSTANCE,
    "delete_instance": DELETE_INSTANCE,
}
