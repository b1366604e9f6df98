"""Fuzz every parser of outside input for a fixed budget each, and print what was found.

Run from the repository root::

    .venv/bin/python bench/fuzz.py                       # atheris, 30 s per target
    .venv/bin/python bench/fuzz.py --seconds 120 --target ini-config
    .venv/bin/python bench/fuzz.py --engine hypothesis --runs 5000

The targets are those of ``tests/fuzz/targets.py`` (the same ones the test suite runs
with a few dozen hypothesis inputs each).  Two engines:

``atheris`` (the default when it is installed: ``.venv/bin/pip install atheris``)
    coverage-guided: libFuzzer mutates each target's seeds, guided by the branches
    they reach in ``gateway``.  Each target runs in a child process (libFuzzer exits
    the process when its budget is spent) with ``-runs`` / ``-max_total_time``; the
    child records every distinct crash (exception type and innermost frame) and keeps
    going, so one bug does not hide the next.
``hypothesis``
    the structured strategies of ``tests/fuzz/strategies.py`` (valid messages broken
    field by field, bad UTF-8 inside strings, odd ini values), in this process.

The table gives, per target: inputs run, seconds, distinct crashes and the first one.
Each crashing input is written to the artifacts folder (``--artifacts``, default a
new temporary folder) as ``<target>-<n>.bin`` with a ``.txt`` holding the traceback;
replay one with ``--replay FILE --target NAME``.  Exit status 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

MAX_INPUT_BYTES = 20_000
PER_INPUT_TIMEOUT_S = 10


@dataclass
class TargetRun:
    """What one target's run found."""

    name: str
    engine: str
    inputs: int = 0
    seconds: float = 0.0
    crashes: list[str] = field(default_factory=list)
    note: str = ""


class CrashLog:
    """Distinct crashes of one target, each written to the artifacts folder at once."""

    def __init__(self, target: str, folder: Path) -> None:
        self.target = target
        self.folder = folder
        self.keys: list[str] = []

    def record(self, crash: Any, data: bytes) -> None:
        if crash.key in self.keys:
            return
        self.keys.append(crash.key)
        stem = self.folder / f"{self.target}-{len(self.keys)}"
        stem.with_suffix(".bin").write_bytes(data)
        text = "".join(traceback.format_exception(crash.error))
        stem.with_suffix(".txt").write_text(f"{crash.key}\n\n{text}", encoding="utf-8")
        with (self.folder / f"{self.target}.crashes.jsonl").open("a", encoding="utf-8") as out:
            out.write(json.dumps({"key": crash.key, "input": str(stem.with_suffix(".bin"))})
                      + "\n")


def _quiet_logs() -> None:
    from gateway.logs import configure_structlog

    configure_structlog("critical")


# -- atheris (one child process per target) --------------------------------------------------


def atheris_child(name: str, runs: int | None, seconds: float | None, folder: Path,
                  seed: int) -> None:
    """Runs inside the child: instrument gateway, fuzz one target until the budget ends."""
    import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

    with atheris.instrument_imports(include=["gateway"]):  # every gateway module it loads
        from fuzz.targets import TARGETS, crash_of
    _quiet_logs()
    target = TARGETS[name]
    crashes = CrashLog(name, folder)
    corpus = Path(tempfile.mkdtemp(prefix=f"corpus-{name}-", dir=folder))
    for number, data in enumerate(target.seeds()):
        (corpus / f"seed-{number}").write_bytes(data)

    def test_one_input(data: bytes) -> None:
        crash = crash_of(target, data)
        if crash is not None:
            crashes.record(crash, data)

    if target.dictionary:
        entries = ("\"" + "".join(f"\\x{b:02x}" for b in token) + "\""
                   for token in target.dictionary)
        (corpus.parent / f"{name}.dict").write_text("\n".join(entries) + "\n")
    options = [sys.argv[0], f"-seed={seed}", f"-max_len={MAX_INPUT_BYTES}",
               f"-timeout={PER_INPUT_TIMEOUT_S}", "-rss_limit_mb=4096",
               "-print_final_stats=1", f"-artifact_prefix={folder}/{name}-libfuzzer-"]
    if target.dictionary:
        options.append(f"-dict={corpus.parent / f'{name}.dict'}")
    if runs is not None:
        options.append(f"-runs={runs}")
    if seconds is not None:
        options.append(f"-max_total_time={max(1, round(seconds))}")
    atheris.Setup([*options, str(corpus)], test_one_input)
    atheris.Fuzz()


def run_atheris(name: str, runs: int | None, seconds: float | None, folder: Path,
                seed: int) -> TargetRun:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name,
               "--artifacts", str(folder), "--seed", str(seed)]
    if runs is not None:
        command += ["--runs", str(runs)]
    if seconds is not None:
        command += ["--seconds", str(seconds)]
    started = time.monotonic()
    child = subprocess.run(command, capture_output=True, text=True, errors="replace",
                           cwd=ROOT, check=False)
    result = TargetRun(name, "atheris", seconds=time.monotonic() - started)
    stats = {}
    for line in child.stderr.splitlines():
        if line.startswith("stat::"):
            key, _, value = line[len("stat::"):].partition(":")
            stats[key.strip()] = value.strip()
    executed = stats.get("number_of_executed_units", "")
    result.inputs = int(executed) if executed.isdigit() else 0
    report = folder / f"{name}.crashes.jsonl"
    if report.exists():
        result.crashes = [json.loads(line)["key"]
                          for line in report.read_text(encoding="utf-8").splitlines()]
    if child.returncode != 0:  # libFuzzer itself stopped: a timeout, OOM, or a crash of ours
        tail = [line for line in child.stderr.splitlines() if "ERROR" in line or "==" in line]
        result.crashes.append(f"libFuzzer stopped (exit {child.returncode}): "
                              + (tail[0][:100] if tail else "see stderr"))
        (folder / f"{name}-stderr.txt").write_text(child.stderr, encoding="utf-8")
    return result


# -- hypothesis (in this process) ---------------------------------------------------------------


def run_hypothesis(name: str, runs: int | None, seconds: float | None, folder: Path,
                   seed: int) -> TargetRun:
    from fuzz.strategies import STRATEGIES
    from fuzz.targets import TARGETS, crash_of
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    target = TARGETS[name]
    crashes = CrashLog(name, folder)
    result = TargetRun(name, "hypothesis")
    budget_runs = runs if runs is not None else 10**12
    deadline = time.monotonic() + seconds if seconds is not None else float("inf")
    chunk = 500
    started = time.monotonic()
    round_number = 0
    while result.inputs < budget_runs and time.monotonic() < deadline:
        examples = min(chunk, budget_runs - result.inputs)

        @hypothesis_seed(seed + round_number)
        @settings(max_examples=examples, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(STRATEGIES[name])
        def fuzz_one(data: bytes) -> None:
            if time.monotonic() >= deadline:
                return
            result.inputs += 1
            crash = crash_of(target, data)
            if crash is not None:
                crashes.record(crash, data)

        fuzz_one()
        round_number += 1
    result.seconds = time.monotonic() - started
    result.crashes = crashes.keys
    return result


# -- the table -------------------------------------------------------------------------------


def print_table(results: list[TargetRun], folder: Path) -> None:
    from fuzz.targets import TARGETS

    header = f"{'target':<24} {'parser':<46} {'engine':<10} {'inputs':>9} {'s':>6} crashes"
    print(header)
    print("-" * len(header))
    for run in results:
        first = f"  ({run.crashes[0]})" if run.crashes else ""
        print(f"{run.name:<24} {TARGETS[run.name].parser[:46]:<46} {run.engine:<10} "
              f"{run.inputs:>9} {run.seconds:>6.0f} {len(run.crashes)}{first}")
    total = sum(r.inputs for r in results)
    print(f"{'total':<24} {'':<46} {'':<10} {total:>9} {sum(r.seconds for r in results):>6.0f} "
          f"{sum(len(r.crashes) for r in results)}")
    print(f"artifacts: {folder}")


def replay(name: str, path: Path) -> int:
    from fuzz.targets import TARGETS, crash_of

    _quiet_logs()
    crash = crash_of(TARGETS[name], path.read_bytes())
    if crash is None:
        print(f"{path}: no crash")
        return 0
    traceback.print_exception(crash.error)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("atheris", "hypothesis"), default=None,
                        help="default: atheris if installed, else hypothesis")
    parser.add_argument("--runs", type=int, default=None, help="inputs per target")
    parser.add_argument("--seconds", type=float, default=None,
                        help="seconds per target (default 30 when --runs is not given)")
    parser.add_argument("--target", action="append", default=None,
                        help="a target name (repeatable); default: all")
    parser.add_argument("--artifacts", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--replay", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        atheris_child(args.child, args.runs, args.seconds, args.artifacts, args.seed)
        return 0
    from fuzz.targets import TARGETS

    names = args.target or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    if args.replay is not None:
        return replay(names[0], args.replay)
    seconds = args.seconds if args.seconds is not None or args.runs is not None else 30.0
    engine = args.engine
    if engine is None:
        engine = "atheris" if importlib.util.find_spec("atheris") else "hypothesis"
        if engine == "hypothesis":
            print("atheris is not installed: using hypothesis "
                  "(.venv/bin/pip install atheris for coverage-guided runs)")
    folder = args.artifacts or Path(tempfile.mkdtemp(prefix="vapi-gateway-fuzz-"))
    folder.mkdir(parents=True, exist_ok=True)
    if engine == "hypothesis":
        _quiet_logs()
    budget = f"{args.runs} inputs" if args.runs is not None else ""
    budget += (" or " if budget and seconds else "") + (f"{seconds:g} s" if seconds else "")
    print(f"fuzzing {len(names)} target(s) with {engine}, {budget} each")
    results = []
    for name in names:
        run = (run_atheris if engine == "atheris" else run_hypothesis)(
            name, args.runs, seconds, folder, args.seed)
        print(f"  {name}: {run.inputs} inputs, {len(run.crashes)} crash(es)", flush=True)
        results.append(run)
    print()
    print_table(results, folder)
    return 1 if any(run.crashes for run in results) else 0


if __name__ == "__main__":
    sys.exit(main())
