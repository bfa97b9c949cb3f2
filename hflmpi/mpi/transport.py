"""Hand torch tensors to MPI without copies on the CPU and with the right path on the GPU.

CPU tensors are passed as numpy views (zero copy). CUDA tensors go to MPI directly when the MPI
library is CUDA-aware (:func:`hflmpi.mpi.comm.cuda_aware_mpi`), after a stream synchronisation so MPI
never reads memory a kernel is still writing; otherwise they are staged through a pinned host
mirror allocated once and reused.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MpiBuffer"]


class MpiBuffer:
    """A tensor plus what MPI needs to read and write it.

    Parameters
    ----------
    tensor : torch.Tensor
        Contiguous 1-D tensor; CPU or CUDA.
    cuda_aware : bool
        Whether MPI may touch CUDA memory directly.

    Use :meth:`outbound` before a collective (returns the object to give mpi4py) and
    :meth:`inbound` after it (copies the host mirror back to the device when staged).
    """

    def __init__(self, tensor: torch.Tensor, cuda_aware: bool) -> None:
        if not tensor.is_contiguous() or tensor.dim() != 1:
            raise ValueError("MPI buffers must be contiguous 1-D tensors")
        self.tensor = tensor
        self.staged = tensor.is_cuda and not cuda_aware
        if self.staged:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        else:
            self._host = tensor

    @property
    def nbytes(self) -> int:
        """Size of the buffer in bytes."""
        return self.tensor.numel() * self.tensor.element_size()

    def outbound(self, copy: bool = True) -> Any:
        """Return the buffer object for mpi4py, staging device data to the host if needed.

        Parameters
        ----------
        copy : bool
            Copy device data to the host mirror (skip it for receive-only buffers).
        """
        if self.tensor.is_cuda:
            if self.staged:
                if copy:
                    self._host.copy_(self.tensor, non_blocking=True)
                torch.cuda.current_stream(self.tensor.device).synchronize()
                return self._host.numpy()
            torch.cuda.current_stream(self.tensor.device).synchronize()
            return self.tensor
        return self.tensor.numpy()

    def inbound(self) -> None:
        """Copy the host mirror back to the device after MPI wrote into it (no-op otherwise)."""
        if self.staged:
            self.tensor.copy_(self._host, non_blocking=True)
