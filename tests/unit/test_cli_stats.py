"""``hako stats``: its arithmetic and its table row (the figures come from a VM: integration)."""

from __future__ import annotations

import os

import pytest

from hako.cli import stats
from hako.cli.stats import Reading, _pss, cpu_percent, human, row, vm_pss
from hako.runtime.state import SandboxState


def reading(at: float, cpu_usec: int, memory: int = 3 << 20, limit: int = 256 << 20) -> Reading:
    return Reading(at=at, cpu_usec=cpu_usec, memory=memory, memory_limit=limit, pids=2, vm_pss=70 << 20)


def test_cpu_percent_is_of_one_cpu() -> None:
    assert cpu_percent(reading(10.0, 0), reading(11.0, 500_000)) == 50.0
    assert cpu_percent(reading(10.0, 0), reading(10.5, 1_000_000)) == 200.0  # two CPUs busy
    assert cpu_percent(reading(10.0, 7), reading(10.0, 9)) == 0.0
    assert cpu_percent(reading(10.0, 9), reading(11.0, 7)) == 0.0  # a counter that went back


def test_sizes_in_dockers_units() -> None:
    assert [human(n) for n in (512, 1536, 3 << 20, 150 << 20, (3 << 30) // 2)] == [
        "512B",
        "1.5KiB",
        "3MiB",
        "150MiB",
        "1.5GiB",
    ]


def test_a_row() -> None:
    state = SandboxState("ab" * 32, "web", "img", ["sh"], 0.0, "trimmed", "tcg", "", 256, 1)
    cells = row(state, reading(0.0, 0), reading(1.0, 250_000, memory=64 << 20, limit=256 << 20))
    assert cells == ("abababababab", "web", "25.00%", "64MiB / 256MiB", "25.00%", "2", "70MiB")


def test_pss_of_processes_and_of_one_gone() -> None:
    own = _pss(os.getpid())
    assert own is not None and own > 0
    assert _pss(None) is None
    assert _pss(2**22 + 1) is None  # no such process


def test_a_sandbox_holds_its_qemu_and_its_share_of_a_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    # This process stands for the QEMU, its parent for the daemon.
    state = SandboxState("ab" * 32, "web", "img", ["sh"], 0.0, "trimmed", "tcg", "", 256, 1)
    state.qemu_pid, state.daemon_pid = os.getpid(), os.getppid()
    own, daemon = _pss(os.getpid()), _pss(os.getppid())
    assert own is not None and daemon is not None and daemon > 0
    whole = vm_pss(state)
    assert whole is not None and abs(whole - (own + daemon)) < daemon // 8
    state.shared_daemon = True  # a pool's keeper, serving four
    monkeypatch.setattr(stats, "served_by", lambda pid: 4 if pid == os.getppid() else 1)
    shared = vm_pss(state)
    assert shared is not None and abs(shared - (own + daemon // 4)) < daemon // 8
    state.daemon_pid = 2**22 + 1
    assert vm_pss(state) is None
