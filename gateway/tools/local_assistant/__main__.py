"""``python -m gateway.tools.local_assistant``: see :mod:`gateway.tools.local_assistant.cli`."""

import sys

from gateway.tools.local_assistant.cli import main

sys.exit(main())
