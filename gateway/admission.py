"""Admission: whether the gateway takes another call right now, and why not.

Read by the voice webhook (busy TwiML), ``/ready`` (503) and the drain on shutdown.
"""

from __future__ import annotations

import enum

from gateway.bridge.registry import CallRegistry


class Refusal(enum.Enum):
    """Why a new call is refused."""

    DRAINING = "draining"
    CAPACITY = "capacity"


class Admission:
    """Capacity and draining state over a call registry."""

    def __init__(self, registry: CallRegistry, max_concurrent_calls: int) -> None:
        self.registry = registry
        self.max_concurrent_calls = max_concurrent_calls
        self.draining = False
        self.refused: dict[Refusal, int] = {r: 0 for r in Refusal}

    def refusal(self) -> Refusal | None:
        """The reason a call arriving now would be refused, or None if it is admitted."""
        if self.draining:
            return Refusal.DRAINING
        if len(self.registry) >= self.max_concurrent_calls:
            return Refusal.CAPACITY
        return None

    def admit(self) -> Refusal | None:
        """Like :meth:`refusal`, and counts the refusal."""
        reason = self.refusal()
        if reason is not None:
            self.refused[reason] += 1
        return reason
