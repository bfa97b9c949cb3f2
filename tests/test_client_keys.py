"""hflmpi.core.client_keys: DH pair keys between clients held by different ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hflmpi.core.client_keys import ClientKeys, new_private_keys
from hflmpi.core.secure import mask_levels, unmask_sum


def _two_ranks():
    pairs = new_private_keys(range(6))
    public = [pairs[c][1] for c in range(6)]
    rank_a = ClientKeys({c: pairs[c][0] for c in (0, 1, 2)}, public)
    rank_b = ClientKeys({c: pairs[c][0] for c in (3, 4, 5)}, public)
    return rank_a, rank_b


def test_both_holders_derive_the_same_key_and_nobody_else_can():
    a, b = _two_ranks()
    key = a.key(1, 4, step=3, layer=2, group=0)
    assert key == b.key(4, 1, step=3, layer=2, group=0) and len(key) == 32
    assert key != a.key(1, 4, step=4, layer=2, group=0)  # another release, another key
    assert key != a.key(1, 5, step=3, layer=2, group=0)
    with pytest.raises(PermissionError):
        a.key(3, 4, step=3, layer=2, group=0)


def test_masks_among_participants_cancel_in_the_sum_across_holders():
    a, b = _two_ranks()
    ids = [0, 2, 3, 5]  # the participants of one node this round
    holder = {0: a, 2: a, 3: b, 5: b}
    rng = np.random.default_rng(0)
    levels = {c: torch.from_numpy(rng.integers(-127, 128, size=1000)) for c in ids}
    width = 12  # 4 * 127 < 2^11
    masked = [mask_levels(levels[c].clone(), i, len(ids), holder[c].among(ids), width, step=7,
                          layer=1, group=2) for i, c in enumerate(ids)]
    for c, m in zip(ids, masked):  # each looks uniform, not like its levels
        assert not torch.equal(m, levels[c] % (1 << width))
    total = unmask_sum(torch.stack(masked).sum(dim=0), width)
    expected = sum(levels[c] for c in ids)
    assert torch.equal(total, expected)


def test_a_wrong_published_key_is_refused():
    pairs = new_private_keys([0, 1])
    with pytest.raises(ValueError, match="client 1 is not its own"):
        ClientKeys({1: pairs[1][0]}, [pairs[0][1], pairs[0][1]])
    keys = ClientKeys({0: pairs[0][0]}, [pairs[0][1], 1])
    with pytest.raises(ValueError, match="public key of client 1 is not a valid group element"):
        keys.key(0, 1, step=0, layer=1, group=0)
