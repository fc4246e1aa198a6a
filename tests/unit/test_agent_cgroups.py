"""cgroup v2 file rendering and parsing in the guest agent (and the I/O, on a fake cgroupfs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hako_agent.cgroups import (
    Cgroup,
    cgroup_relpath,
    is_cgroup2,
    parse_keyed,
    parse_max,
    render_resources,
    shares_to_weight,
)
from hako_agent.errors import FailedPrecondition, InvalidArgument
from hako_agent.spec import parse_resources


def render(raw: dict[str, object]) -> dict[str, str]:
    return render_resources(parse_resources(raw))


def test_render_memory_cpu_pids() -> None:
    files = render(
        {
            "memory": {"limit": 64 << 20, "reservation": 32 << 20, "swap": 96 << 20},
            "cpu": {"quota": 50000, "period": 100000, "shares": 1024, "cpus": "0-1"},
            "pids": {"limit": 100},
        }
    )
    assert files == {
        "memory.max": str(64 << 20),
        "memory.low": str(32 << 20),
        "memory.swap.max": str(32 << 20),
        "cpu.weight": "39",
        "cpu.max": "50000 100000",
        "cpuset.cpus": "0-1",
        "pids.max": "100",
    }


@pytest.mark.parametrize(
    ("raw", "files"),
    [
        ({}, {}),
        ({"memory": {"limit": -1, "swap": -1}}, {"memory.max": "max", "memory.swap.max": "max"}),
        ({"memory": {"limit": 0}}, {}),  # 0 is "not set", as in runc
        ({"cpu": {"quota": -1, "period": 100000}}, {"cpu.max": "max 100000"}),
        ({"cpu": {"quota": 20000}}, {"cpu.max": "20000"}),
        ({"pids": {"limit": -1}}, {"pids.max": "max"}),
        ({"pids": {"limit": 0}}, {}),
        (
            {"unified": {"memory.high": "50M", "pids.max": "7"}, "pids": {"limit": 3}},
            {"pids.max": "7", "memory.high": "50M"},
        ),
    ],
)
def test_render_edges(raw: dict[str, object], files: dict[str, str]) -> None:
    assert render(raw) == files


def test_render_rejects_swap_without_limit() -> None:
    with pytest.raises(InvalidArgument, match=r"memory\.swap: needs memory\.limit"):
        render({"memory": {"swap": 1 << 20}})
    with pytest.raises(InvalidArgument, match=r"memory\.swap: must not be below"):
        render({"memory": {"limit": 2 << 20, "swap": 1 << 20}})


def test_shares_to_weight() -> None:
    assert shares_to_weight(2) == 1
    assert shares_to_weight(1024) == 39
    assert shares_to_weight(262144) == 10000
    assert shares_to_weight(0) == 100


def test_parsers() -> None:
    assert parse_max("max\n") == 0
    assert parse_max("1048576\n") == 1048576
    assert parse_max("50000 100000\n") == 50000
    text = "usage_usec 10\nuser_usec 6\nsystem_usec 4\nnr_periods 0\nbogus\n"
    assert parse_keyed(text) == {"usage_usec": 10, "user_usec": 6, "system_usec": 4, "nr_periods": 0}


def test_relpath() -> None:
    assert cgroup_relpath("/kubepods/pod1/c1", "c1") == "/kubepods/pod1/c1"
    assert cgroup_relpath("", "c1") == "/hako/c1"
    assert cgroup_relpath("system.slice:docker:c1", "c1") == "/hako/c1"  # systemd style: ours instead
    with pytest.raises(InvalidArgument, match="cgroupsPath"):
        cgroup_relpath("/a/../b", "c1")


def fake_cgroupfs(root: Path) -> None:
    (root / "cgroup.procs").write_text("")
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")


def test_cgroup_io_on_a_fake_tree(tmp_path: Path) -> None:
    fake_cgroupfs(tmp_path)
    assert is_cgroup2(str(tmp_path))
    cgroup = Cgroup(str(tmp_path), "/hako/c1")
    cgroup.create()
    # A real cgroupfs creates the files; here, each level gets what the next one needs.
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    hako = tmp_path / "hako"
    assert hako.is_dir() and (hako / "c1").is_dir()
    for name in ("memory.max", "cpu.max", "pids.max"):
        (hako / "c1" / name).write_text("max\n")
    cgroup.apply({"memory.max": "1024", "cpu.max": "1000 10000"})
    assert (hako / "c1" / "memory.max").read_text() == "1024"
    with pytest.raises(InvalidArgument, match=r"memory\.high is not available"):
        cgroup.apply({"memory.high": "1"})

    files = {
        "memory.current": "4096\n",
        "memory.peak": "8192\n",
        "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        "cpu.stat": "usage_usec 300\nuser_usec 200\nsystem_usec 100\nnr_throttled 2\nthrottled_usec 50\n",
        "pids.current": "3\n",
        "pids.max": "max\n",
        "cgroup.procs": "10\n11\n",
    }
    for name, text in files.items():
        (hako / "c1" / name).write_text(text)
    stats = cgroup.stats()
    assert (stats.memory_usage, stats.memory_max_usage, stats.memory_limit, stats.oom_kills) == (
        4096,
        8192,
        1024,
        1,
    )
    assert (stats.cpu_usage_usec, stats.cpu_user_usec, stats.cpu_system_usec) == (300, 200, 100)
    assert (stats.nr_throttled, stats.throttled_usec, stats.pids_current, stats.pids_limit) == (2, 50, 3, 0)
    assert cgroup.procs() == [10, 11]
    with pytest.raises(FailedPrecondition, match="no freezer"):
        cgroup.freeze(True)
    assert not cgroup.kill()


def test_remove_is_idempotent(tmp_path: Path) -> None:
    cgroup = Cgroup(str(tmp_path), "/gone")
    cgroup.remove()
    (tmp_path / "gone").mkdir()
    cgroup.remove()
    assert not (tmp_path / "gone").exists()
