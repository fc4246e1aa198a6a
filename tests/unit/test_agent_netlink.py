"""The agent's rtnetlink client and network configuration, over a fake kernel (no root).

tests/root/test_agent_network.py runs the same code against the real kernel.
"""

from __future__ import annotations

import errno
import re
import socket
import struct
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from hako_agent import netlink
from hako_agent.errors import InvalidArgument
from hako_agent.netlink import (
    ATTR,
    HEADER,
    IFADDRMSG,
    IFINFOMSG,
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_CAPPED,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    RTMSG,
    Message,
    Netlink,
    attr,
    check_ack,
    encode,
    parse_attrs,
    parse_messages,
)
from hako_agent.network import Interface, IPAddress, Route, configure, parse_prefix
from hako_agent.service import AgentService
from hako_api import agent_pb2
from hako_ttrpc import CallContext

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

EXTACK_GATEWAY = b"Nexthop has invalid gateway\0"


def ack(seq: int, error: int = 0, extack: bytes = b"", request: bytes = b"") -> bytes:
    """An NLMSG_ERROR as the kernel sends it: capped (the request's header only) unless ``request``
    is given, with an extended-ACK message if ``extack``."""
    flags = 0 if request else NLM_F_CAPPED
    echo = request or HEADER.pack(16, 0, 0, seq, 0)
    tlvs = b""
    if extack:
        flags |= NLM_F_ACK_TLVS
        tlvs = attr(netlink.NLMSGERR_ATTR_MSG, extack)
    return encode(NLMSG_ERROR, flags, seq, struct.pack("=i", error) + echo + tlvs)


class FakeKernel(socket.socket):
    """The kernel's end of a netlink socket, faked: each request sent is recorded and answered.

    ``links`` are the links RTM_GETLINK finds; ``refuse`` maps a message type to the errno
    the kernel answers it with (and an extended-ACK text). Answers queued in ``answers``
    before a request are read before its own.
    """

    def __init__(self, links: dict[str, int] | None = None, refuse: dict[int, int] | None = None) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.links = links if links is not None else {"eth0": 2}
        self.refuse = refuse or {}
        self.requests: list[Message] = []
        self.answers: list[bytes] = []

    def send(self, data: ReadableBuffer, flags: int = 0, /) -> int:
        (request,) = parse_messages(bytes(data))
        self.requests.append(request)
        seq = request.seq
        if request.kind == netlink.RTM_GETLINK:
            name = parse_attrs(request.payload[IFINFOMSG.size :])[netlink.IFLA_IFNAME].rstrip(b"\0").decode()
            if name not in self.links:
                self.answers.append(ack(seq, -errno.ENODEV))
                return len(bytes(data))
            info = IFINFOMSG.pack(0, 1, self.links[name], 0, 0) + attr(
                netlink.IFLA_IFNAME, name.encode() + b"\0"
            )
            self.answers.append(encode(netlink.RTM_NEWLINK, 0, seq, info))
        if request.kind in self.refuse:
            self.answers.append(ack(seq, -self.refuse[request.kind], EXTACK_GATEWAY))
        else:
            self.answers.append(ack(seq))
        return len(bytes(data))

    def recv(self, size: int, flags: int = 0, /) -> bytes:
        return self.answers.pop(0)


@pytest.fixture
def kernel() -> Iterator[FakeKernel]:
    with FakeKernel() as fake:
        yield fake


def summary(request: Message) -> str:
    """A request in words, for checking what was asked and in which order."""
    attrs: dict[int, bytes]
    if request.kind in (netlink.RTM_GETLINK, netlink.RTM_SETLINK):
        _family, _type, index, flags, change = IFINFOMSG.unpack_from(request.payload)
        attrs = parse_attrs(request.payload[IFINFOMSG.size :])
        name = attrs.get(netlink.IFLA_IFNAME, b"").rstrip(b"\0").decode()
        if request.kind == netlink.RTM_GETLINK:
            return f"find {name}"
        if change:
            return f"{'up' if flags else 'down'} {index}"
        if netlink.IFLA_ADDRESS in attrs:
            return f"mac {index} {netlink.format_mac(attrs[netlink.IFLA_ADDRESS])}"
        if netlink.IFLA_MTU in attrs:
            return f"mtu {index} {struct.unpack('=I', attrs[netlink.IFLA_MTU])[0]}"
        return f"rename {index} {name}"
    if request.kind == netlink.RTM_NEWADDR:
        family, prefix_len, _flags, _scope, index = IFADDRMSG.unpack_from(request.payload)
        attrs = parse_attrs(request.payload[IFADDRMSG.size :])
        return f"addr {index} {socket.inet_ntop(family, attrs[netlink.IFA_LOCAL])}/{prefix_len}"
    family, dst_len = RTMSG.unpack_from(request.payload)[:2]
    attrs = parse_attrs(request.payload[RTMSG.size :])
    words = [
        f"route {socket.inet_ntop(family, attrs.get(netlink.RTA_DST, bytes(16 if family == 10 else 4)))}"
    ]
    words[0] += f"/{dst_len}"
    if netlink.RTA_GATEWAY in attrs:
        words.append(f"via {socket.inet_ntop(family, attrs[netlink.RTA_GATEWAY])}")
    if netlink.RTA_OIF in attrs:
        words.append(f"dev {struct.unpack('=I', attrs[netlink.RTA_OIF])[0]}")
    return " ".join(words)


# -- encoding and decoding ------------------------------------------------------------------------
def test_attributes_are_padded_to_four_bytes() -> None:
    assert attr(3, b"eth0\0") == struct.pack("=HH", 9, 3) + b"eth0\0" + bytes(3)
    assert attr(4, struct.pack("=I", 1400)) == struct.pack("=HHI", 8, 4, 1400)
    assert attr(1, b"") == struct.pack("=HH", 4, 1)
    for size in range(9):
        assert len(attr(1, bytes(size))) % 4 == 0


def test_request_header() -> None:
    body = IFINFOMSG.pack(0, 0, 7, 1, 1) + attr(3, b"eth1\0")
    data = encode(19, NLM_F_REQUEST | NLM_F_ACK, 42, body)
    assert HEADER.unpack_from(data) == (len(data), 19, NLM_F_REQUEST | NLM_F_ACK, 42, 0)
    assert len(data) == 16 + 16 + 12 and data[16:] == body


def test_parse_messages_splits_a_datagram() -> None:
    first = encode(16, 0, 1, b"abcd")
    second = HEADER.pack(16 + 5, 2, 0, 2, 0) + b"12345" + bytes(3)  # unpadded length, padded data
    messages = parse_messages(first + second)
    assert [(m.kind, m.seq, m.payload) for m in messages] == [(16, 1, b"abcd"), (2, 2, b"12345")]


@pytest.mark.parametrize("data", [HEADER.pack(64, 2, 0, 1, 0) + bytes(8), HEADER.pack(8, 2, 0, 1, 0)])
def test_parse_messages_refuses_a_bad_length(data: bytes) -> None:
    with pytest.raises(OSError, match="netlink: a message of") as caught:
        parse_messages(data)
    assert caught.value.errno == errno.EPROTO


def test_parse_attrs_reads_nested_attributes_and_clears_the_flags() -> None:
    inner = attr(1, b"x") + attr(2, struct.pack("=I", 9))
    data = attr(26 | 0x8000, inner) + attr(3, b"eth0\0")  # NLA_F_NESTED
    attrs = parse_attrs(data)
    assert attrs == {26: inner, 3: b"eth0\0"}
    assert parse_attrs(attrs[26]) == {1: b"x", 2: struct.pack("=I", 9)}
    with pytest.raises(OSError, match="an attribute of 40 bytes"):
        parse_attrs(ATTR.pack(40, 1) + bytes(4))


def test_ack_zero_is_success() -> None:
    (message,) = parse_messages(ack(5))
    check_ack(message, "set link 2 up")


def test_ack_error_names_the_operation() -> None:
    (message,) = parse_messages(ack(5, -errno.EEXIST))
    with pytest.raises(OSError) as caught:
        check_ack(message, "rename link 2 to 'v0'")
    assert caught.value.errno == errno.EEXIST
    assert caught.value.strerror == "rename link 2 to 'v0': File exists"


@pytest.mark.parametrize("echo_request", [False, True])
def test_ack_error_carries_the_extended_ack(echo_request: bool) -> None:
    request = encode(netlink.RTM_NEWROUTE, NLM_F_REQUEST, 5, RTMSG.pack(2, 0, 0, 0, 254, 3, 0, 1, 0))
    (message,) = parse_messages(ack(5, -errno.ENETUNREACH, EXTACK_GATEWAY, request if echo_request else b""))
    with pytest.raises(OSError) as caught:
        check_ack(message, "add route 0.0.0.0/0 via 10.9.9.9")
    assert caught.value.errno == errno.ENETUNREACH
    assert caught.value.strerror == (
        "add route 0.0.0.0/0 via 10.9.9.9: Network is unreachable (Nexthop has invalid gateway)"
    )


# -- requests -------------------------------------------------------------------------------------
def test_request_reads_until_its_own_ack(kernel: FakeKernel) -> None:
    rtnl = Netlink(kernel)
    # What is left of an earlier request's answer (another sequence number) is skipped.
    kernel.answers.append(encode(netlink.RTM_NEWLINK, 0, 99, IFINFOMSG.pack(0, 0, 9, 0, 0)) + ack(99, -1))
    assert rtnl.link_index("eth0") == 2
    assert rtnl.link_index("eth0") == 2
    assert [r.seq for r in kernel.requests] == [1, 2]
    assert all(r.flags == NLM_F_REQUEST | NLM_F_ACK for r in kernel.requests)
    assert kernel.answers == []
    with pytest.raises(OSError) as caught:
        rtnl.link_index("eth9")
    assert (caught.value.errno, caught.value.strerror) == (errno.ENODEV, "find link 'eth9': No such device")


def test_link_requests(kernel: FakeKernel) -> None:
    rtnl = Netlink(kernel)
    rtnl.link_down(2)
    rtnl.set_mac(2, bytes.fromhex("02aabbccddee"))
    rtnl.set_mtu(2, 1400)
    rtnl.rename(2, "eth1")
    rtnl.link_up(2)
    assert {r.kind for r in kernel.requests} == {netlink.RTM_SETLINK}
    assert [IFINFOMSG.unpack_from(r.payload) for r in kernel.requests] == [
        (0, 0, 2, 0, 1),
        (0, 0, 2, 0, 0),
        (0, 0, 2, 0, 0),
        (0, 0, 2, 0, 0),
        (0, 0, 2, 1, 1),
    ]
    assert [r.payload[IFINFOMSG.size :] for r in kernel.requests[1:4]] == [
        attr(netlink.IFLA_ADDRESS, bytes.fromhex("02aabbccddee")),
        attr(netlink.IFLA_MTU, struct.pack("=I", 1400)),
        attr(netlink.IFLA_IFNAME, b"eth1\0"),
    ]


def test_address_requests(kernel: FakeKernel) -> None:
    rtnl = Netlink(kernel)
    v4, brd = socket.inet_aton("10.88.0.5"), socket.inet_aton("10.88.255.255")
    v6 = socket.inet_pton(socket.AF_INET6, "fd00::5")
    rtnl.add_address(2, v4, 16, brd)
    rtnl.add_address(3, v6, 64)
    first, second = kernel.requests
    assert first.kind == second.kind == netlink.RTM_NEWADDR
    assert first.flags == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    v4_attrs = attr(netlink.IFA_LOCAL, v4) + attr(netlink.IFA_ADDRESS, v4) + attr(netlink.IFA_BROADCAST, brd)
    assert first.payload == IFADDRMSG.pack(socket.AF_INET, 16, 0, 0, 2) + v4_attrs
    v6_attrs = attr(netlink.IFA_LOCAL, v6) + attr(netlink.IFA_ADDRESS, v6)  # no DAD: usable at once
    assert second.payload == IFADDRMSG.pack(socket.AF_INET6, 64, netlink.IFA_F_NODAD, 0, 3) + v6_attrs


def test_route_requests(kernel: FakeKernel) -> None:
    rtnl = Netlink(kernel)
    gateway, source = socket.inet_aton("169.254.1.1"), socket.inet_aton("10.88.0.5")
    rtnl.add_route(bytes(4), 0, gateway, 2, source)
    rtnl.add_route(gateway, 32, b"", 2)
    rtnl.add_route(socket.inet_pton(socket.AF_INET6, "fd00::"), 64, b"", 2)
    default, onlink, v6 = kernel.requests
    assert default.flags == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    oif = attr(netlink.RTA_OIF, struct.pack("=I", 2))
    # main table, proto boot, scope universe, unicast; no RTA_DST for a default route
    rtmsg = RTMSG.pack(socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0)
    assert default.payload == rtmsg + attr(netlink.RTA_GATEWAY, gateway) + oif + attr(
        netlink.RTA_PREFSRC, source
    )
    assert RTMSG.unpack_from(onlink.payload)[6] == netlink.RT_SCOPE_LINK
    assert onlink.payload[RTMSG.size :] == attr(netlink.RTA_DST, gateway) + oif
    assert RTMSG.unpack_from(v6.payload)[6] == netlink.RT_SCOPE_UNIVERSE


def test_refusal_names_the_route(kernel: FakeKernel) -> None:
    kernel.refuse[netlink.RTM_NEWROUTE] = errno.ENETUNREACH
    rtnl = Netlink(kernel)
    with pytest.raises(OSError) as caught:
        rtnl.add_route(socket.inet_aton("10.9.0.0"), 16, socket.inet_aton("10.77.0.1"), 2)
    assert caught.value.strerror == (
        "add route 10.9.0.0/16 via 10.77.0.1 on link 2: Network is unreachable (Nexthop has invalid gateway)"
    )


# -- network.configure ----------------------------------------------------------------------------
def test_configure_order(kernel: FakeKernel) -> None:
    kernel.links = {"v1": 2, "v3": 3, "eth0": 2}
    interfaces = [
        Interface(
            "v1", "eth0", "02:42:AC:11:00:05", 1400, [IPAddress("10.88.0.5", 16), IPAddress("fd00::5", 64)]
        ),
        Interface("v3"),
    ]
    routes = [
        Route("default", "169.254.1.1", "eth0"),
        Route("169.254.1.1", "", "eth0"),
        Route("", "fd00::1"),
        Route("10.99.0.0/16", "", "v3", "10.88.0.5"),
    ]
    configure(interfaces, routes, rtnl=Netlink(kernel))
    assert [summary(r) for r in kernel.requests] == [
        "find v1",
        "find v3",  # every device is found before any changes
        "down 2",
        "mac 2 02:42:ac:11:00:05",
        "mtu 2 1400",
        "rename 2 eth0",
        "addr 2 10.88.0.5/16",
        "addr 2 fd00::5/64",
        "up 2",
        "down 3",
        "up 3",
        # on-link routes first, then those through a gateway, each in the host's order
        "find eth0",
        "route 169.254.1.1/32 dev 2",
        "find v3",
        "route 10.99.0.0/16 dev 3",
        "find eth0",
        "route 0.0.0.0/0 via 169.254.1.1 dev 2",
        "route ::/0 via fd00::1",
    ]
    broadcast = parse_attrs(kernel.requests[6].payload[IFADDRMSG.size :])[netlink.IFA_BROADCAST]
    assert socket.inet_ntoa(broadcast) == "10.88.255.255"
    assert netlink.IFA_BROADCAST not in parse_attrs(kernel.requests[7].payload[IFADDRMSG.size :])
    source_route = parse_attrs(kernel.requests[14].payload[RTMSG.size :])
    assert source_route[netlink.RTA_PREFSRC] == socket.inet_aton("10.88.0.5")


def test_configure_nothing_sends_nothing(kernel: FakeKernel) -> None:
    configure([], [], rtnl=Netlink(kernel))
    assert kernel.requests == []


@pytest.mark.parametrize(
    ("interface", "message"),
    [
        (Interface(""), "interfaces[0].device: missing"),
        (Interface("eth0", name="a/b"), "interfaces[0].name: 'a/b' is not a link name"),
        (Interface("eth0", name="x" * 16), "interfaces[0].name: 'xxxxxxxxxxxxxxxx' is not a link name"),
        (Interface("eth0", name=".."), "interfaces[0].name: '..' is not a link name"),
        (Interface("eth 0"), "interfaces[0].device: 'eth 0' is not a link name"),
        (Interface("eth0", hw_addr="02:42:ac:11:00"), "interfaces[0].hw_addr: '02:42:ac:11:00' is not a MAC"),
        (
            Interface("eth0", hw_addr="02:42:ac:11:00:zz"),
            "interfaces[0].hw_addr: '02:42:ac:11:00:zz' is not a MAC",
        ),
        (
            Interface("eth0", hw_addr="+2:42:ac:11:00:05"),
            "interfaces[0].hw_addr: '+2:42:ac:11:00:05' is not a",
        ),
        (Interface("eth0", hw_addr="0242ac110005"), "interfaces[0].hw_addr: '0242ac110005' is not a MAC"),
        (
            Interface("eth0", hw_addr="01:00:5e:00:00:01"),
            "interfaces[0].hw_addr: 01:00:5e:00:00:01 is not a unicast",
        ),
        (
            Interface("eth0", hw_addr="00:00:00:00:00:00"),
            "interfaces[0].hw_addr: 00:00:00:00:00:00 is not a unicast",
        ),
        (Interface("eth0", mtu=67), "interfaces[0].mtu: 67 is not in 68..65535"),
        (Interface("eth0", mtu=65536), "interfaces[0].mtu: 65536 is not in 68..65535"),
        (
            Interface("eth0", addresses=[IPAddress("10.0.0.5", 24), IPAddress("10.0.0.1/24", 24)]),
            "interfaces[0].addresses[1].address: '10.0.0.1/24' is not an IPv4 or IPv6 address",
        ),
        (
            Interface("eth0", addresses=[IPAddress("10.1", 8)]),
            "interfaces[0].addresses[0].address: '10.1' is not",
        ),
        (
            Interface("eth0", addresses=[IPAddress("fe80::1%eth0", 64)]),
            "interfaces[0].addresses[0].address: 'fe80::1%eth0'",
        ),
        (Interface("eth0", addresses=[IPAddress("", 8)]), "interfaces[0].addresses[0].address: '' is not"),
        (
            Interface("eth0", addresses=[IPAddress("10.0.0.5", 0)]),
            "interfaces[0].addresses[0].prefix_len: 0 is not in 1..32",
        ),
        (
            Interface("eth0", addresses=[IPAddress("10.0.0.5", 33)]),
            "interfaces[0].addresses[0].prefix_len: 33 is not in 1..32",
        ),
        (
            Interface("eth0", addresses=[IPAddress("fd00::5", 129)]),
            "interfaces[0].addresses[0].prefix_len: 129 is not in 1..128",
        ),
    ],
)
def test_bad_interfaces_change_nothing(interface: Interface, message: str, kernel: FakeKernel) -> None:
    with pytest.raises(InvalidArgument, match="^" + re.escape(message)):
        configure([interface], [], rtnl=Netlink(kernel))
    assert kernel.requests == []


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            Route("10.0.0.0/33", "", "eth0"),
            "routes[1].destination: '10.0.0.0/33': the prefix length is not in 0..32",
        ),
        (Route("10.0.0.0/x", "", "eth0"), "routes[1].destination: '10.0.0.0/x': the prefix length"),
        (Route("10.0.0.0/", "", "eth0"), "routes[1].destination: '10.0.0.0/': the prefix length"),
        (
            Route("fd00::/-1", "", "eth0"),
            "routes[1].destination: 'fd00::/-1': the prefix length is not in 0..128",
        ),
        (
            Route("10.0.0.1/8", "", "eth0"),
            "routes[1].destination: '10.0.0.1/8' has bits set beyond its prefix",
        ),
        (Route("10.0.0/8", "", "eth0"), "routes[1].destination: '10.0.0' is not an IPv4 or IPv6 address"),
        (Route("10.0.0.0/8", "10.0.0.300"), "routes[1].gateway: '10.0.0.300' is not an IPv4 or IPv6 address"),
        (Route("10.0.0.0/8", "fd00::1"), "routes[1].gateway: fd00::1 is an IPv6 address, for an IPv4 route"),
        (
            Route("default", "fd00::1", "", "10.0.0.5"),
            "routes[1].source: 10.0.0.5 is an IPv4 address, for an IPv6",
        ),
        (
            Route("default", "", "eth0", "fd00::5x"),
            "routes[1].source: 'fd00::5x' is not an IPv4 or IPv6 address",
        ),
        (Route("10.0.0.0/8"), "routes[1].device: missing, and a route without a gateway needs one"),
        (Route("10.0.0.0/8", "", "e/0"), "routes[1].device: 'e/0' is not a link name"),
    ],
)
def test_bad_routes_change_nothing(route: Route, message: str, kernel: FakeKernel) -> None:
    with pytest.raises(InvalidArgument, match="^" + re.escape(message)):
        configure([Interface("eth0")], [Route("default", "10.0.0.1"), route], rtnl=Netlink(kernel))
    assert kernel.requests == []


def test_destinations(kernel: FakeKernel) -> None:
    assert parse_prefix("fd00::/64", "d") == (socket.inet_pton(socket.AF_INET6, "fd00::"), 64)
    assert parse_prefix("10.0.0.1", "d") == (socket.inet_aton("10.0.0.1"), 32)  # a host route
    assert parse_prefix("0.0.0.0/0", "d") == (bytes(4), 0)
    # "default" and "": the gateway's family, else the source's, else IPv4
    routes = [Route("", "", "eth0", "fd00::5"), Route("default", "", "eth0"), Route("default", "fd00::1")]
    configure([], routes, rtnl=Netlink(kernel))
    assert [summary(r) for r in kernel.requests if r.kind == netlink.RTM_NEWROUTE] == [
        "route ::/0 dev 2",
        "route 0.0.0.0/0 dev 2",
        "route ::/0 via fd00::1",
    ]


def test_unknown_device_changes_nothing(kernel: FakeKernel) -> None:
    kernel.links = {"eth0": 2}
    with pytest.raises(InvalidArgument, match="^interfaces\\[1\\].device: find link 'eth1': No such device$"):
        configure([Interface("eth0", mtu=1400), Interface("eth1")], [], rtnl=Netlink(kernel))
    assert [summary(r) for r in kernel.requests] == ["find eth0", "find eth1"]


def test_kernel_refusal_names_the_field(kernel: FakeKernel) -> None:
    kernel.refuse[netlink.RTM_NEWROUTE] = errno.ENETUNREACH
    with pytest.raises(InvalidArgument) as caught:
        configure([], [Route("default", "10.0.0.1"), Route("10.9.0.0/16", "10.77.0.1")], rtnl=Netlink(kernel))
    assert str(caught.value) == (
        "routes[0]: add route 0.0.0.0/0 via 10.0.0.1: Network is unreachable (Nexthop has invalid gateway)"
    )


def test_kernel_refusal_of_a_link_change(kernel: FakeKernel) -> None:
    kernel.refuse[netlink.RTM_SETLINK] = errno.EBUSY
    with pytest.raises(InvalidArgument, match="^interfaces\\[0\\]: set link 2 down: Device or resource busy"):
        configure([Interface("eth0")], [], rtnl=Netlink(kernel))


# -- the service's conversion ---------------------------------------------------------------------
class RecordingSandbox:
    def __init__(self) -> None:
        self.setup_args: tuple[Any, ...] = ()

    def setup(self, *args: Any) -> None:
        self.setup_args = args


def test_service_converts_interfaces_and_routes() -> None:
    sandbox = RecordingSandbox()
    service = AgentService(sandbox=sandbox)  # type: ignore[arg-type]
    request = agent_pb2.CreateSandboxRequest(
        sandbox_id="sb",
        interfaces=[
            agent_pb2.Interface(
                device="eth0",
                name="eth1",
                hw_addr="02:42:ac:11:00:05",
                mtu=1400,
                addresses=[agent_pb2.IPAddress(address="10.88.0.5", prefix_len=16)],
            )
        ],
        routes=[
            agent_pb2.Route(destination="default", gateway="10.88.0.1", device="eth1", source="10.88.0.5")
        ],
    )
    service.CreateSandbox(
        request, CallContext("hako.agent.v1.Agent", "CreateSandbox", {}, None, threading.Event(), 1)
    )
    interfaces, routes = sandbox.setup_args[4:]
    (interface,) = interfaces
    assert isinstance(interface, Interface)
    assert (interface.device, interface.name, interface.mtu) == ("eth0", "eth1", 1400)
    assert interface.hw_addr == "02:42:ac:11:00:05"
    assert [(a.address, a.prefix_len) for a in interface.addresses] == [("10.88.0.5", 16)]
    (route,) = routes
    assert isinstance(route, Route)
    assert (route.destination, route.gateway) == ("default", "10.88.0.1")
    assert (route.device, route.source) == ("eth1", "10.88.0.5")


class IdentifyingSandbox:
    def __init__(self) -> None:
        self.identified: tuple[Any, ...] = ()

    def identify(self, *args: Any) -> None:
        self.identified = args


def test_a_pooled_sandbox_takes_a_pods_hostname_and_network() -> None:
    """UpdateSandbox: what CreateSandbox gives, again, for a sandbox a pod took from the pool."""
    sandbox = IdentifyingSandbox()
    service = AgentService(sandbox=sandbox)  # type: ignore[arg-type]
    request = agent_pb2.UpdateSandboxRequest(
        hostname="web-1",
        dns=["10.96.0.10"],
        interfaces=[
            agent_pb2.Interface(
                device="eth0",
                hw_addr="0a:58:0a:d4:00:07",
                mtu=1500,
                addresses=[agent_pb2.IPAddress(address="10.212.0.7", prefix_len=24)],
            )
        ],
        routes=[agent_pb2.Route(destination="default", gateway="10.212.0.1")],
    )
    service.UpdateSandbox(
        request, CallContext("hako.agent.v1.Agent", "UpdateSandbox", {}, None, threading.Event(), 1)
    )
    hostname, dns, (interface,), (route,) = sandbox.identified
    assert (hostname, dns) == ("web-1", ["10.96.0.10"])
    assert isinstance(interface, Interface) and interface.hw_addr == "0a:58:0a:d4:00:07"
    assert [(a.address, a.prefix_len) for a in interface.addresses] == [("10.212.0.7", 24)]
    assert isinstance(route, Route) and (route.destination, route.gateway) == ("default", "10.212.0.1")
