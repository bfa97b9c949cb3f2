"""``python -m hflmpi.experiments ARGS``: the same as ``python -m hflmpi experiments ARGS``."""

import runpy
import sys

sys.argv = [sys.argv[0], "experiments", *sys.argv[1:]]
runpy.run_module("hflmpi", run_name="__main__", alter_sys=True)
