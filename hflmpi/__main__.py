"""``python -m hflmpi``: see :mod:`hflmpi.cli`."""

import sys

from hflmpi.cli import main

code = main()
# Exit codes every rank returns together (2: a config/setup error found collectively, 75: the
# preemption checkpoint) must reach the launcher intact. Under `python -m mpi4py` a non-zero exit
# becomes MPI_Abort, and srun (PMI2) reports an abort as 137, not 75, so a preemptible job would
# never requeue. Finalizing MPI first makes it an ordinary exit on every rank. `hflmpi run` has
# already agreed on the code with every rank and ignores SIGTERM from then on
# (hflmpi.mpi.preempt.leave_together), so a sibling that exits first cannot get this rank killed.
_MPI = sys.modules.get("mpi4py.MPI")
if code in (2, 75) and _MPI is not None and _MPI.Is_initialized() and not _MPI.Is_finalized():
    _MPI.Finalize()
sys.exit(code)
