"""Outbound calls placed by the admin API, from Twilio's create until their stream starts.

An outbound call's stream token cannot be bound to its CallSid: the token goes into the
inline TwiML of the create request, and the CallSid is only known from Twilio's answer.
So the token is issued for a random server-side **reference** (``OB`` + 32 hex digits)
instead, carried in the TwiML as ``<Parameter name="outboundRef">``, and the reference
is recorded here:

1. :meth:`OutboundCalls.reserve` — before the create request: the reference, who is
   called from which number, the assistant chosen and the variables for it, and an
   expiry (the stream token's TTL: the call must ring, be answered and start its
   stream within it).  The table is bounded: when full, nothing more is reserved.
2. :meth:`OutboundCalls.placed` — Twilio's create answered: the reference now names
   that CallSid (:meth:`OutboundCalls.cancel` drops it when the create failed).
3. At the stream's ``start`` the media socket checks (:meth:`OutboundCalls.check`,
   no side effects) that the reference is pending, unexpired and names the start's
   ``callSid``; verifies the stream token against the reference; then
   :meth:`OutboundCalls.attach_stream` consumes the entry (single use) and asks the
   switchboard to open the call with the assistant chosen when it was placed.

A call that is never answered (busy, no answer, failed) leaves no session: its entry
simply expires.  Expired entries are pruned on every use of the table (no timer).

The switchboard remembers how an outbound call was placed for as long as the call
lives, so its Vapi calls (the first, and any recreated one) use the chosen assistant
and variables.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from gateway.bridge.session import CallSession, MediaSocket
from gateway.twilio.stream import Started
from gateway.vapi.assistants import AssistantChoice

if TYPE_CHECKING:
    pass

__all__ = [
    "DEFAULT_MAX_PENDING",
    "OutboundCall",
    "OutboundCalls",
    "OutboundRefusal",
    "PendingTableFullError",
    "outbound_variables",
]

DEFAULT_MAX_PENDING: Final = 1000
"""How many outbound calls may be ringing (reserved, not yet streaming) at once."""

REFERENCE_PREFIX: Final = "OB"
_REFERENCE_BYTES: Final = 16

OutboundRefusal = Literal[
    "unknown",  # no such reference: never issued, already used, cancelled or long expired
    "expired",  # the reference is past its expiry (the call rang or waited too long)
    "not-placed",  # Twilio's create has not answered yet: no CallSid to compare
    "wrong-call",  # the reference belongs to another CallSid
]


class PendingTableFullError(Exception):
    """Too many outbound calls are pending to reserve one more."""


@dataclass(frozen=True)
class OutboundCall:
    """One outbound call between the create request and its stream's ``start``."""

    reference: str
    caller: str
    """The number the call is placed from (the gateway's own: Twilio's ``From``)."""
    called: str
    """The number called (Twilio's ``To``)."""
    choice: AssistantChoice
    variables: Mapping[str, str]
    """Passed to the assistant as ``assistantOverrides.variableValues``."""
    expires_at: float
    """Seconds since the epoch (the injected clock's time)."""
    call_sid: str | None = None
    """Known once Twilio's create answered."""


class OutboundSwitchboard(Protocol):
    """What :class:`OutboundCalls` needs of the switchboard."""

    def attach_stream(self, stream: MediaSocket, started: Started,
                      outbound: OutboundCall | None = None) -> CallSession | None: ...


class OutboundCalls:
    """The pending outbound calls of this process (see the module docstring)."""

    def __init__(
        self,
        switchboard: OutboundSwitchboard,
        *,
        ttl_seconds: float,
        max_pending: int = DEFAULT_MAX_PENDING,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """
        :param ttl_seconds: how long a reserved call may take to start its stream (use
            the stream token's TTL: the token expires at the same moment).
        :param max_pending: the bound on reserved calls.
        :param random_bytes: the reference's randomness (tests inject their own).
        """
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._switchboard = switchboard
        self.ttl_seconds: Final = ttl_seconds
        self.max_pending: Final = max_pending
        self._random_bytes = random_bytes
        # insertion order is expiry order (one TTL for all): pruning pops from the front
        self._pending: dict[str, OutboundCall] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def pending(self, now: float) -> list[OutboundCall]:
        """The unexpired pending calls, oldest first."""
        self._prune(now)
        return list(self._pending.values())

    # -- placing ----------------------------------------------------------------------

    def reserve(
        self,
        *,
        caller: str,
        called: str,
        choice: AssistantChoice,
        variables: Mapping[str, str],
        now: float,
    ) -> OutboundCall:
        """A new pending call under a fresh reference, valid for ``ttl_seconds``.

        Raises :class:`PendingTableFullError` when ``max_pending`` calls are pending.
        """
        self._prune(now)
        if len(self._pending) >= self.max_pending:
            raise PendingTableFullError(f"{len(self._pending)} outbound calls are pending")
        reference = REFERENCE_PREFIX + self._random_bytes(_REFERENCE_BYTES).hex()
        if reference in self._pending or len(reference) != 2 + 2 * _REFERENCE_BYTES:
            raise ValueError("random_bytes gave a repeated or short reference")
        call = OutboundCall(reference, caller, called, choice, dict(variables),
                            expires_at=now + self.ttl_seconds)
        self._pending[reference] = call
        return call

    def placed(self, reference: str, call_sid: str, now: float) -> OutboundCall | None:
        """Twilio's create answered with ``call_sid``; None if the entry is gone."""
        self._prune(now)
        call = self._pending.get(reference)
        if call is None:
            return None
        call = replace(call, call_sid=call_sid)
        self._pending[reference] = call
        return call

    def cancel(self, reference: str) -> None:
        """Drop a reservation (the create failed)."""
        self._pending.pop(reference, None)

    # -- the stream's start -------------------------------------------------------------

    def check(self, reference: str, call_sid: str, now: float) -> OutboundRefusal | None:
        """Whether a stream starting now for ``call_sid`` may claim ``reference``.

        No side effects: a refused start leaves the entry for the genuine stream.
        """
        call = self._pending.get(reference)
        if call is None:
            return "unknown"
        if now >= call.expires_at:
            self._prune(now)
            return "expired"
        if call.call_sid is None:
            return "not-placed"
        if call.call_sid != call_sid:
            return "wrong-call"
        return None

    def attach_stream(
        self, reference: str, stream: MediaSocket, started: Started, now: float
    ) -> CallSession | None:
        """Consume the entry and open the call with its chosen assistant, then attach
        ``stream``.  Call only after :meth:`check` accepted and the token verified;
        None if the entry is unusable or the switchboard does not admit the call."""
        if self.check(reference, started.call_sid, now) is not None:
            return None
        call = self._pending.pop(reference)
        return self._switchboard.attach_stream(stream, started, outbound=call)

    def _prune(self, now: float) -> None:
        pending = self._pending
        while pending:
            reference, call = next(iter(pending.items()))
            if now < call.expires_at:
                return
            del pending[reference]


def outbound_variables(base: Mapping[str, Any] | None, variables: Mapping[str, str]
                       ) -> dict[str, Any] | None:
    """``assistantOverrides`` with the call's ``variables`` added to (and winning over)
    any ``variableValues`` in ``base``; None when there is nothing to override."""
    overrides: dict[str, Any] = dict(base or {})
    if variables:
        overrides["variableValues"] = {**overrides.get("variableValues", {}), **variables}
    return overrides or None
