"""A pod: several containers in one sandbox (one VM), through the runtime library.

This is how the containerd shim will use hako: one Sandbox, containers added to
it. The scenario runs in a forked child in its own mount namespace, as the
sandbox daemon does, and reports back as JSON.
"""

from __future__ import annotations

import json
import os
import secrets
import traceback
from pathlib import Path
from typing import Any

import pytest

from hako import assets
from hako.hypervisor import choose
from hako.image.store import ImageStore
from hako.oci.spec import RunOptions, build_spec
from hako.runtime import mounts
from hako.runtime.config import SandboxConfig
from hako.runtime.sandbox import Sandbox
from tests.integration.harness import BUSYBOX, qemu_pids_under

pytestmark = pytest.mark.integration


def _exec(sandbox: Sandbox, container: str, args: list[str]) -> tuple[int, str]:
    agent = sandbox.agent
    assert agent is not None
    exec_id = secrets.token_hex(4)
    process = {"args": args, "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
    agent.exec_process(container, exec_id, process, stdin=False)
    output = b""
    while chunk := agent.read_stdout(container, exec_id):
        output += chunk
    return sandbox.wait(container, exec_id), output.decode()


def _scenario(store: Path, run_dir: Path) -> dict[str, Any]:
    image = ImageStore(store).get(BUSYBOX)
    config = SandboxConfig(
        sandbox_id=secrets.token_hex(32),
        hostname="pod",
        kernel=assets.kernel("trimmed"),
        image=assets.guest_image("trimmed"),
        memory_mib=256,
        vcpus=1,
        accel=choose("auto"),
        run_dir=run_dir,
    )
    sandbox = Sandbox(config)
    result: dict[str, Any] = {}
    try:
        sandbox.start()
        sandbox.wait_ready()
        for name in ("web", "sidecar"):
            spec = build_spec(
                name, RunOptions(args=["sleep", "1000"]), image=image.config, rootfs=image.rootfs
            )
            sandbox.add_container(name, spec, stdin=False)
            sandbox.start_container(name)
        for name in ("web", "sidecar"):
            result[name] = {
                "boot_id": _exec(sandbox, name, ["cat", "/proc/sys/kernel/random/boot_id"]),
                "ps": _exec(sandbox, name, ["ps", "-o", "pid,args"]),
                "marker": _exec(sandbox, name, ["sh", "-c", f"echo {name} > /tmp/mine; cat /tmp/mine"]),
            }
        sandbox.remove_container("sidecar")
        result["web_after_removal"] = _exec(sandbox, "web", ["true"])
        result["qemu_pid"] = sandbox.vm.pid
    finally:
        sandbox.stop()
    return result


def test_two_containers_share_one_vm(image_store: Path, tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own mount namespace, like a sandbox daemon
        code = 0
        try:
            os.close(read_fd)
            mounts.private_namespace()
            report = _scenario(image_store, tmp_path / "pod")
        except BaseException:
            report = {"error": traceback.format_exc()}
            code = 1
        os.write(write_fd, json.dumps(report).encode())
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = json.loads(pipe.read() or '{"error": "no report"}')
    os.waitpid(pid, 0)
    assert "error" not in report, report.get("error")

    web, sidecar = report["web"], report["sidecar"]
    # One VM: both containers see the same guest kernel boot.
    assert web["boot_id"][0] == 0 and web["boot_id"] == sidecar["boot_id"]
    # Separate containers: each is PID 1 of its own namespace and sees only itself.
    for container in (web, sidecar):
        status, ps = container["ps"]
        assert status == 0
        assert [line.split()[:2] for line in ps.splitlines()[1:2]] == [["1", "sleep"]], ps
        assert "sleep 1000" in ps and len(ps.splitlines()) == 3  # header, sleep, ps
    # Separate root filesystems.
    assert web["marker"] == [0, "web\n"] and sidecar["marker"] == [0, "sidecar\n"]
    # Removing one leaves the other running.
    assert report["web_after_removal"][0] == 0
    assert qemu_pids_under(tmp_path) == []
    assert not (tmp_path / "pod" / "shared").exists()
