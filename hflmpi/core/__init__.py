"""Pure math of hierarchical federated learning; no MPI here.

Tree planning (:mod:`~hflmpi.core.topology`), the nested schedule (:mod:`~hflmpi.core.schedule`),
the unbiased quantizer and its bit packing (:mod:`~hflmpi.core.quantize`,
:mod:`~hflmpi.core.packing`), the one byte model of a layer's traffic (:mod:`~hflmpi.core.wire`),
robust rules, aggregation-rule plug-ins (:mod:`~hflmpi.core.strategy`), server optimizers
(:mod:`~hflmpi.core.server_opt`), secure-aggregation masks, differential privacy, keyed random streams, the cost model
with the one round-time model ``T(tau)`` (:mod:`~hflmpi.core.costmodel`) and the deadline-aware tau
search (:mod:`~hflmpi.core.tau_search`).
"""
