"""``make demo``: start the daemon with the shipped config on a free loopback port,
probe ``/health`` and ``/ready``, stop it with SIGTERM and check it exits cleanly.

(Once the local assistant and the call simulator exist, the demo runs a whole call.)
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from gateway.tools.daemon_process import DaemonProcess, config_with, free_port


def _get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="etc/vapi-gateway.ini")
    args = parser.parse_args(argv)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    text = config_with(args.config, {
        "gateway": {"listen": f"tcp:{port}:interface=127.0.0.1", "public_url": base},
        "log": {"format": "json"},
        "admin": {"listen": f"tcp:{free_port()}:interface=127.0.0.1"},
    })
    daemon = DaemonProcess(text)
    print(f"starting: {' '.join(daemon.argv)}")
    daemon.start()
    try:
        daemon.wait_ready()
        for path in ("/health", "/ready"):
            status, body = _get(base + path)
            print(f"GET {path} -> {status} {json.dumps(body)}")
            if status != 200:
                return 1
    finally:
        code = daemon.terminate()
    print(f"daemon stopped on SIGTERM with exit code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
