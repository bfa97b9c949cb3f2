"""Pure math of hierarchical federated learning; no MPI here.

Tree planning (:mod:`~hflmpi.core.topology`), the nested schedule (:mod:`~hflmpi.core.schedule`),
the unbiased quantizer and its bit packing (:mod:`~hflmpi.core.quantize`,
:mod:`~hflmpi.core.packing`), robust rules, secure-aggregation masks, differential privacy, keyed
random streams, and the cost model with the deadline-aware tau search.
"""
