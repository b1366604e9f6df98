"""Call recording: each call as a stereo WAV (caller left, assistant right), off the reactor.

Optional and off by default.  Each recorded call becomes ``{CallSid}.wav`` in the
configured directory: 8 kHz, 16-bit PCM, two channels — the caller on the left, the
assistant on the right, time-aligned *as the caller heard it*: assistant audio sits at
the time Twilio played it, and audio cut off by a barge-in ``clear`` is not in the file.

Three layers, from pure to threaded:

:class:`StereoTimeline` (sans-io)
    Places each caller frame and each assistant frame on one sample grid (time zero is
    the call's first event) and hands out interleaved PCM for the span that is *final*.
    Assistant audio is final once it has played (until then a ``clear`` can still drop
    it); caller audio is final once it can no longer arrive late (``caller_late_ns``
    after its time).  It keeps only the non-final span, so its memory is bounded by the
    Twilio lead plus the flush interval (and capped outright by ``max_pending_s``).

:class:`WavFile` (blocking, used only in worker threads)
    A WAV file whose header is written first and whose RIFF and ``data`` sizes are
    rewritten after every append (data first, then sizes), so the file on disk is a
    valid WAV of everything appended so far at every moment — readable with the
    standard :mod:`wave` module mid-call, and after a crash.

:class:`CallRecorder` (one per call) and :class:`RecordingWriter` (one per daemon)
    The recorder feeds the timeline from the session's events, collects the final PCM,
    and hands it to a worker thread at most once per ``flush_interval`` and at
    :meth:`~CallRecorder.close`; each call has at most one file operation in flight, so
    its writes stay in order.  Flushes of calls that start together are spread over the
    interval.  The writer (a Twisted service) owns the worker threads; the reactor
    thread never opens, writes, syncs or closes a file.

What a crash loses: a SIGKILL loses at most ``flush_interval + caller_late`` of audio
(plus any write still queued behind a slow disk); the file stays valid.  Data already
written survives a process crash (it is in the page cache); only :meth:`WavFile.close`
calls ``fsync``, so a *machine* crash can lose more.

Errors never reach the call: a failing directory, disk full, permission denied, or even
a bug in this module is logged once for that call, recording stops for that call, and
every method goes on returning normally.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import struct
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import numpy as np
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.python.failure import Failure

from gateway.audio.mulaw import MULAW_DECODE_TABLE, MULAW_SILENCE
from gateway.logs import get_logger

__all__ = [
    "CALL_SID_PATTERN",
    "BlockingRunner",
    "CallRecorder",
    "RecordingWriter",
    "StereoTimeline",
    "WavFile",
    "WriterThread",
]

log = get_logger("gateway.recording")

SAMPLE_RATE: Final = 8000
"""Samples per second on both channels (Twilio's rate)."""
NS_PER_SAMPLE: Final = 1_000_000_000 // SAMPLE_RATE
"""125 000 ns: one 8 kHz sample."""
CHANNELS: Final = 2
SAMPLE_WIDTH: Final = 2
"""Bytes per sample per channel (16-bit PCM)."""
BYTES_PER_SECOND: Final = SAMPLE_RATE * CHANNELS * SAMPLE_WIDTH
"""32 000: one second of the recording as interleaved stereo PCM."""
_SAMPLES_PER_MS: Final = SAMPLE_RATE // 1000
_NS_PER_MS: Final = 1_000_000
_NS_PER_SECOND: Final = 1_000_000_000

CALL_SID_PATTERN: Final = re.compile(r"[A-Za-z0-9]{1,64}")
"""What a CallSid must look like to become a file name (no path can be smuggled in)."""

_SILENCE: Final = bytes([MULAW_SILENCE])
_GOLDEN_RATIO_FRACTION: Final = 0.6180339887498949
_T = TypeVar("_T")


# -- the sans-io core ---------------------------------------------------------------------


class StereoTimeline:
    """Both sides of one call on one 8 kHz sample grid; hands out the final span as PCM.

    Positions are sample indices from the call's first event (the start of the first
    caller frame, or the play time of the first assistant frame).  Only the span from
    :attr:`final_position` on is held, as mu-law (``0xFF`` = silence) in one buffer per
    side.  Times are integer nanoseconds; nothing here reads a clock.

    Caller frames are placed by Twilio's media ``timestamp`` (milliseconds since the
    stream started), anchored so that the first frame ends when it arrived; network
    jitter therefore never shifts, overlaps or gaps the caller's audio.  The anchor is
    reset when a new stream starts (the timestamp goes backwards) or when a frame would
    land more than ``resync_ns`` away from its arrival.  Without timestamps, frames are
    laid end to end under the same resync rule.  Caller audio arriving after its span
    was made final is dropped (counted in :attr:`late_caller_samples`).

    Assistant frames are placed at the time Twilio starts playing them; a later frame
    for the same time replaces the earlier one.
    """

    __slots__ = (
        "_caller_base",
        "_caller_last_ts",
        "_caller_late_ns",
        "_caller_next_ts",
        "_final",
        "_left",
        "_max_pending",
        "_origin_ns",
        "_resync",
        "_right",
        "cleared_samples",
        "late_caller_samples",
        "overflow_samples",
    )

    def __init__(self, *, caller_late_ns: int = 200 * _NS_PER_MS,
                 resync_ns: int = _NS_PER_SECOND, max_pending_s: float = 30.0) -> None:
        if caller_late_ns < 0 or resync_ns <= 0 or max_pending_s <= 0:
            raise ValueError("caller_late_ns >= 0, resync_ns > 0 and max_pending_s > 0")
        self._caller_late_ns = caller_late_ns
        self._resync = resync_ns // NS_PER_SAMPLE
        self._max_pending = int(max_pending_s * SAMPLE_RATE)
        self._origin_ns: int | None = None
        self._final = 0  # sample position of the first sample not yet handed out
        self._left = bytearray()  # caller mu-law from _final on
        self._right = bytearray()  # assistant mu-law from _final on
        self._caller_base = 0  # sample position of the caller stream's timestamp 0
        self._caller_last_ts: int | None = None  # timestamp (samples) of the last caller frame
        self._caller_next_ts = 0  # timestamp (samples) just after the last caller frame
        self.late_caller_samples = 0
        """Caller samples dropped because they arrived after their span was final."""
        self.cleared_samples = 0
        """Assistant samples dropped by ``clear`` (scheduled, never heard)."""
        self.overflow_samples = 0
        """Samples dropped because they fell beyond ``max_pending_s`` of held audio."""

    # -- queries

    @property
    def started(self) -> bool:
        """True once the first event has fixed time zero."""
        return self._origin_ns is not None

    @property
    def final_position(self) -> int:
        """Samples handed out so far (the recording's length up to now)."""
        return self._final

    @property
    def pending_samples(self) -> int:
        """Samples held, not yet final (the longer of the two sides)."""
        return max(len(self._left), len(self._right))

    def position(self, at_ns: int) -> int:
        """The sample index of time ``at_ns`` (time zero is the first event)."""
        if self._origin_ns is None:
            return 0
        return (at_ns - self._origin_ns) // NS_PER_SAMPLE

    # -- events

    def caller(self, payload: bytes, at_ns: int, timestamp_ms: int | None = None) -> None:
        """A caller frame (mu-law) that arrived at ``at_ns``, with Twilio's timestamp."""
        size = len(payload)
        if not size:
            return
        if self._origin_ns is None:
            self._origin_ns = at_ns - size * NS_PER_SAMPLE
        arrival_start = self.position(at_ns) - size
        last = self._caller_last_ts
        ts = self._caller_next_ts if timestamp_ms is None else timestamp_ms * _SAMPLES_PER_MS
        if (
            last is None
            or ts < last  # a new stream: Twilio's timestamps start again
            or abs(self._caller_base + ts - arrival_start) > self._resync
        ):
            self._caller_base = arrival_start - ts
        self._caller_last_ts = ts
        self._caller_next_ts = ts + size
        self.late_caller_samples += self._place(self._left, self._caller_base + ts, payload)

    def assistant(self, payload: bytes, play_at_ns: int) -> None:
        """An assistant frame (mu-law) sent to Twilio, which starts playing it at ``play_at_ns``."""
        if not payload:
            return
        if self._origin_ns is None:
            self._origin_ns = play_at_ns
        self._place(self._right, self.position(play_at_ns), payload)

    def cleared(self, at_ns: int) -> None:
        """Twilio ``clear`` at ``at_ns``: assistant audio from ``at_ns`` on was never heard."""
        if self._origin_ns is None:
            return
        keep = max(self.position(at_ns) - self._final, 0)
        right = self._right
        if keep < len(right):
            self.cleared_samples += len(right) - keep
            del right[keep:]

    # -- output

    def drain(self, up_to_ns: int) -> bytes:
        """Interleaved 16-bit PCM (L caller, R assistant) for the span now final.

        Everything before ``up_to_ns - caller_late_ns`` is final: the assistant audio in
        it has played (``up_to_ns`` is now, and nothing scheduled before now can be
        cleared) and caller frames for it can no longer arrive.  Returns ``b""`` when
        nothing new is final.
        """
        if self._origin_ns is None:
            return b""
        return self._take(self.position(up_to_ns - self._caller_late_ns) - self._final)

    def finish(self, at_ns: int) -> bytes:
        """The call ended at ``at_ns``: everything left, as PCM.

        Assistant audio scheduled from ``at_ns`` on is dropped (Twilio's queue went with
        the call); caller audio already received is kept.
        """
        if self._origin_ns is None:
            return b""
        self.cleared(at_ns)
        end = max(self.position(at_ns), self._final + len(self._left))
        return self._take(end - self._final)

    # -- internals

    def _place(self, side: bytearray, position: int, payload: bytes) -> int:
        """Write ``payload`` at ``position`` on one side; return the samples dropped as late."""
        offset = position - self._final
        data: bytes | memoryview = payload
        late = 0
        if offset < 0:
            late = min(-offset, len(payload))
            data = memoryview(payload)[late:]
            offset = 0
            if not data:
                return late
        end = offset + len(data)
        if end > self._max_pending:
            keep = max(self._max_pending - offset, 0)
            self.overflow_samples += len(data) - keep
            if not keep:
                return late
            data = data[:keep]
            end = offset + keep
        if len(side) < offset:
            side.extend(_SILENCE * (offset - len(side)))
        side[offset:end] = data
        return late

    def _take(self, count: int) -> bytes:
        if count <= 0:
            return b""
        codes = np.full((count, CHANNELS), MULAW_SILENCE, dtype=np.uint8)
        for channel, side in enumerate((self._left, self._right)):
            have = min(len(side), count)
            if have:
                codes[:have, channel] = np.frombuffer(side, dtype=np.uint8, count=have)
                del side[:have]
        self._final += count
        pcm = MULAW_DECODE_TABLE.take(codes).astype("<i2", copy=False)
        return pcm.tobytes()


# -- the file (worker threads only) ---------------------------------------------------------


_HEADER: Final = struct.Struct("<4sI4s4sIHHIIHH4sI")
_RIFF_SIZE_OFFSET: Final = 4
_DATA_SIZE_OFFSET: Final = 40
_MAX_DATA_BYTES: Final = 0xFFFFFFFF - 36


class WavFile:
    """A 16-bit PCM WAV file that is a valid WAV of all its data after every append.

    Blocking: call it from a worker thread, never the reactor.  :meth:`append` writes
    the samples after the data already there, then rewrites the RIFF and ``data``
    sizes; a crash between the two leaves the previous, still valid, sizes.
    """

    HEADER_BYTES: Final = _HEADER.size  # 44

    def __init__(self, fd: int, path: Path, channels: int, sample_rate: int) -> None:
        self.path = path
        self.channels = channels
        self.sample_rate = sample_rate
        self.data_bytes = 0
        self._fd: int | None = fd

    @classmethod
    def create(cls, directory: Path, stem: str, *, channels: int = CHANNELS,
               sample_rate: int = SAMPLE_RATE, mode: int = 0o640) -> WavFile:
        """Create ``directory/stem.wav`` (the directory too), never replacing a file.

        If that name is taken (a CallSid seen again), ``stem-2.wav``, ``stem-3.wav`` …
        are tried.  The header is written before this returns.
        """
        directory.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        for attempt in range(1, 100):
            path = directory / (f"{stem}.wav" if attempt == 1 else f"{stem}-{attempt}.wav")
            try:
                fd = os.open(path, flags, mode)
            except FileExistsError:
                continue
            wav = cls(fd, path, channels, sample_rate)
            try:
                wav._write_at(0, wav._header(0))
            except BaseException:
                wav.abort()
                raise
            return wav
        raise FileExistsError(errno.EEXIST, "too many recordings with this name",
                              str(directory / f"{stem}.wav"))

    def _header(self, data_bytes: int) -> bytes:
        block = self.channels * SAMPLE_WIDTH
        return _HEADER.pack(b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1,
                            self.channels, self.sample_rate, self.sample_rate * block,
                            block, SAMPLE_WIDTH * 8, b"data", data_bytes)

    def _write_at(self, offset: int, data: bytes | memoryview) -> None:
        if self._fd is None:
            raise ValueError("the WAV file is closed")
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def append(self, pcm: bytes) -> None:
        """Append interleaved frames (whole frames only), then rewrite the sizes."""
        if not pcm:
            return
        if len(pcm) % (self.channels * SAMPLE_WIDTH):
            raise ValueError("PCM must hold whole frames")
        size = self.data_bytes + len(pcm)
        if size > _MAX_DATA_BYTES:
            raise OSError(errno.EFBIG, "the recording reached the WAV size limit (4 GiB)")
        self._write_at(self.HEADER_BYTES + self.data_bytes, pcm)
        self._write_at(_RIFF_SIZE_OFFSET, struct.pack("<I", 36 + size))
        self._write_at(_DATA_SIZE_OFFSET, struct.pack("<I", size))
        self.data_bytes = size

    def close(self, *, fsync: bool = True) -> None:
        """Flush to disk (``fsync``) and close; the file is complete."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Close without syncing and without raising (after an error)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    @property
    def seconds(self) -> float:
        return self.data_bytes / (self.channels * SAMPLE_WIDTH * self.sample_rate)


def _append_job(wav: WavFile, pcm: bytes) -> WavFile:
    try:
        wav.append(pcm)
    except BaseException:
        wav.abort()
        raise
    return wav


def _finish_job(wav: WavFile, pcm: bytes, fsync: bool) -> WavFile:
    try:
        wav.append(pcm)
        wav.close(fsync=fsync)
    except BaseException:
        wav.abort()
        raise
    return wav


# -- running blocking work off the reactor ----------------------------------------------------


class BlockingRunner(Protocol):
    """Runs blocking ``work`` elsewhere; the Deferred fires on the reactor thread."""

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]: ...


class WriterThread:
    """One daemon thread that runs blocking work in the order it was given.

    :meth:`__call__` (a :class:`BlockingRunner`) only puts the work on a
    :class:`queue.SimpleQueue` — no lock shared with the worker, so the reactor thread
    never waits for it — and the result comes back through ``reactor.callFromThread``.
    (``deferToThreadPool`` on a Twisted ``ThreadPool`` was tried first: at 50 calls a
    single submission took up to ~25 ms of the reactor thread, apparently waiting for
    the pool's coordinator lock, which its workers also take after every job.)  A
    daemon thread, so a hung disk can never keep the process from exiting.
    """

    def __init__(self, reactor: Any, name: str = "recording-writer") -> None:
        self._reactor = reactor
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Deferred[Any]] | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        """Let the queued work finish, then end the thread (waits at most ``timeout_s``)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout_s)

    def __call__(self, work: Callable[[], _T]) -> Deferred[_T]:
        if self._thread is None:
            raise RuntimeError("the recording writer thread is not running")
        result: Deferred[_T] = Deferred()
        self._queue.put((work, result))
        return result

    def _work(self) -> None:
        call_from_thread = self._reactor.callFromThread
        while (item := self._queue.get()) is not None:
            work, result = item
            try:
                value = work()
            except BaseException:
                call_from_thread(result.errback, Failure())
            else:
                call_from_thread(result.callback, value)


# -- one call -----------------------------------------------------------------------------------


class CallRecorder:
    """Records one call: feeds the timeline, flushes final PCM to a worker thread.

    Every method is cheap, never blocks and never raises (see the module docstring).
    The file is created at once (off the reactor); :meth:`close` returns a Deferred
    that fires with the file's path once it is complete (or ``None`` if recording
    failed for this call) and never errbacks.
    """

    def __init__(self, call_sid: str, directory: Path, run_blocking: BlockingRunner, *,
                 flush_interval_ns: int = 800 * _NS_PER_MS, flush_phase: float = 0.0,
                 caller_late_ns: int = 200 * _NS_PER_MS,
                 max_backlog_bytes: int = 30 * BYTES_PER_SECOND, fsync_on_close: bool = True,
                 call_log: Any = None,
                 on_done: Callable[[CallRecorder], None] | None = None) -> None:
        self.call_sid = call_sid
        self.log = call_log if call_log is not None else log.bind(call_sid=call_sid)
        self.path: Path | None = None
        """The file, once created (and after :meth:`close`, if it succeeded)."""
        self.timeline = StereoTimeline(caller_late_ns=caller_late_ns)
        self._run = run_blocking
        self._flush_interval_ns = flush_interval_ns
        # the first flush comes early by this fraction of the interval, so that calls
        # that start together do not all flush (and wake the writer) in the same tick
        self._first_flush_ns = flush_interval_ns - int(flush_interval_ns * (flush_phase % 1.0))
        self._max_backlog = max_backlog_bytes
        self._fsync = fsync_on_close
        self._on_done = on_done
        self._wav: WavFile | None = None
        self._pending = bytearray()  # final PCM not yet handed to a worker
        self._in_flight = False  # one file operation at a time, so they stay in order
        self._closing = False
        self._done = False
        self._failed = False
        self._next_flush_ns: int | None = None
        self._last_ns: int | None = None
        self._waiters: list[Deferred[Path | None]] = []
        if CALL_SID_PATTERN.fullmatch(call_sid) is None:
            self._fail("the CallSid is not a safe file name", call_sid=repr(call_sid[:80]))
            return
        self._in_flight = True
        self._submit(partial(WavFile.create, directory, call_sid), self._opened,
                     where=str(directory))

    # -- state

    @property
    def recording(self) -> bool:
        """True while this call's audio is still being recorded."""
        return not (self._failed or self._closing)

    @property
    def done(self) -> bool:
        """True once the file is complete (or recording failed): nothing more happens."""
        return self._done

    @property
    def pending_bytes(self) -> int:
        """Final PCM waiting for the worker (bounded by ``max_backlog_bytes``)."""
        return len(self._pending)

    # -- the session's events

    def caller(self, payload: bytes, at_ns: int, timestamp_ms: int | None = None) -> None:
        """Each caller frame as it arrives (``Audio.payload``, now, ``Audio.timestamp_ms``)."""
        if self._failed or self._closing:
            return
        try:
            self.timeline.caller(payload, at_ns, timestamp_ms)
            self._at(at_ns)
        except Exception:
            self._internal_error()

    def assistant(self, payload: bytes, play_at_ns: int) -> None:
        """Each frame sent to Twilio, with the time Twilio starts playing it."""
        if self._failed or self._closing:
            return
        try:
            self.timeline.assistant(payload, play_at_ns)
        except Exception:
            self._internal_error()

    def cleared(self, at_ns: int) -> None:
        """Twilio's queue was dropped at ``at_ns`` (``clear``, or its stream replaced)."""
        if self._failed or self._closing:
            return
        try:
            self.timeline.cleared(at_ns)
            self._at(at_ns)
        except Exception:
            self._internal_error()

    def tick(self, now_ns: int) -> None:
        """The session's periodic tick: flushes when ``flush_interval`` has passed."""
        if self._failed or self._closing:
            return
        try:
            self._at(now_ns)
        except Exception:
            self._internal_error()

    def close(self, at_ns: int | None = None) -> Deferred[Path | None]:
        """The call ended at ``at_ns`` (default: the last time seen): finish the file.

        Idempotent.  Fires with the path once the last samples are written, the sizes
        are final and the file is synced and closed; with ``None`` if recording failed.
        """
        if not (self._closing or self._failed):
            self._closing = True
            try:
                end = at_ns if at_ns is not None else self._last_ns
                if end is not None:
                    self._pending += self.timeline.finish(end)  # holds nothing after this
                self._pump()
            except Exception:
                self._internal_error()
        if self._done:
            return succeed(None if self._failed else self.path)
        waiter: Deferred[Path | None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    # -- internals

    def _at(self, now_ns: int) -> None:
        if self._last_ns is None or now_ns > self._last_ns:
            self._last_ns = now_ns
        if self._next_flush_ns is None:
            self._next_flush_ns = now_ns + self._first_flush_ns
        elif now_ns >= self._next_flush_ns:
            self._next_flush_ns = now_ns + self._flush_interval_ns
            self._flush(now_ns)

    def _flush(self, now_ns: int) -> None:
        self._pending += self.timeline.drain(now_ns)
        if len(self._pending) > self._max_backlog:
            self._fail("the disk is not keeping up with the recording",
                       backlog_s=round(len(self._pending) / BYTES_PER_SECOND, 1))
            return
        self._pump()

    def _pump(self) -> None:
        """Start the next file operation if none is in flight and one is due."""
        wav = self._wav
        if self._in_flight or self._done or self._failed or wav is None:
            return
        if not (self._pending or self._closing):
            return
        pcm, self._pending = bytes(self._pending), bytearray()
        self._in_flight = True
        if self._closing:
            self._submit(partial(_finish_job, wav, pcm, self._fsync), self._finished,
                         where=str(wav.path))
        else:
            self._submit(partial(_append_job, wav, pcm), self._appended, where=str(wav.path))

    def _submit(self, work: Callable[[], WavFile], done: Callable[[WavFile], None],
                where: str) -> None:
        try:
            running = self._run(work)
        except Exception as exc:  # the runner itself refused (e.g. a stopped pool)
            self._in_flight = False
            self._fail("cannot start a file operation", error=str(exc), path=where)
            return
        running.addCallbacks(self._operation_done, self._operation_failed,
                             callbackArgs=(done,), errbackArgs=(where,))

    def _operation_done(self, wav: WavFile, done: Callable[[WavFile], None]) -> None:
        self._in_flight = False
        if self._failed:  # recording stopped meanwhile: just close what we hold
            self._discard(wav)
            return
        try:
            done(wav)
        except Exception:
            self._internal_error()

    def _operation_failed(self, failure: Failure, where: str) -> None:
        self._in_flight = False
        value = failure.value
        if isinstance(value, OSError):
            self._fail("recording failed; the call goes on unrecorded",
                       error=value.strerror or str(value), errno=value.errno,
                       path=value.filename if value.filename else where)
        else:
            self._fail("recording failed; the call goes on unrecorded",
                       error=failure.getErrorMessage(), kind=type(value).__name__,
                       path=where)

    def _opened(self, wav: WavFile) -> None:
        self._wav = wav
        self.path = wav.path
        self._pump()

    def _appended(self, wav: WavFile) -> None:
        # whatever piled up while this write ran was due at an earlier flush: send it now
        self._pump()

    def _finished(self, wav: WavFile) -> None:
        self.log.info("recording saved", path=str(wav.path), seconds=round(wav.seconds, 2),
                      late_caller_ms=self.timeline.late_caller_samples // _SAMPLES_PER_MS)
        self._settle()

    def _internal_error(self) -> None:
        if not self._failed:
            self.log.error("recording failed (internal error); the call goes on unrecorded",
                           exc_info=True)
        self._fail(None)

    def _fail(self, event: str | None, **fields: Any) -> None:
        """Stop recording this call, logging ``event`` once; the file stays as written."""
        if self._failed:
            return
        self._failed = True
        if event is not None:
            self.log.error(event, **fields)
        self._pending = bytearray()
        self.timeline = StereoTimeline()  # release the held audio
        wav, self._wav = self._wav, None
        if wav is not None and not self._in_flight:
            self._discard(wav)
        # (an operation in flight hands its file to _operation_done, which discards it)
        self._settle()

    def _discard(self, wav: WavFile) -> None:
        """Close ``wav`` off the reactor, ignoring errors: what is on disk is a valid WAV."""
        with contextlib.suppress(Exception):
            self._run(partial(_finish_job, wav, b"", False)).addErrback(lambda _: None)

    def _settle(self) -> None:
        if self._done:
            return
        self._done = True
        result = None if self._failed else self.path
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result)
        if self._on_done is not None:
            self._on_done(self)


# -- one daemon ---------------------------------------------------------------------------------


class RecordingWriter(Service):
    """The daemon's recorder factory and the worker threads that do its file I/O.

    A Twisted service: :meth:`startService` starts ``threads`` :class:`WriterThread`
    workers (each call is given one, round robin, so its operations stay in order and
    one slow file holds up only the calls on its thread); :meth:`stopService` closes any
    recorder still open, waits (up to ``stop_timeout_s``) for every file to be complete,
    then ends the threads.  Add it to the root service so that it stops *after* the
    drain has ended the calls.  ``run_blocking`` replaces the threads (tests).
    """

    def __init__(self, directory: str | Path, *, flush_interval_s: float = 0.8,
                 caller_late_ms: int = 200, max_backlog_s: float = 30.0,
                 fsync_on_close: bool = True, threads: int = 2, stop_timeout_s: float = 10.0,
                 reactor: Any = None, run_blocking: BlockingRunner | None = None) -> None:
        if flush_interval_s <= 0 or caller_late_ms < 0 or max_backlog_s <= 0 or threads < 1:
            raise ValueError("flush_interval_s > 0, caller_late_ms >= 0, max_backlog_s > 0, "
                             "threads >= 1")
        self.directory = Path(directory)
        self.flush_interval_ns = int(flush_interval_s * _NS_PER_SECOND)
        self.caller_late_ns = caller_late_ms * _NS_PER_MS
        self.max_backlog_bytes = int(max_backlog_s * BYTES_PER_SECOND)
        self.fsync_on_close = fsync_on_close
        self.stop_timeout_s = stop_timeout_s
        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        self._reactor = reactor
        self._threads: list[WriterThread] = []
        self._runners: list[BlockingRunner]
        if run_blocking is None:
            self._threads = [WriterThread(reactor, f"recording-writer-{n}")
                             for n in range(threads)]
            self._runners = list(self._threads)
        else:
            self._runners = [run_blocking]
        self._calls = 0
        self._open: set[CallRecorder] = set()

    @property
    def open_recorders(self) -> int:
        """Recorders whose file is not complete yet."""
        return len(self._open)

    def recorder(self, call_sid: str, call_log: Any = None) -> CallRecorder:
        """A recorder for a new call (its file is created at once, off the reactor).

        ``call_log`` is the call's bound logger (default: one bound to ``call_sid``).
        """
        run = self._runners[self._calls % len(self._runners)]
        phase = (self._calls * _GOLDEN_RATIO_FRACTION) % 1.0  # evenly spread, any count
        self._calls += 1
        recorder = CallRecorder(
            call_sid, self.directory, run, flush_interval_ns=self.flush_interval_ns,
            flush_phase=phase,
            caller_late_ns=self.caller_late_ns, max_backlog_bytes=self.max_backlog_bytes,
            fsync_on_close=self.fsync_on_close, call_log=call_log, on_done=self._open.discard)
        if not recorder.done:
            self._open.add(recorder)
        return recorder

    def startService(self) -> None:
        super().startService()
        for thread in self._threads:
            thread.start()
        log.info("call recording on", directory=str(self.directory),
                 flush_interval_s=self.flush_interval_ns / _NS_PER_SECOND)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        closing = [recorder.close() for recorder in list(self._open)]
        done: Deferred[None] = Deferred()
        timer = self._reactor.callLater(self.stop_timeout_s, self._stop_timed_out, done)

        def all_closed(_: object) -> None:
            if done.called:
                return
            timer.cancel()
            for thread in self._threads:
                thread.stop()  # every job has finished: ends at once
            done.callback(None)

        DeferredList(closing, consumeErrors=True).addCallback(all_closed)
        return done

    def _stop_timed_out(self, done: Deferred[None]) -> None:
        if done.called:
            return
        log.error("recordings still being written at shutdown; leaving them as they are "
                  "(each file is a valid WAV of what was written)", open=len(self._open))
        done.callback(None)
