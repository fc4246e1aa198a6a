"""The trimmed guest kernel: Debian's linux-source-6.1 configured by guest/kernel/hako.config.

Build: unpack /usr/src/linux-source-6.1.tar.xz into a temporary directory of the cache,
``make allnoconfig KCONFIG_ALLCONFIG=hako.config``, check that every fragment symbol stuck, then
``make -j$(nproc) vmlinux``. The entry keeps only the uncompressed ELF ``vmlinux`` (QEMU's microvm
boots it directly by its PVH note), the ``.config`` and ``info.json``; the source tree is deleted.
Key: (recipe, linux-source package version, fragment contents).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from hako.errors import AssetError

from . import _cache, _debs, _kconfig
from ._progress import Reporter
from ._run import need_tool, run
from ._types import BASE_CMDLINE, Kernel

RECIPE = "trimmed-1"
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
# Objects (CC/AS lines of make) a build of the current fragment compiles; only for the progress bar.
EXPECTED_OBJECTS = 1030
# Kernel args for a fast boot on microvm. No lpj=: it measured no gain (with a known TSC rate the
# delay-loop calibration is skipped anyway) and a preset value skews TSC-based udelay() on other
# hosts. pci=off, tsc=reliable and 8250.nr_uarts=1 (built in) measured no gain either. (Nor did
# no_timer_check before noapictimer; now it saves ~28 ms: see BASE_CMDLINE.) mitigations=off would
# save ~0.1-0.5 s under TCG but is not acceptable (one kernel, many containers). Under TCG add
# Kernel.cmdline_for("tcg"): the TSC rate, noreplace-smp and TCG_CMDLINE.
CMDLINE = BASE_CMDLINE
# TCG's CPU has no TSC-deadline timer, so the kernel calibrates its local APIC timer against the
# PIT: ~250 ms under TCG. noapictimer keeps the PIT as the clock event device instead (a
# one-vCPU guest needs no per-CPU timer; KVM's CPUs have TSC-deadline and skip the calibration).
# Debian's kernel (NO_HZ_FULL, preemptible RCU) stalls for good in container creation that way,
# so only this one takes it. io_delay=none on top measured no gain.
TCG_CMDLINE = ("noapictimer",)
# acpi=off: this kernel has no ACPI, and without it QEMU appends the virtio_mmio.device=... args of
# the attached devices to the command line. rtc=on: without an RTC the kernel spins 1 s (100 x 10 ms)
# waiting for the CMOS clock at boot under TCG (under KVM it reads kvmclock instead).
MICROVM_OPTIONS = ("acpi=off", "rtc=on")

_OBJECT_LINE = re.compile(rb"^\s+(CC|AS)\s+\S+\.o$")


def fragment_path() -> Path:
    """guest/kernel/hako.config of the source checkout this package runs from."""
    path = Path(__file__).resolve().parents[3] / "guest" / "kernel" / "hako.config"
    if not path.is_file():
        raise AssetError(
            f"kernel config fragment not found at {path}; build assets from a hako source checkout"
        )
    return path


@functools.cache
def _source_version() -> str:
    return _debs.installed_version(SOURCE_PACKAGE, memo_dir=_cache.cache_root())


def key() -> str:
    return _cache.cache_key(RECIPE, _source_version(), fragment_path().read_bytes())


def entry() -> Path:
    return _cache.cache_root() / "kernel" / key()


def find() -> Kernel | None:
    """The built kernel for the current inputs, or None."""
    if not SOURCE_TARBALL.exists():
        return None
    path = entry()
    info = _cache.read_info(path)
    if info is None or not (path / "vmlinux").is_file():
        return None
    return Kernel("trimmed", path / "vmlinux", str(info["release"]), CMDLINE, MICROVM_OPTIONS, TCG_CMDLINE)


def build(reporter: Reporter) -> Kernel:
    """Build the kernel unless the cache already holds it for the current inputs."""
    if not SOURCE_TARBALL.is_file():
        raise AssetError(f"{SOURCE_TARBALL} not found; install it with `apt-get install {SOURCE_PACKAGE}`")
    found = find()
    if found is not None:
        reporter.note(f"kernel trimmed {found.release}: cached at {found.path}")
        return found
    for tool in ("make", "gcc", "tar", "xz", "flex", "bison", "bc"):
        need_tool(tool)
    fragment = fragment_path().read_text()
    version = _source_version()
    final = entry()
    started = time.monotonic()
    with _cache.new_entry(final) as tmp:
        reporter.note(f"kernel trimmed: unpacking {SOURCE_TARBALL.name} ({SOURCE_PACKAGE} {version})")
        run(["tar", "-xf", SOURCE_TARBALL, "-C", tmp], what=f"unpacking {SOURCE_TARBALL}")
        trees = [p for p in tmp.iterdir() if (p / "Makefile").is_file()]
        if len(trees) != 1:
            raise AssetError(f"{SOURCE_TARBALL} does not hold exactly one kernel tree")
        src = trees[0]
        env = {
            **os.environ,
            "ARCH": "x86_64",
            "KBUILD_BUILD_USER": "hako",
            "KBUILD_BUILD_HOST": "hako",
            "LC_ALL": "C",
        }
        run(
            ["make", "allnoconfig", f"KCONFIG_ALLCONFIG={fragment_path()}"],
            what="make allnoconfig",
            cwd=src,
            env=env,
        )
        config = (src / ".config").read_text()
        _kconfig.check_fragment(fragment, config)
        objects = _make_vmlinux(src, env, reporter)
        release = (src / "include" / "config" / "kernel.release").read_text().strip()
        shutil.copy2(src / "vmlinux", tmp / "vmlinux")
        (tmp / "config").write_text(config)
        shutil.rmtree(src)
        _cache.write_info(
            tmp,
            {
                "kind": "trimmed",
                "recipe": RECIPE,
                "release": release,
                "source_package": {SOURCE_PACKAGE: version},
                "fragment_sha256": hashlib.sha256(fragment.encode()).hexdigest(),
                "objects": objects,
                "build_seconds": round(time.monotonic() - started),
                "built_at": time.time(),
            },
        )
    _cache.prune(final.parent, {"kind": "trimmed"}, keep=2)
    reporter.note(f"kernel trimmed {release}: built in {round(time.monotonic() - started)}s at {final}")
    return Kernel("trimmed", final / "vmlinux", release, CMDLINE, MICROVM_OPTIONS, TCG_CMDLINE)


def _make_vmlinux(src: Path, env: dict[str, str], reporter: Reporter) -> int:
    """Run make vmlinux, counting compiled objects for the progress display; the count."""
    jobs = len(os.sched_getaffinity(0))
    tail: collections.deque[bytes] = collections.deque(maxlen=40)
    count = 0
    with reporter.counter(f"kernel trimmed: make -j{jobs} vmlinux", EXPECTED_OBJECTS, "objects") as advance:
        # Own session, so that an interrupted build can stop make and all its compilers at once.
        proc = subprocess.Popen(
            ["make", f"-j{jobs}", "vmlinux"],
            cwd=src,
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                tail.append(line)
                if _OBJECT_LINE.match(line):
                    count += 1
                    advance(1)
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        errors = [ln for ln in tail if b"error:" in ln] or list(tail)[-1:] or [b"no output"]
        raise AssetError(
            f"kernel build failed (make vmlinux exit {rc}): {errors[0].decode(errors='replace').strip()}"
        )
    return count
