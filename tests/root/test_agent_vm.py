"""The guest agent as PID 1 of a real (TCG) micro-VM: boot, cgroup v2 limits, pty, power-off.

Needs a guest kernel and the guest's Debian files extracted (not the product image:
an ad-hoc initramfs is assembled here from them, with a busybox container rootfs
inside). Set HAKO_TEST_KERNEL / HAKO_TEST_DEBROOT, or it looks at the paths below and
skips if they are missing. This is where cgroup limits get checked: the host may
not have cgroup v2.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hako_agent
from hako_api import agent_pb2
from hako_ttrpc import Client, Code, SocketTransport, Stub, TtrpcError

pytestmark = [pytest.mark.root, pytest.mark.integration, pytest.mark.timeout(600)]

KERNEL = Path(os.environ.get("HAKO_TEST_KERNEL", "/tmp/kx/linux-source-6.1/vmlinux"))
DEBROOT = Path(os.environ.get("HAKO_TEST_DEBROOT", "/tmp/debs/root"))
QEMU = shutil.which("qemu-system-x86_64")
SRC = Path(hako_agent.__file__).parent.parent
# Standard library parts the agent never imports: left out to keep the initramfs small.
UNUSED_STDLIB = (
    "test", "idlelib", "tkinter", "lib2to3", "ensurepip", "pydoc_data", "turtledemo", "distutils", "unittest",
    "asyncio", "email", "http", "xml", "xmlrpc", "sqlite3", "multiprocessing", "curses", "dbm", "wsgiref",
    "urllib", "html", "concurrent", "venv", "tomllib", "zoneinfo",
)  # fmt: skip
CMDLINE = "console=ttyS0 quiet panic=-1 reboot=t lpj=626688 random.trust_cpu=on hako.debug=1"
INIT = """#!/usr/bin/python3.11 -IS
import sys
sys.path[:0] = ["/usr/lib/hako", "/usr/lib/python3/dist-packages"]
from hako_agent.main import main
raise SystemExit(main())
"""


def build_initramfs(work: Path) -> Path:
    root = work / "root"
    shutil.copytree(DEBROOT, root, symlinks=True)
    shutil.rmtree(root / "usr/share", ignore_errors=True)
    stdlib = root / "usr/lib/python3.11"
    for name in UNUSED_STDLIB:
        shutil.rmtree(stdlib / name, ignore_errors=True)
    for package in ("hako_agent", "hako_ttrpc", "hako_api"):
        shutil.copytree(
            SRC / package, root / "usr/lib/hako" / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    subprocess.run(
        ["/usr/bin/python3.11", "-m", "compileall", "-q", "-j2", "--invalidation-mode", "unchecked-hash",
         str(stdlib), str(root / "usr/lib/python3/dist-packages"), str(root / "usr/lib/hako")],
        check=False, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    for d in ("dev", "proc", "sys", "run", "tmp", "etc/hako"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for name, major, minor in (("console", 5, 1), ("null", 1, 3), ("urandom", 1, 9)):
        os.mknod(root / "dev" / name, 0o600 | 0o020000, os.makedev(major, minor))
    box = root / "containers/busybox"
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (box / d).mkdir(parents=True)
    shutil.copy(root / "bin/busybox", box / "bin/busybox")
    applets = subprocess.run([str(box / "bin/busybox"), "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (box / "bin" / applet).symlink_to("busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    cpio = work / "initramfs.cpio"
    with cpio.open("wb") as out:
        subprocess.run("find . | cpio -o -H newc --quiet", shell=True, cwd=root, stdout=out, check=True)
    return cpio


class VM:
    def __init__(self, work: Path, initrd: Path) -> None:
        self.sock = work / "agent.sock"
        self.log = work / "agent.log"
        self.console = work / "console.log"
        assert QEMU is not None
        self.process = subprocess.Popen(
            [
                QEMU, "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off", "-accel", "tcg",
                "-cpu", "max", "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
                "-no-reboot", "-kernel", str(KERNEL), "-initrd", str(initrd),
                "-append", CMDLINE,
                "-serial", f"file:{self.console}", "-device", "virtio-serial-device",
                "-chardev", f"socket,id=agent,path={self.sock},server=on,wait=off",
                "-device", "virtserialport,chardev=agent,name=hako.agent",
                "-chardev", f"file,id=log,path={self.log}",
                "-device", "virtserialport,chardev=log,name=hako.log",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.client: Client | None = None

    def connect(self, timeout: float = 120) -> Stub:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(self.sock))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)
        self.client = Client(SocketTransport(sock))
        return Stub(self.client, agent_pb2.DESCRIPTOR.services_by_name["Agent"])

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    if not (KERNEL.exists() and (DEBROOT / "usr/bin/python3.11").exists() and QEMU and shutil.which("cpio")):
        pytest.skip("needs a guest kernel, the guest's Debian files, QEMU and cpio")
    work = tmp_path_factory.mktemp("agent-vm")
    machine = VM(work, build_initramfs(work))
    try:
        yield machine
    finally:
        machine.stop()


@pytest.fixture(scope="module")
def agent(vm: VM) -> Stub:
    stub = vm.connect()
    stub.Check(agent_pb2.CheckRequest(), timeout=120)
    return stub


def spec(args: list[str], resources: dict[str, Any] | None = None, terminal: bool = False) -> bytes:
    return json.dumps(
        {
            "root": {"path": "/containers/busybox"},
            "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/", "terminal": terminal},
            "hostname": "ctr",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {
                    "destination": "/dev",
                    "type": "tmpfs",
                    "source": "tmpfs",
                    "options": ["nosuid", "mode=755"],
                },
                {
                    "destination": "/dev/pts",
                    "type": "devpts",
                    "source": "devpts",
                    "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
                },
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "ro"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
            ],
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "mount", "uts", "ipc", "cgroup")],
                "resources": resources or {},
            },
        }
    ).encode()


def run(agent: Stub, cid: str, args: list[str], **kw: Any) -> tuple[int, bytes]:
    agent.CreateContainer(
        agent_pb2.CreateContainerRequest(container_id=cid, oci_spec=spec(args, **kw)), timeout=120
    )
    try:
        agent.StartContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=60)
        out = b""
        while data := agent.ReadStdout(agent_pb2.ReadStreamRequest(container_id=cid), timeout=60).data:
            out += data
        return agent.WaitProcess(agent_pb2.ProcessRequest(container_id=cid), timeout=60).exit_status, out
    finally:
        agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid, timeout_ms=100), timeout=60)


def test_boot_milestones(agent: Stub) -> None:
    check = agent.Check(agent_pb2.CheckRequest(), timeout=30)
    boot = check.boot
    assert check.kernel_release.endswith("-hako") or check.kernel_release
    assert 0 < boot.kernel_done < boot.agent_start < boot.agent_ready < check.uptime
    details = agent.GetGuestDetails(agent_pb2.GuestDetailsRequest(), timeout=30)
    assert {"memory", "pids", "cpu"} <= set(details.cgroup_controllers)
    assert details.online_cpus == 1 and 200 << 20 < details.memory_total_bytes <= 256 << 20


def test_sandbox_setup(agent: Stub) -> None:
    agent.CreateSandbox(
        agent_pb2.CreateSandboxRequest(sandbox_id="sb", hostname="guest", dns=["10.0.2.3"]), timeout=60
    )
    agent.ReseedRandomDev(agent_pb2.ReseedRandomDevRequest(data=os.urandom(64)), timeout=30)
    agent.SetGuestDateTime(agent_pb2.SetGuestDateTimeRequest(sec=int(time.time()), usec=0), timeout=30)


def test_cgroup_limits_apply(agent: Stub) -> None:
    resources = {
        "memory": {"limit": 64 << 20},
        "pids": {"limit": 20},
        "cpu": {"quota": 50000, "period": 100000},
    }
    script = "cat /proc/self/cgroup /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max /sys/fs/cgroup/cpu.max"
    status, out = run(agent, "limits", ["sh", "-c", script], resources=resources)
    assert status == 0
    assert out.decode().splitlines() == ["0::/", str(64 << 20), "20", "50000 100000"]


def test_loopback_is_up(agent: Stub) -> None:
    status, out = run(agent, "lo", ["cat", "/sys/class/net/lo/flags"])  # the VM's network namespace
    assert int(out, 16) & 0x1  # IFF_UP


def test_oom_kill_is_reported(agent: Stub) -> None:
    cid = "oom"
    agent.CreateContainer(
        agent_pb2.CreateContainerRequest(
            container_id=cid,
            oci_spec=spec(
                ["sh", "-c", "x=0123456789abcdef; while true; do x=$x$x; done"],
                {"memory": {"limit": 16 << 20}},
            ),
        ),
        timeout=120,
    )
    try:
        agent.StartContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=60)
        assert agent.WaitProcess(agent_pb2.ProcessRequest(container_id=cid), timeout=120).exit_status == 137
        stats = agent.StatsContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=30)
        assert stats.memory.oom_kills >= 1 and stats.memory.limit_bytes == 16 << 20
    finally:
        agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid), timeout=60)


def test_pids_limit(agent: Stub) -> None:
    script = "cat /sys/fs/cgroup/pids.max; for i in 1 2 3 4 5 6 7 8; do sleep 5 & done; echo survived"
    status, out = run(agent, "pids", ["sh", "-c", script], resources={"pids": {"limit": 4}})
    assert out == b"4\n" and status != 0  # the shell could not fork the fifth process


def test_pause_update_exec(agent: Stub) -> None:
    cid = "pause"
    agent.CreateContainer(
        agent_pb2.CreateContainerRequest(
            container_id=cid, oci_spec=spec(["sh", "-c", "while true; do sleep 0.1; done"])
        ),
        timeout=120,
    )
    try:
        init = agent.StartContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=60).pid
        assert init in agent.ListProcesses(agent_pb2.ContainerRequest(container_id=cid), timeout=30).pids
        agent.PauseContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=30)
        with pytest.raises(TtrpcError) as info:
            agent.PauseContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=30)
        assert info.value.code == Code.FAILED_PRECONDITION
        resources = json.dumps({"memory": {"limit": 32 << 20}}).encode()
        agent.UpdateContainer(
            agent_pb2.UpdateContainerRequest(container_id=cid, resources=resources), timeout=30
        )
        agent.ResumeContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=30)
        process = json.dumps({"args": ["cat", "/sys/fs/cgroup/memory.max"], "env": ["PATH=/bin"]}).encode()
        agent.ExecProcess(
            agent_pb2.ExecProcessRequest(container_id=cid, exec_id="e", process=process), timeout=60
        )
        out = agent.ReadStdout(agent_pb2.ReadStreamRequest(container_id=cid, exec_id="e"), timeout=30).data
        assert out == str(32 << 20).encode() + b"\n"
        stats = agent.StatsContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=30)
        assert stats.memory.limit_bytes == 32 << 20 and stats.cpu.usage_usec > 0 and stats.pids.current >= 1
    finally:
        agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid, timeout_ms=100), timeout=60)


def test_pty(agent: Stub) -> None:
    status, out = run(agent, "pty", ["tty"], terminal=True)
    assert (status, out) == (0, b"/dev/pts/0\r\n")


def test_reconnect_keeps_containers(vm: VM, agent: Stub) -> None:
    agent.CreateContainer(
        agent_pb2.CreateContainerRequest(container_id="keep", oci_spec=spec(["sleep", "100"])), timeout=120
    )
    agent.StartContainer(agent_pb2.ContainerRequest(container_id="keep"), timeout=60)
    assert vm.client is not None
    vm.client.close()
    again = vm.connect()
    deadline = time.monotonic() + 60
    while True:
        try:
            pids = again.ListProcesses(agent_pb2.ContainerRequest(container_id="keep"), timeout=10).pids
            break
        except TtrpcError:
            if time.monotonic() > deadline:
                raise
            vm.client.close()
            time.sleep(0.2)
            again = vm.connect()
    assert len(pids) == 1


def test_destroy_powers_off(vm: VM) -> None:
    stub = (
        vm.connect() if vm.client is None else Stub(vm.client, agent_pb2.DESCRIPTOR.services_by_name["Agent"])
    )
    stub.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)
    assert vm.process.wait(60) == 0
    assert "container keep: removed" in vm.log.read_text()
