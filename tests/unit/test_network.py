"""The host side of sandbox networking that needs no root: ports, addresses, records, rules."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

import pytest

from hako.errors import NetworkError, UsageError
from hako.network import host, records
from hako.network.sandbox import host_nameservers, mac_for


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HAKO_NET_STATE", str(tmp_path / "net"))
    monkeypatch.setenv("HAKO_SUBNET", "10.99.0.0/29")  # gateway .1, sandboxes .2 to .6
    return tmp_path / "net"


def gone(sandbox_id: str) -> records.Holder:
    """A holder whose process has ended (no process ever has start time -1)."""
    return records.Holder(sandbox_id, os.getpid(), -1)


def here(sandbox_id: str) -> records.Holder:
    return records.Holder.this_process(sandbox_id)


@pytest.mark.parametrize(
    ("text", "mapping"),
    [
        ("8080:80", host.PortMapping(8080, 80, "tcp")),
        ("53:5353/udp", host.PortMapping(53, 5353, "udp")),
        ("80", host.PortMapping(80, 80, "tcp")),
    ],
)
def test_port_mappings_parse_as_docker_writes_them(text: str, mapping: host.PortMapping) -> None:
    assert host.PortMapping.parse(text) == mapping
    assert host.PortMapping.parse(str(mapping)) == mapping


@pytest.mark.parametrize("text", ["http:80", "8080:80/sctp", "0:80", "8080:70000", "a:b:c"])
def test_bad_port_mappings_say_what_to_write(text: str) -> None:
    with pytest.raises(UsageError, match=f"-p {text}"):
        host.PortMapping.parse(text)


def test_leases_take_free_addresses_and_free_those_of_gone_sandboxes() -> None:
    first = host.lease(here("a"))
    assert first == ipaddress.IPv4Address("10.99.0.2")  # .1 is the gateway
    taken = [host.lease(here(name)) for name in "bcde"]
    assert [str(a) for a in taken] == ["10.99.0.3", "10.99.0.4", "10.99.0.5", "10.99.0.6"]
    with pytest.raises(NetworkError, match="no free address left in 10.99.0.0/29"):
        host.lease(here("f"))
    host.release("c")
    assert host.lease(here("g")) == ipaddress.IPv4Address("10.99.0.4")
    # A sandbox that died without giving its address back loses it to the next one.
    records.write(records.state_dir() / host.LEASES / "10.99.0.5", gone("d"))
    assert host.lease(here("h")) == ipaddress.IPv4Address("10.99.0.5")


def test_leases_taken_at_once_by_threads_of_one_process_differ() -> None:
    """A pool's keeper serves its sandboxes on threads of one process: the records' lock must
    exclude its threads too, or two of them could lease one address."""
    import threading

    barrier = threading.Barrier(5)  # (the test subnet has five addresses)
    leased: list[object] = []

    def take(index: int) -> None:
        barrier.wait()
        leased.append(host.lease(here(f"s{index}")))

    threads = [threading.Thread(target=take, args=(index,)) for index in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(leased)) == 5


def test_a_port_published_by_a_live_sandbox_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    mapping = host.PortMapping.parse("18080:80")
    records.write(records.state_dir() / host.PORTS / mapping.record, here("abcdef0123456789"))
    with pytest.raises(UsageError, match="published by container abcdef012345"):
        host.check_free(mapping)
    records.write(records.state_dir() / host.PORTS / mapping.record, gone("abcdef0123456789"))
    host.check_free(mapping)  # its holder is gone: free


def test_a_port_a_host_process_listens_on_is_refused() -> None:
    import socket

    with socket.create_server(("0.0.0.0", 0)) as server:
        port = server.getsockname()[1]
        with pytest.raises(UsageError, match=f"host port {port}/tcp is in use"):
            host.check_free(host.PortMapping(port, 80))


def test_records_name_their_holder_and_skip_unreadable_ones(state: Path) -> None:
    records.write(state / "leases" / "10.99.0.2", here("a"), note="x")
    (state / "leases" / "10.99.0.3").write_text("not json")
    found = records.entries("leases")
    assert [(path.name, owner.sandbox_id, data) for path, owner, data in found] == [
        ("10.99.0.2", "a", {"note": "x"})
    ]
    assert not (state / "leases" / "10.99.0.3").exists()
    assert here("a").alive() and not gone("a").alive()


def test_the_ruleset_is_valid_nftables() -> None:
    text = host.ruleset(host.subnet())
    assert host.RULESET_VERSION in text
    assert 'iifname "hk*" oifname "hk*" drop' in text  # no sandbox to sandbox but published ports
    assert 'ip saddr 10.99.0.0/29 oifname != "hk*" masquerade' in text
    check = subprocess.run(["nft", "-c", "-f", "-"], input=text, capture_output=True, text=True, check=False)
    if check.returncode != 0 and "Operation not permitted" in check.stderr:
        pytest.skip("nft -c needs root here")
    assert check.returncode == 0, check.stderr


def test_bad_subnets_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAKO_SUBNET", "10.99.0.0/30")
    with pytest.raises(NetworkError, match="too small"):
        host.subnet()
    monkeypatch.setenv("HAKO_SUBNET", "hello")
    with pytest.raises(NetworkError, match="not an IPv4 network"):
        host.subnet()


def test_macs_are_local_and_follow_the_address() -> None:
    assert mac_for(ipaddress.IPv4Address("10.210.1.2")) == "02:68:6b:d2:01:02"


def test_nameservers_skip_the_hosts_loopback(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# x\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch x\n")
    assert host_nameservers(str(resolv)) == ("10.0.0.2", "fe80::1%eth0")
    assert host_nameservers(str(tmp_path / "none")) == ()
