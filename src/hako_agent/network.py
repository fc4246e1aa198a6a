"""The guest's network, as the host asks for it in CreateSandbox.

The host gives each sandbox VM a virtio-net NIC attached to a network namespace on
the host, and redirects traffic between the NIC's tap and that namespace's veth
(Kata's "tcfilter" model). The guest NIC must therefore carry the veth's identity:
its MAC, MTU, addresses and routes, which the host copies into the request.

Everything is checked before anything changes. Then each interface is taken down
(a rename needs it down), given its MAC, MTU, name and addresses, and brought up;
then the routes are added, on-link routes first, since a gateway must be reachable
when its route is added. A value the kernel refuses fails the call half-applied:
the host destroys a sandbox whose setup failed. Errors are :class:`InvalidArgument`
naming the field (``interfaces[0].hw_addr: ...``). The loopback is not configured
here: PID 1 brings it up at boot.
"""

from __future__ import annotations

import socket

from hako_agent import log
from hako_agent.errors import InvalidArgument
from hako_agent.netlink import Netlink

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import TypeVar

    T = TypeVar("T")

_HEX = frozenset("0123456789abcdefABCDEF")
_MIN_MTU = 68  # the least IPv4 allows
_MAX_MTU = 65535
_IFNAMSIZ = 16  # with the terminating NUL


class IPAddress:
    """An address of an interface (agent.proto's IPAddress)."""

    __slots__ = ("address", "prefix_len")

    def __init__(self, address: str, prefix_len: int) -> None:
        self.address = address
        self.prefix_len = prefix_len


class Interface:
    """A guest link to configure (agent.proto's Interface): "" or 0 keeps a setting."""

    __slots__ = ("addresses", "device", "hw_addr", "mtu", "name")

    def __init__(
        self,
        device: str,
        name: str = "",
        hw_addr: str = "",
        mtu: int = 0,
        addresses: Sequence[IPAddress] = (),
    ) -> None:
        self.device = device
        self.name = name
        self.hw_addr = hw_addr
        self.mtu = mtu
        self.addresses = addresses


class Route:
    """A route of the main table (agent.proto's Route)."""

    __slots__ = ("destination", "device", "gateway", "source")

    def __init__(self, destination: str, gateway: str = "", device: str = "", source: str = "") -> None:
        self.destination = destination
        self.gateway = gateway
        self.device = device
        self.source = source


class _Address:
    """An address, checked: packed, with the IPv4 broadcast ``ip addr add ... brd +`` would give."""

    __slots__ = ("address", "broadcast", "field", "prefix_len")

    def __init__(self, field: str, address: bytes, prefix_len: int, broadcast: bytes) -> None:
        self.field = field
        self.address = address
        self.prefix_len = prefix_len
        self.broadcast = broadcast


class _Link:
    """An interface, checked: its MAC as bytes, its addresses packed."""

    __slots__ = ("addresses", "device", "field", "mac", "mtu", "name")

    def __init__(
        self, field: str, device: str, name: str, mac: bytes, mtu: int, addresses: list[_Address]
    ) -> None:
        self.field = field
        self.device = device
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.addresses = addresses


class _Route:
    """A route, checked: addresses packed, the destination split into address and prefix length."""

    __slots__ = ("destination", "device", "field", "gateway", "prefix_len", "source")

    def __init__(
        self, field: str, destination: bytes, prefix_len: int, gateway: bytes, device: str, source: bytes
    ) -> None:
        self.field = field
        self.destination = destination
        self.prefix_len = prefix_len
        self.gateway = gateway
        self.device = device
        self.source = source


def configure(
    interfaces: Sequence[Interface], routes: Sequence[Route], *, rtnl: Netlink | None = None
) -> None:
    """Configure the interfaces, then add the routes (see the module docstring for the order).

    ``rtnl`` is for tests (a Netlink over a fake kernel); by default one is opened and closed here.
    """
    links = [_check_interface(interface, f"interfaces[{i}]") for i, interface in enumerate(interfaces)]
    paths = [_check_route(route, f"routes[{i}]") for i, route in enumerate(routes)]
    paths.sort(key=lambda path: bool(path.gateway))  # on-link first; stable, so in the host's order
    nl = rtnl if rtnl is not None else Netlink()
    try:
        # Every device is looked up before any is renamed: an unknown one changes nothing.
        indexes = [_apply(f"{link.field}.device", nl.link_index, link.device) for link in links]
        for link, index in zip(links, indexes, strict=True):
            _configure_link(nl, index, link)
        for path in paths:
            _add_route(nl, path)
    finally:
        if rtnl is None:
            nl.close()
    log.info(f"network: {len(links)} interface(s) configured, {len(paths)} route(s) added")


def _configure_link(nl: Netlink, index: int, link: _Link) -> None:
    _apply(link.field, nl.link_down, index)
    if link.mac:
        _apply(f"{link.field}.hw_addr", nl.set_mac, index, link.mac)
    if link.mtu:
        _apply(f"{link.field}.mtu", nl.set_mtu, index, link.mtu)
    if link.name and link.name != link.device:
        _apply(f"{link.field}.name", nl.rename, index, link.name)
    for address in link.addresses:
        _apply(address.field, nl.add_address, index, address.address, address.prefix_len, address.broadcast)
    _apply(link.field, nl.link_up, index)


def _add_route(nl: Netlink, path: _Route) -> None:
    index = _apply(f"{path.field}.device", nl.link_index, path.device) if path.device else 0
    _apply(path.field, nl.add_route, path.destination, path.prefix_len, path.gateway, index, path.source)


def _apply(field: str, operation: Callable[..., T], *args: object) -> T:
    """Run one netlink operation; the kernel's refusal becomes InvalidArgument naming the field."""
    try:
        return operation(*args)
    except OSError as exc:
        raise InvalidArgument(f"{field}: {exc.strerror}") from None


# -- checks ---------------------------------------------------------------------------------------
def _check_interface(interface: Interface, field: str) -> _Link:
    check_ifname(interface.device, f"{field}.device")
    if interface.name:
        check_ifname(interface.name, f"{field}.name")
    mac = parse_mac(interface.hw_addr, f"{field}.hw_addr") if interface.hw_addr else b""
    if interface.mtu and not _MIN_MTU <= interface.mtu <= _MAX_MTU:
        raise InvalidArgument(f"{field}.mtu: {interface.mtu} is not in {_MIN_MTU}..{_MAX_MTU}")
    addresses = [_check_address(a, f"{field}.addresses[{j}]") for j, a in enumerate(interface.addresses)]
    return _Link(field, interface.device, interface.name, mac, interface.mtu, addresses)


def _check_address(address: IPAddress, field: str) -> _Address:
    packed = parse_ip(address.address, f"{field}.address")
    bits = len(packed) * 8
    if not 1 <= address.prefix_len <= bits:
        raise InvalidArgument(f"{field}.prefix_len: {address.prefix_len} is not in 1..{bits}")
    broadcast = b""
    if bits == 32 and address.prefix_len <= 30:  # /31 and /32 have no broadcast address
        host = (1 << (32 - address.prefix_len)) - 1
        broadcast = (int.from_bytes(packed, "big") | host).to_bytes(4, "big")
    return _Address(field, packed, address.prefix_len, broadcast)


def _check_route(route: Route, field: str) -> _Route:
    gateway = parse_ip(route.gateway, f"{field}.gateway") if route.gateway else b""
    source = parse_ip(route.source, f"{field}.source") if route.source else b""
    if route.destination in ("", "default"):
        destination, prefix_len = bytes(len(gateway or source or bytes(4))), 0
    else:
        destination, prefix_len = parse_prefix(route.destination, f"{field}.destination")
    for name, text, value in (("gateway", route.gateway, gateway), ("source", route.source, source)):
        if value and len(value) != len(destination):
            family = _version(destination)
            raise InvalidArgument(
                f"{field}.{name}: {text} is an {_version(value)} address, for an {family} route"
            )
    if route.device:
        check_ifname(route.device, f"{field}.device")
    elif not gateway:
        raise InvalidArgument(f"{field}.device: missing, and a route without a gateway needs one")
    return _Route(field, destination, prefix_len, gateway, route.device, source)


def _version(packed: bytes) -> str:
    return "IPv4" if len(packed) == 4 else "IPv6"


def check_ifname(name: str, field: str) -> None:
    """The kernel's rules for a link name (dev_valid_name)."""
    if not name:
        raise InvalidArgument(f"{field}: missing")
    if len(name.encode()) >= _IFNAMSIZ or name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise InvalidArgument(
            f"{field}: {name!r} is not a link name (at most 15 bytes, no '/', ':' or space)"
        )


def parse_mac(text: str, field: str) -> bytes:
    """'aa:bb:cc:dd:ee:ff' -> 6 bytes; it must be a unicast address, which the kernel requires of a NIC."""
    parts = text.split(":")
    if len(parts) != 6 or any(len(part) != 2 or not set(part) <= _HEX for part in parts):
        raise InvalidArgument(f"{field}: {text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    mac = bytes.fromhex("".join(parts))
    if mac[0] & 1 or not any(mac):
        raise InvalidArgument(f"{field}: {text} is not a unicast MAC address")
    return mac


def parse_ip(text: str, field: str) -> bytes:
    """An IPv4 or IPv6 address -> 4 or 16 bytes (socket.inet_pton: strict, and cheaper than ipaddress)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except OSError:
        raise InvalidArgument(f"{field}: {text!r} is not an IPv4 or IPv6 address") from None


def parse_prefix(text: str, field: str) -> tuple[bytes, int]:
    """'10.0.0.0/8' -> (packed address, 8); an address alone is a host route (/32, /128)."""
    address, slash, length = text.partition("/")
    packed = parse_ip(address, field)
    bits = len(packed) * 8
    if not slash:
        return packed, bits
    if not (length.isascii() and length.isdigit() and int(length) <= bits):
        raise InvalidArgument(f"{field}: {text!r}: the prefix length is not in 0..{bits}")
    prefix_len = int(length)
    if int.from_bytes(packed, "big") & ((1 << (bits - prefix_len)) - 1):
        raise InvalidArgument(f"{field}: {text!r} has bits set beyond its prefix length")
    return packed, prefix_len
