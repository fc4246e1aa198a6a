"""containerd-shim-hako-v2 driven by ctr, as a containerd user drives any runtime.

Every test runs with ``io.containerd.hako.v2`` (the shim under test) and with runc's own shim
``io.containerd.runc.v2`` (which proves the test: what runc passes, the shim must pass). After
each test the ``ctr`` fixture fails it if anything is left: task, container, active snapshot,
shim, QEMU, runc container, mount, socket (ours in /run/containerd/s and /run/hako, any under the
test's dirs), or state (containerd's bundles, hako's sandboxes).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.containerd.harness import NAMESPACE, Containerd, Ctr, Runtime, alive, run_in_pty, unique_id

pytestmark = pytest.mark.integration

CYCLES = 50


def test_echo(ctr: Ctr, runtime: Runtime) -> None:
    result = ctr.run(runtime, unique_id("echo"), "echo", "hi")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", "")


def test_runs_in_a_vm(ctr: Ctr, runtime: Runtime) -> None:
    result = ctr.run(runtime, unique_id("uname"), "uname", "-r")
    assert result.returncode == 0, result.stderr
    # The guest's kernel with hako, the host's with runc.
    assert (result.stdout.strip() != os.uname().release) == runtime.vm, result.stdout
    if runtime.vm:  # the shim's VMs are restored from a template, which it made on first use
        templates = ctr.containerd.paths.hako_run / "templates"
        assert [p for p in templates.iterdir() if p.is_dir() and not p.name.startswith(".")], templates
        # ... and the VM was launched as the shim started, then taken by the Create that followed
        log = ctr.containerd.log_tail(400)
        assert "launched the pod's VM as the shim started" in log, log
        assert "is not the one the pod's first container asks for" not in log


@pytest.mark.parametrize("code", [0, 3, 125])
def test_exit_code_propagates(ctr: Ctr, runtime: Runtime, code: int) -> None:
    result = ctr.run(runtime, unique_id("exit"), "sh", "-c", f"exit {code}")
    assert result.returncode == code, result.stderr


def _metrics(ctr: Ctr, container: str) -> dict[str, str]:
    result = ctr("task", "metrics", container, check=True)
    rows = [line.split(None, 1) for line in result.stdout.splitlines()[1:]]
    return {row[0]: row[1].strip() for row in rows if len(row) == 2}


def test_detached_task_lifecycle(ctr: Ctr, runtime: Runtime) -> None:
    """run -d, exec, ps, metrics, pause/resume, kill, delete."""
    container = unique_id("life")
    started = ctr.run(runtime, container, "sleep", "1000", rm=False, detach=True)
    assert started.returncode == 0, started.stderr
    ctr.wait_for_status(container, "RUNNING")

    executed = ctr.exec(container, "e1", "echo", "hi")
    assert (executed.returncode, executed.stdout) == (0, "hi\n"), executed.stderr
    failed = ctr.exec(container, "e2", "sh", "-c", "exit 5")
    assert failed.returncode == 5, failed.stderr

    ps = ctr("task", "ps", container, check=True).stdout.splitlines()
    assert ps[0].split()[0] == "PID"
    assert [row for row in ps[1:] if row.split() and row.split()[0].isdigit()], ps

    metrics = _metrics(ctr, container)
    memory = metrics.get("memory.usage_in_bytes") or metrics.get("memory.usage")  # cgroup v1 or v2 stats
    cpu = metrics.get("cpuacct.usage") or metrics.get("cpu.usage_usec")
    assert memory is not None and int(memory) > 0, metrics
    assert cpu is not None and int(cpu) > 0, metrics

    ctr("task", "pause", container, check=True)
    assert ctr.tasks()[container] == "PAUSED"
    ctr("task", "resume", container, check=True)
    assert ctr.tasks()[container] == "RUNNING"
    after = ctr.exec(container, "e3", "echo", "resumed")
    assert after.stdout == "resumed\n", after.stderr

    ctr("task", "kill", "-s", "SIGKILL", container, check=True)
    ctr.wait_for_status(container, "STOPPED")
    ctr("task", "delete", container, check=True)
    assert container not in ctr.tasks()
    ctr("container", "delete", container, check=True)
    assert container not in ctr.containers()


def test_tty(ctr: Ctr, runtime: Runtime) -> None:
    argv = ctr.run_argv(runtime, unique_id("tty"), "tty", tty=True)
    returncode, output = run_in_pty(argv, timeout=120)
    assert returncode == 0, output
    assert re.search(r"^/dev/pts/\d+\r*$", output, re.MULTILINE), output  # CRs: each tty maps NL


@pytest.mark.timeout(3600)
def test_run_delete_cycles_leave_nothing(ctr: Ctr, containerd: Containerd, runtime: Runtime) -> None:
    for cycle in range(CYCLES):
        result = ctr.run(runtime, unique_id(f"cycle{cycle}"), "true")
        assert result.returncode == 0, f"cycle {cycle}: {result.stderr}"
    assert ctr.containers() == []
    # Processes get a few seconds to finish going; then nothing may be left (the fixture checks
    # again, more slowly: this is the point of the test, so say it here).
    assert containerd.sweep([NAMESPACE], settle=20) == []


def test_shim_killed_under_a_running_task(ctr: Ctr, containerd: Containerd, runtime: Runtime) -> None:
    container = unique_id("orphan")
    started = ctr.run(runtime, container, "sleep", "1000", rm=False, detach=True)
    assert started.returncode == 0, started.stderr
    ctr.wait_for_status(container, "RUNNING")
    [shim] = containerd.shims(runtime)
    os.kill(shim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(shim.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(shim.pid)

    # containerd sees its shim gone and cleans up after it (``<shim> delete``); what is left for
    # the user is deleting the task (if containerd has not already) and the container.
    deleted = ctr("task", "delete", "-f", container, timeout=120)
    assert deleted.returncode == 0 or "not found" in deleted.stderr, deleted.stderr
    ctr("container", "delete", container, timeout=120, check=True)
    if not runtime.vm:
        # runc's shim (containerd 1.6) leaves its socket file when it is killed; hako's must not.
        containerd.shim_socket(NAMESPACE, container).unlink(missing_ok=True)
    assert containerd.sweep([NAMESPACE], settle=30) == []  # no QEMU, no mount, no socket, no state


@pytest.mark.timeout(900)
def test_containerd_restart_under_a_running_task(ctr: Ctr, containerd: Containerd, runtime: Runtime) -> None:
    container = unique_id("restart")
    started = ctr.run(runtime, container, "sleep", "1000", rm=False, detach=True)
    assert started.returncode == 0, started.stderr
    ctr.wait_for_status(container, "RUNNING")
    shims = containerd.shims(runtime)

    containerd.restart()

    assert containerd.shims(runtime) == shims  # the shim outlived containerd and still serves
    assert ctr.tasks()[container] == "RUNNING"
    executed = ctr.exec(container, "e1", "echo", "still here")
    assert executed.stdout == "still here\n", executed.stderr
    ctr("task", "kill", "-s", "SIGKILL", container, check=True)
    ctr.wait_for_status(container, "STOPPED")
    ctr("task", "delete", container, check=True)
    ctr("container", "delete", container, check=True)
