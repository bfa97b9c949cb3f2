"""The per-layer option rules shared by the config and the aggregator (hflmpi.core.layer_rules).

The references are the configuration's messages, written out: key=value, constraint, fix.
"""

from __future__ import annotations

import pytest

from hflmpi.core.layer_rules import LayerOptionsError, check_layer_options


def _error(*args, **kwargs) -> str:
    with pytest.raises(LayerOptionsError) as info:
        check_layer_options(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_per_layer_combinations():
    assert _error(2, [0, 8], ["mean", "median"]) == (
        "aggregation.robust[1]='median' with quantize.bits[1]=8: robust rules need "
        "full-precision updates; set quantize.bits[1] = 0")
    assert _error(2, [0, 8], secure=[True, False]) == (
        "aggregation.secure[0]=true with quantize.bits[0]=0: secure aggregation masks quantized "
        "integer levels; set quantize.bits[0] to 1..16")
    assert _error(1, [0], ["krum"], [True]).startswith("aggregation.secure[0]=true with quantize")
    # secure needs bits > 0 and robust bits = 0, so one of those two rules always fires first
    assert _error(1, [8], ["krum"], [True]).startswith("aggregation.robust[0]='krum' with quantize")
    assert _error(1, [8], secure=[True], method="gather") == (
        'aggregation.secure needs quantize.method = "auto" or "sum"')
    assert _error(3, [0, 0, 0], ["mean", "median"]) == (
        'aggregation.robust=["mean", "median"] has 2 entries but the tree has 3 layers; give one '
        "per layer (or leave it out)")
    check_layer_options(2, [8, 0], ["mean", "median"], [True, False], method="sum")
    check_layer_options(2, [0, 0])


def test_privacy_layer():
    assert _error(2, [0, 0], privacy_layer=3) == (
        "privacy.layer=3 but the tree has 2 layers; use 1..2 (or 0 to turn privacy off)")
    assert _error(2, [0, 0], ["median", "mean"], privacy_layer=1) == (
        'aggregation.robust[0]="median" at privacy.layer=1: the noise is calibrated to the '
        "weighted mean's sensitivity (clip * max a_c), which a robust rule does not have, so the "
        "stated epsilon would be false; put the robust rule on another layer")
    check_layer_options(2, [0, 0], ["median", "mean"], privacy_layer=2)


def test_group_sizes():
    secure = dict(secure=[True, True], group_sizes=[[2, 3], [3]])
    assert _error(2, [8, 8], **secure) == (
        "aggregation.secure[0]=true with a layer-1 group of 2 participants: its leader subtracts "
        "its own levels from the sum and learns its partner's exactly; use groups of at least 3 "
        "(topology), or set aggregation.allow_small_secure_groups=true to accept that")
    check_layer_options(2, [8, 8], allow_small_secure_groups=True, **secure)
    check_layer_options(2, [8, 8], secure=[True, True], group_sizes=[[1, 3], [3]])
    trimmed = ["trimmed_mean", "mean"]
    assert _error(2, [0, 0], trimmed, group_sizes=[[4, 4], [2]]) == (
        "aggregation.trim=0.2 trims floor(0.2 * 4) = 0 of the 4 children of a layer-1 group, so "
        'aggregation.robust[0]="trimmed_mean" would tolerate no Byzantine child and silently '
        "average them all; set aggregation.trim >= 1/4 (e.g. aggregation.trim=0.25)")
    assert _error(2, [0, 0], trimmed, group_sizes=[[2], [2]], trim=0.25).endswith(
        "; use groups of at least 3 children (topology)")
    check_layer_options(2, [0, 0], trimmed, group_sizes=[[4, 4], [2]], trim=0.25)
    assert _error(2, [0, 0], ["mean", "median"], group_sizes=[[3], [3, 2]]) == (
        'aggregation.robust[1]="median" with a layer-2 group of 2 children tolerates no '
        "Byzantine child (the median of two is their mean); use groups of at least 3 children "
        '(topology) or "mean" there')
    assert _error(1, [0], ["krum"], group_sizes=[[5, 4]]) == (
        "aggregation.krum_f=1 with a layer-1 group of 4 children: krum needs f >= 1 Byzantine "
        "children tolerated and more than 2f + 2 = 4 children; set aggregation.krum_f=1 with "
        'groups of at least 5 children, or use "median" there')
    assert "aggregation.krum_f=0 with a layer-1 group of 9" in _error(
        1, [0], ["krum"], group_sizes=[[9]], krum_f=0)
    check_layer_options(1, [0], ["krum"], group_sizes=[[5, 1]])
