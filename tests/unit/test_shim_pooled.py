"""A containerd pod taking its VM from the warm pool, without VMs: whether it should, the
hand-over of the pod's socket to a pooled daemon, and the pod using what it was handed."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hako.errors import ConfigError, SandboxError
from hako.runtime import paths, pool
from hako.runtime.sockets import connect_unix, listen_unix
from hako.runtime.state import SandboxState
from hako.shim import config as shim_config
from hako.shim import main as shim_main
from hako.shim import pooled
from hako.shim.pod import Pod
from tests.unit.pool_states import pooled_state
from tests.unit.shim_fakes import RecordingPublisher

ADOPTION = pooled.Adoption(
    ["-namespace", "k8s.io", "-id", "c1", "start"], "/run/bundle/c1", "/run/containerd.ttrpc", b"\x0a\x00\xff"
)


@pytest.fixture(autouse=True)
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HAKO_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("HAKO_TEMPLATES", str(tmp_path / "templates"))
    (tmp_path / "templates" / "tpl").mkdir(parents=True)  # the members' template
    monkeypatch.delenv("HAKO_CONFIG", raising=False)  # the shim's defaults
    monkeypatch.setattr(shim_config, "DEFAULT_PATH", tmp_path / "no-hako.toml")
    return tmp_path


def test_an_adoption_survives_the_wire() -> None:
    line = ADOPTION.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert pooled.Adoption.decode(line) == ADOPTION


@pytest.mark.parametrize(
    ("cfg", "wanted"),
    [
        (shim_config.ShimConfig(), True),
        (shim_config.ShimConfig(pool=False), False),  # turned off
        (shim_config.ShimConfig(template="off"), False),  # no template, no clones
        (shim_config.ShimConfig(template="private"), False),  # pooled clones share pages
    ],
)
def test_which_pods_take_from_the_pool(cfg: shim_config.ShimConfig, wanted: bool) -> None:
    assert pooled.wanted(cfg) is wanted


def test_the_pool_is_turned_off_in_the_shims_config() -> None:
    assert shim_config.parse("[runtime]\npool = false\n", "t").pool is False
    assert shim_config.ShimConfig().pool is True
    with pytest.raises(ConfigError):
        shim_config.parse('[runtime]\npool = "no"\n', "t")


def _member(network: str = "none") -> SandboxState:
    return pooled_state("tpl", network=network)


class FakeDaemon:
    """A pooled daemon's end of the hand-over, answering as told."""

    def __init__(self, state: SandboxState, **answer: object) -> None:
        self.adopt = listen_unix(state.dir / paths.ADOPT_SOCKET)
        self.answer = answer
        self.received: list[tuple[pooled.Adoption, socket.socket, int | None]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.adopt.accept()
        with conn:
            self.received.append(pooled.receive(conn))
            pooled.answer(conn, **self.answer)

    def close(self) -> None:
        self.thread.join(5)
        self.adopt.close()
        for _, listener, netns_fd in self.received:
            listener.close()
            if netns_fd is not None:
                os.close(netns_fd)


def test_the_pods_socket_is_handed_over_listening(tmp_path: Path) -> None:
    state = _member()
    daemon = FakeDaemon(state, qemu_pid=4321, took=0.01)
    pod_socket = tmp_path / "pod.sock"
    listener = listen_unix(pod_socket)
    try:
        assert pooled.hand_over(state, listener, ADOPTION) == 4321
        listener.close()  # start closes its copy: the daemon's serves the pod
        [(adoption, received, netns_fd)] = daemon.received
        assert adoption == ADOPTION and netns_fd is None
        with connect_unix(pod_socket) as client:  # containerd connects...
            served, _ = received.accept()  # ... and the daemon answers
            served.close()
            assert client
    finally:
        daemon.close()


def test_the_pods_network_namespace_comes_with_its_socket(tmp_path: Path) -> None:
    """Opened by the shim's start, where its path is mounted (a pooled daemon's mount namespace
    is a copy made at the fill, which may not have it)."""
    paths.pool_file().parent.mkdir(parents=True)
    paths.pool_file().write_text("{}")
    state = _member()
    daemon = FakeDaemon(state, qemu_pid=1, took=0.01)
    args = _start_args(tmp_path, netns="/proc/self/ns/net")
    shim = shim_main.Shim(args.address, args.namespace, "c1")
    shim.dir.mkdir(parents=True)
    try:
        with listen_unix(tmp_path / "pod.sock") as listener:
            assert shim_main._pooled(args, shim, tmp_path, b"", listener)
        [(received, _, netns_fd)] = daemon.received
        assert received.netns_path == "/proc/self/ns/net" and netns_fd is not None
        assert os.fstat(netns_fd).st_ino == os.stat("/proc/self/ns/net").st_ino
    finally:
        daemon.close()


def test_a_pod_whose_network_namespace_is_gone_claims_no_member(tmp_path: Path) -> None:
    paths.pool_file().parent.mkdir(parents=True)
    paths.pool_file().write_text("{}")
    member = _member()
    args = _start_args(tmp_path, netns=str(tmp_path / "gone"))
    shim = shim_main.Shim(args.address, args.namespace, "c1")
    with socket.socket(socket.AF_UNIX) as listener:
        assert not shim_main._pooled(args, shim, tmp_path, b"", listener)
    assert (member.dir / pool.POOLED_MARK).exists()  # still in the pool


def test_a_refusal_and_a_failure_are_told_apart(tmp_path: Path) -> None:
    listener = listen_unix(tmp_path / "pod.sock")
    try:
        refusing = _member()
        daemon = FakeDaemon(refusing, error="the pod asks for template x", refused=True)
        with pytest.raises(pooled.Refused, match="template x"):
            pooled.hand_over(refusing, listener, ADOPTION)
        daemon.close()
        failing = _member()
        daemon = FakeDaemon(failing, error="the pooled sandbox failed: gone")
        with pytest.raises(SandboxError, match="gone") as raised:
            pooled.hand_over(failing, listener, ADOPTION)
        assert not isinstance(raised.value, pooled.Refused)
        daemon.close()
    finally:
        listener.close()


def test_a_hand_over_without_the_socket_is_rejected() -> None:
    daemon_end, start_end = socket.socketpair()
    with daemon_end, start_end:
        start_end.sendall(ADOPTION.encode())
        with pytest.raises(SandboxError, match="socket"):
            pooled.receive(daemon_end)


def _start_args(bundle: Path, netns: str = "") -> Any:
    args = shim_main.parse_args(["-namespace", "default", "-address", "/run/c.sock", "-id", "c1", "start"])
    spec = {"linux": {"namespaces": [{"type": "network", **({"path": netns} if netns else {})}]}}
    (bundle / "config.json").write_text(json.dumps(spec))
    return args


def test_start_takes_a_pooled_member_of_the_pods_shape_and_network(tmp_path: Path) -> None:
    paths.pool_file().parent.mkdir(parents=True)
    paths.pool_file().write_text("{}")
    bridged = _member("bridge")  # hako run's: not for a pod
    member = _member()
    daemon = FakeDaemon(member, qemu_pid=4321, took=0.01)
    args = _start_args(tmp_path)
    shim = shim_main.Shim(args.address, args.namespace, "c1")
    shim.dir.mkdir(parents=True)
    listener = listen_unix(tmp_path / "pod.sock")
    try:
        assert shim_main._pooled(args, shim, tmp_path, b"", listener)
    finally:
        listener.close()
        daemon.close()
    assert not (member.dir / pool.POOLED_MARK).exists()  # taken
    assert (bridged.dir / pool.POOLED_MARK).exists()  # never tried
    recorded = shim.read()
    assert recorded["shim_pid"] == os.getpid() and recorded["qemu_pid"] == 4321
    assert recorded["qemu_name"] == f"hako-{member.short_id}" and recorded["vm_dir"] == str(member.dir)


def test_start_without_a_pool_looks_for_no_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_take(*args: object) -> bool:
        raise AssertionError("start looked for a pooled sandbox where no pool was ever filled")

    monkeypatch.setattr(pooled, "take", no_take)
    args = _start_args(tmp_path)
    shim = shim_main.Shim(args.address, args.namespace, "c1")
    with socket.socket(socket.AF_UNIX) as listener:
        assert not shim_main._pooled(args, shim, tmp_path, b"", listener)


class FakeSandbox:
    def __init__(self, fail: bool = False) -> None:
        self.vm = SimpleNamespace(pid=4321)
        self.dead = threading.Event()
        self.warn: Any = None
        self.started = False
        self.stopped = False
        self.fail = fail
        self.hostnames: list[str] = []
        self.timing = {"identity": 0.012}

    def start(self) -> None:
        self.started = True

    def take_identity(self, hostname: str) -> None:
        if self.fail:
            raise SandboxError("wiring the pod's network failed")
        self.hostnames.append(hostname)

    def stop(self) -> None:
        self.stopped = True


def test_the_pod_uses_the_pooled_vm_as_it_is(tmp_path: Path) -> None:
    sandbox: Any = FakeSandbox()
    log: list[str] = []
    vms: list[int | None] = []
    notes = ["the pod's VM: taken from the warm pool"]
    taken = pooled.PooledVM(None, "/run/netns/cni-1", shim_config.ShimConfig(), sandbox, notes)
    events: Any = RecordingPublisher()
    pod = Pod("f" * 64, tmp_path, events, log.append, on_vm=vms.append, early=taken)
    assert pod._sandbox_for(None, "web-1", "/run/netns/cni-1") is sandbox
    assert not sandbox.started and vms == [4321]
    assert sandbox.hostnames == ["web-1"]  # the pod's, not the pooled sandbox's
    assert sandbox.warn == log.append  # its warnings go to the pod's log now
    assert "taken from the warm pool" in log[0] and "given in 0.01 s" in log[1]


def test_a_pod_without_a_hostname_gives_the_pooled_vm_its_own(tmp_path: Path) -> None:
    sandbox: Any = FakeSandbox()
    taken = pooled.PooledVM(None, "", shim_config.ShimConfig(), sandbox, [])
    events: Any = RecordingPublisher()
    pod = Pod("f" * 64, tmp_path, events, lambda line: None, early=taken)
    pod._sandbox_for(None, "", "")
    assert sandbox.hostnames == ["f" * 12]  # as a VM of the pod's own would have


def test_a_pooled_vm_that_cannot_take_the_pods_identity_is_stopped(tmp_path: Path) -> None:
    sandbox: Any = FakeSandbox(fail=True)
    taken = pooled.PooledVM(None, "", shim_config.ShimConfig(), sandbox, [])
    events: Any = RecordingPublisher()
    pod = Pod("f" * 64, tmp_path, events, lambda line: None, early=taken)
    with pytest.raises(SandboxError, match="wiring"):
        pod._sandbox_for(None, "", "")
    assert sandbox.stopped and pod.sandbox is None


def test_a_pooled_vm_is_not_taken_by_a_pod_that_asks_for_another(tmp_path: Path) -> None:
    sandbox: Any = FakeSandbox()
    taken = pooled.PooledVM("/etc/hako/a.toml", "/run/netns/cni-1", shim_config.ShimConfig(), sandbox, [])
    assert taken.fits("/etc/hako/a.toml", "any-hostname", "/run/netns/cni-1")
    assert not taken.fits("/etc/hako/b.toml", "any-hostname", "/run/netns/cni-1")
    assert not taken.fits("/etc/hako/a.toml", "any-hostname", "/run/netns/cni-2")  # moved into another
    assert not taken.fits("/etc/hako/a.toml", "any-hostname", "")
    taken.discard()
    assert taken.sandbox.stopped  # type: ignore[attr-defined]
