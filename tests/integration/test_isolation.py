"""Isolation: a container tries to reach the host and must fail."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import BUSYBOX, Hako

pytestmark = pytest.mark.integration


def test_cannot_read_a_host_file(hako: Hako, tmp_path: Path) -> None:
    secret = secrets.token_hex(16)
    for place in (Path("/tmp") / f"hako-secret-{secret}", Path("/root") / f".hako-secret-{secret}"):
        place.write_text(secret)
    try:
        script = (
            f"cat /tmp/hako-secret-{secret} /root/.hako-secret-{secret} 2>/dev/null; "
            # every file the container can see, searched for the secret
            f"grep -rs {secret} / --exclude-dir=proc --exclude-dir=sys 2>/dev/null; "
            # and through the 9p share, if it could mount it (it must not be able to)
            "mkdir -p /mnt/x && mount -t 9p -o trans=virtio hako /mnt/x 2>/dev/null && ls /mnt/x; true"
        )
        result = hako("run", "--rm", BUSYBOX, "sh", "-c", script)
        assert result.returncode == 0, result.stderr
        assert secret not in result.stdout
    finally:
        for place in (Path("/tmp") / f"hako-secret-{secret}", Path("/root") / f".hako-secret-{secret}"):
            place.unlink()


def test_cannot_see_host_processes(hako: Hako) -> None:
    marker = f"{secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    host_process = subprocess.Popen(["sleep", marker])
    try:
        result = hako(
            "run", "--rm", BUSYBOX, "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo; ls /proc"
        )
        assert result.returncode == 0, result.stderr
        assert marker not in result.stdout
        pids = [entry for entry in result.stdout.split() if entry.isdigit()]
        assert str(host_process.pid) not in pids or int(host_process.pid) < 10
        assert len(pids) < 10, f"the container sees too many processes: {pids}"
    finally:
        host_process.kill()
        host_process.wait()


def test_cannot_kill_or_ptrace_the_agent(hako: Hako) -> None:
    # The agent is the guest's PID 1, outside the container's PID namespace: invisible, unkillable.
    result = hako("run", "--rm", BUSYBOX, "sh", "-c", "kill -9 1 2>&1; echo still-here")
    assert "still-here" in result.stdout
