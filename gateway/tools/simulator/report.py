"""The simulator's findings: one :class:`CallReport` per call, a :class:`RunSummary` over
all of them, as JSON-ready structs and as readable text.

Times are milliseconds; ``*_ms`` fields that could not be measured are ``None``.
Time to first audio is measured from the moment ``start`` was sent.  See
:mod:`gateway.tools.simulator.playout` for what counts as a gap, an utterance and
audio after the interrupt.

A call is **ok** when it completed (the stream ran and ended as scripted, or the
gateway closed it with 1000, and the status callback was answered 2xx) and the
gateway committed no protocol violation.  A call in which no assistant audio ever
arrived is ``failed`` ("the assistant never spoke"), however it ended: for a voice
assistant that is the failure that matters (e.g. the gateway could not create the
Vapi call and closed the stream with 1000).  ``outcome`` is ``completed``,
``refused`` (busy TwiML, a webhook answered non-2xx, the socket upgrade refused)
or ``failed`` (anything else; ``detail`` says what).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import msgspec

from gateway.tools.simulator.downlink import ViolationSample
from gateway.tools.simulator.playout import ClearSample, GapSample

__all__ = [
    "AnswerReport",
    "BargeInReport",
    "CallReport",
    "ClearsReport",
    "Distribution",
    "EndReport",
    "FramesReport",
    "MarksReport",
    "RunSummary",
    "SpeechReport",
    "TimingReport",
    "ViolationsReport",
    "percentile",
    "render_text",
    "summarize",
    "to_json",
]

Outcome = Literal["completed", "refused", "failed"]


class _Section(msgspec.Struct, kw_only=True):
    """A part of a report (mutable while the call runs)."""


class AnswerReport(_Section):
    """The voice webhook and its TwiML."""

    webhook_status: int | None = None
    kind: Literal["connect", "busy", "other", "none"] = "none"
    greeting: list[str] = msgspec.field(default_factory=list)
    stream_url: str | None = None
    parameters: list[str] = msgspec.field(default_factory=list)
    """Names of the ``<Parameter>``s (their values, e.g. the stream token, are not shown)."""
    after_stream: list[str] = msgspec.field(default_factory=list)
    """The fallback ``<Say>``s Twilio speaks if the gateway closes the stream."""


class TimingReport(_Section):
    """When things happened, ms after ``start`` was sent."""

    first_media_ms: float | None = None
    """The first ``media`` from the gateway arrived."""
    first_audio_ms: float | None = None
    """The first 20 ms slot that played assistant audio began."""
    first_audible_ms: float | None = None
    """The first slot whose audio was above -36 dBFS began."""
    duration_ms: float | None = None
    """``start`` sent to the end of the stream."""


class SpeechReport(_Section):
    """What the caller heard."""

    played_ms: int = 0
    utterances: int = 0
    gaps: int = 0
    gap_ms: int = 0
    longest_gap_ms: int = 0
    gap_samples: list[GapSample] = msgspec.field(default_factory=list)
    max_queued_ms: float = 0.0
    """The most gateway audio Twilio's queue held at once (sampled every 20 ms): about the
    gateway's playout lead; far more means audio piled up (e.g. behind a slow reader)."""


class BargeInReport(_Section):
    """The scripted interruption (``--interrupt-at``)."""

    interrupt_at_ms: int
    assistant_speaking: bool | None = None
    """Whether assistant audio was playing when the caller started to interrupt."""
    clear_after_ms: float | None = None
    """From the interruption's start to the first ``clear`` (None: no clear came)."""
    audio_after_interrupt_ms: int = 0
    """Assistant audio played from the interruption until silence or ``clear``."""


class ClearsReport(_Section):
    """Every ``clear`` the gateway sent."""

    count: int = 0
    dropped_ms: float = 0.0
    samples: list[ClearSample] = msgspec.field(default_factory=list)


class MarksReport(_Section):
    """The gateway's marks and their echoes."""

    received: int = 0
    echoed_played: int = 0
    echoed_by_clear: int = 0
    pending_at_end: int = 0


class ViolationsReport(_Section):
    """The gateway's protocol violations."""

    total: int = 0
    by_kind: dict[str, int] = msgspec.field(default_factory=dict)
    samples: list[ViolationSample] = msgspec.field(default_factory=list)


class FramesReport(_Section):
    """Frames each way on the media socket."""

    sent_total: int = 0
    sent_media: int = 0
    sent_speech: int = 0
    """Media frames carrying the caller's clips (the rest is silence)."""
    sent_mark_echoes: int = 0
    skipped: int = 0
    """Media frames the simulator could not send in time (it was overloaded)."""
    received_total: int = 0
    received_media: int = 0
    received_media_bytes: int = 0
    received_marks: int = 0
    received_clears: int = 0
    received_after_stop: int = 0
    reading_paused_ms: int = 0
    """How long the simulator stopped reading its socket (a slow consumer, by scenario)."""


class EndReport(_Section):
    """How the call ended."""

    ended_by: Literal["caller", "caller-drop", "gateway", "network", "simulator"] | None = None
    reason: str = ""
    closed_by: Literal["gateway", "simulator", "network"] | None = None
    close_code: int | None = None
    close_reason: str | None = None
    clean: bool | None = None
    fallback_spoken: bool = False
    """The gateway closed the stream while the call was up: Twilio speaks the fallback."""
    status_callback: int | None = None
    """HTTP status of the (last) terminal call status callback."""
    status_callbacks: list[int] = msgspec.field(default_factory=list)
    """HTTP status of every terminal call status callback posted, in order."""
    close_frame_ignored: int | None = None
    """The code of the gateway's close frame, when the scenario left it unanswered."""
    dropped_after_close_frame_ms: float | None = None
    """From that unanswered close frame to the gateway dropping the connection."""
    status_callback_to_close_ms: float | None = None
    """``--status-callback-at``: from posting the status callback mid-stream to the media
    socket's close (the gateway ending the call because of it)."""
    stream_events: dict[str, int | None] = msgspec.field(default_factory=dict)
    """HTTP status of each ``<Stream statusCallback>`` event posted."""


class CallReport(msgspec.Struct, kw_only=True):
    """Everything one simulated call found."""

    call_sid: str
    stream_sid: str
    caller: str
    called: str
    outcome: Outcome = "failed"
    ok: bool = False
    detail: str = ""
    answer: AnswerReport = msgspec.field(default_factory=AnswerReport)
    timing: TimingReport = msgspec.field(default_factory=TimingReport)
    speech: SpeechReport = msgspec.field(default_factory=SpeechReport)
    barge_in: BargeInReport | None = None
    clears: ClearsReport = msgspec.field(default_factory=ClearsReport)
    marks: MarksReport = msgspec.field(default_factory=MarksReport)
    violations: ViolationsReport = msgspec.field(default_factory=ViolationsReport)
    frames: FramesReport = msgspec.field(default_factory=FramesReport)
    end: EndReport = msgspec.field(default_factory=EndReport)
    recording: str | None = None


class Distribution(msgspec.Struct, kw_only=True):
    """Nearest-rank percentiles of one measurement over the calls that had it."""

    count: int
    p50: float
    p99: float
    max: float


class RunSummary(msgspec.Struct, kw_only=True):
    """All calls of one run together."""

    calls: int
    completed: int
    refused: int
    failed: int
    ok: int
    refusals: dict[str, int]
    first_media_ms: Distribution | None
    first_audio_ms: Distribution | None
    barge_in_clear_ms: Distribution | None
    gaps: int
    gap_ms: int
    violations: int
    violations_by_kind: dict[str, int]
    frames_skipped: int
    max_tick_interval_ms: float | None
    """Longest time between two ticks of the simulator's media clock (20 when healthy)."""


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of non-empty ``values`` (``fraction`` in (0, 1])."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _distribution(values: Iterable[float | None]) -> Distribution | None:
    present = [value for value in values if value is not None]
    if not present:
        return None
    return Distribution(count=len(present), p50=percentile(present, 0.5),
                        p99=percentile(present, 0.99), max=max(present))


def summarize(reports: Sequence[CallReport],
              max_tick_interval_ms: float | None = None) -> RunSummary:
    """The aggregate of a run."""
    kinds: Counter[str] = Counter()
    refusals: Counter[str] = Counter()
    for report in reports:
        kinds.update(report.violations.by_kind)
        if report.outcome == "refused":
            refusals[report.detail] += 1
    return RunSummary(
        calls=len(reports),
        completed=sum(r.outcome == "completed" for r in reports),
        refused=sum(r.outcome == "refused" for r in reports),
        failed=sum(r.outcome == "failed" for r in reports),
        ok=sum(r.ok for r in reports),
        refusals=dict(refusals),
        first_media_ms=_distribution(r.timing.first_media_ms for r in reports),
        first_audio_ms=_distribution(r.timing.first_audio_ms for r in reports),
        barge_in_clear_ms=_distribution(
            r.barge_in.clear_after_ms if r.barge_in is not None else None for r in reports
        ),
        gaps=sum(r.speech.gaps for r in reports),
        gap_ms=sum(r.speech.gap_ms for r in reports),
        violations=sum(r.violations.total for r in reports),
        violations_by_kind=dict(kinds),
        frames_skipped=sum(r.frames.skipped for r in reports),
        max_tick_interval_ms=max_tick_interval_ms,
    )


def to_json(reports: Sequence[CallReport], summary: RunSummary) -> bytes:
    """``{"calls": [...], "summary": {...}}`` as indented JSON."""
    document = msgspec.json.encode({"calls": reports, "summary": summary})
    return msgspec.json.format(document, indent=2)


# -- text ------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _call_lines(report: CallReport) -> list[str]:
    answer, timing, speech, end = report.answer, report.timing, report.speech, report.end
    flagged = " WITH VIOLATIONS" if report.violations.total else ""
    lines = [
        f"call {report.call_sid}  {report.caller} -> {report.called}  "
        f"{report.outcome.upper()}{flagged}: {report.detail}",
    ]
    status = "-" if answer.webhook_status is None else str(answer.webhook_status)
    if answer.kind == "connect":
        described = (f"<Connect><Stream> {answer.stream_url} "
                     f"with {', '.join(answer.parameters) or 'no parameters'}")
    elif answer.kind == "busy":
        described = f"busy: {' '.join(answer.greeting)!r}"
    else:
        described = answer.kind
    lines.append(f"  answer      {status}, {described}")
    if answer.greeting and answer.kind == "connect":
        lines.append(f"  greeting    {' '.join(answer.greeting)!r}")
    if answer.kind != "connect":
        return lines
    lines.append(
        f"  first audio media received {_ms(timing.first_media_ms)}, "
        f"played {_ms(timing.first_audio_ms)}, audible {_ms(timing.first_audible_ms)} "
        f"(after start)"
    )
    gaps = (f"{speech.gaps} gaps, {speech.gap_ms} ms in all (longest {speech.longest_gap_ms} ms)"
            if speech.gaps else "no gaps")
    lines.append(f"  speech      {speech.played_ms} ms played in {speech.utterances} "
                 f"utterance(s); {gaps}; at most {speech.max_queued_ms:.0f} ms queued")
    for gap in speech.gap_samples[:5]:
        lines.append(f"              gap of {gap.ms} ms at {gap.at_ms} ms")
    barge = report.barge_in
    if barge is not None:
        if barge.assistant_speaking is False:
            speaking = "the assistant was silent then"
        else:
            speaking = f"{barge.audio_after_interrupt_ms} ms of assistant audio played after it"
        clear = ("never came" if barge.clear_after_ms is None
                 else f"after {_ms(barge.clear_after_ms)}")
        lines.append(f"  barge-in    interrupt at {barge.interrupt_at_ms} ms -> clear {clear}; "
                     f"{speaking}")
    clears = report.clears
    if clears.count:
        lines.append(f"  clears      {clears.count}, {clears.dropped_ms:.0f} ms of queued audio "
                     f"dropped")
        for sample in clears.samples[:5]:
            lines.append(f"              at {sample.at_ms:.0f} ms: dropped "
                         f"{sample.dropped_ms:.0f} ms, {sample.marks_flushed} marks flushed, "
                         f"{_ms(sample.since_last_media_ms)} after the last media")
    marks = report.marks
    lines.append(f"  marks       {marks.received} received: {marks.echoed_played} echoed when "
                 f"played, {marks.echoed_by_clear} by clear, {marks.pending_at_end} pending at end")
    violations = report.violations
    if violations.total:
        kinds = ", ".join(f"{kind} x{count}" for kind, count in violations.by_kind.items())
        lines.append(f"  VIOLATIONS  {violations.total}: {kinds}")
        for violation in violations.samples[:5]:
            lines.append(f"              at {_ms(violation.at_ms)}: {violation.kind}: "
                         f"{violation.detail}")
    else:
        lines.append("  violations  none")
    frames = report.frames
    lines.append(
        f"  frames      sent {frames.sent_media} media ({frames.sent_speech} speech) + "
        f"{frames.sent_mark_echoes} mark echoes"
        f"{f', {frames.skipped} SKIPPED' if frames.skipped else ''}; received "
        f"{frames.received_media} media, {frames.received_marks} marks, "
        f"{frames.received_clears} clears ({frames.received_total} frames)"
    )
    closed = (f"{end.closed_by} closed {end.close_code}"
              + (f" {end.close_reason!r}" if end.close_reason else "")
              if end.closed_by else "socket never opened")
    events = ", ".join(f"{event} {code}" for event, code in end.stream_events.items())
    why = f" ({end.reason})" if end.reason and end.reason != report.detail else ""
    callbacks = ", ".join(str(code) for code in end.status_callbacks) or "-"
    lines.append(
        f"  ended       by {end.ended_by or '-'}{why}; {closed}; status callback "
        f"{callbacks}{'; stream events ' + events if events else ''}"
    )
    if end.close_frame_ignored is not None:
        dropped = (f"dropped the connection {_ms(end.dropped_after_close_frame_ms)} later"
                   if end.dropped_after_close_frame_ms is not None
                   else "never dropped the connection")
        lines.append(f"              close frame {end.close_frame_ignored} left unanswered; "
                     f"the gateway {dropped}")
    if end.status_callback_to_close_ms is not None:
        lines.append(f"              the socket closed {_ms(end.status_callback_to_close_ms)} "
                     "after the mid-call status callback")
    if frames.reading_paused_ms:
        lines.append(f"  slow reader the simulator stopped reading for "
                     f"{frames.reading_paused_ms} ms")
    if end.fallback_spoken and answer.after_stream:
        fallback = " ".join(answer.after_stream)
        lines.append(f"              the caller hears the fallback: {fallback!r}")
    if timing.duration_ms is not None:
        lines.append(f"  duration    {timing.duration_ms / 1000:.1f} s")
    if report.recording:
        lines.append(f"  recording   {report.recording}")
    return lines


def render_text(reports: Sequence[CallReport], summary: RunSummary, *,
                brief: bool = False) -> str:
    """The readable report: every call, then the totals when there is more than one.

    ``brief``: one line per call (for many calls).
    """
    lines: list[str] = []
    for report in reports:
        if brief:
            lines.append(_call_lines(report)[0])
            continue
        lines.extend(_call_lines(report))
        lines.append("")
    if len(reports) > 1:
        lines.append(
            f"{summary.calls} calls: {summary.completed} completed, {summary.refused} refused, "
            f"{summary.failed} failed; {summary.ok} ok"
        )
        for name, distribution in (("first media", summary.first_media_ms),
                                   ("first audio", summary.first_audio_ms),
                                   ("barge-in clear", summary.barge_in_clear_ms)):
            if distribution is not None:
                lines.append(f"  {name:<15} p50 {distribution.p50:.0f} ms, p99 "
                             f"{distribution.p99:.0f} ms, max {distribution.max:.0f} ms "
                             f"({distribution.count} calls)")
        lines.append(f"  gaps            {summary.gaps} ({summary.gap_ms} ms)")
        lines.append(f"  violations      {summary.violations}"
                     + (f" {summary.violations_by_kind}" if summary.violations else ""))
        for reason, count in summary.refusals.items():
            lines.append(f"  refused         {count} x {reason}")
    if summary.frames_skipped:
        lines.append(f"WARNING: the simulator skipped {summary.frames_skipped} media frames: "
                     "it could not keep up, so its timings are not reliable")
    if summary.max_tick_interval_ms is not None:
        lines.append("simulator clock: longest tick interval "
                     f"{summary.max_tick_interval_ms:.1f} ms")
    return "\n".join(lines)
