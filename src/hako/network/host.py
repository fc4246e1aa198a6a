"""The host's side of ``hako run``'s default network: addresses, routes, NAT, published ports.

Like Docker's default network from the container's point of view (an address of its own,
NAT to the outside, ``-p`` to publish a port), but routed rather than bridged: each sandbox's
veth is a point-to-point link of its own (CNI's ``ptp``, Calico), with the gateway address on
the host's end and a /32 route to the sandbox's address. Sandboxes share no link, so nothing
one sends reaches another but through the host's routing, where hako's nftables table
(``ip hako``) forwards between sandboxes only what goes to a published port. (On a bridge,
hosts that pass bridged traffic to netfilter, ``br_netfilter`` as Kubernetes nodes do, short-cut
such DNAT'd traffic from one bridge port to another at layer 2, around any isolation.)

The table masquerades the sandboxes' traffic out of the host and forwards published host ports
to them, from other hosts and from the host itself, 127.0.0.1 included. Published ports are
elements of two maps (host port to sandbox address and port), so adding or removing one never
rewrites a rule; each has a record (:mod:`hako.network.records`) naming the sandbox that holds
it, which is how stale ones are found.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hako.errors import NetworkError, UsageError
from hako.network import records

VETH_PREFIX = "hk"  # the host's ends of the sandboxes' veths: hk<sandbox id>
TABLE = "hako"
DEFAULT_SUBNET = "10.210.0.0/16"
PROTOCOLS = ("tcp", "udp")
RULESET_VERSION = "hako ruleset 5"  # a table without it is replaced (its published ports kept)
LEASES = "leases"
PORTS = "ports"


def subnet() -> ipaddress.IPv4Network:
    """The sandboxes' subnet: ``$HAKO_SUBNET`` or 10.210.0.0/16."""
    text = os.environ.get("HAKO_SUBNET", DEFAULT_SUBNET)
    try:
        network = ipaddress.IPv4Network(text)
    except ValueError as exc:
        raise NetworkError(f"HAKO_SUBNET={text}: not an IPv4 network ({exc})") from exc
    if network.num_addresses < 8:
        raise NetworkError(f"HAKO_SUBNET={text}: too small for sandboxes (use a /29 or larger)")
    return network


def gateway() -> ipaddress.IPv4Address:
    return next(subnet().hosts())


def ruleset(network: ipaddress.IPv4Network) -> str:
    """hako's nftables table: NAT out, published ports in, and no forwarding from one sandbox to
    another but to a published port (a sandbox may use another's service as a remote host would)."""
    veths = f'"{VETH_PREFIX}*"'
    dnat = "\n".join(
        f"        fib daddr type local dnat ip to {proto} dport map @publish_{proto}" for proto in PROTOCOLS
    )
    maps = "\n".join(
        f"    map publish_{proto} {{ type inet_service : ipv4_addr . inet_service; }}" for proto in PROTOCOLS
    )
    return f"""table ip {TABLE} {{
    comment "{RULESET_VERSION}"
{maps}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
{dnat}
    }}
    chain output {{
        type nat hook output priority -100; policy accept;
{dnat}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname {veths} oifname {veths} ct status dnat accept
        iifname {veths} oifname {veths} drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {network} oifname != {veths} masquerade
        oifname {veths} fib saddr type local masquerade
    }}
}}
"""


def _nft(script: str, what: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise NetworkError("nft not found: install nftables (apt-get install nftables) or use --network none")
    result = subprocess.run([nft, "-f", "-"], input=script, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()
        raise NetworkError(f"{what}: nft: {detail[-1] if detail else result.returncode}")


def _table() -> str | None:
    """hako's nftables table as ``nft list`` prints it, or None if there is none."""
    nft = shutil.which("nft")
    if nft is None:
        return None
    probe = subprocess.run([nft, "list", "table", "ip", TABLE], capture_output=True, text=True, check=False)
    return probe.stdout if probe.returncode == 0 else None


def _table_exists() -> bool:
    return _table() is not None


def _ensure_table(network: ipaddress.IPv4Network) -> None:
    """hako's table as this version writes it: made if missing, replaced if older (with the
    ports published now added back). The records must be locked."""
    current = _table()
    if current is not None and RULESET_VERSION in current and str(network) in current:
        return
    script = f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n" if current is not None else ""
    script += ruleset(network)
    for _, owner, data in records.entries(PORTS):
        if owner.alive():
            mapping = PortMapping.parse(str(data.get("mapping")))
            script += _element("add", mapping, str(data.get("address")))
    _nft(script, "creating hako's nftables table")


def _element(verb: str, mapping: PortMapping, address: str = "") -> str:
    value = f" : {address} . {mapping.container_port}" if verb == "add" else ""
    return f"{verb} element ip {TABLE} publish_{mapping.protocol} {{ {mapping.host_port}{value} }}\n"


def _sysctl(path: str, value: str) -> None:
    try:
        Path("/proc/sys", path).write_text(value)
    except OSError as exc:
        raise NetworkError(f"cannot set {path.replace('/', '.')} = {value}: {exc.strerror}") from exc


def ensure_host() -> None:
    """What every sandbox's link needs on the host: forwarding on, and hako's nftables table."""
    with records.locked():
        _sysctl("net/ipv4/ip_forward", "1")
        _ensure_table(subnet())


def index_of(ipr: Any, name: str) -> int:
    """The index of link ``name``, as the pyroute2 IPRoute ``ipr`` sees it."""
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetworkError(f"network interface {name} not found")
    return int(found[0])


def veth_name(sandbox_id: str) -> str:
    return f"{VETH_PREFIX}{sandbox_id[:12]}"


def connect_veth(ipr: Any, name: str, address: ipaddress.IPv4Address) -> None:
    """The host's end of a sandbox's veth: the gateway address on it, a route to the sandbox's
    address through it, and 127.0.0.1 allowed out of it (published ports reached from the host
    itself). ``ipr`` is a pyroute2 IPRoute in the host's namespace."""
    index = index_of(ipr, name)
    ipr.addr("add", index=index, address=str(gateway()), prefixlen=32)
    _sysctl(f"net/ipv4/conf/{name}/route_localnet", "1")
    ipr.link("set", index=index, state="up")
    ipr.route("add", dst=f"{address}/32", oif=index, scope=253, prefsrc=str(gateway()))  # 253: link


# -- addresses ---------------------------------------------------------------------------------


def lease(holder: records.Holder) -> ipaddress.IPv4Address:
    """A free address of the subnet for ``holder``'s sandbox (what gone holders held, addresses
    and ports, is freed first)."""
    network = subnet()
    with records.locked() as directory:
        _free(lambda owner: not owner.alive())
        taken = {path.name for path, _, _ in records.entries(LEASES)}
        first = gateway()
        for address in network.hosts():
            if address != first and str(address) not in taken:
                records.write(directory / LEASES / str(address), holder)
                return address
    raise NetworkError(f"no free address left in {network}: too many sandboxes (set HAKO_SUBNET)")


def release(sandbox_id: str) -> None:
    """Free ``sandbox_id``'s address and unpublish its ports."""
    with records.locked():
        _free(lambda owner: owner.sandbox_id == sandbox_id)


def prune() -> None:
    """Free what sandboxes that are gone without saying so still hold: addresses, ports."""
    with records.locked():
        _free(lambda owner: not owner.alive())


def _free(which: Callable[[records.Holder], bool]) -> None:
    """Free the addresses and ports whose holder ``which(holder)`` picks (records locked)."""
    for path, owner, _ in records.entries(LEASES):
        if which(owner):
            path.unlink(missing_ok=True)
    _unpublish(which)


# -- published ports ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PortMapping:
    """``-p [HOSTPORT:]CTRPORT[/PROTO]``."""

    host_port: int
    container_port: int
    protocol: str = "tcp"

    @classmethod
    def parse(cls, text: str) -> PortMapping:
        spec, _, protocol = text.partition("/")
        protocol = protocol or "tcp"
        host, _, container = spec.rpartition(":")
        try:
            container_port = int(container)
            host_port = int(host) if host else container_port
        except ValueError:
            raise UsageError(f"-p {text}: use HOSTPORT:CTRPORT[/tcp|udp], e.g. -p 8080:80") from None
        if protocol not in PROTOCOLS:
            raise UsageError(f"-p {text}: protocol {protocol!r}: use tcp or udp")
        for port in (host_port, container_port):
            if not 0 < port < 65536:
                raise UsageError(f"-p {text}: {port} is not a port number (1-65535)")
        return cls(host_port, container_port, protocol)

    def __str__(self) -> str:
        return f"{self.host_port}:{self.container_port}/{self.protocol}"

    @property
    def record(self) -> str:
        return f"{self.protocol}-{self.host_port}"


def check_free(mapping: PortMapping) -> None:
    """UsageError if a host process already listens on ``mapping``'s host port (it would be
    shadowed) or another sandbox publishes it."""
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closing connection is no user
        try:
            probe.bind(("0.0.0.0", mapping.host_port))
        except OSError as exc:
            raise UsageError(
                f"-p {mapping}: host port {mapping.host_port}/{mapping.protocol} is in use "
                f"({exc.strerror}): choose another"
            ) from None
    record = records.read(records.state_dir() / PORTS / mapping.record)
    if record is not None and record[0].alive():
        raise UsageError(
            f"-p {mapping}: host port {mapping.host_port}/{mapping.protocol} is published by "
            f"container {record[0].sandbox_id[:12]}: choose another"
        )


def publish(holder: records.Holder, address: ipaddress.IPv4Address, mappings: list[PortMapping]) -> None:
    """Forward each mapping's host port to ``address``; all or none."""
    done: list[PortMapping] = []
    try:
        for mapping in mappings:
            with records.locked() as directory:
                check_free(mapping)
                _nft(_element("add", mapping, str(address)), f"publishing {mapping}")
                records.write(
                    directory / PORTS / mapping.record, holder, address=str(address), mapping=str(mapping)
                )
                done.append(mapping)
    except BaseException:
        with records.locked():
            _unpublish(lambda owner: owner == holder)
        raise


def published(sandbox_id: str) -> list[str]:
    """The mappings ``sandbox_id`` publishes, as ``HOST:CTR/PROTO``."""
    return sorted(
        str(data.get("mapping"))
        for _, owner, data in records.entries(PORTS)
        if owner.sandbox_id == sandbox_id
    )


def _unpublish(which: Callable[[records.Holder], bool]) -> None:
    """Remove the published ports whose holder ``which(holder)`` picks (with the records locked)."""
    doomed = [(path, data) for path, owner, data in records.entries(PORTS) if which(owner)]
    table = bool(doomed) and _table_exists()
    for path, data in doomed:
        if table:
            # Not there: a publish that crashed half-way, or the table was flushed.
            with contextlib.suppress(NetworkError, UsageError):
                mapping = PortMapping.parse(str(data.get("mapping")))
                _nft(_element("delete", mapping), f"unpublishing {mapping}")
        path.unlink(missing_ok=True)
