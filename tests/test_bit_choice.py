"""Bits per layer for ``hflmpi plan``: the cheapest widths whose variance factor fits a bound.

References are hand-worked: the QSGD variance factor ``q = min(B/s^2, sqrt(B)/s)`` with the
per-width default buckets (8 bits: s = 127, B = 512; 4 bits: s = 7, B = 1024; 2 bits: s = 1,
B = 2048), and costs from small tables or from the alpha-beta formulas written out by hand.
"""

from __future__ import annotations

import json
import math

import pytest

from hflmpi.cli.plan import main
from hflmpi.core.bit_choice import bit_options, choose_bits
from hflmpi.core.costmodel import Network
from hflmpi.core.netfile import networks_from_dict, read_codec, read_networks, write_networks
from hflmpi.core.tau_search import PlanError

Q8 = min(512 / 127**2, math.sqrt(512) / 127)   # 0.0317
Q4 = min(1024 / 7**2, math.sqrt(1024) / 7)     # 4.571
Q2 = min(2048 / 1**2, math.sqrt(2048) / 1)     # 45.25

# seconds per layer width (made up): narrower is cheaper, exact the dearest
LAYER_COST = {0: 10.0, 8: 3.0, 4: 2.0, 2: 1.5}


def _table_cost(combo):
    return sum(LAYER_COST[b] for b in combo)


@pytest.mark.parametrize("bound, expected", [
    (0.0, (0, 0)), (0.01, (0, 0)), (0.05, (8, 8)), (Q4, (4, 4)), (5.0, (4, 4)), (100.0, (2, 2)),
])
def test_cheapest_combination_within_the_variance_bound(bound, expected):
    chosen = choose_bits([0, 8, 4, 2], 2, _table_cost, bound)
    assert chosen.bits == expected
    assert chosen.cost == pytest.approx(2 * LAYER_COST[expected[0]])
    assert max(chosen.q) <= bound


def test_per_layer_candidates_and_the_q_of_each_layer():
    # layer 1 may only be exact or 8-bit, layer 2 anything: with bound 5 -> (8, 4)
    chosen = choose_bits([[0, 8], [0, 8, 4, 2]], 2, _table_cost, 5.0)
    assert chosen.bits == (8, 4)
    assert chosen.q == pytest.approx((Q8, Q4))
    assert chosen.cost == pytest.approx(3.0 + 2.0)


def test_a_cost_that_couples_the_layers_is_respected():
    # exact everywhere is free (say, one allreduce already paid for); any quantized layer costs 1
    def cost(combo):
        return 0.0 if not any(combo) else 1.0 + 0.1 * len([b for b in combo if b])

    assert choose_bits([0, 8, 4], 2, cost, 5.0).bits == (0, 0)


def test_options_are_sorted_cheapest_first_and_marked():
    options = bit_options([0, 8, 4, 2], 2, _table_cost, 0.05)
    assert len(options) == 16
    costs = [o.cost for o in options]
    assert costs == sorted(costs)
    assert options[0].bits == (2, 2) and not options[0].fits
    assert {o.bits for o in options if o.fits} == {(0, 0), (0, 8), (8, 0), (8, 8)}
    assert options[0].q == pytest.approx((Q2, Q2))


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(PlanError, match="max-variance"):
        choose_bits([8, 4], 1, _table_cost, 0.01)
    with pytest.raises(PlanError, match="max-variance"):
        bit_options([8], 1, _table_cost, -1.0)
    with pytest.raises(PlanError, match="one per layer"):
        choose_bits([[8], [8], [8]], 2, _table_cost, 1.0)
    with pytest.raises(PlanError, match="17"):
        choose_bits([17], 1, _table_cost, 1.0)


def test_network_file_round_trip_and_bad_files(tmp_path):
    nets = [Network("node", 1e-5, 3e-10, 5e-10), Network("link", 2e-5, 8e-9, 1e-9, note="fit")]
    path = tmp_path / "net.json"
    write_networks(path, nets, {"label": "1gbit"})
    assert read_networks(path) == nets
    assert json.loads(path.read_text())["meta"] == {"label": "1gbit"}
    for bad in [{}, {"format": "x", "layers": []}, {"format": "hflmpi-networks/1", "layers": []},
                {"format": "hflmpi-networks/1", "layers": [{"alpha": 1}]},
                {"format": "hflmpi-networks/1", "layers": [{"alpha": 1, "beta": -1, "gamma": 0}]},
                {"format": "hflmpi-networks/1", "layers": [{"alpha": 1, "beta": 1, "gamma": 0, "x": 1}]}]:
        with pytest.raises(ValueError, match="net"):
            networks_from_dict(bad, "net.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        read_networks(tmp_path / "junk.json")


def _plan(tmp_path, capsys, *extra):
    beta = 1e-9  # one ns per byte, no latency, no reduction cost: t = bytes * beta
    path = tmp_path / "net.json"
    write_networks(path, [Network("link", 0.0, beta, 0.0)])
    capsys.readouterr()
    code = main(["--network", str(path), "--numel", "1000000", "--fanouts", "2", "--t-cp", "0.01",
                 "--deadline", "10", "--random", "0", "--tau-max", "4", *extra])
    return code, capsys.readouterr()


def test_cli_with_a_network_file_gives_t_cm_from_the_model(tmp_path, capsys):
    code, out = _plan(tmp_path, capsys, "--json")
    assert code == 0
    result = json.loads(out.out)
    # exact, subtree, p = 2: allreduce of the 8-byte weight (recursive doubling: 8 B) plus the
    # model's allreduce (Rabenseifner, p = 2: 2 (p-1)/p n = n bytes each), n = 4 numel
    assert result["t_cm"] == pytest.approx([(8 + 4_000_000) * 1e-9])
    assert result["bits"] == [0]


def test_cli_chooses_bits_and_says_why(tmp_path, capsys):
    code, out = _plan(tmp_path, capsys, "--choose-bits", "0,8,4", "--max-variance", "0.05")
    assert code == 0, out.err
    assert "CHOSEN" in out.out and "quantize.bits=[8]" in out.out
    assert f"q {Q4:.4g} > 0.05" in out.out  # 4 bits is cheaper, but too noisy
    code, out = _plan(tmp_path, capsys, "--choose-bits", "0,8,4", "--max-variance", "0.01", "--json")
    assert code == 0
    assert json.loads(out.out)["bits"] == [0]
    code, out = _plan(tmp_path, capsys, "--choose-bits", "0,8,4", "--max-variance", "5", "--json")
    result = json.loads(out.out)
    assert result["bits"] == [4]
    assert [o["bits"] for o in result["bit_options"]] == [[4], [8], [0]]


def test_cli_refuses_incomplete_network_options(tmp_path, capsys):
    path = tmp_path / "net.json"
    write_networks(path, [Network("a", 0.0, 1e-9, 0.0), Network("b", 0.0, 1e-9, 0.0)])
    base = ["--t-cp", "0.01", "--deadline", "10", "--random", "0"]
    assert main([*base, "--network", str(path), "--fanouts", "2,2"]) == 2           # no --numel
    assert main([*base, "--network", str(path), "--numel", "10", "--fanouts", "2,2,2"]) == 2
    assert main([*base, "--network", str(path), "--numel", "10", "--choose-bits", "8"]) == 2
    assert main([*base, "--t-cm", "0.1", "--choose-bits", "8", "--max-variance", "1"]) == 2
    err = capsys.readouterr().err
    assert "--numel" in err and "3 layers" in err and "--max-variance" in err and "--network" in err


def test_codec_cost_of_the_file_enters_t_cm_and_the_choice(tmp_path, capsys):
    path = tmp_path / "net.json"
    # 8 bits costs 50 ns of arithmetic per parameter: 50 ms at 1M parameters, dearer than exact
    write_networks(path, [Network("link", 0.0, 1e-9, 0.0)], {"codec": {"8": 50e-9, "4": 1e-9}})
    assert read_codec(path) == {8: 50e-9, 4: 1e-9}
    base = ["--network", str(path), "--numel", "1000000", "--fanouts", "2", "--t-cp", "0.01",
            "--deadline", "10", "--random", "0", "--tau-max", "4", "--json"]
    capsys.readouterr()
    assert main([*base, "--bits", "8"]) == 0
    t8 = json.loads(capsys.readouterr().out)["t_cm"][0]
    assert main([*base, "--choose-bits", "0,8", "--max-variance", "0.05"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bits"] == [0]  # exact: 4 ms of bytes; 8 bits: ~1-2 ms of bytes + 50 ms
    assert [o["bits"] for o in result["bit_options"]] == [[0], [8]]
    assert result["bit_options"][1]["cost"] == pytest.approx(t8)
    assert 0.050 < t8 < 0.050 + 4e-3  # the codec's 50 ms plus fewer bytes than the 4 MB model
    assert main([*base, "--choose-bits", "0,8,2", "--max-variance", "100"]) == 2
    assert "no codec cost for bits [2]" in capsys.readouterr().err
    write_networks(path, [Network("link", 0.0, 1e-9, 0.0)], {"codec": {"8": -1}})
    with pytest.raises(ValueError, match="codec"):
        read_codec(path)


def test_codec_cost_measured_at_several_sizes_takes_the_nearest(tmp_path):
    path = tmp_path / "net.json"
    write_networks(path, [Network("link", 0.0, 1e-9, 0.0)],
                   {"codec": {"8": [[2_000_000, 60e-9], [6_000_000, 20e-9]]}})
    assert read_codec(path, 1_000_000) == {8: 60e-9}
    assert read_codec(path, 3_000_000) == {8: 60e-9}   # log distance: 1.5x vs 2x
    assert read_codec(path, 4_000_000) == {8: 20e-9}   # 2x vs 1.5x
    assert read_codec(path, 25_000_000) == {8: 20e-9}
    write_networks(path, [Network("link", 0.0, 1e-9, 0.0)], {"codec": {"8": [[1, 2, 3]]}})
    with pytest.raises(ValueError, match="codec"):
        read_codec(path, 10)
