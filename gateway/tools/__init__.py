"""Tools that ship with the gateway for operators and developers; ``make demo`` and the
end-to-end tests are built from them.

- :mod:`.daemon_process`: ``twistd -n vapi-gateway`` as a child process, started and
  followed through its JSON log lines;
- :mod:`.local_assistant`: a local stand-in for Vapi (``POST /call`` and the call
  socket) with scripted behaviours, run inside the daemon (``[vapi] api_url = local``)
  or on its own (``vapi-gateway-assistant``);
- :mod:`.simulator`: the call simulator, which plays Twilio against a running gateway
  and reports what the caller experienced (``vapi-gateway-sim``);
- ``clips/``: the speech clips both of them use, 8 kHz mono mu-law WAV files
  (:data:`PACKAGED_CLIPS`, found with :func:`packaged_clip`).

This package itself imports nothing of the gateway (``gateway.config`` imports the
local assistant's settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

__all__ = ["CLIPS_DIR", "PACKAGED_CLIPS", "packaged_clip"]

CLIPS_DIR: Final = Path(__file__).resolve().parent / "clips"
"""Where the packaged clips are (package data: ``gateway/tools/clips/*.wav``)."""
PACKAGED_CLIPS: Final = ("agent", "caller", "interrupt")
"""The packaged clips: an assistant speaking (10.9 s), a caller (5.1 s) and a caller
cutting in (2.2 s)."""


def packaged_clip(name: str) -> Path:
    """The file of the packaged clip ``name`` (one of :data:`PACKAGED_CLIPS`)."""
    if name not in PACKAGED_CLIPS:
        raise ValueError(f"no packaged clip {name!r}: there are {', '.join(PACKAGED_CLIPS)}")
    return CLIPS_DIR / f"{name}_8k_ulaw.wav"
