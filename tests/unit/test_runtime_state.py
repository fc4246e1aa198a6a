"""Sandbox state on disk, names, timing and the output log: no root, no VM."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from hako.errors import SandboxNotFound, UsageError
from hako.runtime import timing
from hako.runtime.output import STDERR, STDOUT, Channel, OutputLog, read_log
from hako.runtime.state import (
    SandboxState,
    Status,
    age,
    all_states,
    find,
    hold_live_lock,
    new_id,
    process_start_ticks,
    reserve,
    served_by,
    using,
)


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HAKO_RUN", str(tmp_path / "run"))
    return tmp_path / "run"


def _state(name: str = "web", **kw: object) -> SandboxState:
    values: dict[str, object] = {
        "id": new_id(),
        "name": name,
        "image": "busybox",
        "command": ["sh"],
        "created": time.time(),
        "kernel": "trimmed",
        "accel": "tcg",
        "accel_reason": "test",
        "memory_mib": 256,
        "vcpus": 1,
    }
    values.update(kw)
    return SandboxState(**values)  # type: ignore[arg-type]


def test_state_round_trips_and_lists() -> None:
    state = _state(timing={"boot_total": 1.5})
    reserve(state)
    loaded = SandboxState.load(state.dir)
    assert loaded == state
    assert [s.id for s in all_states()] == [state.id]
    assert (state.dir.stat().st_mode & 0o777) == 0o700


def test_names_are_unique() -> None:
    reserve(_state("db"))
    with pytest.raises(UsageError, match='"db" is already in use'):
        reserve(_state("db"))


def test_find_by_name_id_and_prefix() -> None:
    a = _state("alpha", id="abc" + "0" * 61)
    b = _state("beta", id="abd" + "0" * 61)
    reserve(a)
    reserve(b)
    assert find("alpha").id == a.id
    assert find(b.id).name == "beta"
    assert find("abc0").name == "alpha"
    with pytest.raises(SandboxNotFound, match="no such container: nope"):
        find("nope")


def test_ambiguous_prefix() -> None:
    reserve(_state("one", id="fff" + "1" * 61))
    reserve(_state("two", id="fff" + "2" * 61))
    with pytest.raises(UsageError, match="matches 2 containers"):
        find("fff")


def test_a_vanished_daemon_makes_a_running_sandbox_dead() -> None:
    alive = _state(
        "alive",
        status=Status.RUNNING,
        daemon_pid=os.getpid(),
        daemon_start_ticks=process_start_ticks(os.getpid()),
    )
    assert alive.effective_status() == Status.RUNNING
    reused = _state("reused", status=Status.RUNNING, daemon_pid=os.getpid(), daemon_start_ticks=1)
    assert reused.effective_status() == Status.DEAD  # same pid, another process: not ours
    exited = _state("exited", status=Status.EXITED, exit_status=3)
    assert exited.effective_status() == Status.EXITED


def test_a_sandbox_of_a_shared_daemon_is_served_while_its_lock_is_held() -> None:
    """A pool's keeper outlives each sandbox it serves: its process running is not enough."""
    me = {"daemon_pid": os.getpid(), "daemon_start_ticks": process_start_ticks(os.getpid())}
    served = _state("served", status=Status.RUNNING, shared_daemon=True, **me)
    done = _state("done", status=Status.RUNNING, shared_daemon=True, **me)
    own = _state(
        "own",
        status=Status.RUNNING,
        daemon_pid=os.getppid(),
        daemon_start_ticks=process_start_ticks(os.getppid()),
    )
    for state in (served, done, own):
        reserve(state)
    live = hold_live_lock(served.dir)
    try:
        # (a lock of the open file: this process checking it does not take or release it)
        assert served.daemon_alive() and served.daemon_alive()
        assert served.effective_status() == Status.RUNNING
        assert not done.daemon_alive() and done.effective_status() == Status.DEAD
        with pytest.raises(BlockingIOError):
            hold_live_lock(served.dir)  # one daemon serves it
        assert served_by(os.getpid()) == 1 and served_by(os.getppid()) == 1
        done_live = hold_live_lock(done.dir)
        assert served_by(os.getpid()) == 2
        os.close(done_live)
    finally:
        os.close(live)
    assert not served.daemon_alive()
    assert served_by(os.getpid()) == 1  # (never 0: a daemon serving none is counted as one)


def test_age_reads_like_docker() -> None:
    assert age(1) == "1 second"
    assert age(59) == "59 seconds"
    assert age(120) == "2 minutes"
    assert age(3600 * 5) == "5 hours"


def test_boot_breakdown_derives_qemu_start_from_guest_uptime() -> None:
    parts = timing.boot_breakdown(
        launched=10.0, answered=11.5, uptime=1.3, kernel_done=0.7, agent_start=0.9, agent_ready=1.2
    )
    assert parts["boot_total"] == pytest.approx(1.5)
    assert parts["qemu_start"] == pytest.approx(0.2)
    assert parts["guest_kernel"] == pytest.approx(0.7)
    assert parts["guest_userspace"] == pytest.approx(0.6)
    assert parts["python_start"] == pytest.approx(0.2)
    assert parts["agent_init"] == pytest.approx(0.3)
    table = timing.render(parts, "tcg", "trimmed")
    assert "TCG" in table and "guest kernel" in table and "700.0 ms" in table


def test_output_log_keeps_streams_apart_and_in_order(tmp_path: Path) -> None:
    log = OutputLog(tmp_path / "c" / "output.log")
    log.append(STDOUT, b"out1")
    log.append(STDERR, b"err")
    log.append(STDOUT, b"out2")
    assert list(read_log(log.path)) == [(STDOUT, b"out1"), (STDERR, b"err"), (STDOUT, b"out2")]


def test_channel_blocks_splits_and_ends() -> None:
    channel = Channel()
    cancelled = threading.Event()
    threading.Timer(0.05, channel.put, args=(b"hello",)).start()
    assert channel.read(3, cancelled) == b"hel"
    assert channel.read(100, cancelled) == b"lo"
    channel.close()
    assert channel.read(100, cancelled) == b""
    waiting = Channel()
    cancelled.set()
    assert waiting.read(10, cancelled) is None


def test_containers_using_an_image_are_found_by_their_specs_rootfs(tmp_path: Path) -> None:
    image = tmp_path / "images" / "abc"
    for name, root in (("a", image / "rootfs"), ("b", tmp_path / "images" / "abcd" / "rootfs"), ("c", None)):
        state = _state(name)
        state.dir.mkdir(parents=True)
        state.save()
        if root is not None:  # (c: no spec yet, being created)
            (state.dir / "config.json").write_text(json.dumps({"root": {"path": str(root)}}))
    assert [state.name for state in using(image)] == ["a"]
