"""One layer's quantized uplink: children send ``Q_n(a_c (x_c - x))``, the leader sums exactly.

QMLHFL's aggregation at a layer-n node (arXiv 2505.08145, Eq. (4)) is
``x_new = x + sum_c Q_n(a_c (x_c - x))`` with an unbiased stochastic quantizer per layer. Here
every child (a participant of the layer communicator) does:

1. ``d_c = a_c (x_c - x)`` and its per-bucket max ``|d_c|``;
2. one small ``MAX`` allreduce so the whole group shares a scale ``m_b`` per bucket;
3. stochastic rounding of ``d_c s / m_b`` to integer levels in ``[-s, s]`` with a generator keyed
   by (seed, rank, step, layer);
4. the levels travel either
   * ``"sum"``: as ``Reduce(SUM)`` of an integer container wide enough for ``fan_in * s``, or
   * ``"gather"``: bit-packed to ``bits`` bits and ``Gather``-ed as bytes to the leader, which
     unpacks and sums them in the same integer container, or
   * ``"lanes"``: offset codes ``level + s`` in lanes of 64-bit words sized from the fan-in
     (:mod:`hflmpi.core.lanes`), ``Reduce(SUM)`` as ``MPI_UINT64_T``: no carry crosses a lane.

Integer sums are associative, so the leader's ``sum_c l_c`` is the same for any reduction order,
MPI algorithm, method or device, and the result ``x + (sum_c l_c) m_b / s`` is bitwise
reproducible. The container is sized from the fan-in so that no sum (and no partial sum) ever
overflows: nothing depends on what an MPI library does on integer overflow (Open MPI 5 saturates
8- and 16-bit sums). Secure layers send masked residues modulo ``2^w`` in a container that holds
``fan_in (2^w - 1)`` and reduce modulo ``2^w`` after the sum (:mod:`hflmpi.core.secure`).
:func:`hflmpi.mpi.exact_sum.check_integer_sum` verifies at set-up that the library's sum is
exact over that range. ``E[l_c m_b / s] = d_c``, so the update is unbiased. The method that moves fewer
bytes per child is used unless one is forced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mpi4py import MPI

from hflmpi.core.lanes import LaneFormat, pack_lanes, unpack_lanes
from hflmpi.core.packing import code_scratch, pack_levels, sum_packed_levels
from hflmpi.core.quantize import (
    bucket_absmax,
    from_level_sum,
    integer_dtype,
    new_workspace,
    to_levels,
    to_packed,
)
from hflmpi.core.secure import PairwiseSeeds, mask_levels, unmask_sum
from hflmpi.core.wire import SCALE_NBYTES, LayerWire, Method, layer_wire, levels_for_bits
from hflmpi.mpi.transport import MpiBuffer

__all__ = ["UplinkResult", "QuantizedUplink"]


@dataclass
class UplinkResult:
    """What one uplink exchange cost and how well it quantized (this rank's view)."""

    bytes_sent: int
    quant_error: float


class QuantizedUplink:
    """Preallocated buffers and the exchange of one quantized layer on one participant.

    Parameters
    ----------
    comm : MPI.Comm
        The layer communicator (children's leaders; rank 0 leads the node).
    numel : int
        Model size.
    bits : int
        Quantizer width, 1..16 (1 = stochastic sign).
    bucket_size : int
        Elements per shared scale (0 = :func:`hflmpi.core.wire.auto_bucket_size`).
    device : torch.device
        Where the model lives.
    cuda_aware : bool
        Whether MPI may read CUDA memory directly.
    method : {"auto", "sum", "gather", "lanes"}
        ``"auto"`` picks the method that brings the leader fewer bytes
        (:func:`hflmpi.core.wire.choose_method`).
    seeds : PairwiseSeeds, optional
        Pair keys for secure aggregation: the levels are masked pairwise (Bonawitz et al. 2017)
        modulo ``2**w`` of the integer container before the ``Reduce``, so a leader (or any rank
        on the reduction tree) sees uniform residues, and the masks cancel in the sum. Needs
        ``method="sum"``.
    """

    def __init__(
        self,
        comm: MPI.Comm,
        numel: int,
        bits: int,
        bucket_size: int,
        device: torch.device,
        cuda_aware: bool,
        method: str = "auto",
        seeds: PairwiseSeeds | None = None,
        sum_op: MPI.Op = MPI.SUM,
    ) -> None:
        self.comm = comm
        self.numel = numel
        self.bits = bits
        self.s = levels_for_bits(bits)
        self.fan_in = comm.Get_size()
        self.wire: LayerWire = layer_wire(numel, bits, self.fan_in, bucket_size, method,
                                          secure=seeds is not None)
        self.bucket_size = self.wire.bucket_size
        self.method = self.wire.method
        self.seeds = seeds
        self.sum_op = sum_op
        # The integer-sum container is what travels; the gather path's leader accumulates offset
        # codes (up to 2s each) in a container with one bit of headroom (LayerWire).
        self.container = integer_dtype(self.wire.accumulator_nbytes)
        self.is_leader = comm.Get_rank() == 0
        self._diff = torch.empty(numel, dtype=torch.float32, device=device)
        self._workspace = new_workspace(numel, device)
        self._scales = torch.empty(self.wire.scale_nbytes // SCALE_NBYTES, dtype=torch.float32,
                                   device=device)
        self._scales_mpi = MpiBuffer(self._scales, cuda_aware)
        self._levels = torch.empty(numel, dtype=self.container, device=device)
        self._levels_mpi = MpiBuffer(self._levels, cuda_aware)
        self.payload_nbytes = self.wire.payload_nbytes
        if self.method == Method.LANES:
            self.lanes = LaneFormat(numel, bits, self.fan_in)
            self._words = torch.empty(self.lanes.words, dtype=torch.int64, device=device)
            self._words_mpi = MpiBuffer(self._words, cuda_aware)
            self._scratch = torch.empty(self.lanes.words, dtype=torch.int64, device=device)
        if self.method == Method.GATHER:
            slots = self.fan_in if self.is_leader else 1
            self._packed = torch.zeros(slots, self.payload_nbytes, dtype=torch.uint8, device=device)
            self._packed_mpi = MpiBuffer(self._packed.view(-1), cuda_aware)
            self._codes = (code_scratch(numel, bits, device)
                           if not self.is_leader and bits != 8 else None)

    def exchange(
        self,
        child: torch.Tensor,
        anchor: torch.Tensor,
        share: float,
        generator: torch.Generator,
        measure_error: bool = False,
        *,
        step: int = 0,
        layer: int = 0,
    ) -> UplinkResult:
        """Send ``Q(share * (child - anchor))``; at the leader, overwrite ``child`` with the new model.

        Collective over the layer communicator.

        Parameters
        ----------
        child : Tensor
            This participant's model (its child's aggregate); at the leader it receives
            ``anchor + sum_c Q(a_c (x_c - anchor))``.
        anchor : Tensor
            The node's model at its last aggregation (identical on all participants).
        share : float
            ``a_c = W_c / W_node``.
        generator : torch.Generator
            Keyed stream for the stochastic rounding of this participant.
        measure_error : bool
            Also return ``||Q(d) - d||^2 / ||d||^2`` of this participant's own update.
        step, layer : int
            Key the secure-aggregation masks (ignored without pair seeds).
        """
        diff = self._diff
        if child.dtype == torch.float32:
            torch.sub(child, anchor, out=diff)
        else:  # float64 model: subtract in float64, then round once into the float32 scratch
            diff.copy_(child - anchor)
        if share != 1.0:
            diff.mul_(share)
        self._scales.copy_(bucket_absmax(diff, self.bucket_size))
        if not bool(torch.isfinite(self._scales).all()):
            # Poison the shared scales with +inf (which MAX keeps, unlike NaN) so every
            # participant fails together instead of one rank leaving the others in a collective.
            self._scales.fill_(float("inf"))
        buf = self._scales_mpi.outbound()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)  # all participants: shared scales
        self._scales_mpi.inbound()
        if not bool(torch.isfinite(self._scales).all()):
            raise FloatingPointError(
                "a model update in this layer group holds NaN or Inf; check the learning rate "
                "and the data of the group's devices"
            )
        if self.method == Method.GATHER and not self.is_leader and not measure_error:
            # these levels only travel packed: round straight into the send row (same bits)
            to_packed(diff, self._scales, self.bits, generator, bucket_size=self.bucket_size,
                      out=self._packed[0], codes=self._codes, workspace=self._workspace)
            levels = None
        else:
            levels = to_levels(
                diff, self._scales, self.s, generator, bucket_size=self.bucket_size,
                sign=self.bits == 1, out=self._levels, workspace=self._workspace,
            )
        error = float("nan")
        if measure_error and levels is not None:
            error = self._relative_error(diff, levels)
        if self.seeds is not None and levels is not None:
            mask_levels(levels, self.comm.Get_rank(), self.fan_in, self.seeds,
                        self.wire.modulus_bits, step=step, layer=layer, out=levels)
        if self.method == Method.INTEGER_SUM:
            sent = self._reduce_sum()
        elif self.method == Method.LANES:
            assert levels is not None
            sent = self._lanes_sum(levels)
        else:
            sent = self._gather_sum(levels)
        if self.is_leader:
            update = from_level_sum(self._levels, self._scales, self.s, out=self._diff,
                                    bucket_size=self.bucket_size)
            torch.add(anchor, update.to(child.dtype), out=child)
        return UplinkResult(sent + self.wire.scale_nbytes, error)

    @property
    def level_sum(self) -> torch.Tensor:
        """The group's level sum at the leader after :meth:`exchange` (integer container)."""
        return self._levels

    @property
    def lane_sums(self) -> torch.Tensor:
        """The summed lane words at the leader after a lanes :meth:`exchange`."""
        return self._words

    @property
    def scales(self) -> torch.Tensor:
        """The shared float32 scales of the last :meth:`exchange` (every participant)."""
        return self._scales

    def sum_range(self) -> tuple[int, int]:
        """Return the smallest and largest value one participant adds in the integer sum.

        Levels ``[-s, s]``, or masked residues ``[0, 2^w - 1]`` on a secure layer; the container
        holds ``fan_in`` times either bound (:func:`hflmpi.core.wire.layer_wire`).
        """
        if self.seeds is not None:
            return 0, (1 << self.wire.modulus_bits) - 1
        return -self.s, self.s

    def _reduce_sum(self) -> int:
        buf = self._levels_mpi.outbound()
        if not self.is_leader:
            self.comm.Reduce(buf, None, op=self.sum_op, root=0)
            return self.payload_nbytes
        self.comm.Reduce(MPI.IN_PLACE, buf, op=self.sum_op, root=0)
        self._levels_mpi.inbound()
        if self.seeds is not None:  # the exact sum of the residues; the masks cancel modulo 2^w
            self._levels.copy_(unmask_sum(self._levels, self.wire.modulus_bits))
        return 0

    def _lanes_sum(self, levels: torch.Tensor) -> int:
        pack_lanes(levels, self.lanes, self._words, offset=self.s, scratch=self._scratch)
        buf = [self._words_mpi.outbound(), MPI.UINT64_T]
        if not self.is_leader:
            self.comm.Reduce(buf, None, op=self.sum_op, root=0)
            return self.payload_nbytes
        self.comm.Reduce(MPI.IN_PLACE, buf, op=self.sum_op, root=0)
        self._words_mpi.inbound()
        unpack_lanes(self._words, self.lanes, self._levels, offset=self.fan_in * self.s,
                     scratch=self._scratch)
        return 0

    def _gather_sum(self, levels: torch.Tensor | None) -> int:
        if not self.is_leader and levels is not None:  # the leader's own levels never leave it
            pack_levels(levels, self.bits, out=self._packed[0], codes=self._codes, check=False)
        buf = self._packed_mpi.outbound()
        if self.is_leader:
            self.comm.Gather(MPI.IN_PLACE, buf, root=0)
            self._packed_mpi.inbound()
            # own levels are in self._levels already; add the other children's, in rank order
            sum_packed_levels(self._packed[1:], self.bits, self._levels)
            return 0
        self.comm.Gather(buf, None, root=0)
        return self.payload_nbytes

    def _relative_error(self, diff: torch.Tensor, levels: torch.Tensor) -> float:
        decoded = from_level_sum(levels, self._scales, self.s, bucket_size=self.bucket_size)
        denominator = float(torch.dot(diff, diff))
        if denominator == 0.0:
            return 0.0
        return float(torch.sum((decoded - diff) ** 2)) / denominator
