"""The VM's tap in a sandbox's network namespace: one that goes with its last descriptor (a
joined namespace, which outlives the sandbox), and one that stays until its namespace goes, so
that a killed QEMU does not wait for the kernel to unregister it (root, no VM)."""

from __future__ import annotations

import os
import socket

import pytest

from hako.errors import NetworkError
from hako.network import netns

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
    ),
]


def _index(netns_fd: int) -> int | None:
    with netns.entered(netns_fd):
        try:
            return socket.if_nametoindex(netns.TAP_NAME)
        except OSError:
            return None


def test_a_tap_goes_with_its_last_descriptor() -> None:
    namespace = netns.create()
    try:
        tap = netns.open_tap(namespace)
        assert _index(namespace) is not None
        os.close(tap)
        assert _index(namespace) is None
    finally:
        os.close(namespace)


def test_a_persistent_tap_stays_and_is_taken_again() -> None:
    namespace = netns.create()
    try:
        tap = netns.open_tap(namespace, persist=True)
        index = _index(namespace)
        os.close(tap)  # QEMU exits
        assert index is not None and _index(namespace) == index
        again = netns.open_tap(namespace, persist=True)  # a VM booted in place of a failed restore
        assert _index(namespace) == index
        with pytest.raises(NetworkError, match="busy"):  # one VM at a time
            netns.open_tap(namespace, persist=True)
        os.close(again)
    finally:
        os.close(namespace)  # nothing holds the namespace: it goes, and its tap with it


def test_a_pooled_vms_tap_moves_into_a_pods_namespace() -> None:
    """A pod took a pooled VM: its tap leaves the VM's own namespace for the pod's, is wired to
    the pod's veth there, and the guest is to take the veth's identity."""
    from pyroute2 import IPRoute

    from hako.network.sandbox import SandboxNetwork

    own, pod = netns.create(), netns.create()
    tap = netns.open_tap(own, persist=True)  # as a pooled VM's QEMU holds it
    try:
        with netns.entered(pod), IPRoute() as ipr:  # what CNI's bridge plugin leaves in a pod
            ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "peer0"})
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address="10.99.0.5", prefixlen=24)
            ipr.link("set", index=eth0, state="up")
            mac = ipr.get_links(eth0)[0].get_attr("IFLA_ADDRESS")
        network = SandboxNetwork("pooled", "none", os.dup(own))
        network.move_into(os.dup(pod))
        network.wait_wired()
        assert network.mode == "joined" and not network.owns_namespace
        assert _index(own) is None and _index(pod) is not None
        [interface] = network.guest().interfaces
        assert (interface.hw_addr, interface.addresses) == (mac, (("10.99.0.5", 24),))
        os.close(tap)  # QEMU exits: the tap persists (it was made to, in the VM's own namespace)
        tap = -1
        assert _index(pod) is not None
        network.close()
        assert _index(pod) is None  # nothing of the sandbox is left in the pod's namespace
    finally:
        if tap >= 0:
            os.close(tap)
        os.close(own)
        os.close(pod)
