"""twistd glue: the ``vapi-gateway`` subcommand's options and ``makeService``.

``twistd -n vapi-gateway --config etc/vapi-gateway.ini`` parses the options here.  The
ini file is loaded and validated while options are parsed — before twistd starts
logging or binds any port — so a bad config prints one clear line per problem and
exits non-zero with no traceback; ``--check`` validates and exits.  Unless twistd was
given ``--logger``, the ini's log format is installed as twistd's log observer.

``--worker N`` names this process's place among the host's workers (the instance of
the ``vapi-gateway@N`` systemd template, all accepting from one shared socket); a value
that is not a whole number from 0 up exits with status 2 and one line, like a config
error.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from gateway import __version__
from gateway.config import ConfigError, Settings, load_settings
from gateway.logs import redactor, set_observer_config

DEFAULT_CONFIG = "etc/vapi-gateway.ini"


class Options(usage.Options):
    """Options of the ``vapi-gateway`` twistd subcommand."""

    synopsis = "[--config FILE] [--check] [--worker N]"
    longdesc = "Puts a Vapi voice assistant on a Twilio phone number."
    optParameters = [["config", "c", DEFAULT_CONFIG, "the ini file to load"]]
    optFlags = [["check", None, "validate the config file, print the result and exit"],
                ["version", None, "print the gateway's version and exit"]]

    settings: Settings

    def __init__(self) -> None:
        super().__init__()
        self["worker"] = None

    def opt_worker(self, value: str) -> None:
        """this process's number among the host's workers (0, 1, ...: the systemd
        template instance, vapi-gateway@N)"""
        number = worker_number(value)
        if number is None:
            print(f"vapi-gateway: --worker: {value!r} is not a whole number; "
                  "allowed: a whole number from 0 up (the vapi-gateway@N instance)",
                  file=sys.stderr)
            raise SystemExit(2)
        self["worker"] = number

    def opt_version(self) -> None:
        print(f"vapi-gateway {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.settings = load_settings(self["config"])
        except ConfigError as exc:
            for line in exc.problems:
                print(f"vapi-gateway: {line}", file=sys.stderr)
            print(f"vapi-gateway: {len(exc.problems)} problem(s) in the config; not starting",
                  file=sys.stderr)
            raise SystemExit(2) from None
        if self["check"]:
            print(f"vapi-gateway: {self['config']}: OK")
            raise SystemExit(0)
        redactor.add(*self.settings.secrets())
        set_observer_config(self.settings.log.format, self.settings.log.level)
        parent: Any = getattr(self, "parent", None)
        if parent is not None and parent.get("logger") is None:
            parent["logger"] = "gateway.logs.observer"


def worker_number(value: str) -> int | None:
    """``value`` as a worker number (a whole number ≥ 0, ASCII digits only), else None."""
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        return None
    return int(text)


def makeService(options: Options) -> IService:
    """Build the gateway's root service on the global reactor."""
    from twisted.internet import reactor

    from gateway.daemon import build_gateway

    return build_gateway(options.settings, reactor,  # type: ignore[arg-type]
                         handle_sigterm=True, worker=options["worker"]).service
