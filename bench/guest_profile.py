#!/usr/bin/env python3
"""Where a guest boot spends its time: the guest's instruction pointer, sampled over QMP.

Boots the trimmed kernel with bench/image_formats.py's stub /init (it imports the agent's
protobuf code like the agent, then reboots) under QEMU as hako runs it, stopped at start; then
resumes it and asks the monitor for the registers (``info registers``) every ``--interval`` ms
until the guest reboots. Kernel addresses are named from the vmlinux's symbol table
(``nm``); user-space ones are counted as "user". Prints the functions with the most samples,
then what the guest ran in each 100 ms of the boot.

This is how the local APIC timer calibration (~250 ms) and the uniprocessor patching of lock
prefixes (~100 ms) were found in TCG boots (see Kernel.cmdline_for). Each sample stops the vCPU
briefly, so the boot runs slower than unsampled; the proportions are what it is for.

    .venv/bin/python bench/guest_profile.py [--interval 2] [--top 30] [--extra-args "..."]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for bench.image_formats

from qemu.qmp import QMPClient

from bench.image_formats import MACHINE, STUB_INIT, qemu_argv
from hako.assets import guest_image, kernel

KERNEL_SPACE = 0xFFFF800000000000
RIP = re.compile(r"RIP=([0-9a-f]+)")


class Symbols:
    """Text symbols of a vmlinux, for naming addresses."""

    def __init__(self, vmlinux: Path) -> None:
        out = subprocess.run(["nm", "-n", str(vmlinux)], capture_output=True, text=True, check=True).stdout
        pairs = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[1] in "tTwW":
                pairs.append((int(fields[0], 16), fields[2]))
        if not pairs:
            raise SystemExit(f"{vmlinux} has no symbols: profile the trimmed kernel")
        self.addresses = [address for address, _ in pairs]
        self.names = [name for _, name in pairs]

    def name(self, rip: int) -> str:
        if rip < KERNEL_SPACE:
            return "user"
        index = bisect.bisect_right(self.addresses, rip) - 1
        return self.names[index] if index >= 0 else hex(rip)


async def sample(argv: list[str], interval: float, timeout: float) -> list[tuple[float, int]]:
    """(seconds since resume, RIP) until QEMU exits (the stub reboots; -no-reboot) or timeout."""
    with tempfile.TemporaryDirectory(prefix="hako-profile-") as scratch:
        monitor = os.path.join(scratch, "qmp.sock")
        qemu = subprocess.Popen(
            [*argv, "-S", "-qmp", f"unix:{monitor},server=on,wait=on"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = QMPClient("guest-profile")
        try:
            for _ in range(500):
                if os.path.exists(monitor):
                    break
                await asyncio.sleep(0.01)
            await client.connect(monitor)
            await client.execute("cont")
            started = time.monotonic()
            samples = []
            while qemu.poll() is None and time.monotonic() - started < timeout:
                try:
                    text = await client.execute("human-monitor-command", {"command-line": "info registers"})
                except Exception:  # the monitor went away with QEMU: the boot is over
                    break
                found = RIP.search(str(text))
                if found:
                    samples.append((time.monotonic() - started, int(found.group(1), 16)))
                await asyncio.sleep(interval)
            return samples
        finally:
            with contextlib.suppress(EOFError, OSError):  # QEMU may be gone already
                await client.disconnect()
            qemu.kill()
            qemu.wait()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--interval", type=float, default=2.0, help="ms between samples")
    parser.add_argument("--timeout", type=float, default=30.0, help="s before giving up on the boot")
    parser.add_argument("--top", type=int, default=30, help="functions to list")
    parser.add_argument("--extra-args", default="", help="kernel args added to Kernel.cmdline_for('tcg')")
    parser.add_argument("--plain", action="store_true", help="Kernel.cmdline, not Kernel.cmdline_for('tcg')")
    args = parser.parse_args()

    k = kernel("trimmed")
    img = guest_image("trimmed", build=True, init=STUB_INIT)
    kargs = (*(k.cmdline if args.plain else k.cmdline_for("tcg")), *args.extra_args.split())
    argv = qemu_argv(k, img, MACHINE, kargs)
    symbols = Symbols(k.path)
    samples = asyncio.run(sample(argv, args.interval / 1000, args.timeout))
    if not samples:
        print("no samples: QEMU exited at once", file=sys.stderr)
        return 1
    span = samples[-1][0]
    print(f"kernel {k.path}; args: {' '.join(kargs)}")
    print(f"{len(samples)} samples over {span:.2f} s (TCG; each sample pauses the vCPU briefly)\n")
    counts = collections.Counter(symbols.name(rip) for _, rip in samples)
    print(f"{'samples':>7} {'share':>6}  function")
    for name, count in counts.most_common(args.top):
        print(f"{count:7d} {count / len(samples):6.1%}  {name}")
    print("\nper 100 ms of the boot: the functions sampled most")
    buckets: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for at, rip in samples:
        buckets[int(at * 10)][symbols.name(rip)] += 1
    for bucket in sorted(buckets):
        top = ", ".join(f"{name} {count}" for name, count in buckets[bucket].most_common(3))
        print(f"{bucket / 10:5.1f} s  {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
