#!/usr/bin/env python3
"""The seed's "Kata boot time" table for hako: where the time of a cold start goes.

For each guest kernel, N runs (default 5) of ``hako run --rm IMG true`` with the
breakdown the sandbox records (QEMU start, guest kernel, guest userspace up to
the agent, container create/start/run, teardown), medians, and the wall time of
the whole command. Then the guest image sizes and the host memory one idle
sandbox takes (PSS of its QEMU and of its daemon, median over a few sandboxes).

This machine's speed drifts by a third within the hour, so each round also runs
``runsc --platform=ptrace run`` of a bundle with the same busybox rootfs (where
runsc is installed): its median is the yardstick the figures were taken at (the
issues' reference speed is runsc at ~146-150 ms). runsc spends its time in system
calls, and follows the speed of emulated guest code only roughly (cold runs of 1.44
and 2.18 s measured at runsc 149 and 150 ms, within the hour), so under TCG each
round also boots a stub guest (:func:`stub_boot`): the trimmed kernel and
bench/image_formats.py's stub /init, which imports the protobuf runtime and powers
off. It runs the same kind of code a cold start does, and none of hako's.

Runs against a throw-away state and image store (the busybox image is built
from Debian's busybox-static). Needs root, QEMU and the built guest assets.

    sudo .venv/bin/python bench/boot.py [--runs 5] [--kernels trimmed,debian] [--sandboxes 3]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for bench.image_formats

from hako import assets
from hako.hypervisor import choose
from hako.image.busybox import build_busybox_image
from hako.image.store import ImageStore

IMAGE = "hako.local/busybox:latest"
PHASES = (
    ("host_startup", "hako start-up (to the sandbox daemon)"),
    ("daemon_launch", "sandbox daemon start-up (to QEMU launch)"),
    ("qemu_start", "QEMU start"),
    ("guest_kernel", "guest kernel"),
    ("guest_userspace", "guest userspace (to agent ready)"),
    ("python_start", "  of which: python start"),
    ("agent_init", "  of which: agent init"),
    ("boot_total", "boot total (QEMU launch to agent ready)"),
    ("sandbox_setup", "sandbox setup (network, hostname, clock)"),
    ("container_create", "container create"),
    ("container_start", "container start"),
    ("container_run", "container run (start to exit)"),
    ("teardown", "teardown (VM stop)"),
    ("exit_seen", "container exit until hako returns"),
    ("total", "hako run --rm IMG true (in-process)"),
    ("wall", "hako run --rm IMG true (wall, measured outside)"),
)


def hako_command() -> list[str]:
    entry = Path(sys.executable).parent / "hako"
    return [str(entry)] if entry.exists() else [sys.executable, "-m", "hako.cli.main"]


def run_once(env: dict[str, str], kernel: str, template: str = "off", pool: bool = False) -> dict[str, float]:
    """One ``hako run --rm IMG true``: its timing breakdown, and its wall time as ``wall``."""
    argv = [*hako_command(), "run", "--rm", f"--template={template}", "--kernel", kernel]
    argv += [] if pool else ["--no-pool"]
    started = time.perf_counter()
    result = subprocess.run(
        [*argv, "--timing-json", IMAGE, "true"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"hako run failed ({result.returncode}): {result.stderr.strip()}")
    report = json.loads(result.stderr.strip().splitlines()[-1])
    figures: dict[str, float] = report["timing"]
    figures["wall"] = wall
    return figures


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed ({result.returncode}): {result.stderr.strip()}")
    return wall


def stub_boot() -> Callable[[], float]:
    """A second yardstick, for TCG: a function that boots the stub guest once (the trimmed
    kernel and bench/image_formats.py's stub /init, built on first use) and returns the
    seconds from QEMU's start to its exit."""
    from bench.image_formats import MACHINE, STUB_INIT, boot, qemu_argv

    kernel = assets.kernel("trimmed")
    image = assets.guest_image("trimmed", build=True, init=STUB_INIT)
    argv = qemu_argv(kernel, image, MACHINE, kernel.cmdline_for("tcg"))
    return lambda: boot(argv).host_exit


def make_bundle(store: ImageStore, bundle: Path) -> None:
    """An OCI bundle for runc and runsc: the busybox image's rootfs (read-only), ``true``."""
    image = store.resolve(IMAGE)
    rootfs = getattr(image, "rootfs", None)
    if not isinstance(rootfs, Path):
        raise SystemExit(f"{IMAGE} has no unpacked rootfs")
    bundle.mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["root"] = {"path": str(rootfs), "readonly": True}
    spec["process"]["args"] = ["true"]
    spec["process"]["terminal"] = False
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise SystemExit(f"no Pss for pid {pid}")


def translated_code_kib(pid: int) -> int:
    """PSS of QEMU's TCG translation buffer: its one anonymous mapping that is writable and
    executable (0 under KVM, which runs guest code as it is)."""
    total, in_buffer = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping: address, perms, offset, dev, inode[, path]
            in_buffer = fields[1] == "rwxp" and len(fields) == 5
        elif in_buffer and fields[0] == "Pss:":
            total += int(fields[1])
    return total


@dataclasses.dataclass(frozen=True)
class Memory:
    """Median PSS (MiB) per idle sandbox."""

    qemu: float
    daemon: float
    translated: float  # of ``qemu``: TCG's translated code

    @property
    def total(self) -> float:
        return self.qemu + self.daemon

    def describe(self) -> str:
        code = f", of which {self.translated:.1f} MiB TCG's translated code" if self.translated else ""
        return f"QEMU {self.qemu:.1f} MiB{code} + daemon {self.daemon:.1f} MiB = {self.total:.1f} MiB PSS"


KSM = Path("/sys/kernel/mm/ksm")


@contextlib.contextmanager
def host_ksm(pages_to_scan: int = 1000) -> Iterator[None]:
    """The host's KSM on (scanning ``pages_to_scan`` pages per 20 ms), then as it was: a
    host-wide setting, which a benchmark that measures it must restore. Pages it merged are
    unmerged again if it was off."""
    names = ("run", "pages_to_scan", "sleep_millisecs")
    before = {name: (KSM / name).read_text().strip() for name in names}
    try:
        for name, value in (("pages_to_scan", pages_to_scan), ("sleep_millisecs", 20), ("run", 1)):
            (KSM / name).write_text(str(value))
        yield
    finally:
        (KSM / "run").write_text("2" if before["run"] == "0" else before["run"])  # 2: unmerge all
        for name in ("pages_to_scan", "sleep_millisecs"):
            (KSM / name).write_text(before[name])
        if before["run"] == "0":
            (KSM / "run").write_text("0")


def _ksm_settled(timeout: float = 180.0) -> None:
    """Wait until KSM merges no more (its count of sharing pages moves by under 1% in 10 s)."""
    deadline = time.monotonic() + timeout
    previous = -1
    while time.monotonic() < deadline:
        sharing = int((KSM / "pages_sharing").read_text())
        if previous >= 0 and abs(sharing - previous) <= previous / 100:
            return
        previous = sharing
        time.sleep(10)


def measure_memory(
    env: dict[str, str], count: int, template: str = "off", pool: bool = False, ksm: bool = False
) -> Memory:
    """PSS of an idle sandbox's QEMU and of its daemon, medians over ``count`` sandboxes running
    ``sleep`` at the same time. With ``pool``, the sandboxes are taken from a warm pool of
    ``count`` (whose daemons one ``hako pool fill`` forked), which is not refilled. With ``ksm``
    (the host's KSM on: :func:`host_ksm`), once KSM has merged what it will."""
    names = [f"mem{i}" for i in range(count)]
    try:
        if pool:
            for size in (count, 0):  # fill it, then want none: taking one starts no refill
                argv = [*hako_command(), "pool", "fill", str(size)]
                subprocess.run(argv, env=env, check=True, capture_output=True)
        for name in names:
            argv = [*hako_command(), "run", "-d", f"--template={template}", "--name", name]
            argv += [] if pool else ["--no-pool"]
            subprocess.run([*argv, IMAGE, "sleep", "1000"], env=env, check=True, capture_output=True)
        time.sleep(3)  # let the guests settle (warm-up thread, page cache)
        if ksm:
            _ksm_settled()
        qemu, daemon, code = [], [], []
        directories = (Path(env["HAKO_RUN"]) / "sandboxes").iterdir()
        states = [json.loads((directory / "state.json").read_text()) for directory in directories]
        states = [state for state in states if state.get("name") in names]
        for state in states:
            if pool and "pool_take" not in state.get("timing", {}):
                raise SystemExit(f"{state['name']} was not taken from the pool")
            qemu.append(pss_kib(state["qemu_pid"]) / 1024)
            # A pool's sandboxes share one daemon process (its keeper): each holds its share.
            served = sum(1 for other in states if other["daemon_pid"] == state["daemon_pid"])
            daemon.append(pss_kib(state["daemon_pid"]) / 1024 / served)
            code.append(translated_code_kib(state["qemu_pid"]) / 1024)
        return Memory(statistics.median(qemu), statistics.median(daemon), statistics.median(code))
    finally:
        subprocess.run([*hako_command(), "rm", "-f", *names], env=env, capture_output=True, check=False)
        if pool:
            subprocess.run([*hako_command(), "pool", "drain"], env=env, capture_output=True, check=False)


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False)
    return (
        f"{platform.node()}: {os.cpu_count()} x {model}, {memory:.0f} GiB, {platform.system()} "
        f"{platform.release()}; {qemu.stdout.splitlines()[0] if qemu.stdout else 'QEMU ?'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per kernel (median reported)")
    parser.add_argument("--kernels", default="trimmed,debian", help="comma-separated kernel kinds")
    parser.add_argument("--sandboxes", type=int, default=3, help="idle sandboxes for the memory figure")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/boot.py runs VMs: run it as root")
    kernels = args.kernels.split(",")

    scratch = Path(tempfile.mkdtemp(prefix="hako-bench-"))
    env = {**os.environ, "HAKO_RUN": str(scratch / "run"), "HAKO_IMAGES": str(scratch / "images")}
    try:
        ImageStore(scratch / "images").import_path(build_busybox_image(scratch / "busybox"))
        (scratch / "run").mkdir()
        (scratch / "run" / "tcg-notice").touch()
        accel = choose("auto")
        print(f"machine: {machine()}")
        print(f"accelerator: {accel.name.upper()} ({accel.reason})")
        print(f"runs: {args.runs} per kernel, medians; image: {IMAGE}\n")

        runsc = shutil.which("runsc")
        if runsc is not None:
            make_bundle(ImageStore(scratch / "images"), scratch / "bundle")
        results: dict[str, list[dict[str, float]]] = {kernel: [] for kernel in kernels}
        yardstick: list[float] = []
        stub = stub_boot() if accel.name == "tcg" else None
        stubs: list[float] = []
        for i in range(args.runs):  # interleaved, so drift in the machine's speed hits all alike
            for kernel in kernels:
                results[kernel].append(run_once(env, kernel))
            if runsc is not None:
                argv = [runsc, "--platform=ptrace", "--network=none", "--root", str(scratch / "runsc")]
                yardstick.append(timed([*argv, "run", "--bundle", str(scratch / "bundle"), f"y{i}"]))
            if stub is not None:
                stubs.append(stub())

        width = max(len(label) for _, label in PHASES)
        header = "".join(f"{kernel + ' kernel':>18}" for kernel in kernels)
        print(f"{'phase (' + accel.name.upper() + ')':<{width}}{header}")
        for key, label in PHASES:
            cells = []
            for kernel in kernels:
                values = [run[key] for run in results[kernel] if key in run]
                cells.append(f"{statistics.median(values) * 1000:15.0f} ms" if values else f"{'-':>18}")
            print(f"{label:<{width}}{''.join(cells)}")
        if yardstick:
            ms = statistics.median(yardstick) * 1000
            print(f"{'the yardstick: runsc --platform=ptrace run':<{width}}{ms:15.0f} ms (same rounds)")
        if stubs:
            ms = statistics.median(stubs) * 1000
            print(f"{'the TCG yardstick: a stub guest boot (stub_boot)':<{width}}{ms:15.0f} ms (same rounds)")

        print()
        for kernel in kernels:
            image = assets.guest_image(kernel)
            kernel_file = assets.kernel(kernel)
            print(
                f"{kernel} kernel: {kernel_file.release}, {kernel_file.path.stat().st_size / 1e6:.1f} MB; "
                f"guest image: {image.format}, {image.size_bytes / 1e6:.1f} MB"
            )
        memory = measure_memory(env, args.sandboxes)
        label = f"host memory per idle sandbox (trimmed kernel, median of {args.sandboxes})"
        print(f"{label}: {memory.describe()}")
    finally:
        if (scratch / "runsc").is_dir():
            for container in (scratch / "runsc").iterdir():
                argv = ["runsc", "--root", str(scratch / "runsc"), "delete", "-f", container.name]
                subprocess.run(argv, capture_output=True, check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
