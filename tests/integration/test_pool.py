"""The warm pool: restored, paused sandboxes that `hako run` takes instead of restoring one."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import BUSYBOX, Hako, qemu_pids_under

pytestmark = pytest.mark.integration


@pytest.fixture
def pooled(hako: Hako) -> Iterator[Hako]:
    """A hako whose pool is drained at the end (a background refill included)."""
    yield hako
    drained = hako("pool", "drain", timeout=300)
    assert drained.returncode == 0, drained.stderr
    assert _members(hako) == []


def _members(hako: Hako) -> list[str]:
    return [line.split()[0] for line in hako("pool", "ls", check=True).stdout.splitlines()[1:]]


def _ready(hako: Hako) -> list[str]:
    return [
        line.split()[0]
        for line in hako("pool", "ls", check=True).stdout.splitlines()[1:]
        if " ready " in line
    ]


def _wait_ready(hako: Hako, count: int, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(ready := _ready(hako)) < count:
        assert time.monotonic() < deadline, f"the pool did not refill: {hako('pool', 'ls').stdout}"
        time.sleep(0.5)
    return ready


def _timed_run(hako: Hako, *args: str) -> tuple[dict[str, float], str]:
    result = hako("run", "--rm", "--timing-json", *args)
    assert result.returncode == 0, result.stderr
    figures: dict[str, float] = json.loads(result.stderr.strip().splitlines()[-1])["timing"]
    return figures, result.stdout


def test_run_takes_a_pooled_sandbox_and_the_pool_refills(pooled: Hako) -> None:
    hako = pooled
    [member] = hako("pool", "fill", "1", check=True).stdout.split()
    assert _ready(hako) == [member]
    assert member not in hako("ps", "-a", check=True).stdout  # not a container (yet)

    before = time.time()
    figures, out = _timed_run(hako, BUSYBOX, "sh", "-c", "hostname; date +%s")
    hostname, clock = out.split()
    assert "pool_take" in figures and "restore" not in figures and "guest_kernel" not in figures
    assert hostname == member  # the sandbox id is the container's: the pooled one's
    assert before - 2 <= int(clock) <= time.time() + 2  # the host's clock, not the pause's

    [refilled] = _wait_ready(hako, 1)
    assert refilled != member
    assert not any(p.name.startswith(member) for p in hako.sandbox_dirs())  # --rm: gone


def test_a_pooled_sandbox_takes_the_hostname_it_is_given(pooled: Hako) -> None:
    hako = pooled
    hako("pool", "fill", "1", check=True)
    show = "hostname; cat /etc/hostname; grep -c 'box-2$' /etc/hosts"
    figures, out = _timed_run(hako, "--hostname", "box-2", BUSYBOX, "sh", "-c", show)
    assert "pool_take" in figures, figures
    assert out.split() == ["box-2", "box-2", "1"], out  # its address in /etc/hosts under the name
    _wait_ready(hako, 1)


def test_a_pooled_sandbox_has_run_a_container_before_it_is_taken(pooled: Hako) -> None:
    """The warm-up: a throw-away container ran in it (so a taker's is not the first)."""
    hako = pooled
    [member] = hako("pool", "fill", "1", check=True).stdout.split()
    [run_dir] = [p for p in hako.sandbox_dirs() if p.name.startswith(member)]
    daemon_log = (run_dir / "daemon.log").read_text()
    assert "warmed up in" in daemon_log, daemon_log
    agent_log = (run_dir / "agent.log").read_text()
    assert "container hako-warm-up: started" in agent_log and "hako-warm-up: removed" in agent_log
    assert "hako-warm-up" not in hako("ps", "-a", check=True).stdout


def test_a_pooled_sandbox_takes_a_block_rootfs_and_publishes_ports(pooled: Hako) -> None:
    """Its disk is attached and its port published when it is taken, long after its restore."""
    hako = pooled
    hako("pool", "fill", "1", check=True)
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    script = (
        "awk '$2 == \"/\" {print $3}' /proc/mounts > /tmp/root; while :; do cat /tmp/root | nc -l -p 80; done"
    )
    started = hako("run", "-d", "--name", "web", "-p", f"{port}:80", BUSYBOX, "sh", "-c", script, check=True)
    state = json.loads((hako.run_root / "sandboxes" / started.stdout.strip() / "state.json").read_text())
    assert "pool_take" in state["timing"]
    deadline = time.monotonic() + 60
    answer = b""
    while not answer and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                answer = conn.recv(100)
        except OSError:
            time.sleep(0.3)
    assert answer == b"ext4\n"
    hako("rm", "-f", "web", check=True)


def test_pooled_sandboxes_have_their_own_randomness(pooled: Hako) -> None:
    hako = pooled
    hako("pool", "fill", "2", check=True)
    outputs = set()
    for _ in range(2):
        _wait_ready(hako, 1)
        figures, out = _timed_run(hako, BUSYBOX, "sh", "-c", "head -c 32 /dev/urandom | od -An -tx1")
        assert "pool_take" in figures
        outputs.add(out)
    assert len(outputs) == 2


def test_template_off_private_and_no_pool_do_not_take_from_the_pool(pooled: Hako) -> None:
    hako = pooled
    [member] = hako("pool", "fill", "1", check=True).stdout.split()
    for flags in (["--template", "off"], ["--template", "private"], ["--no-pool"]):
        figures, _ = _timed_run(hako, *flags, BUSYBOX, "true")
        assert "pool_take" not in figures
    assert _ready(hako) == [member]


def test_a_dead_pool_member_is_not_taken(pooled: Hako) -> None:
    hako = pooled
    [member] = hako("pool", "fill", "1", check=True).stdout.split()
    [directory] = [d for d in hako.sandbox_dirs() if d.name.startswith(member)]
    daemon = json.loads((directory / "state.json").read_text())["daemon_pid"]
    os.kill(daemon, signal.SIGKILL)  # its QEMU dies with it
    deadline = time.monotonic() + 10
    while qemu_pids_under(directory) and time.monotonic() < deadline:
        time.sleep(0.1)
    figures, out = _timed_run(hako, BUSYBOX, "echo", "fine")
    assert out == "fine\n" and "pool_take" not in figures
    assert member in hako("pool", "ls", check=True).stdout and "dead" in hako("pool", "ls").stdout


def test_a_pool_per_vm_size(pooled: Hako) -> None:
    """`hako run --memory` takes from the pool of its VM's size, and only from that one."""
    hako = pooled
    [member] = hako("pool", "fill", "1", "--memory", "64m", check=True).stdout.split()
    assert "320 MiB" in hako("pool", "ls", check=True).stdout  # 256 MiB for the guest + 64
    figures, _ = _timed_run(hako, BUSYBOX, "true")  # the standard size: not this pool's
    assert "pool_take" not in figures
    assert _ready(hako) == [member]
    figures, out = _timed_run(hako, "--memory", "64m", BUSYBOX, "sh", "-c", "hostname; head -1 /proc/meminfo")
    hostname, meminfo = out.split("\n", 1)
    assert "pool_take" in figures and hostname == member
    assert 250_000 < int(meminfo.split()[1]) <= 320 * 1024  # the guest's MemTotal, in kB
    [refilled] = _wait_ready(hako, 1)  # refilled at its size
    assert refilled != member and "320 MiB" in hako("pool", "ls", check=True).stdout
    assert len(hako("pool", "drain", check=True).stdout.split()) == 1


def test_drain_leaves_nothing(pooled: Hako) -> None:
    hako = pooled
    hako("pool", "fill", "2", check=True)
    assert len(_members(hako)) == 2
    assert len(hako("pool", "drain", check=True).stdout.split()) == 2
    assert _members(hako) == []
    assert hako.sandbox_dirs() == []
    assert qemu_pids_under(hako.run_root) == []
    # a drained pool stays empty: a later run does not refill it
    _timed_run(hako, BUSYBOX, "true")
    time.sleep(3)
    assert _members(hako) == []


def _states(hako: Hako) -> dict[str, dict[str, object]]:
    """Sandboxes' states by short id."""
    return {
        d.name[:12]: json.loads((d / "state.json").read_text())
        for d in hako.sandbox_dirs()
        if (d / "state.json").exists()
    }


def _process_runs(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] not in "ZX"
    except OSError:
        return False


def test_a_fill_serves_its_sandboxes_from_one_keeper(pooled: Hako) -> None:
    """One daemon process serves every sandbox a fill adds, taken or not, and those later fills
    add; ending one sandbox, or killing its VM, ends only that one; the keeper exits with its
    last sandbox, and leaves nothing behind."""
    hako = pooled
    members = hako("pool", "fill", "3", check=True).stdout.split()
    hako("pool", "fill", "0", check=True)  # (taking one starts no refill)
    states = _states(hako)
    [keeper] = {states[m]["daemon_pid"] for m in members}
    assert isinstance(keeper, int) and all(states[m]["shared_daemon"] for m in members)
    assert (hako.run_root / "keepers" / "trimmed_256M_1" / f"{keeper}.sock").exists()

    taken = hako("run", "-d", "--name", "kept", BUSYBOX, "sleep", "600", check=True).stdout.strip()[:12]
    assert taken in members and _states(hako)[taken]["daemon_pid"] == keeper
    assert hako("exec", "kept", "cat", "/proc/1/cmdline", check=True).stdout.startswith("sleep")
    hako("stop", "kept", check=True)  # through its API: the keeper is not signalled
    assert "Exited (137)" in hako("ps", "-a", check=True).stdout
    assert _process_runs(keeper) and len(_ready(hako)) == 2

    [added] = hako("pool", "fill", "3", check=True).stdout.split()  # added by the same keeper
    assert _states(hako)[added]["daemon_pid"] == keeper

    # A pooled sandbox whose VM dies leaves the pool; the others go on.
    dying = next(m for m in members if m != taken)
    [dying_dir] = [d for d in hako.sandbox_dirs() if d.name.startswith(dying)]
    [qemu] = qemu_pids_under(dying_dir)
    os.kill(qemu, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while dying in _ready(hako) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sorted({*members, added} - {taken, dying})
    assert sorted(_ready(hako)) == left and _process_runs(keeper)
    hako("pool", "fill", "0", check=True)
    for _ in left:  # taken, run, finished
        assert hako("run", "--rm", BUSYBOX, "hostname", check=True).stdout.strip() in left

    # Its last sandbox finished ("kept" exited before: its record stays, for `hako rm`).
    deadline = time.monotonic() + 20
    while _process_runs(keeper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _process_runs(keeper) and _ready(hako) == []
    assert list((hako.run_root / "keepers" / "trimmed_256M_1").iterdir()) == []
    assert "Exited (137)" in hako("ps", "-a", check=True).stdout
    hako("rm", "kept", check=True)
    assert hako.sandbox_dirs() == [] and qemu_pids_under(hako.run_root) == []


def test_bad_pool_size(hako: Hako) -> None:
    result = hako("pool", "fill", "-1")
    assert result.returncode == 125 and "0 or more" in result.stderr
    assert (
        not (hako.run_root / "pool.json").exists()
        or json.loads((hako.run_root / "pool.json").read_text()) == {}
    )
    assert Path(hako.run_root).is_dir()


def test_a_pool_is_per_network(pooled: Hako) -> None:
    """`hako run --network none` takes from the pool of `none`, the default run from the
    bridge's; neither takes the other's."""
    hako = pooled
    [unnetworked] = hako("pool", "fill", "1", "--network", "none", check=True).stdout.split()
    assert "none" in hako("pool", "ls", check=True).stdout.splitlines()[1].split()
    figures, _ = _timed_run(hako, BUSYBOX, "true")
    assert "pool_take" not in figures and unnetworked in _members(hako)  # none was of the bridge
    figures, out = _timed_run(hako, "--network", "none", BUSYBOX, "ip", "-o", "-4", "addr")
    assert "pool_take" in figures
    assert "eth0" not in out, out  # the loopback only, as --network none gives
