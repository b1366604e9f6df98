"""Admission: whether the gateway takes another call right now, and why not.

Read by the voice webhook (busy TwiML), ``/ready`` (503) and the drain on shutdown.
"""

from __future__ import annotations

import enum
from typing import Protocol

from twisted.internet.defer import Deferred, succeed

from gateway.bridge.registry import CallRegistry


class ClusterGate(Protocol):
    """Cluster-wide admission (``gateway.cluster.member.ClusterMember.reserve``)."""

    def reserve(self, call_sid: str) -> Deferred[bool | None]: ...


class Refusal(enum.Enum):
    """Why a new call is refused."""

    DRAINING = "draining"
    CAPACITY = "capacity"
    CLUSTER_CAPACITY = "cluster-capacity"


class Admission:
    """Capacity and draining state over a call registry."""

    def __init__(self, registry: CallRegistry, max_concurrent_calls: int,
                 cluster: ClusterGate | None = None) -> None:
        self.registry = registry
        self.max_concurrent_calls = max_concurrent_calls
        self.cluster = cluster
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

    def admit_call(self, call_sid: str) -> Deferred[Refusal | None]:
        """:meth:`admit` for a new call, then the cluster-wide limit if one is set (when
        Redis cannot say, this instance's own limit decides)."""
        reason = self.admit()
        if reason is not None or self.cluster is None:
            return succeed(reason)

        def decided(admitted: bool | None) -> Refusal | None:
            if admitted is False:
                self.refused[Refusal.CLUSTER_CAPACITY] += 1
                return Refusal.CLUSTER_CAPACITY
            return None

        return self.cluster.reserve(call_sid).addCallback(decided)
