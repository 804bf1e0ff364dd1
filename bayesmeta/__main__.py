"""``python -m bayesmeta`` (and ``torchrun -m bayesmeta``): the ``bayesmeta`` command line."""

import sys

from bayesmeta.cli import main

sys.exit(main())
