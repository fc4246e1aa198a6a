"""A sandbox's network: its namespace, wired to the guest's NIC the way Kata's "tcfilter" does.

Every sandbox VM has one virtio-net NIC whose host side is a tap in the sandbox's network
namespace, where QEMU runs. What is beyond the tap depends on the mode:

``bridge`` (``hako run``'s default, named after Docker's default network)
    hako makes the namespace and a veth pair, ``eth0`` inside and its peer on the host, a
    point-to-point link to the host's routing and NAT (:mod:`hako.network.host`), and leases the
    sandbox an address of hako's subnet.
``none``
    the namespace holds only the tap, which leads nowhere; the guest has its loopback.
joined (containerd's CNI, or a netns path in the OCI spec)
    the namespace exists with a veth already configured by someone else; hako adds the tap.

In both cases with a veth, tc ingress filters redirect every frame from the veth to the tap
and from the tap to the veth (``u32 match all, mirred egress redirect``), so the guest's NIC
stands in for the veth: the agent gives it the veth's MAC, MTU, addresses and routes. Nothing
of the namespace's own stack is in the path.

The address is leased (and the guest's configuration known) before QEMU starts, which costs no
netlink; the veth and filters are made with pyroute2 while the guest boots (``start_wiring``),
and a container is created only once they are in place (``wait_wired``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from hako.errors import HakoError, NetworkError
from hako.network import host, netns, records

MODES = ("bridge", "none")
GUEST_DEVICE = "eth0"  # the guest's NIC, as its kernel names it
VETH = "eth0"  # the veth's end in the sandbox's namespace (bridge mode)
ETH_P_ALL = 0x0003
INGRESS = 0xFFFF0000
WIRE_TIMEOUT = 30.0
RT_TABLE_MAIN = 254


@dataclass(frozen=True)
class GuestInterface:
    device: str  # the guest's link to configure
    hw_addr: str
    mtu: int
    addresses: tuple[tuple[str, int], ...]  # (address, prefix length)


@dataclass(frozen=True)
class GuestRoute:
    destination: str  # CIDR, or "default"
    gateway: str = ""
    device: str = GUEST_DEVICE
    source: str = ""


@dataclass(frozen=True)
class GuestNetwork:
    """What the agent makes of the guest's NIC (CreateSandbox)."""

    interfaces: tuple[GuestInterface, ...] = ()
    routes: tuple[GuestRoute, ...] = ()
    dns: tuple[str, ...] = ()


def mac_for(address: ipaddress.IPv4Address) -> str:
    """A locally administered MAC derived from the address (unique while the lease is)."""
    return "02:68:6b:" + ":".join(f"{b:02x}" for b in address.packed[1:])


def host_nameservers(path: str = "/etc/resolv.conf") -> tuple[str, ...]:
    """The host's nameservers that a sandbox can reach (not the host's loopback ones)."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    try:
                        if not ipaddress.ip_address(fields[1].split("%")[0]).is_loopback:
                            servers.append(fields[1])
                    except ValueError:
                        continue
    except OSError:
        pass
    return tuple(servers)


class SandboxNetwork:
    def __init__(self, sandbox_id: str, mode: str, netns_fd: int) -> None:
        self.sandbox_id = sandbox_id
        self.mode = mode  # "bridge", "none" or "joined"
        self.netns_fd = netns_fd
        self.holder = records.Holder.this_process(sandbox_id)
        self.address: ipaddress.IPv4Address | None = None
        self._guest = GuestNetwork()
        self._veth = VETH  # the namespace's own end, which the tap stands in for
        self._wired = threading.Event()
        self._wire_error: BaseException | None = None
        self._closed = False

    @classmethod
    def create(cls, sandbox_id: str, mode: str) -> SandboxNetwork:
        """A new namespace for a sandbox; in bridge mode, with its address leased."""
        if mode not in MODES:
            raise NetworkError(f"network mode {mode!r}: use one of {', '.join(MODES)}")
        network = cls(sandbox_id, mode, netns.create())
        if mode == "bridge":
            try:
                network._plan_bridge()
            except BaseException:
                network.close()
                raise
        return network

    @classmethod
    def join(cls, sandbox_id: str, path: str) -> SandboxNetwork:
        """The namespace at ``path``, made and configured by someone else (containerd's CNI)."""
        return cls(sandbox_id, "joined", netns.open_netns(path))

    def _plan_bridge(self) -> None:
        self.address = host.lease(self.holder)
        gateway = str(host.gateway())
        # A /32 and the gateway as its only neighbour: other sandboxes are reached through the host.
        interface = GuestInterface(GUEST_DEVICE, mac_for(self.address), 1500, ((str(self.address), 32),))
        routes = (GuestRoute(gateway), GuestRoute("default", gateway=gateway))
        self._guest = GuestNetwork((interface,), routes, host_nameservers())

    # -- wiring --------------------------------------------------------------------------------
    def start_wiring(self) -> None:
        """Wire the namespace in the background (its tap must exist: QEMU was launched)."""
        if self.mode == "none":
            self._wired.set()
            return
        threading.Thread(target=self._wire, daemon=True, name="net-wire").start()

    def _wire(self) -> None:
        try:
            if self.mode == "bridge":
                self._wire_routed()
            else:
                self._wire_joined()
        except BaseException as exc:
            self._wire_error = exc
        finally:
            self._wired.set()

    def wait_wired(self, timeout: float = WIRE_TIMEOUT) -> None:
        if not self._wired.wait(timeout):
            raise NetworkError(f"wiring the sandbox's network took more than {timeout:g} s")
        error = self._wire_error
        if isinstance(error, HakoError):
            raise error
        if error is not None:
            raise NetworkError(f"cannot wire the sandbox's network: {error}") from error

    def guest(self) -> GuestNetwork:
        """The guest's configuration (for a joined namespace: read off its veth, once wired)."""
        if self.mode == "joined":
            self.wait_wired()
        return self._guest

    def _wire_routed(self) -> None:
        from pyroute2 import IPRoute

        assert self.address is not None
        peer = host.veth_name(self.sandbox_id)
        host.ensure_host()
        host_fd = netns.current()
        try:
            with netns.entered(self.netns_fd):
                inside = IPRoute()
            try:
                inside.link(
                    "add",
                    ifname=VETH,
                    kind="veth",
                    address=mac_for(self.address),
                    peer={"ifname": peer, "net_ns_fd": host_fd},
                )
                _redirect_both_ways(inside, VETH, netns.TAP_NAME)
            finally:
                inside.close()
            with IPRoute() as outside:
                host.connect_veth(outside, peer, self.address)
        finally:
            os.close(host_fd)

    def _wire_joined(self) -> None:
        from pyroute2 import IPRoute

        with netns.entered(self.netns_fd):
            inside = IPRoute()
        try:
            link = _uplink(inside)
            name = link.get_attr("IFLA_IFNAME")
            index = link["index"]
            addresses = tuple(
                (str(a.get_attr("IFA_ADDRESS")), int(a["prefixlen"]))
                for a in inside.get_addr(index=index)
                if a["scope"] == 0  # global: the kernel makes link-local ones itself
            )
            interface = GuestInterface(
                GUEST_DEVICE, str(link.get_attr("IFLA_ADDRESS")), int(link.get_attr("IFLA_MTU")), addresses
            )
            routes = tuple(_routes(inside, index))
            self._veth = str(name)
            _redirect_both_ways(inside, self._veth, netns.TAP_NAME)
        finally:
            inside.close()
        self._guest = GuestNetwork((interface,), routes, ())

    def rewire(self) -> None:
        """Point the filters at a new tap: the VM was replaced (a restore that fell back to a
        boot), and its tap went with the old QEMU."""
        if self.mode == "none":
            return
        self.wait_wired()
        from pyroute2 import IPRoute

        with netns.entered(self.netns_fd):
            inside = IPRoute()
        try:
            _redirect_both_ways(inside, self._veth, netns.TAP_NAME)
        except Exception as exc:
            raise NetworkError(f"cannot wire the new VM's tap: {exc}") from exc
        finally:
            inside.close()

    # -- ports ---------------------------------------------------------------------------------
    def publish(self, mappings: list[host.PortMapping]) -> None:
        if not mappings:
            return
        if self.mode != "bridge" or self.address is None:
            raise NetworkError("publishing ports needs the default network (not --network none)")
        self.wait_wired()
        host.publish(self.holder, self.address, mappings)

    def close(self) -> None:
        """Give back the address and ports, and let go of the namespace (it ends with QEMU)."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "bridge":
            host.release(self.sandbox_id)
        os.close(self.netns_fd)


def _index(ipr: Any, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetworkError(f"network interface {name} not found")
    return int(found[0])


def _redirect_both_ways(ipr: Any, veth: str, tap: str) -> None:
    """tc ingress filters: every frame arriving on one leaves by the other (Kata's tcfilter).
    Filters already there (for a tap that was replaced) are replaced."""
    from pyroute2.netlink.exceptions import NetlinkError

    ends = (_index(ipr, veth), _index(ipr, tap))
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


def _uplink(ipr: Any) -> Any:
    """The joined namespace's own interface: the first one besides the loopback and our tap
    that has an address."""
    for link in ipr.get_links():
        name = link.get_attr("IFLA_IFNAME")
        if name in ("lo", netns.TAP_NAME):
            continue
        if any(a["scope"] == 0 for a in ipr.get_addr(index=link["index"])):
            return link
    raise NetworkError("the network namespace has no interface with an address to give the guest")


def _routes(ipr: Any, index: int) -> list[GuestRoute]:
    """The namespace's main-table routes through ``index``, for the guest; on-link first."""
    found = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            if route.get_attr("RTA_OIF") != index or route["proto"] == 2:  # 2: made by the kernel
                continue
            destination = route.get_attr("RTA_DST")
            target = f"{destination}/{route['dst_len']}" if destination else "default"
            gateway = str(route.get_attr("RTA_GATEWAY") or "")
            source = str(route.get_attr("RTA_PREFSRC") or "")
            found.append(GuestRoute(target, gateway=gateway, source=source))
    return sorted(found, key=lambda r: r.gateway != "")
