"""The shim binary: containerd's flags, one shim per pod, start/delete without a VM (no root needed)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import hako
from hako.runtime import mounts, paths
from hako.runtime.sockets import listen_unix
from hako.shim import main as shim_main
from hako.shim.main import KILLED, Shim, parse_args
from hako.shim.serve import ShimLog
from hako_containerd.containerd.runtime.v2.task import shim_pb2

ADDRESS = "/run/containerd/containerd.sock"
SANDBOX_ID = "io.kubernetes.cri.sandbox-id"  # what containerd's CRI plugin writes in config.json


@pytest.fixture(autouse=True)
def run_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """State under tmp_path, sockets too: nothing here touches /run."""
    monkeypatch.setenv("HAKO_RUN", str(tmp_path / "run"))
    monkeypatch.setattr(shim_main, "SOCKETS", tmp_path / "s")
    return tmp_path / "run"


def _args(*extra: str, id: str = "c1", namespace: str = "k8s.io") -> list[str]:
    flags = ["-namespace", namespace, "-address", ADDRESS, "-publish-binary", "/usr/bin/containerd"]
    return [*flags, "-id", id, *extra]


def _bundle(tmp_path: Path, name: str, config: object | str | None) -> Path:
    bundle = tmp_path / "bundles" / name
    bundle.mkdir(parents=True)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (bundle / "config.json").write_text(text)
    return bundle


def _in_pod(sandbox_id: str) -> dict[str, object]:
    return {"ociVersion": "1.0.2", "annotations": {SANDBOX_ID: sandbox_id, "other": "x"}}


# -- containerd's command line ------------------------------------------------------------------


def test_start_flags_as_containerd_passes_them() -> None:
    args = parse_args(_args("-debug", "start", id="0123abcd"))
    assert args.namespace == "k8s.io"
    assert args.address == ADDRESS
    assert args.publish_binary == "/usr/bin/containerd"
    assert args.id == "0123abcd"
    assert args.debug is True
    assert args.version is False
    assert args.action == "start"


def test_delete_flags_and_defaults() -> None:
    args = parse_args(_args("-bundle", "/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1", "delete"))
    assert args.action == "delete"
    assert args.bundle == "/run/containerd/io.containerd.runtime.v2.task/k8s.io/c1"
    assert args.debug is False
    assert args.socket == ""


def test_go_style_equals_and_unknown_flags_are_tolerated() -> None:
    args = parse_args(["-namespace=default", "-id=x", "-some-future-flag", "start"])
    assert (args.namespace, args.id, args.action) == ("default", "x", "start")


@pytest.mark.parametrize("flag", ["-v", "-version"])
def test_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        shim_main.main([flag])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"containerd-shim-hako-v2 {hako.__version__}\n"


@pytest.mark.parametrize(("argv", "action"), [(_args("bogus"), "bogus"), ([], "")])
def test_an_unknown_action_exits_2_with_a_message(
    argv: list[str], action: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        shim_main.main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"containerd-shim-hako-v2: unknown action {action!r}: use start or delete\n"


# -- one shim per pod ---------------------------------------------------------------------------


def test_containers_of_one_pod_share_a_shim(tmp_path: Path, run_root: Path) -> None:
    sandbox = Shim.of(parse_args(_args(id="pod-a")), _bundle(tmp_path, "pod-a", _in_pod("pod-a")))
    app = Shim.of(parse_args(_args(id="app")), _bundle(tmp_path, "app", _in_pod("pod-a")))
    assert app.group == sandbox.group == "pod-a"
    assert app.socket == sandbox.socket
    assert app.dir == sandbox.dir
    assert app.pod_id == sandbox.pod_id
    assert app.dir.parent == run_root / "shim" == paths.run_root() / "shim"
    assert app.socket.parent == tmp_path / "s"
    assert len(app.pod_id) == 64


def test_other_pods_namespaces_and_containerds_get_other_shims(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, "b", _in_pod("pod-a"))
    base = Shim.of(parse_args(_args(id="app")), bundle)
    other_pod = Shim.of(parse_args(_args(id="app")), _bundle(tmp_path, "b2", _in_pod("pod-b")))
    other_ns = Shim.of(parse_args(_args(id="app", namespace="default")), bundle)
    other_containerd = Shim(ADDRESS + ".2", "k8s.io", "pod-a")
    shims = [base, other_pod, other_ns, other_containerd]
    assert (
        len({s.socket for s in shims}) == len({s.dir for s in shims}) == len({s.pod_id for s in shims}) == 4
    )


@pytest.mark.parametrize(
    "config",
    [
        None,  # no config.json
        "{not json",
        "[1, 2]",  # JSON, but not an object
        {"ociVersion": "1.0.2"},  # no annotations
        {"annotations": None},
        {"annotations": ["io.kubernetes.cri.sandbox-id"]},
        {"annotations": {SANDBOX_ID: ""}},
        {"annotations": {"io.kubernetes.cri.container-type": "sandbox"}},
    ],
)
def test_without_a_usable_sandbox_id_the_container_is_its_own_group(
    tmp_path: Path, config: object | str | None
) -> None:
    shim = Shim.of(parse_args(_args(id="lonely")), _bundle(tmp_path, "lonely", config))
    assert shim.group == "lonely"
    assert shim.socket == Shim(ADDRESS, "k8s.io", "lonely").socket
    assert shim.socket != Shim(ADDRESS, "k8s.io", "someone-else").socket


def test_the_real_socket_path_fits_sun_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # containerd dials the socket itself: 108 bytes, no /proc/self/fd trick
    shim = Shim(ADDRESS, "k8s.io", "x" * 200)
    assert str(shim.socket).startswith("/run/hako/s/")
    assert len(os.fsencode(shim.socket)) < 108


def test_the_pod_record_merges_and_survives_corruption(tmp_path: Path) -> None:
    shim = Shim(ADDRESS, "k8s.io", "pod")
    assert shim.read() == {}
    shim.dir.mkdir(parents=True)
    shim.record(shim_pid=10, group="pod")
    shim.record(qemu_pid=20)
    shim.record(qemu_pid=None)
    assert shim.read() == {"shim_pid": 10, "group": "pod", "qemu_pid": None}
    assert not (shim.dir / ".pod.json.tmp").exists()
    (shim.dir / "pod.json").write_text("{trunc")
    assert shim.read() == {}


def test_alive_means_something_listens_on_the_socket(tmp_path: Path) -> None:
    shim = Shim(ADDRESS, "k8s.io", "pod")
    assert not shim.alive()
    shim.socket.parent.mkdir(parents=True)
    listener = listen_unix(shim.socket)
    try:
        assert shim.alive()
    finally:
        listener.close()
    assert not shim.alive()  # the path remains, nobody accepts


# -- start and delete, as far as they go without forking a serving shim -------------------------


def test_start_reuses_the_running_shim_of_the_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    first = Shim(ADDRESS, "k8s.io", "pod-a")
    first.socket.parent.mkdir(parents=True)
    listener = listen_unix(first.socket)  # the pod's shim is up already

    def no_fork() -> int:
        raise AssertionError("start forked a second shim for a pod that has one")

    monkeypatch.setattr(os, "fork", no_fork)
    bundle = _bundle(tmp_path, "app", _in_pod("pod-a"))
    monkeypatch.chdir(bundle)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x0a\x00")))  # runtime options
    try:
        assert shim_main.start(parse_args(_args("start", id="app"))) == 0
    finally:
        listener.close()
    address = f"unix://{first.socket}"
    assert capsys.readouterr().out == f"{address}\n"
    assert (bundle / "address").read_text() == address
    assert not (bundle / ".address").exists()
    assert first.dir.is_dir() and (first.dir.stat().st_mode & 0o777) == 0o700


@pytest.fixture
def sleeper() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()


def _sleep(started: list[subprocess.Popen[bytes]], *argv: str) -> subprocess.Popen[bytes]:
    """A long-lived process with ``argv`` in its command line, once it is really running.

    Popen returns when execve closes its pipe, before the kernel has set up the new argv:
    /proc/PID/cmdline may still read empty then. The child says when it is up.
    """
    code = "import sys, time; print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE)
    started.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


def test_delete_cleans_up_after_a_dead_shim(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
    sleeper: list[subprocess.Popen[bytes]],
) -> None:
    unmounted: list[Path] = []
    monkeypatch.setattr(mounts, "umount", unmounted.append)
    bundle = _bundle(tmp_path, "app", _in_pod("pod-a"))
    shim = Shim(ADDRESS, "k8s.io", "pod-a")
    shim.dir.mkdir(parents=True)
    shim.socket.parent.mkdir(parents=True)
    shim.socket.touch()  # left behind by the shim that died
    qemu = _sleep(sleeper, "-name", f"hako-{shim.pod_id[:12]}")  # the pod's QEMU, still running
    shim.record(qemu_pid=qemu.pid)

    with pytest.raises(SystemExit) as info:
        shim_main.main(_args("-bundle", str(bundle), "delete", id="app"))
    assert info.value.code == 0

    assert qemu.wait(5) == -9
    assert not shim.dir.exists()
    assert not shim.socket.exists()
    assert unmounted == [bundle / "rootfs"]
    response = shim_pb2.DeleteResponse.FromString(capsysbinary.readouterr().out)
    assert (response.pid, response.exit_status) == (0, KILLED) == (0, 137)
    assert response.exited_at.seconds > 0


def _dead_pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Shim]:
    """The bundle of pod-a's app container, and the state its shim left when it died."""
    monkeypatch.setattr(mounts, "umount", lambda target: None)
    bundle = _bundle(tmp_path, "app", _in_pod("pod-a"))
    shim = Shim(ADDRESS, "k8s.io", "pod-a")
    shim.dir.mkdir(parents=True)
    return bundle, shim


def test_delete_kills_only_the_pods_own_qemu(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
    sleeper: list[subprocess.Popen[bytes]],
) -> None:
    bundle, shim = _dead_pod(tmp_path, monkeypatch)
    stranger = _sleep(sleeper, "-name", "hako-000000000000")  # the pid was reused by someone else
    shim.record(qemu_pid=stranger.pid)
    monkeypatch.chdir(bundle)  # no -bundle: the bundle is the working directory
    assert shim_main.delete(parse_args(_args("delete", id="app"))) == 0
    assert stranger.poll() is None
    assert not shim.dir.exists()
    assert shim_pb2.DeleteResponse.FromString(capsysbinary.readouterr().out).exit_status == KILLED


def test_delete_cleans_up_after_a_dead_shim_that_took_its_vm_from_the_pool(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
    sleeper: list[subprocess.Popen[bytes]],
) -> None:
    """The pooled sandbox's QEMU has the pooled sandbox's name, and its run dir is its own."""
    bundle, shim = _dead_pod(tmp_path, monkeypatch)
    vm_dir = paths.sandboxes_dir() / ("a" * 64)
    vm_dir.mkdir(parents=True)
    qemu = _sleep(sleeper, "-name", "hako-aaaaaaaaaaaa")
    shim.record(qemu_pid=qemu.pid, qemu_name="hako-aaaaaaaaaaaa", vm_dir=str(vm_dir))
    assert shim_main.delete(parse_args(_args("-bundle", str(bundle), "delete", id="app"))) == 0
    assert qemu.wait(5) == -9
    assert not vm_dir.exists() and not shim.dir.exists()
    assert shim_pb2.DeleteResponse.FromString(capsysbinary.readouterr().out).exit_status == KILLED


def test_delete_leaves_a_live_shim_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    monkeypatch.setattr(mounts, "umount", lambda target: None)
    bundle = _bundle(tmp_path, "app", _in_pod("pod-a"))
    shim = Shim(ADDRESS, "k8s.io", "pod-a")
    shim.dir.mkdir(parents=True)
    shim.socket.parent.mkdir(parents=True)
    listener = listen_unix(shim.socket)  # other containers of the pod are still served
    try:
        assert shim_main.delete(parse_args(_args("-bundle", str(bundle), "delete", id="app"))) == 0
        assert shim.dir.is_dir() and shim.socket.exists()
    finally:
        listener.close()
    assert shim_pb2.DeleteResponse.FromString(capsysbinary.readouterr().out).exit_status == KILLED


# -- the serving shim's log ---------------------------------------------------------------------


@pytest.fixture
def logs() -> Iterator[list[ShimLog]]:
    """ShimLogs live as long as the shim's process, which closes nothing: the test does."""
    made: list[ShimLog] = []
    yield made
    for log in made:
        log._file.close()
        if log._fifo is not None:
            os.close(log._fifo)


def test_shim_log_goes_to_the_file_and_to_containerds_fifo(tmp_path: Path, logs: list[ShimLog]) -> None:
    fifo = tmp_path / "log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        log = ShimLog(tmp_path / "shim.log", fifo, debug=True)
        logs.append(log)
        log("hello")
        log("world")
        from_fifo = os.read(reader, 65536).decode()
    finally:
        os.close(reader)
    log("after containerd went away")  # EPIPE: the file still gets it
    lines = (tmp_path / "shim.log").read_text().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["hello", "world", "after containerd went away"]
    assert f"hako-shim[{os.getpid()}]" in lines[0]
    assert from_fifo.splitlines() == lines[:2]
    assert log.debug is True


def test_shim_log_without_a_fifo_reader_writes_the_file_only(tmp_path: Path, logs: list[ShimLog]) -> None:
    os.mkfifo(tmp_path / "log")
    log = ShimLog(tmp_path / "shim.log", tmp_path / "log", debug=False)  # must not block
    logs.append(log)
    log("alone")
    log("nobody reads")
    other = ShimLog(tmp_path / "other.log", tmp_path / "missing", debug=False)  # no FIFO at all
    logs.append(other)
    other("still fine")
    assert (tmp_path / "shim.log").read_text().count("\n") == 2
    assert (tmp_path / "other.log").read_text().endswith(": still fine\n")
