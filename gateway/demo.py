"""``make demo``: a whole phone call through the real daemon, offline.

1. starts ``twistd -n vapi-gateway`` with the shipped config (``etc/vapi-gateway.ini``:
   ``[vapi] api_url = local``, so the local assistant plays Vapi inside the daemon) on
   free loopback ports;
2. runs one call with the call simulator (``vapi-gateway-sim``) playing Twilio: a signed
   webhook, the media stream with the caller clip, Twilio's playout; the dialled number
   is routed to the local assistant's ``speak+interrupt`` script, so the assistant
   talks, the caller barges in, and the gateway must cut it off;
3. prints the simulator's report and the path of the recorded WAV (what the caller
   heard), stops the daemon with SIGTERM, and exits 0 only if the call was clean (no
   gaps, no protocol violations) and the daemon drained and exited 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from gateway.tools import packaged_clip
from gateway.tools.daemon_process import DaemonProcess, config_with, free_port

DEMO_NUMBER = "+15550100200"
DEMO_SCRIPT = "local:speak+interrupt"


def caller_clip() -> str:
    """The caller clip from ../shared/audio when present, else the packaged copy."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "audio" / "caller_8k_ulaw.wav"
    if not shared.exists():
        shared = Path.cwd().parent / "shared" / "audio" / "caller_8k_ulaw.wav"
    if shared.exists():
        return str(shared)
    return str(packaged_clip("caller"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="etc/vapi-gateway.ini")
    parser.add_argument("--duration", type=float, default=9.0,
                        help="seconds the simulated caller stays on the line")
    parser.add_argument("--out", default=None, help="folder for the recording and logs")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="vapi-gateway-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    text = config_with(args.config, {
        "gateway": {"listen": f"tcp:{port}:interface=127.0.0.1", "public_url": base},
        "log": {"format": "json"},
        "admin": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"},
        "routing": {DEMO_NUMBER: DEMO_SCRIPT},
    })
    daemon = DaemonProcess(text, workdir=str(out))
    print(f"1. starting the daemon: {' '.join(daemon.argv)}")
    daemon.start()
    try:
        ready = daemon.wait_ready()
        print(f"   ready ({ready.get('event')}), listening on {base}; "
              f"the local assistant plays Vapi; {DEMO_NUMBER} is routed to {DEMO_SCRIPT}")
        recording = out / "caller-heard.wav"
        command = [sys.executable, "-m", "gateway.tools.simulator",
                   "--config", daemon.config_path, "--url", base, "--to", DEMO_NUMBER,
                   "--audio", caller_clip(), "--duration", str(args.duration),
                   "--record", str(recording)]
        print(f"2. one simulated call: {' '.join(command)}\n")
        sim = subprocess.run(command, check=False, text=True, capture_output=True,
                             env=os.environ.copy(),
                             timeout=args.duration + 60)
        print(sim.stdout.rstrip())
        if sim.stderr.strip():
            print(sim.stderr.rstrip(), file=sys.stderr)
    finally:
        code = daemon.terminate()
        (out / "daemon.log").write_text("\n".join(daemon.lines) + "\n", encoding="utf-8")
    summary = [e for e in daemon.events() if e.get("event") == "call ended"]
    print(f"\n3. the daemon's summary of the call: {json.dumps(summary[-1]) if summary else '-'}")
    print(f"   recording of what the caller heard: {recording}")
    print(f"   daemon log: {out / 'daemon.log'}; stopped on SIGTERM with exit code {code}")
    ok = sim.returncode == 0 and code == 0
    print("demo " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
