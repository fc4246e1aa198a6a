"""containerd pods taking their VM from hako's warm pool (``hako pool fill --network none``).

A pod takes a pooled VM: the pooled sandbox's daemon becomes the pod's shim (a pod with a
network namespace of its own: tests/containerd/test_shim_cri.py). The pool is drained before
each test ends, so the ``ctr`` fixture's sweep finds nothing of it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hako.shim.main import Shim
from tests.containerd.harness import (
    HAKO,
    NAMESPACE,
    POD_SUBNET_HOST,
    POD_SUBNET_POD,
    Containerd,
    Ctr,
    pod_namespace,
    qemu_processes,
    unique_id,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def pool(ctr: Ctr) -> Iterator[Containerd]:
    """One pooled sandbox of the `none` network, drained (with any refill) at the end."""
    filled = ctr.containerd.hako("pool", "fill", "1", "--network", "none")
    assert filled.returncode == 0, filled.stderr
    try:
        yield ctr.containerd
    finally:
        drained = ctr.containerd.hako("pool", "drain")
        assert drained.returncode == 0, drained.stderr


def test_a_pod_without_a_network_namespace_takes_a_pooled_vm(ctr: Ctr, pool: Containerd) -> None:
    [member] = pool.pool_ready()
    qemus = {proc.pid for proc in qemu_processes(pool.paths.base)}
    container = unique_id("pooled")
    result = ctr.run(HAKO, container, "sh", "-c", "hostname; echo hi >&2; exit 3")
    # The pooled VM took the pod's identity: its hostname, as a VM of the pod's own would have.
    pod_hostname = Shim(str(pool.paths.address), NAMESPACE, container).pod_id[:12]
    assert (result.returncode, result.stdout, result.stderr) == (3, f"{pod_hostname}\n", "hi\n")
    log = pool.log_tail(400)
    assert f"taken from the warm pool (sandbox {member}" in log, log
    assert "launched the pod's VM as the shim started" not in log.split(container)[-1]
    # Its QEMU was the pooled one, and it is gone with the pod; the pool refills.
    deadline = time.monotonic() + 180
    while not (refilled := pool.pool_ready()):
        assert time.monotonic() < deadline, pool.hako("pool", "ls").stdout
        time.sleep(0.5)
    assert refilled != [member]
    left = {proc.pid for proc in qemu_processes(pool.paths.base)} - qemus
    assert len(left) == 1, left  # the refill's, not the pod's
    assert not [p for p in (pool.paths.hako_run / "sandboxes").iterdir() if p.name.startswith(member)]


def test_a_pod_with_the_pool_turned_off_restores_its_own(ctr: Ctr, pool: Containerd, tmp_path: Path) -> None:
    [member] = pool.pool_ready()
    config = tmp_path / "hako.toml"
    config.write_text("[runtime]\npool = false\n")
    result = ctr.run(HAKO, unique_id("unpooled"), "hostname", options=["--runtime-config-path", str(config)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != member
    assert pool.pool_ready() == [member]


def test_a_pod_that_asks_for_another_vm_leaves_the_pooled_one(
    ctr: Ctr, pool: Containerd, tmp_path: Path
) -> None:
    """Same kernel and size, but a debug guest is another template: the pooled sandbox refuses
    the pod and stays in the pool; the pod restores a VM of its own."""
    [member] = pool.pool_ready()
    config = tmp_path / "hako.toml"
    config.write_text("[runtime]\ndebug = true\n")
    result = ctr.run(
        HAKO, unique_id("debug"), "hostname", options=["--runtime-config-path", str(config)], timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != member
    assert pool.pool_ready() == [member]
    [run_dir] = [p for p in (pool.paths.hako_run / "sandboxes").iterdir() if p.name.startswith(member)]
    assert "refused the containerd pod" in (run_dir / "daemon.log").read_text()


@pytest.fixture
def pod_netns() -> Iterator[str]:
    with pod_namespace() as path:
        yield path


def test_a_pod_with_a_network_namespace_takes_a_pooled_vm_into_it(
    ctr: Ctr, pool: Containerd, pod_netns: str
) -> None:
    """The pooled VM's tap moves into the pod's namespace, and the guest takes the veth's
    address, MAC and routes: the host reaches the container, and the container the host."""
    [member] = pool.pool_ready()
    script = f"ip -o -4 addr show eth0; ip route; ping -c 1 -W 5 {POD_SUBNET_HOST} >/dev/null && echo reached"
    result = ctr.run(
        HAKO, unique_id("netns"), "sh", "-c", script, options=["--with-ns", f"network:{pod_netns}"]
    )
    assert result.returncode == 0, result.stderr
    assert f"inet {POD_SUBNET_POD}/24" in result.stdout and f"default via {POD_SUBNET_HOST}" in result.stdout
    assert result.stdout.endswith("reached\n"), result.stdout
    assert f"taken from the warm pool (sandbox {member}" in pool.log_tail(400)
    # The pod's namespace is someone else's and outlives the pod: nothing of the VM stays in it.
    links = subprocess.run(
        ["ip", "-n", Path(pod_netns).name, "-o", "link"], capture_output=True, text=True, check=True
    )
    assert "tap0" not in links.stdout, links.stdout
