"""The leak soak (``bench/soak.py``), CI-sized: 200 short calls through the real daemon
-- 80 to warm up and 100 more twenty at a time, 20 one at a time -- in under a minute.

It runs the bench script itself and holds it to its verdicts: every call completed with
no protocol violation, the fd count and the registry back to the warm-up baseline, RSS
growth after the warm-up within ``MAX_RSS_GROWTH_PERCENT`` (looser than the full soak's
5 %: after an 80-call warm-up, the next 120 calls still grow the daemon by about 4 % --
its thread pool and allocator arenas reach their working size), no error log line,
every Vapi call ended by ``end-call``, SIGTERM exits 0.  The full run is
``.venv/bin/python bench/soak.py`` (5,000 calls).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MAX_RSS_GROWTH_PERCENT = 10


def test_two_hundred_calls_leave_nothing_behind(tmp_path: Path,
                                                log_capture_path: Path) -> None:
    results_path = tmp_path / "soak.json"
    workdir = tmp_path / "daemon"
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--warmup", "80",
         "--sequential", "20", "--concurrent", "100", "--concurrency", "20",
         "--duration", "1.0", "--max-rss-growth", str(MAX_RSS_GROWTH_PERCENT),
         "--json", str(results_path), "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    daemon_log = workdir / "daemon.log"
    if daemon_log.exists():
        with log_capture_path.open("a", encoding="utf-8") as capture:
            capture.write(daemon_log.read_text(encoding="utf-8", errors="replace"))
    assert results_path.exists(), out.stdout + out.stderr
    results = json.loads(results_path.read_text())
    failed = [verdict for verdict, held in results["verdicts"].items() if not held]
    assert not failed, out.stdout
    assert out.returncode == 0, out.stdout + out.stderr
    assert sum(phase["calls"] for phase in results["phases"]) == 200
    baseline, *_, final = results["samples"]
    assert final["active_calls"] == baseline["active_calls"] == 0
    print(out.stdout)
