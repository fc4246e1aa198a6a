"""Sandbox networking end to end: the bridge, NAT, published ports, isolation, clean-up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hako.image.store import ImageStore
from hako.network import host, records
from tests.integration.harness import BUSYBOX, Hako

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port: int = probe.getsockname()[1]
        return port


def serve_published(hako: Hako, name: str, port: int) -> str:
    """A detached container ``name`` that greets whoever connects to its port 80, published on
    the host's ``port``; its sandbox id."""
    script = f"while :; do echo hello-from-{name} | nc -l -p 80; done"
    return hako(
        "run", "-d", "--name", name, "-p", f"{port}:80", BUSYBOX, "sh", "-c", script, check=True
    ).stdout.strip()


def state_of(hako: Hako, sandbox_id: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(
        (hako.run_root / "sandboxes" / sandbox_id / "state.json").read_text()
    )
    return data


def read_from(host: str, port: int, timeout: float = 60) -> bytes:
    """What a server sends on connecting (retried while it is not listening yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as conn:
                data = conn.recv(100)
                if data:
                    return data
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing answered on {host}:{port}")
        time.sleep(0.3)


def host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@pytest.fixture
def host_server() -> Iterator[int]:
    """A TCP server on every host address that greets whoever connects."""
    server = socket.create_server(("0.0.0.0", 0))
    port: int = server.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"hello-from-host\n")

    threading.Thread(target=serve, daemon=True).start()
    yield port
    server.close()


def test_the_guest_nic_takes_the_sandbox_address(hako: Hako) -> None:
    script = "ip -o -4 addr show eth0; ip route; cat /etc/hosts"
    result = hako("run", "--rm", BUSYBOX, "sh", "-c", script, check=True)
    gateway = str(host.gateway())
    assert f"default via {gateway} dev eth0" in result.stdout, result.stdout
    address = result.stdout.split(" inet ")[1].split("/")[0]
    assert address in [str(a) for a in host.subnet().hosts()] and address != gateway
    assert any(line.split()[0] == address for line in result.stdout.splitlines() if "\t" in line)


def test_a_container_reaches_a_server_on_the_host(hako: Hako, host_server: int) -> None:
    gateway = str(host.gateway())
    result = hako("run", "--rm", BUSYBOX, "nc", "-w", "10", gateway, str(host_server), check=True)
    assert result.stdout == "hello-from-host\n", result.stderr


def test_the_host_reaches_a_published_port(hako: Hako) -> None:
    port = free_port()
    sandbox_id = serve_published(hako, "web", port)
    assert read_from("127.0.0.1", port) == b"hello-from-web\n"
    outside = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout.split()
    assert read_from(outside[0], port) == b"hello-from-web\n"  # as another host would
    assert f"0.0.0.0:{port}->80/tcp" in hako("ps", check=True).stdout
    assert state_of(hako, sandbox_id)["ports"] == [f"{port}:80/tcp"]
    hako("rm", "-f", "web", check=True)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=3).close()


def test_a_published_port_in_use_is_refused_at_once(hako: Hako) -> None:
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        result = hako("run", "--rm", "-p", f"{port}:80", BUSYBOX, "true")
    assert result.returncode == 125
    assert f"host port {port}/tcp is in use" in result.stderr and result.stderr.count("\n") == 1
    assert hako.sandbox_dirs() == []
    bad = hako("run", "--rm", "-p", "80:http", BUSYBOX, "true")
    assert bad.returncode == 125 and "HOSTPORT:CTRPORT" in bad.stderr


def test_sandboxes_cannot_reach_each_other_unless_a_port_is_published(hako: Hako) -> None:
    port = free_port()
    a_id = serve_published(hako, "a", port)
    a_address = str(state_of(hako, a_id)["address"])
    assert read_from("127.0.0.1", port) == b"hello-from-a\n"  # a serves
    probe = (
        f"if nc -w 3 {a_address} 80 </dev/null; then echo direct-reached; fi; "
        f"if ping -c 2 -W 2 {a_address} >/dev/null; then echo ping-reached; fi; "
        f"nc -w 10 {host.gateway()} {port} </dev/null"
    )
    result = hako("run", "--rm", "--name", "b", BUSYBOX, "sh", "-c", probe)
    assert "direct-reached" not in result.stdout and "ping-reached" not in result.stdout, result.stdout
    assert "hello-from-a" in result.stdout, result.stderr  # through the published port: allowed


def test_network_none_has_only_a_loopback(hako: Hako, host_server: int) -> None:
    script = f"ip -o -4 addr; nc -w 3 {host.gateway()} {host_server} </dev/null || echo unreachable"
    result = hako("run", "--rm", "--network", "none", BUSYBOX, "sh", "-c", script, check=True)
    addresses = [line.split()[3] for line in result.stdout.splitlines() if " inet " in line]
    assert addresses == ["127.0.0.1/8"], result.stdout
    assert "unreachable" in result.stdout and "hello-from-host" not in result.stdout
    refused = hako("run", "--rm", "--network", "none", "-p", "8080:80", BUSYBOX, "true")
    assert refused.returncode == 125 and "-p needs the default network" in refused.stderr


def test_a_sandbox_killed_with_sigkill_leaves_nothing_after_rm(hako: Hako) -> None:
    port = free_port()
    sandbox_id = serve_published(hako, "doomed", port)
    assert read_from("127.0.0.1", port) == b"hello-from-doomed\n"
    state = state_of(hako, sandbox_id)
    veth = f"hk{sandbox_id[:12]}"
    layer = hako.run_root / "sandboxes" / sandbox_id / "containers" / sandbox_id / "rootfs.qcow2"
    assert veth in host_links() and layer.is_file()
    netns = os.readlink(f"/proc/{state['qemu_pid']}/ns/net")
    assert netns != os.readlink("/proc/self/ns/net")  # QEMU runs in the sandbox's namespace

    # Its QEMU dies with it, and the namespace (which only they held) with its tap and veth pair.
    os.kill(int(str(state["daemon_pid"])), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while veth in host_links() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert veth not in host_links(), "the veth outlived its sandbox's namespace"
    assert hako("rm", "doomed").returncode == 0
    assert not layer.exists() and hako.sandbox_dirs() == []
    held = [owner.sandbox_id for kind in ("leases", "ports") for _, owner, _ in records.entries(kind)]
    assert sandbox_id not in held
    elements = subprocess.run(
        ["nft", "list", "map", "ip", "hako", "publish_tcp"], capture_output=True, text=True, check=True
    ).stdout
    assert f"{port} :" not in elements


@pytest.fixture
def foreign_netns() -> Iterator[str]:
    """A network namespace someone else configured (as CNI would): a veth with 10.213.0.2/30."""
    name = f"hakotest{os.getpid()}"
    host_end = f"hkt{os.getpid()}"[:15]
    commands = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name],
        ["ip", "addr", "add", "10.213.0.1/30", "dev", host_end],
        ["ip", "link", "set", host_end, "up"],
        ["ip", "-n", name, "addr", "add", "10.213.0.2/30", "dev", "eth0"],
        ["ip", "-n", name, "link", "set", "eth0", "up"],
        ["ip", "-n", name, "route", "add", "default", "via", "10.213.0.1"],
    ]
    try:
        for argv in commands:
            subprocess.run(argv, check=True, capture_output=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def test_a_network_namespace_made_by_someone_else(
    hako: Hako, foreign_netns: str, host_server: int, image_store: Path, tmp_path: Path
) -> None:
    script = f"ip -o -4 addr show eth0; ip route; nc -w 10 10.213.0.1 {host_server} </dev/null"
    result = hako("run", "--rm", "--network", f"ns:{foreign_netns}", BUSYBOX, "sh", "-c", script, check=True)
    assert " 10.213.0.2/30 " in result.stdout and "default via 10.213.0.1" in result.stdout, result.stdout
    assert "hello-from-host" in result.stdout

    # A bundle whose config.json names the namespace joins it without being told.
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"] = {"path": str(ImageStore(image_store).get(BUSYBOX).rootfs), "readonly": True}
    spec["process"].update(args=["ip", "-o", "-4", "addr", "show", "eth0"], terminal=False)
    for namespace in spec["linux"]["namespaces"]:
        if namespace["type"] == "network":
            namespace["path"] = foreign_netns
    (bundle / "config.json").write_text(json.dumps(spec))
    assert " 10.213.0.2/30 " in hako("run", "--rm", str(bundle), check=True).stdout

    missing = hako("run", "--rm", "--network", "ns:/run/netns/nosuch", BUSYBOX, "true")
    assert missing.returncode == 125 and "is not a network namespace" in missing.stderr
