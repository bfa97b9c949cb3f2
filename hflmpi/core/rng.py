"""Explicit random streams keyed by (seed, rank, round, layer, purpose).

Nothing in hflmpi touches the global RNGs of torch, numpy or :mod:`random`. Every consumer of
randomness asks for a generator keyed by what it is for, so a run is reproducible bit for bit from
its seed and no two streams overlap (keys are hashed with numpy's ``SeedSequence``).

The seed is stored in the run file, so these streams are public: nothing secret may come from
them. Differential-privacy noise therefore does not (it comes from the OS CSPRNG, see
:mod:`hflmpi.core.privacy`), and a run with a private layer is not reproducible bit for bit.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["stream_seed", "torch_generator", "numpy_generator"]


def _purpose_key(purpose: str) -> int:
    return zlib.crc32(purpose.encode("utf-8"))


def stream_seed(seed: int, *, purpose: str, rank: int = 0, round: int = 0, layer: int = 0) -> int:
    """Return a 63-bit seed for the stream named by its key.

    Parameters
    ----------
    seed : int
        The run's seed (``run.seed`` in the config).
    purpose : str
        What the stream is for, e.g. ``"quantize"``, ``"batches"``, ``"partition"``.
    rank, round, layer : int
        The rest of the key. Use 0 where a key part does not apply.

    Returns
    -------
    int
        A non-negative seed below ``2**63``, identical for identical keys on any machine.
    """
    for name, value in (("seed", seed), ("rank", rank), ("round", round), ("layer", layer)):
        if value < 0:
            raise ValueError(f"rng key {name}={value} must be >= 0")
    sequence = np.random.SeedSequence([seed, _purpose_key(purpose), rank, round, layer])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def torch_generator(
    seed: int,
    *,
    purpose: str,
    rank: int = 0,
    round: int = 0,
    layer: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Generator:
    """Return a torch generator on ``device`` seeded from the stream key (see :func:`stream_seed`)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, purpose=purpose, rank=rank, round=round, layer=layer))
    return generator


def numpy_generator(
    seed: int, *, purpose: str, rank: int = 0, round: int = 0, layer: int = 0
) -> np.random.Generator:
    """Return a numpy PCG64 generator seeded from the stream key (see :func:`stream_seed`)."""
    return np.random.Generator(
        np.random.PCG64(stream_seed(seed, purpose=purpose, rank=rank, round=round, layer=layer))
    )
