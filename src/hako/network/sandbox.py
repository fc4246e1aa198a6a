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
by a short-lived process of their own (:mod:`hako.network.wire`), and a container is created
only once they are in place (``wait_wired``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any

from hako.errors import HakoError, NetworkError
from hako.network import host, netns, records

MODES = ("bridge", "none")
GUEST_DEVICE = "eth0"  # the guest's NIC, as its kernel names it
VETH = "eth0"  # the veth's end in the sandbox's namespace (bridge mode)
WIRE_TIMEOUT = 30.0


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
        self._moved = False  # the tap was moved into this (joined) namespace: see move_into
        self._closed = False

    @property
    def owns_namespace(self) -> bool:
        """The namespace is this sandbox's own, and ends with it (not a joined one)."""
        return self.mode != "joined"

    @classmethod
    def create(cls, sandbox_id: str, mode: str) -> SandboxNetwork:
        """A new namespace for a sandbox; in bridge mode, with its address leased. ``ns:PATH``
        joins the namespace at PATH instead (:meth:`join`)."""
        if mode.startswith("ns:"):
            return cls.join(sandbox_id, mode[3:])
        if mode not in MODES:
            raise NetworkError(f"network mode {mode!r}: use one of {', '.join(MODES)} or ns:PATH")
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

    def move_into(self, netns_fd: int) -> None:
        """Move the VM's tap from this network's own namespace (mode ``none``) into the one
        ``netns_fd`` is (it is this network's now), made and configured by someone else (a
        pod's, by containerd's CNI), and wire it there, in the background: a pooled VM that a
        pod took (:mod:`hako.shim.pooled`). The guest is then given the pod's addresses
        (:meth:`guest`, once wired).

        This runs :mod:`hako.network.wire` in this process, on a thread of its own (network
        namespaces are per thread): the pooled daemons' filler imported pyroute2 before it
        forked them, so they share it, and the pod's first container does not wait for a
        process to start and import it (the wiring took 200-340 ms that way, measured)."""
        if self.mode != "none":
            raise NetworkError(f"only a sandbox of network none can move into a pod's, not {self.mode}")
        own, self.netns_fd, self.mode = self.netns_fd, netns_fd, "joined"
        self._moved = True
        self._wired.clear()
        threading.Thread(target=self._wire, args=(own,), daemon=True, name="net-move").start()

    def _wire(self, tap_from: int | None = None) -> None:
        try:
            if self.mode == "bridge":
                assert self.address is not None
                self._run_wire("routed", "--sandbox-id", self.sandbox_id, "--address", str(self.address))
            elif tap_from is not None:
                from pyroute2.netlink.exceptions import NetlinkError

                from hako.network import wire

                try:
                    answer = wire.joined(self.netns_fd, tap_from)
                except (OSError, NetlinkError) as exc:
                    raise NetworkError(f"cannot wire the pod's network namespace: {exc}") from exc
                finally:
                    os.close(tap_from)  # the namespace ends with QEMU, which still runs in it
                self._veth = str(answer["veth"])
                self._guest = guest_network(answer["guest"])
            else:
                answer = self._run_wire("joined")
                self._veth = str(answer["veth"])
                self._guest = guest_network(answer["guest"])
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

    def rewire(self) -> None:
        """Point the filters at a new tap: the VM was replaced (a restore that fell back to a
        boot), and its tap went with the old QEMU."""
        if self.mode == "none":
            return
        self.wait_wired()
        self._run_wire("rewire", "--veth", self._veth)

    def _run_wire(self, *args: str) -> dict[str, Any]:
        """Run :mod:`hako.network.wire` on the namespace: pyroute2 is loaded by that short-lived
        process, not by the one that holds the sandbox for its whole life (12 MiB each)."""
        argv = [sys.executable, "-m", "hako.network.wire", "--netns-fd", str(self.netns_fd), *args]
        result = subprocess.run(argv, capture_output=True, text=True, pass_fds=(self.netns_fd,), check=False)
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            raise NetworkError(lines[-1] if lines else f"{argv[3]} exited with status {result.returncode}")
        answer: dict[str, Any] = json.loads(result.stdout or "{}")
        return answer

    # -- ports ---------------------------------------------------------------------------------
    def publish(self, mappings: list[host.PortMapping]) -> None:
        if not mappings:
            return
        if self.mode != "bridge" or self.address is None:
            raise NetworkError("publishing ports needs the default network (not --network none)")
        self.wait_wired()
        host.publish(self.holder, self.address, mappings)

    def close(self) -> None:
        """Give back the address and ports, and let go of the namespace (it ends with QEMU). A
        tap moved into a pod's namespace, which outlives the sandbox, is deleted."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "bridge":
            host.release(self.sandbox_id)
        if self._moved:
            from pyroute2.netlink.exceptions import NetlinkError

            from hako.network import wire

            with contextlib.suppress(OSError, NetlinkError, HakoError):
                wire.remove_tap(self.netns_fd)
        os.close(self.netns_fd)


def guest_network(data: dict[str, Any]) -> GuestNetwork:
    """A GuestNetwork from its JSON form (``dataclasses.asdict``)."""
    interfaces = tuple(
        GuestInterface(i["device"], i["hw_addr"], i["mtu"], tuple((a, n) for a, n in i["addresses"]))
        for i in data.get("interfaces", [])
    )
    routes = tuple(GuestRoute(**r) for r in data.get("routes", []))
    return GuestNetwork(interfaces, routes, tuple(data.get("dns", [])))
