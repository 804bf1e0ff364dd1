"""``python -m bayesmeta.cli``."""

import sys

from bayesmeta.cli import main

sys.exit(main())
