"""The agent's network configuration on the real kernel, each test in a fresh network namespace (root, no VM).

Each test starts a child Python under ``unshare --net`` (:func:`child`). It makes a
veth pair there, the host side ``v0`` up and the guest side ``v1`` standing for the
VM's NIC, runs the agent's code on it (``network.configure``, or the whole
CreateSandbox handler), and prints what the kernel then has, as ``ip -j`` shows it.
The namespace, and everything in it, dies with the child.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format

from hako_agent.errors import InvalidArgument
from hako_agent.network import Interface, IPAddress, Route, configure
from hako_agent.sandbox import Sandbox
from hako_agent.service import AgentService
from hako_api import agent_pb2
from hako_ttrpc import CallContext, TtrpcError

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
MAC = "02:42:ac:11:00:05"
# As a CNI plugin leaves a pod's veth: addresses, and a gateway reached through an on-link
# route (Calico's 169.254.1.1), listed after the route through it.
ETH0 = {
    "device": "v1",
    "name": "eth0",
    "hw_addr": MAC,
    "mtu": 1400,
    "addresses": [{"address": "10.88.0.5", "prefix_len": 16}, {"address": "fd00:1::5", "prefix_len": 64}],
}
ROUTES = [
    {"destination": "default", "gateway": "169.254.1.1", "device": "eth0"},
    {"destination": "10.200.0.0/16", "gateway": "10.88.0.1", "device": "eth0", "source": "10.88.0.5"},
    {"destination": "169.254.1.1", "device": "eth0"},
    {"destination": "default", "gateway": "fd00:1::1", "device": "eth0"},
    # the kernel's own prefix route, as the host copies it from the veth
    {"destination": "10.88.0.0/16", "device": "eth0", "source": "10.88.0.5"},
]


# -- in the child ---------------------------------------------------------------------------------
def _ip(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out or "[]")


def _create_sandbox(request: dict[str, Any]) -> None:
    sandbox = Sandbox(cgroup_root=None)
    try:
        ctx = CallContext("hako.agent.v1.Agent", "CreateSandbox", {}, None, threading.Event(), 1)
        message = json_format.ParseDict(request, agent_pb2.CreateSandboxRequest())
        AgentService(sandbox=sandbox, cgroup_root=None).CreateSandbox(message, ctx)
    finally:
        sandbox.reaper.stop()  # it reaps every child: subprocess must wait for `ip` itself


def _configure(request: dict[str, Any]) -> None:
    interfaces = [
        Interface(
            i["device"],
            i.get("name", ""),
            i.get("hw_addr", ""),
            i.get("mtu", 0),
            [IPAddress(a["address"], a["prefix_len"]) for a in i.get("addresses", [])],
        )
        for i in request.get("interfaces", [])
    ]
    routes = [
        Route(r.get("destination", ""), r.get("gateway", ""), r.get("device", ""), r.get("source", ""))
        for r in request.get("routes", [])
    ]
    configure(interfaces, routes)


def child(argument: str) -> None:
    """Run in a new network namespace: set up the veth pair, apply the request, print the outcome."""
    spec = json.loads(argument)
    subprocess.run(["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
    subprocess.run(["ip", "link", "set", "v0", "up"], check=True)
    error = ""
    try:
        if spec["via_service"]:
            _create_sandbox(spec["request"])
        else:
            _configure(spec["request"])
    except (InvalidArgument, TtrpcError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    links = {link["ifname"]: link for link in _ip("addr")}
    print(
        json.dumps(
            {
                "error": error,
                "links": links,
                "routes": _ip("-d", "route"),
                "routes6": _ip("-d", "-6", "route"),
            }
        )
    )


# -- in the test ----------------------------------------------------------------------------------
def run(request: dict[str, Any], *, via_service: bool = False) -> dict[str, Any]:
    spec = json.dumps({"request": request, "via_service": via_service})
    code = f"from tests.root.test_agent_network import child; child({spec!r})"
    python = [sys.executable, "-c", code]
    result = subprocess.run(
        # A mount namespace too, with its own /run: the agent writes /run/hako/etc/hosts.
        ["unshare", "--net", "--mount", "sh", "-c", 'mount -t tmpfs tmpfs /run && exec "$@"', "-", *python],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome: dict[str, Any] = json.loads(result.stdout)
    return outcome


def addresses(link: dict[str, Any]) -> set[tuple[str, str, int, str]]:
    """(family, address, prefix length, broadcast) of a link's global addresses."""
    return {
        (a["family"], a["local"], a["prefixlen"], a.get("broadcast", ""))
        for a in link["addr_info"]
        if a["scope"] == "global"
    }


def routes(table: list[dict[str, Any]], device: str) -> set[tuple[str, str, str, str, str]]:
    """(destination, gateway, scope, source, protocol) of the main table's routes through ``device``."""
    return {
        (r["dst"], r.get("gateway", ""), r["scope"], r.get("prefsrc", ""), r["protocol"])
        for r in table
        if r["dev"] == device and r["dst"] != "fe80::/64"
    }


def assert_untouched(outcome: dict[str, Any]) -> None:
    v1 = outcome["links"]["v1"]
    assert "UP" not in v1["flags"] and v1["mtu"] == 1500 and v1["address"] != MAC
    assert addresses(v1) == set()
    assert routes(outcome["routes"], "v1") == set()


def assert_configured(outcome: dict[str, Any]) -> None:
    assert outcome["error"] == ""
    assert "v1" not in outcome["links"]
    eth0 = outcome["links"]["eth0"]
    assert (eth0["address"], eth0["mtu"], eth0["link"]) == (MAC, 1400, "v0")
    assert "UP" in eth0["flags"] and eth0["operstate"] == "UP"
    assert addresses(eth0) == {("inet", "10.88.0.5", 16, "10.88.255.255"), ("inet6", "fd00:1::5", 64, "")}
    v6 = next(a for a in eth0["addr_info"] if a["local"] == "fd00:1::5")
    assert "tentative" not in v6  # usable at once: no duplicate address detection
    assert routes(outcome["routes"], "eth0") == {
        ("default", "169.254.1.1", "global", "", "boot"),
        ("169.254.1.1", "", "link", "", "boot"),
        ("10.200.0.0/16", "10.88.0.1", "global", "10.88.0.5", "boot"),
        ("10.88.0.0/16", "", "link", "10.88.0.5", "boot"),  # the kernel's, replaced
    }
    assert routes(outcome["routes6"], "eth0") == {
        ("fd00:1::/64", "", "global", "", "kernel"),
        ("default", "fd00:1::1", "global", "", "boot"),
    }


def test_the_guest_nic_takes_the_veths_identity() -> None:
    assert_configured(run({"interfaces": [ETH0], "routes": ROUTES}))


def test_create_sandbox_configures_the_network() -> None:
    assert_configured(run({"sandbox_id": "sb", "interfaces": [ETH0], "routes": ROUTES}, via_service=True))


def test_create_sandbox_refuses_bad_input() -> None:
    bad = {**ETH0, "hw_addr": "01:00:5e:00:00:01"}
    outcome = run({"sandbox_id": "sb", "interfaces": [bad]}, via_service=True)
    assert outcome["error"] == (
        "TtrpcError: INVALID_ARGUMENT: interfaces[0].hw_addr: 01:00:5e:00:00:01 is not a unicast MAC address"
    )
    assert_untouched(outcome)


@pytest.mark.parametrize(
    ("asked", "error"),
    [
        (
            {"interfaces": [{**ETH0, "hw_addr": "02:42:ac:11:00"}]},
            "interfaces[0].hw_addr: '02:42:ac:11:00' is not a MAC address (aa:bb:cc:dd:ee:ff)",
        ),
        (
            {"interfaces": [{**ETH0, "addresses": [{"address": "10.88.0.5", "prefix_len": 33}]}]},
            "interfaces[0].addresses[0].prefix_len: 33 is not in 1..32",
        ),
        (
            {"interfaces": [ETH0, {"device": "eth9"}]},
            "interfaces[1].device: find link 'eth9': No such device",
        ),
        (
            {"interfaces": [ETH0], "routes": [*ROUTES, {"destination": "10.0.0.0/8", "gateway": "fd00::1"}]},
            "routes[5].gateway: fd00::1 is an IPv6 address, for an IPv4 route",
        ),
    ],
)
def test_bad_input_changes_nothing(asked: dict[str, Any], error: str) -> None:
    outcome = run(asked)
    assert outcome["error"] == f"InvalidArgument: {error}"
    assert_untouched(outcome)


def test_kernel_refusals_name_the_field() -> None:
    outcome = run({"interfaces": [{"device": "v1", "name": "v0"}]})
    assert outcome["error"].startswith("InvalidArgument: interfaces[0].name: rename link ")
    assert outcome["error"].endswith(" to 'v0': File exists")
    outcome = run({"interfaces": [ETH0], "routes": [{"destination": "10.9.0.0/16", "gateway": "10.77.0.1"}]})
    assert outcome["error"] == (
        "InvalidArgument: routes[0]: add route 10.9.0.0/16 via 10.77.0.1: Network is unreachable"
        " (Nexthop has invalid gateway)"
    )
    assert addresses(outcome["links"]["eth0"])  # the interfaces were configured before the routes
