"""`hako run` end to end: real VMs (TCG here, KVM where it works), real containers."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hako.hypervisor import probe_kvm
from tests.integration.harness import BUSYBOX, Hako, qemu_pids_under

pytestmark = pytest.mark.integration


def test_guest_kernel_is_not_the_hosts(hako: Hako) -> None:
    result = hako("run", "--rm", BUSYBOX, "uname", "-r", check=True)
    release = result.stdout.strip()
    assert release and release != platform.release()
    assert hako.sandbox_dirs() == [], "--rm left state behind"


def test_tcg_notice_is_given_once(hako: Hako) -> None:
    (hako.run_root / "tcg-notice").unlink()
    first = hako("run", "--rm", BUSYBOX, "true", check=True)
    second = hako("run", "--rm", BUSYBOX, "true", check=True)
    if probe_kvm().usable:
        assert "TCG" not in first.stderr + second.stderr
    else:
        assert first.stderr.count("hako: using TCG (software emulation): ") == 1
        assert second.stderr == ""


def test_check_reports_the_host(hako: Hako) -> None:
    result = hako("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accelerator (auto): " in result.stdout
    assert "KVM: " in result.stdout and "QEMU: " in result.stdout
    assert "asset: kernel/trimmed" in result.stdout


def test_an_image_tar_runs_directly(hako: Hako, tmp_path: Path) -> None:
    built = hako("image", "busybox", str(tmp_path / "bb"), "--tar", check=True).stdout.strip()
    assert built.endswith(".tar")
    result = hako("run", "--rm", built, "echo", "from a tar", check=True)
    assert result.stdout == "from a tar\n"


def test_exit_code_is_the_commands(hako: Hako) -> None:
    assert hako("run", "--rm", BUSYBOX, "sh", "-c", "exit 3").returncode == 3


def test_stdin_reaches_the_container(hako: Hako) -> None:
    result = hako("run", "--rm", "-i", BUSYBOX, "cat", input="hi\n")
    assert (result.returncode, result.stdout) == (0, "hi\n")


def test_stdout_and_stderr_stay_separate(hako: Hako) -> None:
    result = hako("run", "--rm", BUSYBOX, "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (result.returncode, result.stdout, result.stderr) == (4, "out\n", "err\n")


def test_env_workdir_user_and_hostname(hako: Hako) -> None:
    result = hako(
        "run", "--rm", "-e", "FOO=bar", "-w", "/tmp", "-u", "65534:65534", "--name", "envtest",
        BUSYBOX, "sh", "-c", 'echo "$FOO $(pwd) $(id -u):$(id -g)"',
    )  # fmt: skip
    assert result.stdout == "bar /tmp 65534:65534\n", result.stderr


def test_dockers_other_run_options(hako: Hako, tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text("# the app's\nGREETING=hello from a file\nLEVEL=1\n")
    script = (
        'echo "$GREETING $LEVEL"; hostname; grep -c "box-1" /etc/hosts; '
        "touch /x 2>/dev/null || echo read-only; cat /sys/fs/cgroup/pids.max; "
        "grep NoNewPrivs /proc/self/status"
    )
    result = hako(
        "run", "--rm", "--env-file", str(env_file), "-e", "LEVEL=2", "--hostname", "box-1", "--read-only",
        "--pids-limit", "50", "--security-opt", "no-new-privileges", "--entrypoint", "sh",
        BUSYBOX, "-c", script,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr
    assert lines[:5] == ["hello from a file 2", "box-1", "1", "read-only", "50"], lines
    assert lines[5].split() == ["NoNewPrivs:", "1"], lines
    bad = hako("run", "--rm", "--security-opt", "seccomp=unconfined", BUSYBOX, "true")
    assert bad.returncode == 125 and "no-new-privileges" in bad.stderr and hako.sandbox_dirs() == []


def test_cap_add_and_cap_drop(hako: Hako) -> None:
    only = hako("run", "--rm", "--cap-drop", "ALL", "--cap-add", "net_bind_service", BUSYBOX,
                "grep", "CapEff", "/proc/self/status")  # fmt: skip
    assert only.stdout.split() == ["CapEff:", f"{1 << 10:016x}"], only.stderr  # CAP_NET_BIND_SERVICE
    mount = "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m && echo mounted"
    assert hako("run", "--rm", BUSYBOX, "sh", "-c", mount).returncode != 0  # no CAP_SYS_ADMIN
    admin = hako("run", "--rm", "--cap-add", "SYS_ADMIN", BUSYBOX, "sh", "-c", mount)
    assert admin.stdout == "mounted\n", admin.stderr
    bad = hako("run", "--rm", "--cap-add", "NET_FLY", BUSYBOX, "true")
    _one_line_error(bad, 125, "unknown capability 'NET_FLY'")
    assert hako.sandbox_dirs() == []


def test_a_missing_workdir_is_made_as_docker_and_runc_do(hako: Hako) -> None:
    result = hako("run", "--rm", "-w", "/made/here", "-u", "65534", BUSYBOX, "sh", "-c", "pwd; ls -ld .")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and lines[0] == "/made/here", result.stderr
    assert lines[1].startswith("drwxr-xr-x") and " root " in lines[1], lines[1]


def test_tty_mode(hako: Hako) -> None:
    result = hako("run", "--rm", "-t", BUSYBOX, "tty")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("/dev/pts/")


def test_timing_prints_the_breakdown(hako: Hako) -> None:
    result = hako("run", "--rm", "--timing", "--template", "off", BUSYBOX, "true", check=True)
    for row in ("QEMU start", "guest kernel", "guest userspace", "container start", "total"):
        assert row in result.stderr
    assert "TCG" in result.stderr or "KVM" in result.stderr
    restored = hako("run", "--rm", "--timing", BUSYBOX, "true", check=True)
    for row in ("restore from template", "container start", "total"):
        assert row in restored.stderr
    assert "guest kernel" not in restored.stderr


def test_detached_container_lifecycle(hako: Hako) -> None:
    started = hako("run", "-d", "--name", "web", BUSYBOX, "sleep", "1000", check=True)
    sandbox_id = started.stdout.strip()
    assert len(sandbox_id) == 64
    listing = hako("ps", check=True).stdout
    assert "web" in listing and "Up " in listing

    assert hako("exec", "web", "echo", "hello", check=True).stdout == "hello\n"
    # exec joins the container: same PID namespace (sleep is PID 1 there), same hostname.
    ps = hako("exec", "web", "ps", "-o", "pid,args", check=True).stdout
    assert any(line.split()[:2] == ["1", "sleep"] for line in ps.splitlines()[1:]), ps
    assert hako("exec", "web", "sh", "-c", "exit 5").returncode == 5
    assert hako("exec", "-i", "web", "cat", input="piped\n").stdout == "piped\n"

    assert hako("kill", "web").returncode == 0
    deadline = time.monotonic() + 30
    while "Exited (137)" not in hako("ps", "-a").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Exited (137)" in hako("ps", "-a").stdout
    assert hako("rm", "web").returncode == 0
    assert "web" not in hako("ps", "-a").stdout
    assert qemu_pids_under(hako.run_root) == []


def test_stop_asks_then_kills(hako: Hako) -> None:
    polite = 'trap "echo bye; exit 7" TERM; while :; do sleep 0.1; done'
    hako("run", "-d", "--name", "polite", BUSYBOX, "sh", "-c", polite, check=True)
    deaf = 'trap "" TERM; while :; do sleep 0.1; done'
    hako("run", "-d", "--name", "deaf", BUSYBOX, "sh", "-c", deaf, check=True)
    time.sleep(1)  # the traps are set
    assert hako("stop", "polite", check=True).stdout == "polite\n"
    started = time.monotonic()
    assert hako("stop", "-t", "1", "deaf", check=True).stdout == "deaf\n"
    assert time.monotonic() - started >= 1
    rows = {line.split()[-1]: line for line in hako("ps", "-a").stdout.splitlines()[1:]}
    assert "Exited (7)" in rows["polite"] and "Exited (137)" in rows["deaf"], rows
    assert hako("logs", "polite").stdout == "bye\n"
    assert qemu_pids_under(hako.run_root) == []
    assert hako("stop", "polite").returncode == 0  # stopped already: nothing to do, as Docker
    assert hako("rm", "polite", "deaf").returncode == 0


def test_pause_stops_the_vm_until_unpause(hako: Hako) -> None:
    count = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.05; done"
    hako("run", "-d", "--name", "counter", BUSYBOX, "sh", "-c", count, check=True)
    time.sleep(0.5)
    assert hako("pause", "counter", check=True).stdout == "counter\n"
    [qemu] = qemu_pids_under(hako.run_root)
    ticks = _cpu_ticks(qemu)
    time.sleep(2)
    assert _cpu_ticks(qemu) - ticks <= 5, "a paused VM used CPU"  # (clock ticks: 10 ms each)
    assert "(Paused)" in hako("ps").stdout
    for refused in (("exec", "counter", "true"), ("kill", "counter"), ("stop", "counter"), ("rm", "counter")):
        result = hako(*refused)
        assert result.returncode == 125 and "counter" in result.stderr, (refused, result.stderr)
    assert hako("unpause", "counter", check=True).stdout == "counter\n"
    counted = hako("exec", "counter", "sh", "-c", "cat /tmp/n; date +%s", check=True).stdout.split()
    assert abs(int(counted[1]) - time.time()) < 3, "the guest's clock did not catch up"
    again = int(hako("exec", "counter", "cat", "/tmp/n", check=True).stdout)
    assert again > int(counted[0]), "the container did not run on"
    hako("pause", "counter", check=True)
    assert hako("rm", "-f", "counter").returncode == 0  # a paused one too
    assert qemu_pids_under(hako.run_root) == [] and hako.sandbox_dirs() == []


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_wait_and_inspect(hako: Hako, tmp_path: Path) -> None:
    hako("run", "-d", "--name", "kept", BUSYBOX, "sh", "-c", "exit 5", check=True)
    # A --rm container is gone once it has exited (as Docker's), so it waits for the test's
    # word to exit, given well after `hako wait` is under way.
    gate = "until [ -e /gate/go ]; do sleep 0.1; done; exit 4"
    hako(
        "run",
        "-d",
        "--rm",
        "--name",
        "brief",
        "-v",
        f"{tmp_path}:/gate",
        BUSYBOX,
        "sh",
        "-c",
        gate,
        check=True,
    )
    waiting = hako.popen("wait", "brief", "kept", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3)
    (tmp_path / "go").touch()
    out, err = waiting.communicate(timeout=60)
    assert (waiting.returncode, out) == (0, "4\n5\n"), err  # --rm: its daemon answers
    [record] = json.loads(hako("inspect", "kept", check=True).stdout)
    assert (record["name"], record["status"], record["exit_status"]) == ("kept", "exited", 5)
    assert record["spec"]["process"]["args"] == ["sh", "-c", "exit 5"] and record["kernel"] == "trimmed"
    assert hako("inspect", "brief").returncode == 125  # gone with its exit
    hako("rm", "kept", check=True)


def test_stats_of_a_running_container(hako: Hako) -> None:
    two = "sleep 1000 & sleep 1000 & wait"  # three processes
    hako("run", "-d", "--name", "busy", "--memory", "64m", BUSYBOX, "sh", "-c", two, check=True)
    result = hako("stats", "--no-stream", "busy", check=True)
    header, line = result.stdout.splitlines()
    assert header.split("   ")[:3] == ["CONTAINER ID", "NAME", "CPU %"]
    cells = line.split()  # id, name, cpu, usage, /, limit, mem %, pids, vm
    assert cells[1] == "busy" and cells[4:6] == ["/", "64MiB"] and cells[7] == "3", line
    assert cells[8].endswith("MiB") and float(cells[8][:-3]) > 10, line  # its QEMU and daemon on the host
    assert hako("stats", "--no-stream").stdout.count("busy") == 1  # every running container
    hako("rm", "-f", "busy", check=True)
    gone = hako("stats", "--no-stream", "busy")
    assert gone.returncode == 125 and "no such container" in gone.stderr


def test_rm_refuses_a_running_container_unless_forced(hako: Hako) -> None:
    hako("run", "-d", "--name", "busy", BUSYBOX, "sleep", "1000", check=True)
    refused = hako("rm", "busy")
    assert refused.returncode != 0 and "hako rm -f" in refused.stderr
    assert hako("rm", "-f", "busy").returncode == 0
    assert hako.sandbox_dirs() == []
    assert qemu_pids_under(hako.run_root) == []


def test_logs_keep_both_streams(hako: Hako) -> None:
    hako("run", "-d", "--name", "talker", BUSYBOX, "sh", "-c", "echo a; echo b >&2", check=True)
    deadline = time.monotonic() + 30
    while "Exited (0)" not in hako("ps", "-a").stdout and time.monotonic() < deadline:
        time.sleep(0.2)
    logs = hako("logs", "talker", check=True)
    assert (logs.stdout, logs.stderr) == ("a\n", "b\n")


def test_ctrl_c_reaches_the_container_as_sigint(hako: Hako) -> None:
    # The command is PID 1 of its namespace: like any init it only gets signals it handles
    # (Docker behaves the same without --init), so it traps SIGINT and says so.
    script = 'trap "echo got SIGINT; exit 130" INT; echo ready; while :; do sleep 0.1; done'
    process = hako.popen(
        "run", "--rm", BUSYBOX, "sh", "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, out) == (130, "got SIGINT\n"), err


@pytest.mark.parametrize(
    ("detach", "signum"),
    [(False, signal.SIGINT), (True, signal.SIGINT), (False, signal.SIGTERM)],
    ids=["ctrl-c", "ctrl-c-detached", "sigterm"],
)
def test_interrupted_while_the_vm_boots_leaves_nothing(hako: Hako, detach: bool, signum: int) -> None:
    """Interrupted before its container ran, `hako run` ends as a failed one does: no VM, no record."""
    argv = ["run", "--template", "off", *(["-d"] if detach else []), BUSYBOX, "sleep", "30"]
    process = hako.popen(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not qemu_pids_under(hako.run_root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_pids_under(hako.run_root), "no VM was started"
    process.send_signal(signum)  # the guest is still booting (a cold boot takes ~2 s here)
    out, err = process.communicate(timeout=60)
    # 128 + the signal, as a shell reports it; after Ctrl-C, Python may end by SIGINT itself
    assert process.returncode in (128 + signum, -signal.SIGINT) and out == "", (process.returncode, err)
    assert hako.sandbox_dirs() == [] and qemu_pids_under(hako.run_root) == []
    assert hako("ps", "-a").stdout.count("\n") == 1  # the header only


def test_volumes_read_write_and_read_only(hako: Hako, tmp_path: Path) -> None:
    shared = tmp_path / "data"
    shared.mkdir()
    (shared / "in").write_text("from host\n")
    result = hako(
        "run", "--rm", "-v", f"{shared}:/data", BUSYBOX, "sh", "-c", "cat /data/in; echo back > /data/out"
    )
    assert result.stdout == "from host\n", result.stderr
    assert (shared / "out").read_text() == "back\n"
    denied = hako("run", "--rm", "-v", f"{shared}:/data:ro", BUSYBOX, "sh", "-c", "echo x > /data/new")
    assert denied.returncode != 0
    assert not (shared / "new").exists()


def test_resource_limits_apply_inside_the_guest(hako: Hako) -> None:
    result = hako(
        "run", "--rm", "--memory", "64m", "--cpus", "0.5", BUSYBOX,
        "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == [str(64 << 20), "50000 100000"]


def test_debian_kernel(hako: Hako) -> None:
    result = hako("run", "--rm", "--kernel", "debian", BUSYBOX, "uname", "-r", check=True)
    assert result.stdout.strip().endswith("-amd64")


# -- bad input: one line, Docker's exit code, nothing left behind ---------------------------------


def _one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hako: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_image(hako: Hako) -> None:
    _one_line_error(hako("run", "--rm", "no/such-image", "true"), 125, "no/such-image", "not found")
    assert hako.sandbox_dirs() == []


def test_command_not_found_is_127(hako: Hako) -> None:
    _one_line_error(hako("run", "--rm", BUSYBOX, "no-such-command"), 127, "no-such-command")
    assert hako.sandbox_dirs() == []
    assert qemu_pids_under(hako.run_root) == []


def test_command_not_executable_is_126(hako: Hako) -> None:
    _one_line_error(hako("run", "--rm", BUSYBOX, "/etc/passwd"), 126, "/etc/passwd")
    assert hako.sandbox_dirs() == []


def test_bad_config_json(hako: Hako, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text('{"ociVersion": "1.0.2", "process": ')
    _one_line_error(hako("run", "--rm", str(bundle)), 125, "config.json", "invalid JSON")
    assert hako.sandbox_dirs() == []


def test_a_missing_volume_source_fails_before_any_vm(hako: Hako, tmp_path: Path) -> None:
    result = hako("run", "--rm", "-v", f"{tmp_path}/nowhere:/data", BUSYBOX, "true")
    _one_line_error(result, 125, f"{tmp_path}/nowhere", "does not exist")
    assert hako.sandbox_dirs() == []
    assert not (tmp_path / "nowhere").exists()


def test_too_little_memory(hako: Hako) -> None:
    _one_line_error(hako("run", "--rm", "--memory", "1m", BUSYBOX, "true"), 125, "memory")
    assert hako.sandbox_dirs() == []


def test_no_qemu(hako: Hako) -> None:
    hako.env["HAKO_QEMU"] = "/nonexistent/qemu-system-x86_64"
    _one_line_error(hako("run", "--rm", BUSYBOX, "true"), 125, "not found", "apt-get install")
    assert hako.sandbox_dirs() == []


def test_a_qemu_that_fails_at_start_is_named(hako: Hako, tmp_path: Path) -> None:
    broken = tmp_path / "qemu-system-x86_64"
    broken.write_text("#!/bin/sh\necho 'qemu: cannot do this here' >&2\nexit 1\n")
    broken.chmod(0o755)
    hako.env["HAKO_QEMU"] = str(broken)
    result = hako("run", "--rm", "--template", "off", BUSYBOX, "true")
    _one_line_error(result, 125, "the VM died while booting", "cannot do this here")
    assert hako.sandbox_dirs() == []


def test_a_qemu_that_fails_on_its_devices_is_named(hako: Hako, tmp_path: Path) -> None:
    """QEMU itself starts, then refuses a device: the CLI may reach the daemon before or after
    the daemon sees its VM die; either way the user is told why, once."""
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    broken = tmp_path / "qemu-system-x86_64"
    broken.write_text(f'#!/bin/sh\nexec {real} "$@" -device virtio-serial-device,max_ports=0,bogus=1\n')
    broken.chmod(0o755)
    hako.env["HAKO_QEMU"] = str(broken)
    for _ in range(4):
        result = hako("run", "--rm", "--template", "off", BUSYBOX, "true")
        _one_line_error(result, 125, "the VM died while booting", "bogus")
        assert "CreateContainer" not in result.stderr and "not reachable" not in result.stderr
    assert hako.sandbox_dirs() == []


# -- the VM dying or hanging under a container ------------------------------------------------


def _state_of(hako: Hako, name: str) -> dict[str, object]:
    for directory in hako.sandbox_dirs():
        state: dict[str, object] = json.loads((directory / "state.json").read_text())
        if state["name"] == name:
            return state
    raise AssertionError(f"no sandbox {name}")


def _wait_status(hako: Hako, name: str, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    listing = ""
    while time.monotonic() < deadline:
        listing = hako("ps", "-a").stdout
        line = next((line for line in listing.splitlines() if line.rstrip().endswith(name)), "")
        if text in line:
            return line
        time.sleep(0.2)
    raise AssertionError(f"{name} never showed {text!r}: {listing}")


def test_qemu_killed_under_a_container(hako: Hako) -> None:
    hako("run", "-d", "--name", "victim", BUSYBOX, "sleep", "1000", check=True)
    qemu_pid = _state_of(hako, "victim")["qemu_pid"]
    assert isinstance(qemu_pid, int)
    os.kill(qemu_pid, signal.SIGKILL)
    _wait_status(hako, "victim", "Dead", timeout=30)
    state = _state_of(hako, "victim")
    assert state["exit_status"] == 137 and "SIGKILL" in str(state["error"])
    assert qemu_pids_under(hako.run_root) == []
    assert hako("rm", "victim").returncode == 0


def test_a_killed_daemon_takes_its_vm_along(hako: Hako) -> None:
    hako("run", "-d", "--name", "orphan", BUSYBOX, "sleep", "1000", check=True)
    state = _state_of(hako, "orphan")
    daemon = state["daemon_pid"]
    assert isinstance(daemon, int)
    os.kill(daemon, signal.SIGKILL)  # no clean-up code runs
    deadline = time.monotonic() + 10
    while qemu_pids_under(hako.run_root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids_under(hako.run_root) == [], "QEMU outlived the process that owned it"
    _wait_status(hako, "orphan", "Dead", timeout=5)
    assert hako("rm", "orphan").returncode == 0
    assert hako.sandbox_dirs() == []


def test_hung_qemu_is_detected_and_killed(hako: Hako) -> None:
    hako("run", "-d", "--name", "frozen", BUSYBOX, "sleep", "1000", check=True)
    qemu_pid = _state_of(hako, "frozen")["qemu_pid"]
    assert isinstance(qemu_pid, int)
    os.kill(qemu_pid, signal.SIGSTOP)  # QEMU stops answering, as a hung VMM would
    _wait_status(hako, "frozen", "Dead", timeout=60)
    assert "stopped answering" in str(_state_of(hako, "frozen")["error"])
    assert qemu_pids_under(hako.run_root) == []
