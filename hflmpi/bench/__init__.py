"""Benchmarks run under mpiexec: aggregation vs raw Allreduce and gloo, scaling, Flower."""
