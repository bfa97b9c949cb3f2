"""hflmpi: multi-layer hierarchical federated learning on MPI clusters.

Implements QMLHFL (quantized multi-layer hierarchical federated learning, arXiv 2505.08145) and its
special cases FedAvg (one layer) and hierarchical SGD (two layers; Wang et al., AAAI 2022). Every
MPI rank is a client; the aggregation tree of any depth maps onto communicators made with
``Comm.Split``.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
