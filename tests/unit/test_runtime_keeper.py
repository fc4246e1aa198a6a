"""A pool's keeper adding and serving sandboxes, with stand-in daemons: no root, no VM."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from hako.errors import HakoError
from hako.runtime import keeper as keeper_module
from hako.runtime.keeper import Keeper
from hako.runtime.launch import notify
from hako.runtime.sockets import listen_unix
from hako.runtime.state import SandboxState, new_id, reserve


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HAKO_RUN", str(tmp_path / "run"))
    return tmp_path / "run"


class FakeVM:
    def __init__(self) -> None:
        self.killed = False

    def kill(self) -> None:
        self.killed = True


class FakeSandbox:
    def __init__(self) -> None:
        self.vm = FakeVM()


class FakeDaemon:
    """Says what a daemon says on its way into the pool (or fails as told), then serves until
    stopped."""

    def __init__(self, state: SandboxState, fail: str | None, crash: bool) -> None:
        self.state = state
        self.fail = fail
        self.crash = crash
        self.sandbox = FakeSandbox()
        self.notify_fd = -1
        self.stopped = threading.Event()
        self.logged: list[str] = []

    def run(self, notify_fd: int) -> int:
        self.notify_fd = notify_fd
        notify(notify_fd, {"serving": True})
        if self.crash:
            raise RuntimeError("a bug")
        if self.fail:
            notify(notify_fd, {"final": {"error": self.fail}})
            return 0
        notify(notify_fd, {"pooled": True})
        self.stopped.wait(10)
        return 0

    def stop_soon(self) -> None:
        self.stopped.set()

    def log(self, message: str) -> None:
        self.logged.append(message)


class Fill:
    """A keeper, the sandboxes it is given, and what it tells the filler."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, count: int, fail: dict[int, str] | None = None
    ) -> None:
        self.count = count
        self.fail = fail or {}
        self.crash: set[int] = set()
        self.made: list[SandboxState] = []
        self.daemons: list[FakeDaemon] = []
        self.removed: list[str] = []
        self.keeper = Keeper("bridge")
        monkeypatch.setattr(keeper_module, "start_daemon", self._start)
        monkeypatch.setattr(keeper_module, "remove_dead", lambda state: self.removed.append(state.id))

    def next_sandbox(self) -> tuple[SandboxState, Any] | None:
        if len(self.made) >= self.count:
            return None
        sandbox_id = new_id()
        state = SandboxState(sandbox_id, f"pool-{sandbox_id[:12]}", "", [], 0.0, "trimmed", "tcg", "", 256, 1)
        reserve(state)
        self.made.append(state)
        return state, None

    def _start(self, state: SandboxState, config: Any, notify_fd: int, **kw: Any) -> FakeDaemon:
        index = len(self.daemons)
        notify(notify_fd, {"launched": True})
        daemon = FakeDaemon(state, self.fail.get(index), crash=index in self.crash)
        self.daemons.append(daemon)
        return daemon

    def messages(self, close_early: bool = False) -> list[dict[str, Any]]:
        read_fd, write_fd = os.pipe()
        if close_early:
            os.close(read_fd)
        self.keeper._fill(self.next_sandbox, write_fd)
        os.close(write_fd)
        if close_early:
            return []
        with os.fdopen(read_fd) as pipe:
            return [json.loads(line) for line in pipe]


def test_a_keeper_serves_every_sandbox_it_adds(monkeypatch: pytest.MonkeyPatch) -> None:
    fill = Fill(monkeypatch, 3)
    assert fill.messages() == [{"pooled": state.id} for state in fill.made]
    for state in fill.made:
        assert SandboxState.load(state.dir).shared_daemon  # (so that nobody signals the keeper)
    assert sorted(fill.keeper._serving) == sorted(state.id for state in fill.made)
    fill.keeper._on_sigterm(15, None)  # stops them all, and adds no more
    for _, thread in list(fill.keeper._serving.values()):
        thread.join(5)
    assert all(daemon.stopped.is_set() for daemon in fill.daemons)
    assert fill.keeper._serving == {} and fill.keeper.stopping.is_set()
    assert fill.messages() == []


def test_a_sandbox_that_fails_ends_the_fill_and_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    fill = Fill(monkeypatch, 3, fail={1: "the guest did not answer"})
    first, second, *_ = (messages := fill.messages())
    assert first == {"pooled": fill.made[0].id}
    assert "the guest did not answer" in second["error"] and len(messages) == 2
    assert len(fill.made) == 2 and fill.removed == [fill.made[1].id]
    assert list(fill.keeper._serving) == [fill.made[0].id]  # the one pooled stays
    fill.keeper._on_sigterm(15, None)


def test_an_interrupted_fill_adds_no_more(monkeypatch: pytest.MonkeyPatch) -> None:
    fill = Fill(monkeypatch, 3)
    fill.messages(close_early=True)  # the filler is gone before the first is pooled
    assert len(fill.made) == 1 and list(fill.keeper._serving) == [fill.made[0].id]
    fill.keeper._on_sigterm(15, None)


def test_no_sandbox_to_make_is_an_error_for_the_filler(monkeypatch: pytest.MonkeyPatch) -> None:
    fill = Fill(monkeypatch, 3)

    def broken() -> None:
        raise HakoError("no template")

    read_fd, write_fd = os.pipe()
    fill.keeper._fill(broken, write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        assert [json.loads(line) for line in pipe] == [{"error": "no template", "exit_code": 125}]


def test_a_daemon_that_crashes_takes_its_vm_along_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    fill = Fill(monkeypatch, 2)
    fill.crash = {1}
    first, second = fill.messages()
    assert first == {"pooled": fill.made[0].id} and "error" in second
    assert fill.daemons[1].sandbox.vm.killed and "a bug" in fill.daemons[1].logged[0]
    assert not fill.daemons[0].sandbox.vm.killed and list(fill.keeper._serving) == [fill.made[0].id]
    fill.keeper._on_sigterm(15, None)


def test_a_keeper_takes_later_fills_on_its_socket_and_exits_with_its_last_sandbox(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fill = Fill(monkeypatch, 1)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)  # (not the main thread)
    path = keeper_module.socket_path("trimmed/256M/1", 1234)
    assert path.parts[-2:] == ("trimmed_256M_1", "1234.sock")
    path.parent.mkdir(parents=True)
    listener = listen_unix(path)
    read_fd, write_fd = os.pipe()
    codes: list[int] = []

    def keep() -> None:
        codes.append(fill.keeper.run(fill.next_sandbox, write_fd, listener, path))

    running = threading.Thread(target=keep)
    running.start()
    with os.fdopen(read_fd) as pipe:  # the fill that forked it, then the pipe is closed
        assert [json.loads(line) for line in pipe] == [{"pooled": fill.made[0].id}, {"done": True}]

    fill.count = 3  # a later fill: two more
    messages = keeper_module.fill_by_keeper("trimmed/256M/1")
    assert messages is not None
    said = [messages.next(timeout=10) for _ in range(3)]
    messages.close()
    assert said == [{"pooled": fill.made[1].id}, {"pooled": fill.made[2].id}, {"done": True}]
    assert len(fill.keeper._serving) == 3

    fill.keeper._on_sigterm(15, None)
    running.join(10)
    assert codes == [0] and not path.exists()
    assert keeper_module.fill_by_keeper("trimmed/256M/1") is None  # none runs: the filler forks one


def test_a_keeper_that_died_leaves_a_socket_nobody_answers_on() -> None:
    path = keeper_module.socket_path("trimmed/256M/1", 1234)
    path.parent.mkdir(parents=True)
    listen_unix(path).close()  # bound, then its keeper gone
    assert path.exists() and keeper_module.fill_by_keeper("trimmed/256M/1") is None
    assert not path.exists()
    assert keeper_module.fill_by_keeper("trimmed/512M/1") is None  # (never a keeper)
