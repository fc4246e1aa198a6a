"""A small rtnetlink client: the few requests that configure the guest's network.

The guest image has no pyroute2, and every import costs boot time under emulation,
so this speaks NETLINK_ROUTE with ``socket`` and ``struct`` alone. Each request
carries a fresh sequence number and NLM_F_ACK; :meth:`Netlink.request` reads until
the kernel's acknowledgement of that sequence number, and a refusal raises
:class:`OSError` with the errno, the operation, its object and, where the kernel
gives one, its extended-ACK text ("... Network is unreachable (Nexthop has invalid gateway)").

On the wire (host byte order; every part padded to 4 bytes)::

    message    nlmsghdr (len, type, flags, seq, pid) | family header | attributes
    attribute  rtattr (len, type) | value | padding   (len counts header and value)

Family headers: ifinfomsg (links), ifaddrmsg (addresses), rtmsg (routes). The
encoders and decoders below are pure functions, tested without root.
"""

from __future__ import annotations

import os
import socket
import struct

# linux/netlink.h
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # on NLMSG_ERROR: only the request's header is echoed
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR: extended-ACK attributes follow the echo
NLMSGERR_ATTR_MSG = 1
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

# linux/rtnetlink.h, if_link.h, if_addr.h
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_SETLINK = 19
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
IFA_F_NODAD = 0x02
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
IFF_UP = 0x1

ENODEV = 19
EPROTO = 71

HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
ATTR = struct.Struct("=HH")  # rtattr: len, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBi")  # family, prefix length, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst len, src len, tos, table, protocol, scope, type, flags
_ERROR = struct.Struct("=i")
_U32 = struct.Struct("=I")
_RECV_SIZE = 65536


def align(size: int) -> int:
    return (size + 3) & ~3


def attr(kind: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    size = ATTR.size + len(value)
    return ATTR.pack(size, kind) + value + bytes(align(size) - size)


def encode(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One request; ``body`` (family header and attributes) is a multiple of 4 bytes."""
    return HEADER.pack(HEADER.size + len(body), kind, flags, seq, 0) + body


class Message:
    """One message from the kernel, its header unpacked."""

    __slots__ = ("flags", "kind", "payload", "seq")

    def __init__(self, kind: int, flags: int, seq: int, payload: bytes) -> None:
        self.kind = kind
        self.flags = flags
        self.seq = seq
        self.payload = payload


def parse_messages(data: bytes) -> list[Message]:
    """Split a datagram from the kernel into its messages."""
    messages = []
    offset = 0
    while offset + HEADER.size <= len(data):
        size, kind, flags, seq, _pid = HEADER.unpack_from(data, offset)
        if size < HEADER.size or offset + size > len(data):
            raise OSError(
                EPROTO, f"netlink: a message of {size} bytes at {offset} of a {len(data)}-byte reply"
            )
        messages.append(Message(kind, flags, seq, data[offset + HEADER.size : offset + size]))
        offset += align(size)
    return messages


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """Attributes -> {type: value}, the type without its nested and byte-order flags."""
    attrs = {}
    offset = 0
    while offset + ATTR.size <= len(data):
        size, kind = ATTR.unpack_from(data, offset)
        if size < ATTR.size or offset + size > len(data):
            raise OSError(EPROTO, f"netlink: an attribute of {size} bytes at {offset} of {len(data)}")
        attrs[kind & NLA_TYPE_MASK] = data[offset + ATTR.size : offset + size]
        offset += align(size)
    return attrs


def check_ack(message: Message, what: str) -> None:
    """Raise the refusal an NLMSG_ERROR message carries; return if it is an acknowledgement (0)."""
    (error,) = _ERROR.unpack_from(message.payload)
    if error == 0:
        return
    reason = os.strerror(-error)
    if message.flags & NLM_F_ACK_TLVS:
        # After the error comes the request's header (capped) or the whole request, then the TLVs.
        echoed = HEADER.size if message.flags & NLM_F_CAPPED else HEADER.unpack_from(message.payload, 4)[0]
        text = parse_attrs(message.payload[4 + align(echoed) :]).get(NLMSGERR_ATTR_MSG, b"")
        text = text.rstrip(b"\0")
        if text:
            reason += f" ({text.decode(errors='replace')})"
    raise OSError(-error, f"{what}: {reason}")


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _family(address: bytes) -> int:
    return socket.AF_INET if len(address) == 4 else socket.AF_INET6


def _text(address: bytes) -> str:
    return socket.inet_ntop(_family(address), address)


class Netlink:
    """A NETLINK_ROUTE socket: one request at a time, each acknowledged before the next.

    ``sock`` is for tests (a fake kernel); by default the socket asks for extended ACKs,
    without the request echoed back in errors.
    """

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
            )
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.bind((0, 0))
        self.sock = sock
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> list[Message]:
        """Send one request; the kernel's replies to it, once it acknowledged it (OSError if it refused)."""
        self.seq = self.seq % 0xFFFFFFFF + 1
        seq = self.seq
        self.sock.send(encode(kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, body))
        replies: list[Message] = []
        while True:
            for reply in parse_messages(self.sock.recv(_RECV_SIZE)):
                if reply.seq != seq:
                    continue  # the rest of an answer to a request that failed before reading it all
                if reply.kind == NLMSG_ERROR:
                    check_ack(reply, what)
                    return replies
                replies.append(reply)

    # -- links ----------------------------------------------------------------------------------
    def link_index(self, name: str) -> int:
        """The index of the link called ``name`` (ENODEV if there is none)."""
        what = f"find link {name!r}"
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr(IFLA_IFNAME, name.encode() + b"\0")
        for reply in self.request(RTM_GETLINK, 0, body, what):
            if reply.kind == RTM_NEWLINK:
                index: int = IFINFOMSG.unpack_from(reply.payload)[2]
                return index
        raise OSError(EPROTO, f"{what}: the kernel acknowledged without describing the link")

    def link_up(self, index: int) -> None:
        self._set_link(index, IFF_UP, IFF_UP, b"", f"set link {index} up")

    def link_down(self, index: int) -> None:
        self._set_link(index, 0, IFF_UP, b"", f"set link {index} down")

    def set_mac(self, index: int, mac: bytes) -> None:
        self._set_link(index, 0, 0, attr(IFLA_ADDRESS, mac), f"set MAC {format_mac(mac)} on link {index}")

    def set_mtu(self, index: int, mtu: int) -> None:
        self._set_link(index, 0, 0, attr(IFLA_MTU, _U32.pack(mtu)), f"set MTU {mtu} on link {index}")

    def rename(self, index: int, name: str) -> None:
        """Rename a link; the kernel refuses (EBUSY) while it is up."""
        body = attr(IFLA_IFNAME, name.encode() + b"\0")
        self._set_link(index, 0, 0, body, f"rename link {index} to {name!r}")

    def _set_link(self, index: int, flags: int, change: int, attrs: bytes, what: str) -> None:
        # RTM_SETLINK, not NEWLINK: it changes an existing link and can never create one.
        self.request(RTM_SETLINK, 0, IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change) + attrs, what)

    # -- addresses and routes -------------------------------------------------------------------
    def add_address(self, index: int, address: bytes, prefix_len: int, broadcast: bytes = b"") -> None:
        """Add an IPv4 (4 bytes) or IPv6 (16 bytes) address, or update it if the link has it
        (``ip address replace``): an address listed twice is no error.

        IPv6 addresses skip duplicate address detection: the host allocated them, and a
        tentative address would be unusable (even as a route's source) for a second or more.
        """
        family = _family(address)
        flags = IFA_F_NODAD if family == socket.AF_INET6 else 0
        body = IFADDRMSG.pack(family, prefix_len, flags, RT_SCOPE_UNIVERSE, index)
        body += attr(IFA_LOCAL, address) + attr(IFA_ADDRESS, address)
        if broadcast:
            body += attr(IFA_BROADCAST, broadcast)
        what = f"add address {_text(address)}/{prefix_len} to link {index}"
        self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body, what)

    def add_route(
        self, destination: bytes, prefix_len: int, gateway: bytes = b"", index: int = 0, source: bytes = b""
    ) -> None:
        """Add a unicast route to the main table, or replace the one to the same destination.

        Replacing lets the host list the prefix route the kernel made for an address (as
        ``ip route`` shows the veth's). A route without a gateway is on-link: scope link in
        IPv4 (IPv6 has no route scopes: universe, as iproute2 sends).
        """
        family = _family(destination)
        scope = RT_SCOPE_LINK if not gateway and family == socket.AF_INET else RT_SCOPE_UNIVERSE
        body = RTMSG.pack(family, prefix_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        what = f"add route {_text(destination)}/{prefix_len}"
        if prefix_len:
            body += attr(RTA_DST, destination)
        if gateway:
            body += attr(RTA_GATEWAY, gateway)
            what += f" via {_text(gateway)}"
        if index:
            body += attr(RTA_OIF, _U32.pack(index))
            what += f" on link {index}"
        if source:
            body += attr(RTA_PREFSRC, source)
            what += f" src {_text(source)}"
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body, what)
