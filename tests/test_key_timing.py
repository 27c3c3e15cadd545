"""The key table's timings (simulation.key_table): one timing per key geometry, shared by the holders with it, taken
interleaved and repeated until the aug/plain ratio settles; the median and spread arithmetic on a fake clock."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from clients.keys import HolderKey
from simulation import key_table
from simulation.errors import UsageError
from simulation.key_table import (
    TimingPlan,
    compare_keys,
    format_key_table,
    interleaved_timings,
    relative_spread,
    timing_geometry,
    write_key_report,
)

IMAGE_SHAPE = (1, 8, 8)
MEAN, STD = [0.5], [0.25]


class FakeClock:
    """A clock that moves only when a fake call says how long it took."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def call_taking(self, seconds):
        """A call whose n-th run takes seconds[n] (or always `seconds`)."""
        durations = iter(seconds) if isinstance(seconds, list) else None

        def call():
            self.now += next(durations) if durations is not None else seconds

        return call


# --- the arithmetic, on a fake clock --------------------------------------------------------------
def test_relative_spread_is_the_interquartile_range_over_the_median():
    assert relative_spread([1, 2, 3, 4, 5]) == pytest.approx((4 - 2) / 3)
    assert relative_spread([5, 1, 4, 2, 3, 100]) == pytest.approx((4.75 - 2.25) / 3.5)  # linear quartiles, as numpy's
    assert relative_spread([2.0] * 7) == 0
    assert relative_spread([1, 2, 3, 4]) is None  # too few repeats to say


def test_median_and_spread_of_known_durations():
    clock = FakeClock()
    calls = {
        "conv_ms": clock.call_taking(0.002),
        "augconv_ms": clock.call_taking([0.004, 0.006, 0.008, 0.010, 0.012]),  # ratios 2, 3, 4, 5, 6
    }
    plan = TimingPlan(min_repeats=5, max_repeats=5, seconds=60, target_spread=0.1)
    measured = interleaved_timings(calls, {"augconv_ratio": ("augconv_ms", "conv_ms")}, plan, clock=clock)
    assert measured["conv_ms"] == pytest.approx(2.0)
    assert measured["augconv_ms"] == pytest.approx(8.0)
    assert measured["augconv_ratio"] == pytest.approx(4.0)
    assert measured["augconv_ratio_spread"] == pytest.approx((5 - 3) / 4)
    assert measured["timing_repeats"] == 5 and measured["timing_stopped"] == "max repeats"
    assert measured["timing_elapsed_s"] == pytest.approx(5 * 0.002 + 0.040)


def test_the_ratio_is_taken_per_repeat_so_a_slow_moment_hitting_both_sides_cancels():
    clock = FakeClock()
    load = [1, 1, 5, 1, 5, 1, 1]  # the machine is five times slower in some repeats
    calls = {"conv_ms": clock.call_taking([0.002 * f for f in load]), "augconv_ms": clock.call_taking([0.006 * f for f in load])}
    measured = interleaved_timings(calls, {"augconv_ratio": ("augconv_ms", "conv_ms")},
                                   TimingPlan(min_repeats=5, max_repeats=7, seconds=60), clock=clock)
    assert measured["augconv_ratio"] == pytest.approx(3.0) and measured["augconv_ratio_spread"] == pytest.approx(0, abs=1e-9)
    assert measured["timing_stopped"] == "settled" and measured["timing_repeats"] == 5


def test_steady_timings_stop_at_the_minimum_and_noisy_ones_at_the_cap():
    clock = FakeClock()
    steady = {"conv_ms": clock.call_taking(0.001), "augconv_ms": clock.call_taking(0.003)}
    ratio = {"augconv_ratio": ("augconv_ms", "conv_ms")}
    measured = interleaved_timings(steady, ratio, TimingPlan(min_repeats=8, max_repeats=50, seconds=60), clock=clock)
    assert (measured["timing_repeats"], measured["timing_stopped"]) == (8, "settled")

    noisy = {"conv_ms": clock.call_taking(0.5), "augconv_ms": clock.call_taking([0.5, 1.5] * 100)}
    measured = interleaved_timings(noisy, ratio, TimingPlan(min_repeats=2, max_repeats=100, seconds=10), clock=clock)
    assert measured["timing_stopped"] == "time cap" and measured["timing_repeats"] == 7  # 1 s and 2 s repeats: 10 s after 7
    assert measured["augconv_ratio_spread"] > 0.1


def test_calls_alternate_in_order_and_runs_per_sample_divide_the_time():
    clock, order = FakeClock(), []

    def call(name, seconds):
        def run():
            order.append(name)
            clock.now += seconds

        return run

    calls = {"conv_ms": call("conv", 0.001), "augconv_ms": call("aug", 0.004)}
    measured = interleaved_timings(calls, {"augconv_ratio": ("augconv_ms", "conv_ms")},
                                   TimingPlan(min_repeats=5, max_repeats=5, seconds=60), clock=clock,
                                   runs_per_sample={"conv_ms": 3})
    assert order[:8] == ["conv"] * 3 + ["aug"] + ["aug"] + ["conv"] * 3  # reversed in every other repeat
    assert measured["conv_ms"] == pytest.approx(1.0) and measured["augconv_ratio"] == pytest.approx(4.0)


@pytest.mark.parametrize("least, most, seconds", [(5, 4, 1.0), (0, 10, 1.0), (2, 10, 0.0)])
def test_a_bad_timing_plan_is_a_one_line_error(least, most, seconds):
    with pytest.raises(UsageError) as error:
        TimingPlan.checked(least, most, seconds, 0.1)
    assert "\n" not in str(error.value)


# --- one timing per geometry ----------------------------------------------------------------------
@pytest.fixture()
def counted(monkeypatch):
    """The geometries `compare_keys` timed, in order, with a fast real timing of each."""
    timed = []
    original = key_table._time_side_by_side

    def counting(conv, augconv, key, images, backbone, plan):
        timed.append(timing_geometry(key, conv, len(images)))
        return original(conv, augconv, key, images, backbone, plan)

    monkeypatch.setattr(key_table, "_time_side_by_side", counting)
    return timed


def small_setup():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    images = torch.randint(0, 256, (12, *IMAGE_SHAPE), dtype=torch.uint8)
    return conv, backbone, images


def compare(keys, **options):
    conv, backbone, images = small_setup()
    return compare_keys(keys, conv, images, mean=MEAN, std=STD, backbone=backbone, timing_batch=4, timing_repeats=5,
                        timing_max_repeats=8, known_plaintext=False, metric_images=2, **options)


def test_holders_with_one_geometry_share_one_timing_and_other_geometries_get_their_own(counted, tmp_path):
    keys = [
        HolderKey.generate(IMAGE_SHAPE, family="repeated", seed=1),
        HolderKey.generate(IMAGE_SHAPE, family="repeated", entries="integer", seed=2),  # other values, same work
        HolderKey.generate(IMAGE_SHAPE, family="repeated", block_size=4, seed=3),
        HolderKey.generate(IMAGE_SHAPE, family="repeated", seed=4),
    ]
    rows = compare(keys, order=[3, 1, 0, 2])
    assert len(counted) == 2 == len(set(counted))
    assert [row["timing_geometry"] for row in rows] == [counted[0], counted[0], counted[1], counted[0]]
    assert "q=4" in counted[1] and "q=8" in counted[0]
    timing_fields = [field for field in rows[0] if field.endswith(("_ms", "_ratio", "_spread")) or field.startswith("timing")]
    assert {"augconv_ms", "conv_ms", "morph_ms", "augconv_step_ms", "step_ms", "augconv_ratio", "augconv_ratio_spread",
            "augconv_step_ratio", "augconv_step_ratio_spread", "timing_repeats", "timing_stopped"} <= set(timing_fields)
    for shared in (rows[1], rows[3]):
        assert {field: shared[field] for field in timing_fields} == {field: rows[0][field] for field in timing_fields}
    assert rows[2]["augconv_ms"] != rows[0]["augconv_ms"]
    for row in rows:
        assert 5 <= row["timing_repeats"] <= 8 and row["timing_stopped"] in ("settled", "max repeats", "time cap")
        assert isinstance(row["augconv_ratio_spread"], float) and np.isfinite(row["augconv_ratio_spread"])
        assert row["augconv_ratio"] > 0 and row["augconv_step_ratio"] > 0
    table = format_key_table(rows)
    assert "holders 0-1, 3 (repeated q=8 on 1x8x8" in table and "holder 2 (repeated q=4 on 1x8x8" in table
    assert f"IQR {rows[0]['augconv_ratio_spread']:.0%}" in table
    images = small_setup()[2][:1]
    report = json.loads(write_key_report(rows, tmp_path, keys, images, mean=MEAN, std=STD)[0].read_text())
    assert report["holders"][3]["augconv_ratio_spread"] == rows[3]["augconv_ratio_spread"]
    assert "timing_geometry" in report["definitions"] and "augconv_ratio" in report["definitions"]


def test_the_family_and_key_padding_are_part_of_the_geometry(counted):
    keys = [
        HolderKey.generate(IMAGE_SHAPE, family="repeated", seed=1),
        HolderKey.generate(IMAGE_SHAPE, family="blocks", seed=1),
        HolderKey.generate(IMAGE_SHAPE, family="repeated", padding=1, block_size=10, seed=1),
    ]
    rows = compare(keys)
    assert len(counted) == 3 == len({row["timing_geometry"] for row in rows})


def test_a_figure_whose_spread_stays_large_is_marked_noisy():
    key = HolderKey.generate(IMAGE_SHAPE, family="repeated", seed=1)
    (row,) = compare([key], timing_target_spread=1e-12)  # no real timing is that steady
    assert row["timing_stopped"] in ("max repeats", "time cap") and row["augconv_ratio_spread"] > 1e-12
    table = format_key_table([row])
    assert f"(x{row['augconv_ratio']:.2f}, IQR {row['augconv_ratio_spread']:.0%} noisy)" in table
    assert "stopped at the most repeats" in table or "stopped at the time cap" in table

    settled = row | {"augconv_ratio_spread": 0.04, "augconv_step_ratio_spread": 0.06, "timing_target_spread": 0.1,
                     "timing_stopped": "settled"}
    table = format_key_table([settled])
    assert f"(x{row['augconv_ratio']:.2f}, IQR 4%)" in table and "noisy)" not in table and "settled" in table
