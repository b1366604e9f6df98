"""Fuzzing of every parser that takes outside input.

- :mod:`fuzz.targets`: one :class:`~fuzz.targets.FuzzTarget` per parser: how one
  input (bytes) is fed to it, which exceptions are its own (anything else is a
  crash), the properties checked on what it returns, and seed inputs;
- :mod:`fuzz.strategies`: hypothesis strategies that build those inputs with
  structure (Twilio and Vapi messages with wrong types, missing fields, bad UTF-8
  inside strings, ini files with unknown keys and odd values, ...);
- ``test_fuzz_parsers.py``: the hypothesis runs (a few dozen inputs per target, part
  of the normal suite) and a regression test for every crash fuzzing found;
- ``bench/fuzz.py``: the long runs, coverage-guided (atheris) or hypothesis, with a
  fixed budget per target, printing inputs run and crashes found.
"""
