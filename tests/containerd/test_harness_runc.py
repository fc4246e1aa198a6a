"""The harness proven with runc's own shim: ctr run works, exit codes propagate, a terminal
works, and after each test nothing of it remains (the ``ctr`` fixture checks; these tests check
the checks)."""

from __future__ import annotations

import os
import re
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from tests.containerd.harness import (
    BUSYBOX,
    CNI_PLUGINS,
    CNI_SUBNET,
    CRI_NAMESPACE,
    HAKO,
    NAMESPACE,
    PAUSE,
    RUNC,
    VENV_BIN,
    Containerd,
    Ctr,
    Paths,
    cni_available,
    cni_conflist,
    render_config,
    run_in_pty,
    unique_id,
)


def test_config_is_valid_toml_with_what_cri_needs(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    config = tomllib.loads(render_config(paths, hako_config=tmp_path / "hako.toml"))
    assert config["version"] == 2
    assert config["root"] == str(paths.root)
    assert config["state"] == str(paths.state)
    assert config["grpc"]["address"] == str(paths.address)
    assert config["ttrpc"]["address"] == str(paths.ttrpc_address)
    assert "io.containerd.internal.v1.opt" in config["disabled_plugins"]  # would create /opt/containerd
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == PAUSE
    assert cri["restrict_oom_score_adj"] is True
    assert cri["cni"]["conf_dir"].startswith(str(tmp_path))  # never the host's /etc/cni/net.d
    # Debian's plugins where installed (with a network of the tests' own), else an empty dir
    assert cri["cni"]["bin_dir"] == str(CNI_PLUGINS if cni_available() else paths.cni_bin)
    ipam = cni_conflist(paths)["plugins"][0]["ipam"]
    assert ipam["dataDir"].startswith(str(tmp_path)) and ipam["ranges"] == [[{"subnet": CNI_SUBNET}]]
    runtimes = cri["containerd"]["runtimes"]
    assert runtimes["runc"]["runtime_type"] == RUNC.type
    assert runtimes["runc"]["options"]["Root"] == str(paths.runc_root)
    assert runtimes["hako"]["runtime_type"] == HAKO.type
    assert runtimes["hako"]["options"] == {"ConfigPath": str(tmp_path / "hako.toml")}
    assert (
        "options"
        not in tomllib.loads(render_config(paths))["plugins"]["io.containerd.grpc.v1.cri"]["containerd"][
            "runtimes"
        ]["hako"]
    )


@pytest.mark.integration
def test_images_imported_under_their_names(containerd: Containerd) -> None:
    for namespace in (NAMESPACE, CRI_NAMESPACE):
        names = containerd.ctr(namespace)("images", "ls", "-q", check=True).stdout.split()
        assert BUSYBOX in names
        assert PAUSE in names


@pytest.mark.integration
def test_containerd_is_private(containerd: Containerd) -> None:
    assert containerd.pid is not None
    cmdline = Path(f"/proc/{containerd.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"--config", str(containerd.paths.config).encode()]
    environ = dict(
        item.split(b"=", 1)
        for item in Path(f"/proc/{containerd.pid}/environ").read_bytes().split(b"\0")
        if item
    )
    assert environ[b"PATH"].split(b":")[0] == str(VENV_BIN).encode()  # where containerd-shim-hako-v2 is
    assert environ[b"HAKO_RUN"] == str(containerd.paths.hako_run).encode()
    plugins = containerd.ctr()("plugins", "ls", check=True).stdout
    assert "io.containerd.internal.v1  opt" not in re.sub(" +", "  ", plugins)  # /opt/containerd


@pytest.mark.integration
def test_echo(ctr: Ctr, containerd: Containerd) -> None:
    result = ctr.run(RUNC, unique_id("echo"), "echo", "hi")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", "")


@pytest.mark.integration
def test_exit_code_propagates(ctr: Ctr) -> None:
    result = ctr.run(RUNC, unique_id("exit"), "sh", "-c", "exit 3")
    assert result.returncode == 3, result.stderr


@pytest.mark.integration
def test_runs_on_the_host_kernel(ctr: Ctr) -> None:
    result = ctr.run(RUNC, unique_id("uname"), "uname", "-r")
    assert result.stdout.strip() == os.uname().release


@pytest.mark.integration
def test_tty_through_a_pty(ctr: Ctr) -> None:
    returncode, output = run_in_pty(ctr.run_argv(RUNC, unique_id("tty"), "tty", tty=True), timeout=60)
    assert returncode == 0, output
    assert re.search(r"/dev/pts/\d+", output), output


@pytest.mark.integration
def test_nothing_remains_after_runs(ctr: Ctr, containerd: Containerd) -> None:
    for _ in range(3):
        assert ctr.run(RUNC, unique_id("cycle"), "true").returncode == 0
    assert ctr.containers() == []
    assert ctr.tasks() == {}
    assert containerd.sweep([NAMESPACE], settle=10) == []


@pytest.mark.integration
def test_sweep_finds_and_removes_what_a_test_leaves(ctr: Ctr, containerd: Containerd) -> None:
    """A detached container left running is found (task, container, shim, runc container,
    rootfs mount, shim socket), removed, and reported."""
    container = unique_id("left")
    assert ctr.run(RUNC, container, "sleep", "1000", rm=False, detach=True).returncode == 0
    ctr.wait_for_status(container, "RUNNING")
    shims = containerd.shims(RUNC)
    assert len(shims) == 1, shims
    assert [c for _, c in containerd.runc_containers()] == [container]
    assert any(container in m for m in containerd.mounts())
    problems = containerd.sweep([NAMESPACE], settle=10)
    assert f"task {NAMESPACE}/{container} left RUNNING" in problems
    assert f"container {NAMESPACE}/{container} left" in problems
    # Removing the container through containerd takes the rest with it.
    assert not any(p.startswith(("process left", "mount left", "runc container")) for p in problems), problems
    assert containerd.shims() == []
    assert containerd.runc_containers() == []
    assert containerd.mounts() == []
    assert containerd.sweep([NAMESPACE], settle=0) == []


@pytest.mark.integration
def test_sweep_kills_a_process_left_without_containerd(ctr: Ctr, containerd: Containerd) -> None:
    """A process started for the daemon (found by its environment, which names the daemon's dir,
    as a shim's does) that outlives what started it is killed, with its children."""
    env = {**os.environ, "HAKO_RUN": str(containerd.paths.hako_run)}
    proc = subprocess.Popen(["sh", "-c", "sleep 1000; true"], env=env)
    try:
        deadline = time.monotonic() + 10  # (it is found once it runs sh, with that environment)
        while proc.pid not in [p.pid for p in containerd.processes()] and time.monotonic() < deadline:
            time.sleep(0.05)
        problems = containerd.sweep([NAMESPACE], settle=0.5)
        seen = f"{proc.pid} exited {proc.returncode}" if proc.poll() is not None else f"{proc.pid} runs"
        assert any(p.startswith(f"process left: {proc.pid} ") for p in problems), (problems, seen)
        assert proc.wait(timeout=5) == -9
    finally:
        proc.kill()
        proc.wait()
