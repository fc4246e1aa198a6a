"""Wiring a sandbox's network namespace to its VM's tap, with pyroute2, in a process of its own.

The process that holds a sandbox lives as long as the sandbox, and pyroute2 takes 12 MiB of it;
so the netlink work runs here instead, a short-lived process started with the namespace's
descriptor (:meth:`hako.network.sandbox.SandboxNetwork.start_wiring`), on another core while
the guest boots. It answers one line of JSON, or exits non-zero with a one-line error.

    python -m hako.network.wire --netns-fd N routed --sandbox-id ID --address A
        make the veth pair (``eth0`` inside, ``hk<id>`` on the host, the MAC for A), redirect
        between ``eth0`` and the tap, and connect the host's end (:mod:`hako.network.host`)
    python -m hako.network.wire --netns-fd N joined
        find the namespace's configured interface (containerd's CNI made it), redirect between
        it and the tap, and answer the guest's configuration read off it
    python -m hako.network.wire --netns-fd N rewire --veth NAME
        redirect between NAME and the tap again (the VM, and with it its tap, was replaced)

A pooled sandbox's daemon, which its filler gave pyroute2 before forking it, calls
:func:`joined` itself, with the tap to move there first from the VM's own namespace (see
:meth:`hako.network.sandbox.SandboxNetwork.move_into`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import socket
import sys
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hako.errors import HakoError, NetworkError
from hako.network import host, netns
from hako.network.sandbox import GUEST_DEVICE, VETH, GuestInterface, GuestNetwork, GuestRoute, mac_for

ETH_P_ALL = 0x0003
INGRESS = 0xFFFF0000
RT_TABLE_MAIN = 254
RTPROT_KERNEL = 2
SCOPE_UNIVERSE = 0


def inside(netns_fd: int) -> Any:
    """An IPRoute whose socket lives in the namespace ``netns_fd``."""
    with netns.entered(netns_fd):
        return IPRoute()


def routed(netns_fd: int, sandbox_id: str, address: ipaddress.IPv4Address) -> dict[str, Any]:
    peer = host.veth_name(sandbox_id)
    host.ensure_host()
    host_fd = netns.current()
    try:
        ipr = inside(netns_fd)
        try:
            peer_spec = {"ifname": peer, "net_ns_fd": host_fd}
            ipr.link("add", ifname=VETH, kind="veth", address=mac_for(address), peer=peer_spec)
            redirect_both_ways(ipr, VETH, netns.TAP_NAME)
        finally:
            ipr.close()
        with IPRoute() as outside:
            host.connect_veth(outside, peer, address)
    finally:
        os.close(host_fd)
    return {}


def joined(netns_fd: int, tap_from: int | None = None) -> dict[str, Any]:
    """Redirect between the namespace's interface and the tap (moved there first from the
    namespace ``tap_from``, if given); the guest's configuration, read off the interface."""
    if tap_from is not None:
        source = inside(tap_from)
        try:
            source.link("set", index=host.index_of(source, netns.TAP_NAME), net_ns_fd=netns_fd)
        finally:
            source.close()
    ipr = inside(netns_fd)
    try:
        link = uplink(ipr)
        name = str(link.get_attr("IFLA_IFNAME"))
        index = int(link["index"])
        addresses = tuple(
            (str(a.get_attr("IFA_ADDRESS")), int(a["prefixlen"]))
            for a in ipr.get_addr(index=index)
            if a["scope"] == SCOPE_UNIVERSE  # the kernel makes link-local ones itself
        )
        mac, mtu = str(link.get_attr("IFLA_ADDRESS")), int(link.get_attr("IFLA_MTU"))
        guest = GuestNetwork((GuestInterface(GUEST_DEVICE, mac, mtu, addresses),), tuple(routes(ipr, index)))
        redirect_both_ways(ipr, name, netns.TAP_NAME)
    finally:
        ipr.close()
    return {"veth": name, "guest": dataclasses.asdict(guest)}


def remove_tap(netns_fd: int) -> None:
    """Delete the namespace's tap: one moved there from a VM's own namespace persists (it was
    made to outlast its QEMU there, see :func:`hako.network.netns.open_tap`)."""
    ipr = inside(netns_fd)
    try:
        with contextlib.suppress(NetworkError):  # gone already
            ipr.link("del", index=host.index_of(ipr, netns.TAP_NAME))
    finally:
        ipr.close()


def rewire(netns_fd: int, veth: str) -> dict[str, Any]:
    ipr = inside(netns_fd)
    try:
        redirect_both_ways(ipr, veth, netns.TAP_NAME)
    finally:
        ipr.close()
    return {}


def redirect_both_ways(ipr: Any, veth: str, tap: str) -> None:
    """tc ingress filters: every frame arriving on one leaves by the other (Kata's tcfilter).
    Filters already there (for a tap that was replaced) are replaced."""
    ends = (host.index_of(ipr, veth), host.index_of(ipr, tap))
    for index in ends:
        ipr.link("set", index=index, state="up")
        with contextlib.suppress(NetlinkError):  # none yet
            ipr.tc("del", "ingress", index)
        ipr.tc("add", "ingress", index)
    for source, target in (ends, ends[::-1]):
        action = {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": target}
        ipr.tc(
            "add-filter",
            "u32",
            source,
            parent=INGRESS,
            protocol=ETH_P_ALL,
            target=0,
            keys=["0x0/0x0+0"],
            action=[action],
        )


def uplink(ipr: Any) -> Any:
    """The joined namespace's own interface: the first one besides the loopback and our tap
    that has an address."""
    for link in ipr.get_links():
        if link.get_attr("IFLA_IFNAME") in ("lo", netns.TAP_NAME):
            continue
        if any(a["scope"] == SCOPE_UNIVERSE for a in ipr.get_addr(index=link["index"])):
            return link
    raise NetworkError("the network namespace has no interface with an address to give the guest")


def routes(ipr: Any, index: int) -> list[GuestRoute]:
    """The namespace's main-table routes through ``index``, for the guest; on-link first (the
    kernel's own prefix routes are left out: the guest's kernel makes them from the addresses)."""
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            if route.get_attr("RTA_OIF") != index or route["proto"] == RTPROT_KERNEL:
                continue
            destination = route.get_attr("RTA_DST")
            target = f"{destination}/{route['dst_len']}" if destination else "default"
            gateway = str(route.get_attr("RTA_GATEWAY") or "")
            source = str(route.get_attr("RTA_PREFSRC") or "")
            found.append(GuestRoute(target, gateway=gateway, source=source))
    return sorted(found, key=lambda r: r.gateway != "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hako.network.wire", description=__doc__)
    parser.add_argument("--netns-fd", type=int, required=True)
    commands = parser.add_subparsers(dest="command", required=True)
    routed_parser = commands.add_parser("routed")
    routed_parser.add_argument("--sandbox-id", required=True)
    routed_parser.add_argument("--address", type=ipaddress.IPv4Address, required=True)
    commands.add_parser("joined")
    rewire_parser = commands.add_parser("rewire")
    rewire_parser.add_argument("--veth", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "routed":
            answer = routed(args.netns_fd, args.sandbox_id, args.address)
        elif args.command == "joined":
            answer = joined(args.netns_fd)
        else:
            answer = rewire(args.netns_fd, args.veth)
    except (HakoError, NetlinkError, OSError) as exc:
        print(f"cannot wire the sandbox's network ({args.command}): {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
