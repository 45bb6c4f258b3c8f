"""Tests of the pure scheduling decisions: window, duration mean, node choice."""

from __future__ import annotations

import math
import random

import pytest

from dispynb.defaults import MAX_JOBS_PER_CPU, MIN_JOBS_PER_CPU
from dispynb.scheduler.policy import (
    DURATION_WEIGHT,
    NodeLoad,
    assign,
    load_key,
    pick_node,
    update_mean,
    window,
)


def test_window_unknown_duration_uses_min_depth():
    assert window(4, None) == 4 * MIN_JOBS_PER_CPU


@pytest.mark.parametrize("duration", [10.0, 1.0, 0.01, 0.005])
def test_window_long_jobs_keeps_min_depth(duration):
    assert window(3, duration) == 3 * MIN_JOBS_PER_CPU


@pytest.mark.parametrize(
    ("duration", "depth"),
    [(0.0025, 3), (0.002, 4), (0.001, 6), (0.0005, 11), (0.0002, 26)],
)
def test_window_short_jobs_deepens_pipeline(duration, depth):
    assert window(1, duration) == depth
    assert window(4, duration) == 4 * depth


@pytest.mark.parametrize("duration", [0.0001, 1e-9, 5e-324, 0.0])
def test_window_tiny_or_zero_duration_caps_at_max(duration):
    assert window(2, duration) == 2 * MAX_JOBS_PER_CPU


@pytest.mark.parametrize("duration", [math.nan, -1.0])
def test_window_invalid_duration_uses_min_depth(duration):
    assert window(2, duration) == 2 * MIN_JOBS_PER_CPU


@pytest.mark.parametrize("cpus", [0, -1])
def test_window_no_cpus_is_zero(cpus):
    assert window(cpus, None) == 0
    assert window(cpus, 0.0001) == 0


def test_window_shorter_jobs_never_shrinks():
    durations = [2.0**-n for n in range(30)]  # 1 s down to about 2 ns
    depths = [window(1, duration) for duration in durations]
    assert depths == sorted(depths)
    assert depths[0] == MIN_JOBS_PER_CPU
    assert depths[-1] == MAX_JOBS_PER_CPU


def test_update_mean_first_sample_is_mean():
    assert update_mean(None, 0.25) == 0.25


def test_update_mean_later_sample_moves_by_weight():
    assert update_mean(1.0, 2.0) == pytest.approx(1.0 + DURATION_WEIGHT)
    assert update_mean(1.0, 1.0) == 1.0


@pytest.mark.parametrize("duration", [-0.5, math.nan, math.inf, -math.inf])
def test_update_mean_bad_sample_is_ignored(duration):
    assert update_mean(None, duration) is None
    assert update_mean(0.5, duration) == 0.5


def test_update_mean_repeated_samples_converges():
    mean = None
    for _ in range(100):
        mean = update_mean(mean, 0.001)
    assert mean == pytest.approx(0.001)
    for _ in range(100):
        mean = update_mean(mean, 0.5)
    assert mean == pytest.approx(0.5)


def test_load_key_zero_cpus_sorts_last():
    assert load_key(NodeLoad("a", 0, 0, 0, 0)) == (math.inf, 0)
    assert load_key(NodeLoad("b", 4, 2, 8, 3)) == (0.5, 3)


def test_pick_node_fewest_running_per_cpu_wins():
    loads = [NodeLoad("a", 1, 1, 2, 0), NodeLoad("b", 4, 3, 8, 1)]
    assert pick_node(loads) == "b"


def test_pick_node_equal_load_earliest_join_wins():
    loads = [NodeLoad("late", 2, 1, 4, 5), NodeLoad("early", 4, 2, 8, 2)]
    assert pick_node(loads) == "early"


def test_pick_node_full_node_is_skipped():
    loads = [NodeLoad("a", 4, 8, 8, 0), NodeLoad("b", 1, 1, 2, 1)]
    assert pick_node(loads) == "b"


def test_pick_node_no_room_returns_none():
    assert pick_node([]) is None
    assert pick_node([NodeLoad("a", 1, 2, 2, 0), NodeLoad("b", 0, 0, 0, 1)]) is None


def test_assign_two_nodes_interleaves_by_load():
    loads = [NodeLoad("a", 1, 0, 2, 0), NodeLoad("b", 3, 0, 6, 1)]
    assert assign(loads, 10) == ["a", "b", "b", "b", "a", "b", "b", "b"]


def test_assign_count_limits_result():
    loads = [NodeLoad("a", 1, 0, 2, 0), NodeLoad("b", 1, 0, 2, 1)]
    assert assign(loads, 0) == []
    assert assign(loads, 3) == ["a", "b", "a"]


@pytest.mark.parametrize("seed", range(5))
def test_assign_random_loads_matches_repeated_pick_node(seed):
    rng = random.Random(seed)
    loads = []
    for order in range(rng.randint(0, 8)):
        cpus = rng.randint(0, 4)
        limit = window(cpus, rng.choice([None, 0.001, 0.0001]))
        loads.append(NodeLoad(f"n{order}", cpus, rng.randint(0, limit), limit, order))
    rng.shuffle(loads)
    count = rng.randint(0, 200)
    expected = []
    current = {load.node: load for load in loads}
    for _ in range(count):
        name = pick_node(current.values())
        if name is None:
            break
        expected.append(name)
        load = current[name]
        current[name] = NodeLoad(
            name, load.cpus, load.running + 1, load.window, load.order
        )
    assert assign(loads, count) == expected
