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
