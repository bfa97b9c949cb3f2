"""The MPI wiring: communicators per layer, buffer transport, the layer aggregations and guards.

Only this package, the round loop's entry points, the command line and the benchmark tools import
mpi4py; everything they compute with comes from :mod:`hflmpi.core`.
"""
