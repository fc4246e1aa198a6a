"""The pause image: busybox's layer, an entrypoint that ends on SIGTERM/SIGINT even as PID 1."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hako.image import mediatypes as mt
from hako.image.busybox import build_busybox_image
from hako.image.pause import DEFAULT_NAME, ENTRYPOINT, build_pause_image, main
from hako.image.store import ImageStore

pytestmark = pytest.mark.skipif(
    shutil.which("dpkg-query") is None, reason="needs Debian's dpkg to find busybox-static"
)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pause_image(tmp_path_factory.mktemp("pause") / "pause")


def _json_blob(layout: Path, desc: dict[str, Any]) -> dict[str, Any]:
    algorithm, _, hexpart = str(desc["digest"]).partition(":")
    data = (layout / "blobs" / algorithm / hexpart).read_bytes()
    assert hashlib.new(algorithm, data).hexdigest() == hexpart
    document: dict[str, Any] = json.loads(data)
    return document


def _manifest(layout: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    index = json.loads((layout / "index.json").read_text())
    [entry] = index["manifests"]
    return entry, _json_blob(layout, entry)


def test_layout_names_the_image_and_runs_the_entrypoint(layout: Path) -> None:
    entry, manifest = _manifest(layout)
    assert entry["annotations"][mt.REF_NAME] == DEFAULT_NAME == "hako.local/pause:latest"
    config = _json_blob(layout, manifest["config"])
    assert config["config"]["Entrypoint"] == ENTRYPOINT
    assert "Cmd" not in config["config"]
    assert config["config"]["Labels"]["org.opencontainers.image.title"] == "pause"


def test_shares_busybox_layer(layout: Path, tmp_path: Path) -> None:
    busybox = build_busybox_image(tmp_path / "busybox")
    _, pause_manifest = _manifest(layout)
    _, busybox_manifest = _manifest(busybox)
    assert pause_manifest["layers"] == busybox_manifest["layers"]
    assert pause_manifest["config"]["digest"] != busybox_manifest["config"]["digest"]
    # The busybox image itself is unchanged by the sharing: still `sh` by default.
    assert _json_blob(busybox, busybox_manifest["config"])["config"]["Cmd"] == ["sh"]


def test_tar_is_deterministic_and_importable(tmp_path: Path) -> None:
    first = build_pause_image(tmp_path / "one" / "pause", tar=True)
    second = build_pause_image(tmp_path / "two" / "pause", tar=True)
    assert first == tmp_path / "one" / "pause.tar"
    assert first.read_bytes() == second.read_bytes()
    image = ImageStore(tmp_path / "store").import_path(first)
    assert image.config.entrypoint == tuple(ENTRYPOINT)
    assert (image.rootfs / "bin" / "sleep").is_symlink()


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "cli"), "--name", "example.test/pause:1"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'cli'} sha256:")
    entry, _ = _manifest(tmp_path / "cli")
    assert entry["annotations"][mt.REF_NAME] == "example.test/pause:1"


def _busybox() -> str:
    path = shutil.which("busybox")
    if path is None:
        pytest.skip("needs busybox on the host to run the entrypoint")
    return path


def _entrypoint(busybox: str) -> list[str]:
    # The image's /bin/sh is busybox; run the same script with the host's busybox.
    return [busybox, "sh", *ENTRYPOINT[1:]]


def _children(pid: int) -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children.update(map(int, (task / "children").read_text().split()))
        except OSError:
            continue
    return children


def _wait_for_children(pid: int) -> set[int]:
    """The shell's children once one of them runs ``sleep`` (signalled between its fork and its
    exec, a child still has the shell's handlers and loses the signal: a race of any shell)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        children = _children(pid)
        if any(_runs_sleep(child) for child in children):
            return children
        time.sleep(0.02)
    raise AssertionError(f"process {pid} started no sleep")


def _runs_sleep(pid: int) -> bool:
    try:
        return b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_entrypoint_exits_promptly_on_signal(signum: signal.Signals) -> None:
    proc = subprocess.Popen(_entrypoint(_busybox()))
    sleeps: set[int] = set()
    try:
        sleeps = _wait_for_children(proc.pid)
        started = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 2
        # The trap also kills the background sleep, but busybox's sh loses that race now and
        # then; as a container's PID 1 it does not matter (test_..._as_pid_1: the namespace
        # goes, and everything in it).
    finally:
        proc.kill()
        proc.wait()
        for pid in sleeps:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_entrypoint_exits_on_sigterm_as_pid_1() -> None:
    """As PID 1 of a PID namespace (as in a container), SIGTERM is delivered only because it is handled."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux unshare")
    userns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    probe = subprocess.run([unshare, *userns, "--pid", "--fork", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    proc = subprocess.Popen([unshare, *userns, "--pid", "--fork", "--kill-child", *_entrypoint(_busybox())])
    try:
        # unshare's child is PID 1 of the new namespace: the shell.
        [shell] = _wait_for_children(proc.pid)
        _wait_for_children(shell)
        os.kill(shell, signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
        proc.wait()
