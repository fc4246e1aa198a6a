"""containerd pods taking their VM from hako's warm pool (``hako pool fill --network none``).

A pod without a network namespace of its own (``ctr run`` without CNI) takes a pooled VM: the
pooled sandbox's daemon becomes the pod's shim. The pool is drained before each test ends, so
the ``ctr`` fixture's sweep finds nothing of it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containerd.harness import HAKO, VENV_BIN, Containerd, Ctr, qemu_processes, unique_id

pytestmark = pytest.mark.integration


def _hako(containerd: Containerd, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """hako as containerd's shims see it (the same run root, hence the same pool and templates)."""
    return subprocess.run(
        [str(VENV_BIN / "hako"), *args],
        env=containerd.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _ready(containerd: Containerd) -> list[str]:
    listing = _hako(containerd, "pool", "ls").stdout.splitlines()[1:]
    return [line.split()[0] for line in listing if " ready " in line]


@pytest.fixture
def pool(ctr: Ctr) -> Iterator[Containerd]:
    """One pooled sandbox of the `none` network, drained (with any refill) at the end."""
    filled = _hako(ctr.containerd, "pool", "fill", "1", "--network", "none")
    assert filled.returncode == 0, filled.stderr
    try:
        yield ctr.containerd
    finally:
        drained = _hako(ctr.containerd, "pool", "drain")
        assert drained.returncode == 0, drained.stderr


def test_a_pod_without_a_network_namespace_takes_a_pooled_vm(ctr: Ctr, pool: Containerd) -> None:
    [member] = _ready(pool)
    qemus = {proc.pid for proc in qemu_processes(pool.paths.base)}
    container = unique_id("pooled")
    result = ctr.run(HAKO, container, "sh", "-c", "hostname; echo hi >&2; exit 3")
    # The pooled VM ran it: the guest's hostname is the pooled sandbox's (ctr names none).
    assert (result.returncode, result.stdout, result.stderr) == (3, f"{member}\n", "hi\n")
    log = pool.log_tail(400)
    assert f"taken from the warm pool (sandbox {member}" in log, log
    assert "launched the pod's VM as the shim started" not in log.split(container)[-1]
    # Its QEMU was the pooled one, and it is gone with the pod; the pool refills.
    deadline = time.monotonic() + 180
    while not (refilled := _ready(pool)):
        assert time.monotonic() < deadline, _hako(pool, "pool", "ls").stdout
        time.sleep(0.5)
    assert refilled != [member]
    left = {proc.pid for proc in qemu_processes(pool.paths.base)} - qemus
    assert len(left) == 1, left  # the refill's, not the pod's
    assert not [p for p in (pool.paths.hako_run / "sandboxes").iterdir() if p.name.startswith(member)]


def test_a_pod_with_the_pool_turned_off_restores_its_own(ctr: Ctr, pool: Containerd, tmp_path: Path) -> None:
    [member] = _ready(pool)
    config = tmp_path / "hako.toml"
    config.write_text("[runtime]\npool = false\n")
    result = ctr.run(HAKO, unique_id("unpooled"), "hostname", options=["--runtime-config-path", str(config)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != member
    assert _ready(pool) == [member]


def test_a_pod_that_asks_for_another_vm_leaves_the_pooled_one(
    ctr: Ctr, pool: Containerd, tmp_path: Path
) -> None:
    """Same kernel and size, but a debug guest is another template: the pooled sandbox refuses
    the pod and stays in the pool; the pod restores a VM of its own."""
    [member] = _ready(pool)
    config = tmp_path / "hako.toml"
    config.write_text("[runtime]\ndebug = true\n")
    result = ctr.run(
        HAKO, unique_id("debug"), "hostname", options=["--runtime-config-path", str(config)], timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != member
    assert _ready(pool) == [member]
    [run_dir] = [p for p in (pool.paths.hako_run / "sandboxes").iterdir() if p.name.startswith(member)]
    assert "refused the containerd pod" in (run_dir / "daemon.log").read_text()
