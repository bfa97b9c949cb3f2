"""``python -m hflmpi``: see :mod:`hflmpi.cli`."""

import sys

from hflmpi.cli import main

sys.exit(main())
