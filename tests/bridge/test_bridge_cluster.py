"""The switchboard and sessions in a cluster, on a fake clock with a fake cluster member:
the Vapi socket held back until the stream comes, the takeover of a call whose webhook
another instance answered (both sides), and requests forwarded to a call's owner."""

from __future__ import annotations

from typing import Any

from test_bridge_session import FakeStream, Harness  # type: ignore[import-not-found]
from twisted.internet.defer import Deferred, succeed

from gateway.bridge.session import HANDED_OVER
from gateway.cluster.member import Takeover
from gateway.vapi.calls import CreatedCall, SocketUrl


class FakeMember:
    """The ClusterMember as the switchboard uses it."""

    instance_id = "here"

    def __init__(self) -> None:
        self.takeovers: list[tuple[str, Deferred[Takeover]]] = []
        self.ended_elsewhere: list[tuple[str, str]] = []
        self.vapi_elsewhere: list[str] = []

    def take_over(self, call_sid: str) -> Deferred[Takeover]:
        d: Deferred[Takeover] = Deferred()
        self.takeovers.append((call_sid, d))
        return d

    def end_elsewhere(self, call_sid: str, cause: str) -> Deferred[str | None]:
        self.ended_elsewhere.append((call_sid, cause))
        return succeed("there")

    def vapi_ended_elsewhere(self, vapi_call_id: str) -> Deferred[str | None]:
        self.vapi_elsewhere.append(vapi_call_id)
        return succeed("there")


def clustered(**sections: dict[str, str]) -> tuple[Harness, FakeMember]:
    h = Harness(**sections)
    member = FakeMember()
    # the composition the daemon does with a redis backend
    from gateway.bridge.switchboard import Switchboard
    h.board = Switchboard(h.settings, h.registry, h.admission, h.clock, h.vapi, h._link,
                          h.rest, cluster=member)  # type: ignore[arg-type]
    return h, member


def test_the_vapi_socket_waits_for_the_stream() -> None:
    h, _ = clustered()
    session, _ = h.call(open_link=False, stream=False)
    h.vapi.answer()
    assert h.links == [] and session.vapi_call_id == "vapi-call-1"  # created, not opened
    sock = FakeStream()
    h.attach("CA1", sock)
    (link,) = h.links
    assert link.started
    link.open()
    session.on_link_audio(b"\x20" * 160 * 5)
    assert sock.media()
    session.end("twilio-stop")
    h.assert_clean()


def test_a_created_call_whose_stream_never_came_is_still_ended() -> None:
    h, _ = clustered(twilio={"account_sid": "AC" + "0" * 32, "hangup_via": "rest"})
    session, _ = h.call(open_link=False, stream=False)
    h.vapi.answer()
    h.tick(int(h.settings.bridge.stream_wait_timeout / 0.02) + 2)
    assert session.cause == "stream-never-arrived"
    (orphan,) = h.links  # a socket of its own, only to send end-call
    assert orphan.started and orphan.stops == 1
    # in a cluster the stream may be live elsewhere: no REST hang-up of the phone call
    assert h.rest is not None and h.rest.hung_up == []
    h.assert_clean()


def test_handing_over_an_unopened_vapi_call() -> None:
    h, _ = clustered()
    session, _ = h.call(open_link=False, stream=False)
    created = h.vapi.answer()
    handed: list[Any] = []
    h.board.hand_over("CA1").addCallback(handed.append)
    assert handed == [created]
    assert session.cause == HANDED_OVER and h.links == []  # nothing ended, nothing opened
    # the call lives on elsewhere: a later stream here is not refused as "ended"
    assert not h.board._ended_recently("CA1")
    h.assert_clean()


def test_handing_over_waits_for_a_call_still_being_created() -> None:
    h, _ = clustered()
    session, _ = h.call(open_link=False, stream=False)
    handed: list[Any] = []
    h.board.hand_over("CA1").addCallback(handed.append)
    assert handed == [] and not session.ended
    created = h.vapi.answer()
    assert handed == [created] and session.cause == HANDED_OVER
    assert h.links == []
    h.assert_clean()


def test_a_joined_vapi_call_is_ended_not_handed_over() -> None:
    h, _ = clustered()
    session, _ = h.call(stream=False, open_link=False)
    h.vapi.answer()
    h.attach("CA1", FakeStream())  # the stream came here first: the socket joined
    h.links[0].open()
    handed: list[Any] = []
    h.board.hand_over("CA1").addCallback(handed.append)
    assert handed == ["none"] and session.cause == HANDED_OVER
    assert h.links[0].messages == ["end-call"]
    h.assert_clean()


def test_hand_over_of_an_unknown_or_ended_call() -> None:
    h, _ = clustered()
    answers: list[Any] = []
    h.board.hand_over("CA-unknown").addCallback(answers.append)
    session, _ = h.call(open_link=False)
    h.vapi.answer()
    h.links[0].open()
    session.end("twilio-stop")
    h.board.hand_over("CA1").addCallback(answers.append)
    assert answers == ["none", "ended"]
    h.assert_clean()


def test_a_stream_for_a_call_held_elsewhere_takes_its_vapi_call_over() -> None:
    h, member = clustered()
    sock = FakeStream()
    session = h.attach("CA7", sock)
    assert session is not None and session.stream is sock
    assert h.vapi.requests == []  # no Vapi call created while the owner is asked
    (sid, answer), = member.takeovers
    assert sid == "CA7"
    created = CreatedCall("vapi-from-a", SocketUrl("ws://127.0.0.1:9/a/transport"))
    answer.callback(Takeover("handed-over", created))
    (link,) = h.links
    assert link.created is created and link.started
    assert session.vapi_call_id == "vapi-from-a"
    link.open()
    session.on_link_audio(b"\x20" * 160 * 3)
    assert sock.media()
    session.end("twilio-stop")
    h.assert_clean()


def test_no_owner_means_the_stream_s_instance_creates_the_vapi_call() -> None:
    h, member = clustered()
    session = h.attach("CA8", FakeStream())
    assert session is not None
    member.takeovers[0][1].callback(Takeover("owner-timeout"))
    assert len(h.vapi.requests) == 1
    h.vapi.answer()
    h.links[0].open()
    session.end("twilio-stop")
    h.assert_clean()


def test_a_stream_for_a_call_that_ended_elsewhere_is_closed() -> None:
    h, member = clustered()
    sock = FakeStream()
    session = h.attach("CA9", sock)
    assert session is not None
    member.takeovers[0][1].callback(Takeover("ended", ended=True))
    assert session.cause == "call-already-ended" and sock.closes
    assert h.vapi.requests == []
    h.assert_clean()


def test_the_stream_closing_during_the_takeover_ends_the_handed_over_call() -> None:
    h, member = clustered()
    sock = FakeStream()
    session = h.attach("CA10", sock)
    assert session is not None
    session.on_stream_closed(sock)
    created = CreatedCall("vapi-late", SocketUrl("ws://127.0.0.1:9/late/transport"))
    member.takeovers[0][1].callback(Takeover("handed-over", created))
    (orphan,) = h.links  # ended over a socket of its own
    assert orphan.created is created and orphan.stops == 1
    h.assert_clean()


def test_requests_for_calls_held_elsewhere_go_to_their_owner() -> None:
    h, member = clustered()
    assert h.board.call_status("CA-remote", "completed") is False
    assert member.ended_elsewhere == [("CA-remote", "twilio-status")]
    assert h.board.call_status("CA-remote", "in-progress") is False  # not terminal
    assert len(member.ended_elsewhere) == 1
    assert h.board.vapi_call_ended("vapi-remote") is False
    assert member.vapi_elsewhere == ["vapi-remote"]
    owners: list[Any] = []
    h.board.end_anywhere("CA-x", "admin-hangup").addCallback(owners.append)
    assert owners == ["there"]
    h.assert_clean()
