"""``python -m gateway.tools.simulator``: the ``vapi-gateway-sim`` command."""

import sys

from gateway.tools.simulator.cli import main

sys.exit(main())
