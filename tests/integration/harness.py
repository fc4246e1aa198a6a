"""Fixtures for end-to-end tests: the real CLI, real VMs, a throw-away state and image store.

Every test gets its own /run/hako (HAKO_RUN) and the session shares one image store with
the busybox image imported. After each test, nothing of it may remain: no QEMU process
started from its run dir, no mount under it, no state left by --rm.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hako.image.busybox import build_busybox_image
from hako.image.store import ImageStore

BUSYBOX = "hako.local/busybox:latest"


@dataclass
class Hako:
    env: dict[str, str]
    run_root: Path

    def __call__(
        self, *args: str, input: str | None = None, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "hako.cli.main", *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"hako {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def popen(self, *args: str, **kwargs: object) -> subprocess.Popen[str]:
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            [sys.executable, "-m", "hako.cli.main", *args], env=self.env, text=True, **kwargs
        )

    def sandbox_dirs(self) -> list[Path]:
        root = self.run_root / "sandboxes"
        return sorted(root.iterdir()) if root.is_dir() else []


def qemu_pids_under(path: Path) -> list[int]:
    """QEMU processes whose command line names ``path`` (their run dir is under it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and str(path).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def mounts_under(path: Path) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(path) in line]


@pytest.fixture(scope="session")
def image_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    layout = build_busybox_image(tmp_path_factory.mktemp("oci") / "busybox")
    ImageStore(root).import_path(layout)
    return root


@pytest.fixture(scope="session")
def template_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """VM templates, made once per session (on first use) and shared by the tests' sandboxes."""
    return tmp_path_factory.mktemp("templates")


@pytest.fixture
def hako(image_store: Path, template_store: Path, tmp_path: Path) -> Iterator[Hako]:
    run_root = tmp_path / "run"
    run_root.mkdir()
    (run_root / "tcg-notice").touch()  # the once-per-host TCG notice was given (see test_tcg_notice)
    env = {
        **os.environ,
        "HAKO_RUN": str(run_root),
        "HAKO_IMAGES": str(image_store),
        "HAKO_TEMPLATES": str(template_store),
    }
    env.pop("HAKO_TEMPLATE", None)  # the default (templates on) unless a test says otherwise
    runner = Hako(env, run_root)
    yield runner
    # Whatever a test left running is removed, and then nothing of it may remain.
    for directory in runner.sandbox_dirs():
        runner("rm", "-f", directory.name, timeout=60)
    deadline = time.monotonic() + 10
    while qemu_pids_under(run_root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids_under(run_root) == [], "a QEMU process outlived its test"
    assert qemu_pids_under(template_store) == [], "a template's QEMU outlived its test"
    assert mounts_under(run_root) == [], "a mount outlived its test"
