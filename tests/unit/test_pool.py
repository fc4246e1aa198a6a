"""The warm pool's bookkeeping, without VMs: who is a member, taking one, what is stale, the size."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from hako.errors import HakoError
from hako.runtime import paths, pool
from hako.runtime.launch import Notifications
from hako.runtime.state import SandboxState
from tests.unit.pool_states import pooled_state

STANDARD = pool.Shape("trimmed", 256, 1)


@pytest.fixture(autouse=True)
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HAKO_RUN", str(tmp_path / "run"))
    monkeypatch.setenv("HAKO_TEMPLATES", str(tmp_path / "templates"))
    (tmp_path / "templates" / "tpl-a").mkdir(parents=True)
    (tmp_path / "templates" / "tpl-b").mkdir(parents=True)
    return tmp_path


def test_members_are_alive_unclaimed_and_of_the_template() -> None:
    ready = pooled_state()
    pooled_state("tpl-b")
    pooled_state(alive=False)
    pooled_state(marked=False)  # claimed by someone already
    assert [s.id for s in pool.members("tpl-a")] == [ready.id]
    assert len(pool.members()) == 2


def test_take_is_once(roots: Path) -> None:
    only = pooled_state()
    assert pool.take("tpl-a") is None  # no pool was filled here (no pool.json): nothing is read
    pool.set_wanted(STANDARD, 1)  # as `hako pool fill` does
    taken = pool.take("tpl-a")
    assert taken is not None and taken.id == only.id
    assert (only.dir / pool.CLAIMED_MARK).exists() and not (only.dir / pool.POOLED_MARK).exists()
    assert pool.take("tpl-a") is None
    assert pool.take("tpl-b") is None


def test_take_is_of_the_network_and_shape_asked_for(roots: Path) -> None:
    pool.set_wanted(STANDARD, 1)
    bridged, bigger = pooled_state(), pooled_state(memory_mib=512, network="none")
    unnetworked = pooled_state(network="none")
    assert pool.take("tpl-a", "none", pool.Shape("trimmed", 256, 1, "none")) == unnetworked
    assert pool.take(None, "none", pool.Shape("trimmed", 256, 1, "none")) is None
    assert pool.take(None, "none") == bigger  # any shape
    assert pool.take("tpl-a") == bridged  # hako run's default: the bridge


def test_stale_members_are_the_dead_and_those_of_removed_templates(roots: Path) -> None:
    ready = pooled_state()
    dead = pooled_state(alive=False)
    orphan = pooled_state("tpl-b")
    (roots / "templates" / "tpl-b").rmdir()  # its inputs changed: the template was pruned
    assert {s.id for s in pool.stale()} == {dead.id, orphan.id}
    assert [s.id for s in pool.members()] == [ready.id]


def test_wanted_sizes_per_shape() -> None:
    bigger = pool.Shape("trimmed", 512, 2)
    debian = pool.Shape("debian", 256, 1)
    assert pool.wanted(STANDARD) == 0 and pool.shapes() == []
    pool.set_wanted(STANDARD, 3)
    pool.set_wanted(bigger, 1)
    pool.set_wanted(debian, 2)
    assert (pool.wanted(STANDARD), pool.wanted(bigger), pool.wanted(debian)) == (3, 1, 2)
    pool.set_wanted(STANDARD, 0)
    assert pool.wanted(STANDARD) == 0
    assert set(pool.shapes()) == {bigger, debian}


def test_shape_keys_round_trip() -> None:
    shape = pool.Shape("trimmed", 768, 4)
    assert shape.key == "trimmed/768M/4"
    assert pool.Shape.parse(shape.key) == shape
    unnetworked = pool.Shape("trimmed", 256, 1, "none")  # for --network none and containerd pods
    assert unnetworked.key == "trimmed/256M/1/none" and pool.Shape.parse(unnetworked.key) == unnetworked
    assert pool.Shape.parse("trimmed/256M/1") == STANDARD and STANDARD.network == "bridge"
    for bad in ("trimmed", "trimmed/768/4", "/256M/1", "trimmed/256M/x", "trimmed/256M/1/ns:x"):
        with pytest.raises(ValueError):
            pool.Shape.parse(bad)


def test_an_old_pool_file_is_ignored(roots: Path) -> None:
    (roots / "run").mkdir(exist_ok=True)
    paths.pool_file().write_text('{"trimmed": 2}')  # keyed by kernel, before shapes
    assert pool.shapes() == [] and pool.wanted(STANDARD) == 0


def test_no_refill_unless_short(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: started.append(argv))
    pool.refill_in_background(STANDARD)  # no pool wanted
    pooled_state()
    pooled_state(memory_mib=512)  # another shape's member does not count
    pool.set_wanted(STANDARD, 1)
    pool.refill_in_background(STANDARD)  # full
    assert started == []
    pool.set_wanted(STANDARD, 2)
    pool.refill_in_background(STANDARD)
    assert len(started) == 1 and started[0][-4:] == ["fill", "--refill", "--shape", "trimmed/256M/1"]


def _said(*messages: Mapping[str, object]) -> Notifications:
    """A keeper's messages, as a fill reads them."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"".join(json.dumps(message).encode() + b"\n" for message in messages))
    os.close(write_fd)
    return Notifications(read_fd)


@pytest.fixture
def fill_events(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What a fill does (preload, make the template, ask a keeper, fork), with stand-ins."""
    from hako.cli import pool as pool_cli
    from hako.runtime import keeper, launch

    events: list[str] = []
    monkeypatch.setattr(pool_cli, "require_root", lambda command: None)
    monkeypatch.setattr(launch, "preload_daemon", lambda shim=False: events.append(f"preload shim={shim}"))
    monkeypatch.setattr(pool_cli, "_template", lambda shape: events.append("template"))

    def fork_keeper(next_sandbox: object, shape: str, network: str) -> tuple[int, Notifications]:
        events.append(f"fork keeper of {shape}")
        made = [pooled_state(network=network) for _ in range(pool_cli._short(pool.Shape.parse(shape)))]
        return os.getpid(), _said(*({"pooled": state.id} for state in made), {"done": True})

    def add_one(shape: pool.Shape) -> SandboxState:
        events.append("fork daemon")
        return pooled_state(network=shape.network)

    monkeypatch.setattr(keeper, "fill_by_keeper", lambda shape: events.append("ask keeper"))
    monkeypatch.setattr(keeper, "fork_keeper", fork_keeper)
    monkeypatch.setattr(pool_cli, "_add_one", add_one)
    return events


def _fill_args(size: int, shape: pool.Shape = STANDARD) -> argparse.Namespace:
    return argparse.Namespace(size=size, shape=shape.key, refill=False, memory=None, cpus=None)


def test_a_fill_forks_a_keeper_after_preloading_what_it_runs_on(fill_events: list[str]) -> None:
    """With no keeper running, a fill imports what the keeper runs on and makes the template,
    then forks the keeper; a fill that adds nothing does neither."""
    from hako.cli import pool as pool_cli

    assert pool_cli.fill(_fill_args(2)) == 0
    assert fill_events == ["ask keeper", "preload shim=False", "template", f"fork keeper of {STANDARD.key}"]
    assert len(pool.members()) == 2
    fill_events.clear()
    assert pool_cli.fill(_fill_args(2)) == 0  # full: nothing to do
    assert fill_events == []


def test_a_fill_asks_the_running_keeper_first(
    fill_events: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hako.cli import pool as pool_cli
    from hako.runtime import keeper

    def asked(shape: str) -> Notifications:
        fill_events.append("ask keeper")
        return _said({"pooled": pooled_state().id}, {"done": True})

    monkeypatch.setattr(keeper, "fill_by_keeper", asked)
    assert pool_cli.fill(_fill_args(1)) == 0
    assert fill_events == ["ask keeper"] and len(capsys.readouterr().out.split()) == 1
    # A keeper that goes away without a word (it was closing): the fill forks one of its own.
    fill_events.clear()

    def closing(shape: str) -> Notifications:
        fill_events.append("ask keeper")
        return _said()

    monkeypatch.setattr(keeper, "fill_by_keeper", closing)
    assert pool_cli.fill(_fill_args(2)) == 0
    assert fill_events[0] == "ask keeper" and fill_events[-1] == f"fork keeper of {STANDARD.key}"
    # One that fails to add one: the fill fails with its error.
    monkeypatch.setattr(keeper, "fill_by_keeper", lambda shape: _said({"error": "no room", "exit_code": 125}))
    with pytest.raises(HakoError, match="no room"):
        pool_cli.fill(_fill_args(3))


def test_a_pool_of_none_forks_a_daemon_per_sandbox(fill_events: list[str]) -> None:
    """A containerd pod's pooled sandbox has a daemon of its own: it becomes the pod's shim."""
    from hako.cli import pool as pool_cli

    assert pool_cli.fill(_fill_args(2, pool.Shape("trimmed", 256, 1, pool.SHIM_NETWORK))) == 0
    assert fill_events == ["preload shim=True", "fork daemon", "fork daemon"]


def test_preload_daemon_imports_what_the_daemon_runs_on() -> None:
    script = (
        "import sys\n"
        "from hako.runtime.launch import preload_daemon\n"
        "daemon = ('hako.runtime.sandboxd', 'qemu.qmp', 'hako.hypervisor.qemu', 'hako.image.disk')\n"
        "assert not any(name in sys.modules for name in daemon)\n"
        "preload_daemon()\n"
        "assert all(name in sys.modules for name in daemon)\n"
        "assert 'hako.shim.serve' not in sys.modules\n"
        "preload_daemon(shim=True)\n"  # a pool of `none`: its daemons may become a pod's shim
        "assert {'hako.shim.serve', 'hako.shim.pooled', 'pyroute2'} <= set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
