"""The guest agent's container layer on the host kernel (root, no VM), with a busybox rootfs.

The agent's Sandbox runs in this process: its reaper thread waits for every
child of the test process, so nothing here may use subprocess once it runs.

cgroups: this host may be cgroup v1 (or hybrid). Limits (memory.max, ...) need a
cgroup v2 root with controllers, so they are only checked in a VM (see the
agent's report); here the cgroup is the v2 hierarchy if there is one
(/sys/fs/cgroup, else the hybrid's /sys/fs/cgroup/unified, which still has the
freezer, cgroup.kill and cgroup.procs), and the cgroup tests skip without one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hako_agent.cgroups import is_cgroup2
from hako_agent.errors import AlreadyExists, ExecFailed, FailedPrecondition, InvalidArgument, NotFound
from hako_agent.sandbox import Sandbox, Storage
from hako_agent.service import AgentService
from hako_api import agent_pb2
from hako_ttrpc import Client, Code, Server, SocketTransport, Stub, TtrpcError

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

BUSYBOX = "/bin/busybox"
CGROUP_ROOT = next((p for p in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified") if is_cgroup2(p)), None)
CGROUP_PARENT = "/hako-agent-test"
needs_cgroup2 = pytest.mark.skipif(CGROUP_ROOT is None, reason="no cgroup v2 hierarchy on this host")


def mountinfo() -> list[str]:
    """This namespace's mount points (id and fields that stay put while other tests run)."""
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not os.path.exists(BUSYBOX):
        pytest.skip("needs /bin/busybox")
    root = tmp_path_factory.mktemp("agent") / "rootfs"
    for d in ("bin", "proc", "dev", "sys", "tmp", "etc", "work"):
        (root / d).mkdir(parents=True)
    (root / "tmp").chmod(0o1777)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout
    for applet in applets.split():  # (before the reaper starts)
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "bin" / "notexec").write_text("#!/bin/sh\necho nope\n")
    (root / "bin" / "notexec").chmod(0o644)
    return root


@pytest.fixture(scope="module")
def sandbox(rootfs: Path) -> Iterator[Sandbox]:
    before = mountinfo()
    sb = Sandbox(cgroup_root=CGROUP_ROOT)
    try:
        yield sb
    finally:
        sb.shutdown(grace=0.1)
        sb.reaper.stop()
        if CGROUP_ROOT is not None:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(CGROUP_ROOT + CGROUP_PARENT)
    assert mountinfo() == before, "mounts left behind"


_ids = iter(range(1_000_000))


def new_id() -> str:
    return f"t{os.getpid()}-{next(_ids)}"


def make_spec(rootfs: Path, cid: str, args: list[str], **kw: Any) -> bytes:
    process: dict[str, Any] = {
        "args": args,
        "env": kw.pop("env", ["PATH=/bin", "HOME=/"]),
        "cwd": kw.pop("cwd", "/"),
        "terminal": kw.pop("terminal", False),
    }
    for key in ("user", "capabilities", "rlimits", "noNewPrivileges"):
        if key in kw:
            process[key] = kw.pop(key)
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "root": {"path": str(kw.pop("root", rootfs)), "readonly": kw.pop("readonly", False)},
        "process": process,
        "hostname": f"box-{cid}"[:60],
        "mounts": [
            {
                "destination": "/proc",
                "type": "proc",
                "source": "proc",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "nodev", "mode=1777"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "nodev"],
            },
            *kw.pop("mounts", []),
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "mount", "uts", "ipc")],
            "cgroupsPath": f"{CGROUP_PARENT}/{cid}",
            "maskedPaths": kw.pop("masked", []),
            "readonlyPaths": kw.pop("readonly_paths", []),
        },
    }
    assert not kw, f"unused: {kw}"
    return json.dumps(spec).encode()


def drain(sb: Sandbox, cid: str, exec_id: str = "", stderr: bool = False) -> bytes:
    out = b""
    while chunk := sb.read_output(cid, exec_id, stderr, 65536):
        out += chunk
    return out


def run(
    sb: Sandbox, rootfs: Path, args: list[str], stdin: bytes | None = None, **kw: Any
) -> tuple[int, str, str]:
    """Create, start, feed, read, wait, remove: (exit status, stdout, stderr)."""
    cid = new_id()
    sb.create_container(cid, make_spec(rootfs, cid, args, **kw), [], stdin is not None)
    try:
        sb.start_container(cid)
        if stdin is not None:
            sb.write_stdin(cid, "", stdin)
            sb.close_stdin(cid, "")
        out = drain(sb, cid)
        err = drain(sb, cid, stderr=True)
        status, _ = sb.wait_process(cid, "")
        return status, out.decode(), err.decode()
    finally:
        sb.remove_container(cid, 0.1)


def started(sb: Sandbox, rootfs: Path, args: list[str], **kw: Any) -> str:
    cid = new_id()
    sb.create_container(cid, make_spec(rootfs, cid, args, **kw), [], False)
    sb.start_container(cid)
    return cid


# -- running programs ---------------------------------------------------------------------------


def test_echo(sandbox: Sandbox, rootfs: Path) -> None:
    assert run(sandbox, rootfs, ["echo", "hi"]) == (0, "hi\n", "")


def test_exit_code_and_stderr(sandbox: Sandbox, rootfs: Path) -> None:
    assert run(sandbox, rootfs, ["sh", "-c", "echo oops >&2; exit 3"]) == (3, "", "oops\n")


def test_not_found_is_an_exec_failure(sandbox: Sandbox, rootfs: Path) -> None:
    cid = new_id()
    sandbox.create_container(cid, make_spec(rootfs, cid, ["nosuchprogram"]), [], False)
    try:
        with pytest.raises(ExecFailed) as info:
            sandbox.start_container(cid)
        assert info.value.errno == errno.ENOENT and info.value.path == "nosuchprogram"
        assert str(info.value) == 'exec: "nosuchprogram": executable file not found in $PATH'
        assert sandbox.wait_process(cid, "")[0] == 127
        assert sandbox.container(cid).state == "stopped"
    finally:
        sandbox.remove_container(cid, 0)


def test_not_executable_is_eacces(sandbox: Sandbox, rootfs: Path) -> None:
    cid = new_id()
    sandbox.create_container(cid, make_spec(rootfs, cid, ["/bin/notexec"]), [], False)
    try:
        with pytest.raises(ExecFailed) as info:
            sandbox.start_container(cid)
        assert info.value.errno == errno.EACCES
        assert str(info.value) == 'exec: "/bin/notexec": permission denied'
    finally:
        sandbox.remove_container(cid, 0)


def test_own_pid_namespace(sandbox: Sandbox, rootfs: Path) -> None:
    status, out, _ = run(sandbox, rootfs, ["ps", "-o", "pid,args"])
    rows = [line.split(None, 1) for line in out.splitlines()[1:]]
    assert status == 0 and rows == [["1", "ps -o pid,args"]]
    status, out, _ = run(sandbox, rootfs, ["sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'"])
    pid, visible = out.split()
    # sh, ls and perhaps grep (it may not have started while ls reads /proc): nothing from the host
    assert pid == "1" and int(visible) in (2, 3)


def test_hostname_uts(sandbox: Sandbox, rootfs: Path) -> None:
    status, out, _ = run(sandbox, rootfs, ["hostname"])
    assert status == 0 and out.startswith("box-t")
    assert socket.gethostname() != out.strip()


def test_user_and_groups(sandbox: Sandbox, rootfs: Path) -> None:
    status, out, _ = run(sandbox, rootfs, ["id"], user={"uid": 1000, "gid": 1001, "additionalGids": [10, 20]})
    assert status == 0
    fields = dict(part.split("=", 1) for part in out.split())
    assert fields["uid"] == "1000" and fields["gid"] == "1001"
    assert {g.split("(")[0] for g in fields["groups"].split(",")} >= {"10", "20"}


def test_capabilities_and_no_new_privs(sandbox: Sandbox, rootfs: Path) -> None:
    caps = ["CAP_KILL", "CAP_NET_BIND_SERVICE"]  # bits 5 and 10
    sets = {name: caps for name in ("bounding", "effective", "permitted")}
    status, out, _ = run(
        sandbox,
        rootfs,
        ["grep", "-E", "^(Cap|NoNewPrivs)", "/proc/self/status"],
        capabilities=sets,
        noNewPrivileges=True,
    )
    fields = dict(line.split(":\t") for line in out.splitlines())
    assert status == 0
    assert fields["CapEff"] == fields["CapPrm"] == fields["CapBnd"] == f"{(1 << 5) | (1 << 10):016x}"
    assert fields["CapInh"] == fields["CapAmb"] == "0" * 16
    assert fields["NoNewPrivs"] == "1"


def test_non_root_keeps_only_ambient_caps(sandbox: Sandbox, rootfs: Path) -> None:
    caps = {
        name: ["CAP_NET_BIND_SERVICE"]
        for name in ("bounding", "effective", "permitted", "inheritable", "ambient")
    }
    user = {"uid": 1000, "gid": 1000}
    status, out, _ = run(
        sandbox, rootfs, ["grep", "^CapEff", "/proc/self/status"], user=user, capabilities=caps
    )
    assert status == 0 and out.split()[1] == f"{1 << 10:016x}"


def test_ambient_caps_that_are_not_inheritable_are_skipped_as_runc_does(
    sandbox: Sandbox, rootfs: Path
) -> None:
    # `runc spec` asks for ambient capabilities without inheritable ones: the kernel cannot
    # raise those, and runc goes on without them.
    caps = {
        name: ["CAP_KILL", "CAP_NET_BIND_SERVICE"]
        for name in ("bounding", "effective", "permitted", "ambient")
    }
    status, out, err = run(sandbox, rootfs, ["grep", "^Cap", "/proc/self/status"], capabilities=caps)
    fields = dict(line.split(":\t") for line in out.splitlines())
    assert status == 0, err
    assert fields["CapEff"] == f"{(1 << 5) | (1 << 10):016x}" and fields["CapAmb"] == "0" * 16


def test_cwd_and_env(sandbox: Sandbox, rootfs: Path) -> None:
    status, out, _ = run(sandbox, rootfs, ["env"], env=["PATH=/bin", "FOO=bar baz"], cwd="/work")
    assert status == 0 and sorted(out.splitlines()) == ["FOO=bar baz", "PATH=/bin"]
    assert run(sandbox, rootfs, ["pwd"], cwd="/work")[1] == "/work\n"


def test_a_missing_cwd_is_made_in_the_rootfs_as_runc_does(sandbox: Sandbox, rootfs: Path) -> None:
    assert run(sandbox, rootfs, ["pwd"], cwd="/made/for/it")[1] == "/made/for/it\n"
    made = rootfs / "made" / "for" / "it"
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o755
    shutil.rmtree(rootfs / "made")


def test_a_cwd_that_cannot_be_made_fails_create(sandbox: Sandbox, rootfs: Path) -> None:
    cid = new_id()
    with pytest.raises(FailedPrecondition, match="cwd '/etc/passwd/x'"):
        sandbox.create_container(cid, make_spec(rootfs, cid, ["true"], cwd="/etc/passwd/x"), [], False)
    with pytest.raises(NotFound):
        sandbox.container(cid)


def test_rlimits(sandbox: Sandbox, rootfs: Path) -> None:
    rlimits = [{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}]
    assert run(sandbox, rootfs, ["sh", "-c", "ulimit -n; ulimit -Hn"], rlimits=rlimits)[1].split() == [
        "123",
        "456",
    ]


def test_stdin_pipe(sandbox: Sandbox, rootfs: Path) -> None:
    assert run(sandbox, rootfs, ["cat"], stdin=b"hello\nworld\n") == (0, "hello\nworld\n", "")
    # without stdin the process reads /dev/null
    assert run(sandbox, rootfs, ["cat"]) == (0, "", "")


def test_pty(sandbox: Sandbox, rootfs: Path) -> None:
    status, out, err = run(sandbox, rootfs, ["sh", "-c", "tty; stty size"], terminal=True)
    assert status == 0 and err == ""
    assert out.replace("\r", "").splitlines()[0] == "/dev/pts/0"


def test_pty_stdin_and_resize(sandbox: Sandbox, rootfs: Path) -> None:
    cid = started(sandbox, rootfs, ["sh", "-c", "read line; stty size; echo got $line"], terminal=True)
    try:
        sandbox.resize(cid, "", 33, 99)
        sandbox.write_stdin(cid, "", b"abc\n")
        out = drain(sandbox, cid).decode().replace("\r", "")
        assert "33 99\ngot abc\n" in out
        assert sandbox.wait_process(cid, "")[0] == 0
    finally:
        sandbox.remove_container(cid, 0)


def test_masked_and_readonly_paths(sandbox: Sandbox, rootfs: Path) -> None:
    (rootfs / "work" / "secret").write_text("s3cret")
    script = (
        "wc -c < /proc/cmdline; ls /work | wc -l; grep ' /proc/sys ' /proc/self/mountinfo; "
        "touch /x 2>&1; touch /work/y 2>&1"
    )
    status, out, _ = run(
        sandbox,
        rootfs,
        ["sh", "-c", script],
        masked=["/proc/cmdline", "/work", "/nothere"],
        readonly_paths=["/proc/sys"],
        readonly=True,
    )
    (rootfs / "work" / "secret").unlink()
    lines = out.splitlines()
    assert lines[0].strip() == "0"  # a file: /dev/null over it
    assert lines[1].strip() == "0"  # a directory: an empty read-only tmpfs over it
    assert lines[2].split()[5].startswith("ro,")
    assert "Read-only file system" in lines[3]  # root.readonly
    assert "Read-only file system" in lines[4]
    assert status != 0


def test_bind_mount_and_storage(sandbox: Sandbox, rootfs: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data").write_text("from the host\n")
    storage_target = tmp_path / "storage" / "rootfs"
    storage = Storage("bind", str(rootfs), "", ["rbind"], str(storage_target))
    cid = new_id()
    mounts = [{"destination": "/data", "type": "bind", "source": str(shared), "options": ["rbind", "ro"]}]
    spec = make_spec(
        rootfs, cid, ["sh", "-c", "cat /data/data; touch /data/x 2>&1"], root=storage_target, mounts=mounts
    )
    sandbox.create_container(cid, spec, [storage], False)
    assert str(storage_target) in mountinfo()
    sandbox.start_container(cid)
    out = drain(sandbox, cid).decode()
    assert out.startswith("from the host\n") and "Read-only file system" in out
    sandbox.remove_container(cid, 0)
    assert str(storage_target) not in mountinfo()
    assert not (shared / "x").exists()


# -- lifecycle -----------------------------------------------------------------------------------


def test_states_and_errors(sandbox: Sandbox, rootfs: Path) -> None:
    cid = new_id()
    spec = make_spec(rootfs, cid, ["sleep", "100"])
    sandbox.create_container(cid, spec, [], False)
    try:
        assert sandbox.container(cid).state == "created"
        with pytest.raises(AlreadyExists):
            sandbox.create_container(cid, spec, [], False)
        with pytest.raises(FailedPrecondition, match="is created: cannot exec"):
            sandbox.exec_process(cid, "e1", b'{"args": ["true"]}', False)
        with pytest.raises(FailedPrecondition, match="is created: cannot pause"):
            sandbox.pause(cid)
        pid = sandbox.start_container(cid)
        assert pid == sandbox.container(cid).init.pid and pid > 1
        assert sandbox.container(cid).state == "running"
        with pytest.raises(FailedPrecondition, match="is running: cannot start"):
            sandbox.start_container(cid)
        with pytest.raises(NotFound):
            sandbox.wait_process(cid, "nosuchexec")
        sandbox.signal_process(cid, "", 9, False)
        assert sandbox.wait_process(cid, "")[0] == 137
        assert sandbox.container(cid).state == "stopped"
        sandbox.signal_process(cid, "", 9, False)  # gone already: still fine
        with pytest.raises(FailedPrecondition, match="is stopped: cannot exec"):
            sandbox.exec_process(cid, "e1", b'{"args": ["true"]}', False)
    finally:
        sandbox.remove_container(cid, 0)
    sandbox.remove_container(cid, 0)  # idempotent
    with pytest.raises(NotFound):
        sandbox.start_container(cid)


def test_bad_spec(sandbox: Sandbox, rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"^process\.args"):
        bad = json.dumps({"root": {"path": str(rootfs)}, "process": {"args": []}}).encode()
        sandbox.create_container(new_id(), bad, [], False)
    cid = new_id()
    with pytest.raises(InvalidArgument, match="^root.path: /nonexistent is not a directory"):
        sandbox.create_container(cid, make_spec(rootfs, cid, ["true"], root="/nonexistent"), [], False)


def test_signal_handled_by_init(sandbox: Sandbox, rootfs: Path) -> None:
    cid = started(
        sandbox, rootfs, ["sh", "-c", "trap 'exit 7' TERM; echo ready; while true; do sleep 0.05; done"]
    )
    try:
        assert sandbox.read_output(cid, "", False, 100) == b"ready\n"
        sandbox.signal_process(cid, "", 15, False)
        assert sandbox.wait_process(cid, "")[0] == 7
    finally:
        sandbox.remove_container(cid, 0)


def test_wait_from_two_threads(sandbox: Sandbox, rootfs: Path) -> None:
    cid = started(sandbox, rootfs, ["sh", "-c", "sleep 0.3; exit 5"])
    results: list[tuple[int, int]] = []
    threads = [
        threading.Thread(target=lambda: results.append(sandbox.wait_process(cid, ""))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    try:
        assert len(results) == 2 and results[0] == results[1] and results[0][0] == 5
        assert abs(results[0][1] - time.time_ns()) < 10e9
        assert sandbox.wait_process(cid, "") == results[0]  # keeps answering
    finally:
        sandbox.remove_container(cid, 0)


def test_remove_kills(sandbox: Sandbox, rootfs: Path) -> None:
    cid = started(sandbox, rootfs, ["sh", "-c", "sleep 100 & sleep 100"])
    init = sandbox.container(cid).init
    start = time.monotonic()
    sandbox.remove_container(cid, 0.2)  # sh as PID 1 ignores SIGTERM: SIGKILL after 0.2 s
    assert 0.15 < time.monotonic() - start < 5
    assert init.exited and init.exit_status == 137
    with pytest.raises(ProcessLookupError):
        os.kill(init.pid, 0)
    with pytest.raises(NotFound):
        sandbox.container(cid)


def test_remove_unblocks_readers(sandbox: Sandbox, rootfs: Path) -> None:
    cid = started(sandbox, rootfs, ["sleep", "100"])
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(sandbox.read_output(cid, "", False, 10)))
    reader.start()
    time.sleep(0.1)
    sandbox.remove_container(cid, 0)
    reader.join(5)
    assert got == [b""]


def test_reaper_child_exiting_before_it_is_tracked(sandbox: Sandbox) -> None:
    reaper = sandbox.reaper
    reaper.spawning()
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(5)
        reaper.forked()
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.01)  # reaped while nobody tracks it yet
        got: list[int] = []
        reaper.track(pid, got.append)
        assert got == [5]
    finally:
        reaper.spawned()


def test_reaper_reaps_orphans(sandbox: Sandbox) -> None:
    """A grandchild whose parent exits comes back to the agent (init, or a subreaper here)."""
    r, w = os.pipe()
    sandbox.reaper.spawning()
    try:
        pid = os.fork()
        if pid == 0:
            grandchild = os.fork()
            if grandchild == 0:
                time.sleep(0.2)
                os._exit(0)
            os.write(w, str(grandchild).encode())
            os._exit(0)
        sandbox.reaper.forked()
    finally:
        sandbox.reaper.spawned()
    os.close(w)
    orphan = int(os.read(r, 32))
    os.close(r)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{orphan}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{orphan}"), "the orphan was not reaped (a zombie is left)"


# -- exec ---------------------------------------------------------------------------------------


def test_exec_joins_the_container(sandbox: Sandbox, rootfs: Path) -> None:
    cid = started(sandbox, rootfs, ["sleep", "100"])
    try:
        process = json.dumps(
            {"args": ["sh", "-c", "hostname; echo $$; ps -o pid,args"], "env": ["PATH=/bin"]}
        )
        pid = sandbox.exec_process(cid, "e1", process.encode(), False)
        assert pid > 1
        out = drain(sandbox, cid, "e1").decode().splitlines()
        assert sandbox.wait_process(cid, "e1")[0] == 0
        assert out[0] == f"box-{cid}"
        assert int(out[1]) > 1  # not the init: same PID namespace, its own pid
        assert out[3].split(None, 1) == ["1", "sleep 100"]
        with pytest.raises(AlreadyExists):
            sandbox.exec_process(cid, "e1", process.encode(), False)

        tty = json.dumps({"args": ["tty"], "env": ["PATH=/bin"], "terminal": True})
        sandbox.exec_process(cid, "e2", tty.encode(), False)
        assert drain(sandbox, cid, "e2").decode().strip().startswith("/dev/pts/")

        stdin = json.dumps({"args": ["cat"], "env": ["PATH=/bin"], "user": {"uid": 65534, "gid": 65534}})
        sandbox.exec_process(cid, "e3", stdin.encode(), True)
        sandbox.write_stdin(cid, "e3", b"piped")
        sandbox.close_stdin(cid, "e3")
        assert drain(sandbox, cid, "e3") == b"piped"

        with pytest.raises(ExecFailed) as info:
            sandbox.exec_process(cid, "e4", b'{"args": ["nope"], "env": ["PATH=/bin"]}', False)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(NotFound):
            sandbox.wait_process(cid, "e4")

        sleeper = sandbox.exec_process(cid, "e5", b'{"args": ["sleep", "100"], "env": ["PATH=/bin"]}', False)
        sandbox.signal_process(cid, "e5", 9, False)
        assert sandbox.wait_process(cid, "e5")[0] == 137
        with pytest.raises(ProcessLookupError):
            os.kill(sleeper, 0)
    finally:
        sandbox.remove_container(cid, 0)


def test_exec_dies_with_the_container(sandbox: Sandbox, rootfs: Path) -> None:
    cid = started(sandbox, rootfs, ["sleep", "100"])
    sandbox.exec_process(cid, "e1", b'{"args": ["sleep", "100"], "env": ["PATH=/bin"]}', False)
    sandbox.signal_process(cid, "", 9, False)
    try:
        assert sandbox.wait_process(cid, "e1")[0] == 137  # the PID namespace went with its init
    finally:
        sandbox.remove_container(cid, 0)


# -- cgroups -------------------------------------------------------------------------------------


@needs_cgroup2
def test_cgroup_pause_resume_and_processes(sandbox: Sandbox, rootfs: Path) -> None:
    cid = started(sandbox, rootfs, ["sh", "-c", "while true; do echo tick; sleep 0.05; done"])
    try:
        init = sandbox.container(cid).init.pid
        pids = sandbox.list_processes(cid)
        assert init in pids
        assert sandbox.read_output(cid, "", False, 5) == b"tick\n"
        sandbox.pause(cid)
        assert sandbox.container(cid).state == "paused"
        with pytest.raises(FailedPrecondition, match="is paused: cannot pause"):
            sandbox.pause(cid)
        drain_until = time.monotonic() + 0.3
        while time.monotonic() < drain_until:  # whatever was written before the freeze
            try:
                sandbox.read_output(cid, "", False, 4096, lambda: time.monotonic() > drain_until)
            except Exception:
                break
        with pytest.raises(Exception, match="gave up"):
            sandbox.read_output(cid, "", False, 4096, lambda: time.monotonic() > drain_until + 0.3)
        sandbox.resume(cid)
        assert sandbox.read_output(cid, "", False, 5) == b"tick\n"
        sandbox.signal_process(cid, "", 9, True)  # all: cgroup.kill
        assert sandbox.wait_process(cid, "")[0] == 137
    finally:
        sandbox.remove_container(cid, 0)
    assert CGROUP_ROOT is not None
    assert not os.path.exists(f"{CGROUP_ROOT}{CGROUP_PARENT}/{cid}")


def test_remove_paused_container(sandbox: Sandbox, rootfs: Path) -> None:
    if CGROUP_ROOT is None:
        pytest.skip("no cgroup v2 hierarchy on this host")
    cid = started(sandbox, rootfs, ["sleep", "100"])
    sandbox.pause(cid)
    sandbox.remove_container(cid, 0.2)
    with pytest.raises(NotFound):
        sandbox.container(cid)


# -- the whole service over ttRPC ----------------------------------------------------------------


@pytest.fixture
def agent(sandbox: Sandbox) -> Iterator[Stub]:
    server = Server()
    server.register_service(agent_pb2.DESCRIPTOR.services_by_name["Agent"], AgentService(sandbox=sandbox))
    near, far = socket.socketpair()
    thread = threading.Thread(target=server.serve, args=(SocketTransport(far),), daemon=True)
    thread.start()
    client = Client(SocketTransport(near))
    try:
        yield Stub(client, agent_pb2.DESCRIPTOR.services_by_name["Agent"])
    finally:
        client.close()
        thread.join(5)


def test_service_over_ttrpc(agent: Stub, rootfs: Path) -> None:
    check = agent.Check(agent_pb2.CheckRequest(), timeout=10)
    assert check.agent_version and check.kernel_release == os.uname().release
    cid = new_id()
    spec = make_spec(rootfs, cid, ["sh", "-c", "read x; echo got $x; echo err >&2; exit 4"])
    agent.CreateContainer(
        agent_pb2.CreateContainerRequest(container_id=cid, oci_spec=spec, stdin=True), timeout=30
    )
    try:
        pid = agent.StartContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=30).pid
        assert pid > 1
        wrote = agent.WriteStdin(agent_pb2.WriteStreamRequest(container_id=cid, data=b"it\n"), timeout=10)
        assert wrote.len == 3
        agent.CloseStdin(agent_pb2.ProcessRequest(container_id=cid), timeout=10)
        out = b""
        while data := agent.ReadStdout(
            agent_pb2.ReadStreamRequest(container_id=cid, len=1024), timeout=10
        ).data:
            out += data
        err = agent.ReadStderr(agent_pb2.ReadStreamRequest(container_id=cid), timeout=10).data
        assert (out, err) == (b"got it\n", b"err\n")
        waited = agent.WaitProcess(agent_pb2.ProcessRequest(container_id=cid), timeout=10)
        assert waited.exit_status == 4 and waited.exited_at_unix_ns > 0
        with pytest.raises(TtrpcError) as info:
            agent.StartContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=10)
        assert info.value.code == Code.FAILED_PRECONDITION
    finally:
        agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid, timeout_ms=100), timeout=30)

    with pytest.raises(TtrpcError) as info:
        agent.WaitProcess(agent_pb2.ProcessRequest(container_id=cid), timeout=10)
    assert info.value.code == Code.NOT_FOUND
    with pytest.raises(TtrpcError) as info:
        agent.CreateContainer(agent_pb2.CreateContainerRequest(container_id="x", oci_spec=b"{"), timeout=10)
    assert info.value.code == Code.INVALID_ARGUMENT and "oci_spec" in info.value.message


def test_service_exec_failure_details(agent: Stub, rootfs: Path) -> None:
    cid = new_id()
    spec = make_spec(rootfs, cid, ["nosuchprogram"])
    agent.CreateContainer(agent_pb2.CreateContainerRequest(container_id=cid, oci_spec=spec), timeout=30)
    try:
        with pytest.raises(TtrpcError) as info:
            agent.StartContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=30)
        assert info.value.code == Code.FAILED_PRECONDITION
        failure = agent_pb2.ExecFailure()
        assert info.value.details[0].Unpack(failure)
        assert (failure.errno, failure.path) == (errno.ENOENT, "nosuchprogram")
        assert failure.message == 'exec: "nosuchprogram": executable file not found in $PATH'
    finally:
        agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid), timeout=30)


def test_service_exec_and_signal(agent: Stub, rootfs: Path) -> None:
    cid = new_id()
    spec = make_spec(rootfs, cid, ["sleep", "100"])
    agent.CreateContainer(agent_pb2.CreateContainerRequest(container_id=cid, oci_spec=spec), timeout=30)
    try:
        agent.StartContainer(agent_pb2.ContainerRequest(container_id=cid), timeout=30)
        process = json.dumps({"args": ["sh", "-c", "echo $$"], "env": ["PATH=/bin"]}).encode()
        agent.ExecProcess(
            agent_pb2.ExecProcessRequest(container_id=cid, exec_id="e", process=process), timeout=30
        )
        out = agent.ReadStdout(agent_pb2.ReadStreamRequest(container_id=cid, exec_id="e"), timeout=10).data
        assert int(out) > 1
        assert (
            agent.WaitProcess(agent_pb2.ProcessRequest(container_id=cid, exec_id="e"), timeout=10).exit_status
            == 0
        )
        agent.SignalProcess(agent_pb2.SignalProcessRequest(container_id=cid, signal=9), timeout=10)
        assert agent.WaitProcess(agent_pb2.ProcessRequest(container_id=cid), timeout=10).exit_status == 137
        with pytest.raises(TtrpcError) as info:
            agent.WaitProcess(agent_pb2.ProcessRequest(container_id=cid, exec_id="nope"), timeout=10)
        assert info.value.code == Code.NOT_FOUND
    finally:
        agent.RemoveContainer(agent_pb2.RemoveContainerRequest(container_id=cid), timeout=30)
