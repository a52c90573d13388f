"""The emulated cluster's CPU-use readers (tests/support/emulated.py) and the bench's
arithmetic on them (bench/emulated_cluster.py): what says whether a node's quota held."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench import emulated_cluster
from tests.support import emulated


def node_at(cgroup: Path, cpus: float = 0.45) -> emulated.Node:
    return emulated.Node(
        name="n", index=0, cpus=cpus, address="10.0.0.1", namespace="ns", cgroup=cgroup, facts={}
    )


def test_cpu_stat_reads_every_counter(tmp_path: Path) -> None:
    (tmp_path / "cpu.stat").write_text(
        "nr_periods 120\nnr_throttled 118\nthrottled_time 950000000\nnr_bursts 0\nburst_time 0\n"
    )
    assert node_at(tmp_path).cpu_stat() == {
        "nr_periods": 120,
        "nr_throttled": 118,
        "throttled_time": 950_000_000,
        "nr_bursts": 0,
        "burst_time": 0,
    }


def test_process_cpu_seconds_counts_this_process() -> None:
    before = emulated.process_cpu_seconds(os.getpid())
    until = time.process_time() + 0.05
    while time.process_time() < until:  # 50 ms of CPU, at least 5 clock ticks
        pass
    after = emulated.process_cpu_seconds(os.getpid())
    assert after - before >= 0.03  # tick-sampled: a tick or two either way
    assert after <= time.process_time() + 0.02


def test_steal_seconds_is_a_nonnegative_counter() -> None:
    first = emulated.steal_seconds()
    assert 0 <= first <= emulated.steal_seconds()


def mark(wall: float, cpu: float, periods: int, throttled: int, ns: int) -> dict[str, object]:
    stage = {"cpu": cpu, "nr_periods": periods, "nr_throttled": throttled, "throttled_time": ns}
    return {"wall": wall, "steal": wall / 100, "stages": [stage]}


def test_usage_over_a_window() -> None:
    before = mark(100.0, 3.0, 1000, 900, 5_000_000_000)
    after = mark(110.0, 7.5, 2000, 1800, 10_500_000_000)
    got = emulated_cluster.usage(before, after, 0)
    assert got["wallSeconds"] == 10.0
    assert got["cpuSeconds"] == 4.5
    assert got["cpuShare"] == 0.45
    assert got["throttledShare"] == 0.9
    assert got["throttledSeconds"] == 5.5
    assert abs(emulated_cluster.steal_share(before, after) - 0.01) < 1e-12


def test_budget_line_flags_a_node_over_its_quota() -> None:
    held = {"cpuShare": 0.449, "cpus": 0.45, "throttledShare": 0.96, "cpuPerStep": 0.0806}
    over = {"cpuShare": 0.95, "cpus": 0.45, "throttledShare": 0.0, "cpuPerStep": 0.08}
    assert "within" in emulated_cluster.budget_line(held, estimated=0.242)
    assert "(-26%)" in emulated_cluster.budget_line(held, estimated=0.242)  # 80.6 vs 108.9 ms
    assert "OVER BUDGET" in emulated_cluster.budget_line(over, estimated=0.242)
