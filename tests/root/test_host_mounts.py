"""A daemon's volume binds see the host's mounts as they are now, not as its namespace copied them.

A child process enters a private mount namespace (as a sandbox daemon does); then this process,
in the host's namespace, mounts a tmpfs with a file in it; then the child binds that path from
the host (``mounts.bind(..., from_host=True)``) and reads the file through its bind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

CHILD = """
import json, os, subprocess, sys
from pathlib import Path
from hako.runtime import mounts

source, targets = Path(sys.argv[1]), Path(sys.argv[2])
mounts.private_namespace()
print("ready", flush=True)
sys.stdin.readline()  # the host mounted its tmpfs meanwhile
report = {}
mounts.bind(source, targets / "dir", from_host=True)
report["through_dir"] = (targets / "dir" / "file").read_text()
mounts.bind(source / "file", targets / "file", readonly=True, from_host=True)
report["through_file"] = (targets / "file").read_text()
try:
    (targets / "file").write_text("x")
except OSError as exc:
    report["write_ro"] = exc.strerror
try:
    mounts.bind(source / "missing", targets / "missing", from_host=True)
except mounts.SourceMissing as exc:
    report["missing"] = str(exc)
child = mounts.in_host_namespace(lambda: subprocess.Popen(["sleep", "5"]))
report["child_ns"] = os.readlink(f"/proc/{child.pid}/ns/mnt")
report["own_ns"] = os.readlink("/proc/self/ns/mnt")
child.kill()
child.wait()
print(json.dumps(report), flush=True)
"""


def test_a_bind_from_the_host_sees_a_mount_made_after_the_namespace(tmp_path: Path) -> None:
    source, targets = tmp_path / "source", tmp_path / "targets"
    source.mkdir()
    targets.mkdir()
    mounted = False
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(source), str(targets)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            assert child.stdout.readline() == "ready\n"
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "fresh", str(source)], check=True)
            mounted = True
            (source / "file").write_text("made after the namespace")
            child.stdin.write("go\n")
            child.stdin.flush()
            line = child.stdout.readline()
        finally:
            child.kill()
            if mounted:
                subprocess.run(["umount", str(source)], check=True)
    assert line, "the child failed (its error is above)"
    report = json.loads(line)
    assert report["through_dir"] == report["through_file"] == "made after the namespace"
    assert report["write_ro"] == "Read-only file system"
    assert report["missing"] == f"{source}/missing does not exist"
    assert report["own_ns"] != os.readlink("/proc/self/ns/mnt")
    assert report["child_ns"] == os.readlink("/proc/self/ns/mnt")
    assert not any(os.path.ismount(p) for p in targets.iterdir())  # the binds were the child's only
