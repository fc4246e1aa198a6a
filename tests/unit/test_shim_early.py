"""The pod's VM launched as the shim starts: the first Create adopts it if it asks for that VM,
stops it and starts its own if not; a shim that goes away without a Create stops it."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hako.shim import config as shim_config
from hako.shim import pod as pod_module
from hako.shim.pod import Pod
from tests.unit.shim_fakes import RecordingPublisher

KEY = (None, "web", "/run/netns/pod")


class FakeEarly:
    def __init__(self) -> None:
        self.config_path, self.hostname, self.netns_path = KEY
        self.settings = shim_config.ShimConfig(kernel="debian", source="/etc/hako/as-launched.toml")
        self.config = SimpleNamespace(template=None, accel=SimpleNamespace(reason="test"))
        self.vm = SimpleNamespace(pid=4242)
        self.network = None
        self.notes = ["launched the pod's VM as the shim started (QEMU pid 4242)"]
        self.discarded = False

    def fits(self, config_path: str | None, hostname: str, netns_path: str) -> bool:
        return (config_path, hostname, netns_path) == KEY

    def discard(self) -> None:
        self.discarded = True


class RecordingSandbox:
    def __init__(self, config: Any, hypervisor: Any = None, *, warn: Any = None, network: Any = None) -> None:
        self.config, self.hypervisor, self.network = config, hypervisor, network
        self.vm = hypervisor or SimpleNamespace(pid=1111)
        self.timing: dict[str, float] = {}
        self.dead = threading.Event()

    def start(self) -> None: ...
    def wait_ready(self) -> None: ...
    def stop(self) -> None: ...


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The config a Pod builds when it does not adopt (no assets, no QEMU needed here)."""
    configs: list[Any] = []

    def fake_prepare(*args: Any) -> tuple[Any, None]:
        config = SimpleNamespace(template=None, accel=SimpleNamespace(reason="test"), netns_fd=None)
        configs.append(config)
        return config, None

    monkeypatch.setattr(pod_module, "prepare", fake_prepare)
    monkeypatch.setattr(pod_module, "Sandbox", RecordingSandbox)
    monkeypatch.delenv("HAKO_CONFIG", raising=False)  # no config: the defaults
    monkeypatch.setattr(shim_config, "DEFAULT_PATH", Path("/nonexistent/hako.toml"))
    return configs


def _pod(tmp_path: Path, early: FakeEarly, log: list[str]) -> Pod:
    events: Any = RecordingPublisher()
    early_vm: Any = early
    return Pod("f" * 64, tmp_path, events, log.append, early=early_vm)


def test_the_first_container_adopts_the_vm_it_asks_for(
    tmp_path: Path, made: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    early = FakeEarly()
    pod = _pod(tmp_path, early, log)

    def no_reading(config_path: str | None = None) -> shim_config.ShimConfig:
        raise AssertionError("the config file was read again for a VM launched with it")

    monkeypatch.setattr(shim_config, "load", no_reading)
    sandbox: Any = pod._sandbox_for(*KEY)
    assert sandbox.hypervisor is early.vm and sandbox.config is early.config
    assert not early.discarded and made == []
    assert any("as the shim started" in line for line in log)
    # the VM is described as it was launched
    assert any("debian kernel" in line and "as-launched.toml" in line for line in log)


def test_another_vm_is_started_when_the_early_one_does_not_fit(tmp_path: Path, made: list[Any]) -> None:
    log: list[str] = []
    early = FakeEarly()
    pod = _pod(tmp_path, early, log)
    sandbox: Any = pod._sandbox_for(None, "other-hostname", "")
    assert early.discarded
    assert sandbox.hypervisor is None and sandbox.config is made[0]
    assert any("not the one" in line for line in log)


def test_a_shim_closed_before_any_create_stops_the_early_vm(tmp_path: Path, made: list[Any]) -> None:
    early = FakeEarly()
    pod = _pod(tmp_path, early, [])
    pod.close()
    assert early.discarded


def test_the_network_namespace_a_spec_joins() -> None:
    spec = {"linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/x"}]}}
    assert shim_config.network_namespace(spec) == "/run/netns/x"
    assert shim_config.network_namespace({"linux": {"namespaces": [{"type": "network"}]}}) == ""
    assert shim_config.network_namespace({}) == ""
