"""Fixtures for the containerd tests; the machinery is in harness.py (bench/ctr.py uses it too).

- ``containerd`` (session): a private containerd with busybox and pause imported into the ctr
  namespace and CRI's k8s.io. At the end of the session, whatever is left fails the last test.
- ``ctr`` (per test): :class:`~tests.containerd.harness.Ctr` in the test namespace; after the
  test, anything it left (tasks, containers, snapshots, shims, QEMU, runc containers, mounts,
  sockets, state) is removed and fails the test.
- ``runtime``: each test that takes it runs once with runc (which proves the test) and once with
  hako (the shim under test).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.containerd.harness import CRI_NAMESPACE, NAMESPACE, RUNTIMES, Containerd, Ctr, Runtime


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    if os.geteuid() != 0:
        pytest.skip("containerd needs root")
    daemon = Containerd()
    try:
        daemon.start()
        daemon.import_images((NAMESPACE, CRI_NAMESPACE))
        yield daemon
    finally:
        problems = daemon.close()
    assert not problems, "left behind by the containerd tests:\n" + "\n".join(problems)


@pytest.fixture
def ctr(containerd: Containerd) -> Iterator[Ctr]:
    yield containerd.ctr(NAMESPACE)
    problems = containerd.sweep([NAMESPACE])
    assert not problems, "the test left behind:\n" + "\n".join(problems)


@pytest.fixture(params=RUNTIMES, ids=str)
def runtime(request: pytest.FixtureRequest) -> Runtime:
    value: Runtime = request.param
    return value
