"""The Kubernetes path: containerd's CRI plugin runs a pod with runtime handler ``hako`` (and,
to prove the test itself, ``runc``), driven as kubelet drives it, through CRI v1 gRPC.

A pod is one sandbox: with hako, one VM in which the pause container and the pod's
containers all run. After StopPodSandbox + RemovePodSandbox nothing of it remains.
"""

from __future__ import annotations

import ipaddress
import platform
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containerd.cri import Cri
from tests.containerd.harness import CNI_SUBNET, CRI_NAMESPACE, PAUSE, Containerd, Runtime, cni_available

pytestmark = pytest.mark.integration

BOOT_ID = ["cat", "/proc/sys/kernel/random/boot_id"]


@pytest.fixture
def cri(containerd: Containerd) -> Iterator[Cri]:
    client = Cri(containerd)
    yield client
    problems = client.close() + containerd.sweep([CRI_NAMESPACE])
    assert not problems, "the test left behind:\n" + "\n".join(problems)


def test_cri_answers(cri: Cri) -> None:
    assert cri.version().runtime_api_version == "v1"
    conditions = {c.type: c.status for c in cri.status().status.conditions}
    # Without the CNI plugins only host-network pods can run, and the CRI plugin says so.
    assert conditions == {"RuntimeReady": True, "NetworkReady": cni_available()}


@pytest.mark.skipif(not cni_available(), reason="needs Debian's containernetworking-plugins")
def test_pod_network_from_cni(cri: Cri, containerd: Containerd, runtime: Runtime) -> None:
    """A pod with a network of its own: CNI's bridge plugin configures a veth in the pod's
    namespace; with hako, the VM's NIC stands in for it (tcfilter) and takes its address."""
    pod_config = cri.pod_config(f"net-{runtime.name}", host_network=False)
    pod_id = cri.run_pod(pod_config, handler=runtime.name)
    cri.wait_for_pod_ready(pod_id)
    address = cri.pod_ip(pod_id)
    assert ipaddress.ip_address(address) in ipaddress.ip_network(CNI_SUBNET)

    serve = "while :; do echo hello-from-pod | nc -l -p 8080; done"
    server = cri.create_container(pod_id, pod_config, "server", ["sh", "-c", serve])
    cri.start_container(server)
    shown = cri.exec_sync(server, ["ip", "-o", "-4", "addr", "show", "eth0"])
    assert f" {address}/" in shown.stdout.decode(), shown
    if runtime.vm:
        kernel = cri.exec_sync(server, ["uname", "-r"]).stdout.decode().strip()
        assert kernel != platform.release(), kernel  # the address is the guest's, not the host's
    _reach(address)

    cri.stop_pod(pod_id)
    cri.remove_pod(pod_id)
    assert cri.list_pods() == []


@pytest.mark.skipif(not cni_available(), reason="needs Debian's containernetworking-plugins")
def test_a_pod_and_the_warm_pool(cri: Cri, containerd: Containerd, tmp_path: Path) -> None:
    """A pooled VM (``hako pool fill --network none``) becomes the pod's: its tap moves into the
    pod's namespace and the guest takes the pod's address, as a restored VM's would. A volume
    mounted on the host after the pool was filled (as kubelet mounts a secret's tmpfs) reaches
    it, though this host's ``/`` is private (no mount propagates to the pooled daemon)."""
    filled = containerd.hako("pool", "fill", "1", "--network", "none")
    assert filled.returncode == 0, filled.stderr
    secret = tmp_path / "secret"
    secret.mkdir()
    mounted = False
    try:
        [member] = containerd.pool_ready()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "secret", str(secret)], check=True)
        mounted = True
        (secret / "token").write_text("mounted after the fill\n")
        pod_config = cri.pod_config("pooled-net", host_network=False)
        pod_id = cri.run_pod(pod_config, handler="hako")
        cri.wait_for_pod_ready(pod_id)
        assert f"taken from the warm pool (sandbox {member}" in containerd.log_tail(400)
        assert containerd.pool_ready() == []
        address = cri.pod_ip(pod_id)
        serve = "while :; do echo hello-from-pod | nc -l -p 8080; done"
        volumes = {secret: "/var/run/secrets/test"}
        server = cri.create_container(pod_id, pod_config, "server", ["sh", "-c", serve], volumes=volumes)
        cri.start_container(server)
        shown = cri.exec_sync(server, ["ip", "-o", "-4", "addr", "show", "eth0"])
        assert f" {address}/" in shown.stdout.decode(), shown
        token = cri.exec_sync(server, ["cat", "/var/run/secrets/test/token"])
        assert token.stdout == b"mounted after the fill\n", token
        _reach(address)
        cri.stop_pod(pod_id)
        cri.remove_pod(pod_id)
        assert cri.list_pods() == []
    finally:
        drained = containerd.hako("pool", "drain")
        assert drained.returncode == 0, drained.stderr
        if mounted:
            subprocess.run(["umount", str(secret)], check=True)


def _reach(address: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection((address, 8080), timeout=5) as conn:
                if conn.recv(100) == b"hello-from-pod\n":
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the host could not reach the pod at {address}:8080"
        time.sleep(0.3)


def test_pod_with_two_containers(cri: Cri, containerd: Containerd, runtime: Runtime) -> None:
    host_boot_id = Path("/proc/sys/kernel/random/boot_id").read_text()
    pod_config = cri.pod_config(f"pod-{runtime.name}")
    pod_id = cri.run_pod(pod_config, handler=runtime.name)
    cri.wait_for_pod_ready(pod_id)
    if runtime.vm:
        assert len(containerd.qemus()) == 1, containerd.qemus()

    containers = []
    for name in ("first", "second"):
        container_id = cri.create_container(pod_id, pod_config, name, ["sleep", "1000"])
        cri.start_container(container_id)
        containers.append(container_id)
    for container_id in containers:
        assert cri.container_state(container_id) == 1  # CONTAINER_RUNNING

    # Both containers run in the pod's one sandbox: with hako one VM, with runc the host.
    boot_ids = set()
    for container_id in containers:
        result = cri.exec_sync(container_id, BOOT_ID)
        assert result.exit_code == 0, result.stderr
        boot_ids.add(result.stdout.decode())
    assert len(boot_ids) == 1
    assert (boot_ids.pop() != host_boot_id) == runtime.vm
    if runtime.vm:
        qemus = containerd.qemus()
        assert len(qemus) == 1, qemus  # one VM for the pause container and both containers
    assert len(containerd.shims(runtime)) == 1  # one shim per pod

    hi = cri.exec_sync(containers[0], ["echo", "hi"])
    assert (hi.stdout, hi.stderr, hi.exit_code) == (b"hi\n", b"", 0)
    failed = cri.exec_sync(containers[1], ["sh", "-c", "exit 4"])
    assert failed.exit_code == 4

    # The sandbox container runs the local pause image.
    ctr = containerd.ctr(CRI_NAMESPACE)
    info = ctr("container", "info", pod_id, check=True).stdout
    assert PAUSE in info

    cri.stop_pod(pod_id)
    cri.remove_pod(pod_id)
    assert cri.list_pods() == []
    assert cri.list_containers() == []
    problems = containerd.sweep([CRI_NAMESPACE])
    assert problems == []  # no QEMU, no shim, no mount, no socket, no state
    assert containerd.qemus() == []
    assert containerd.shims() == []
    assert containerd.mounts() == []
