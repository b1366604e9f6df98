"""twistd finds the ``vapi-gateway`` plugin from the installed package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
import gateway.tap
found = [p for p in getPlugins(IServiceMaker) if p.tapname == "vapi-gateway"]
assert len(found) == 1, found
options = found[0].options()
assert hasattr(options, "postOptions")
print(found[0].tapname, gateway.tap.__file__)
"""


def test_get_plugins_yields_vapi_gateway_from_the_install(tmp_path: Path) -> None:
    # run outside the checkout, so only the installed package can be found
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    tapname, module_file = out.stdout.split()
    assert tapname == "vapi-gateway"
    assert module_file.endswith("gateway/tap.py")


def test_the_dropin_has_no_package_init() -> None:
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()
    assert (ROOT / "twisted" / "plugins" / "vapi_gateway_dropin.py").exists()


def test_twistd_help_lists_the_subcommand() -> None:
    twistd = Path(sys.executable).with_name("twistd")
    out = subprocess.run([str(twistd), "--help"], capture_output=True, text=True, check=True)
    assert "vapi-gateway" in out.stdout
