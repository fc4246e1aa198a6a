"""Boot-time benchmark of guest image formats and kernel args under TCG (QEMU microvm).

Boots the built kernel with a stub /init that prints the guest uptime when /init starts, imports
the protobuf runtime (and hako_api, when it imports) like the agent, prints the uptime again and
reboots. Host times are from QEMU's start; guest times are /proc/uptime. Medians of --boots runs.

    .venv/bin/python bench/image_formats.py --boots 5
    .venv/bin/python bench/image_formats.py --variants initramfs,erofs --extra-args "pci=off"
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from hako.assets import GuestImage, Kernel, guest_image, kernel
from hako.hypervisor.base import cpu_model

STUB_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
read up rest < /proc/uptime
echo "HAKO_BENCH_INIT $up"
/usr/bin/python3.11 -IS -c '
import sys
sys.path[:0] = ["/usr/lib/hako"]
import os
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "cpp")
from google.protobuf import descriptor_pool, symbol_database
from google.protobuf.internal import builder
try:
    import hako_api.agent_pb2
except Exception:
    pass
print("HAKO_BENCH_PY", open("/proc/uptime").read().split()[0], flush=True)
'
/bin/busybox reboot -f
"""

MACHINE = "microvm,x-option-roms=off,isa-serial=on"


@dataclasses.dataclass
class Variant:
    name: str
    format: str = "initramfs"
    compression: str = "none"


@dataclasses.dataclass
class Boot:
    host_init: float  # s from QEMU start to the /init marker
    host_py: float  # s to the python marker
    host_exit: float  # s to QEMU exit
    guest_init: float  # guest uptime at /init
    guest_py: float  # guest uptime after the imports


VARIANTS = {
    "initramfs": Variant("initramfs"),
    "initramfs-gzip": Variant("initramfs-gzip", compression="gzip"),
    "initramfs-lz4": Variant("initramfs-lz4", compression="lz4"),
    "erofs": Variant("erofs", format="erofs"),
}


def qemu_argv(k: Kernel, img: GuestImage, machine: str, args: tuple[str, ...]) -> list[str]:
    machine = ",".join([machine, *k.microvm_options])
    argv = [
        "qemu-system-x86_64",
        "-M",
        machine,
        "-accel",
        "tcg",
        "-cpu",
        cpu_model("tcg"),
        "-m",
        "256M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(k.path),
        "-object",
        "rng-random,filename=/dev/urandom,id=rng0",
        "-device",
        "virtio-rng-device,rng=rng0",
        "-serial",
        "stdio",
    ]
    if img.format == "initramfs":
        argv += ["-initrd", str(img.path)]
    else:
        argv += [
            "-drive",
            f"id=root,file={img.path},format=raw,if=none,readonly=on",
            "-device",
            "virtio-blk-device,drive=root",
        ]
    argv += ["-append", " ".join([*args, *img.cmdline])]
    return argv


def boot(argv: list[str], timeout: float = 60.0) -> Boot:
    start = time.monotonic()
    marks: dict[str, tuple[float, float]] = {}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    watchdog = threading.Timer(timeout, proc.kill)  # a hung guest prints nothing: do not wait on its output
    watchdog.start()
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            for tag in ("HAKO_BENCH_INIT", "HAKO_BENCH_PY"):
                if line.startswith(tag):
                    marks[tag] = (time.monotonic() - start, float(line.split()[1]))
        proc.wait(timeout=5)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    end = time.monotonic() - start
    if len(marks) != 2:
        raise RuntimeError(f"boot did not reach both markers: {' '.join(argv)}")
    return Boot(
        marks["HAKO_BENCH_INIT"][0],
        marks["HAKO_BENCH_PY"][0],
        end,
        marks["HAKO_BENCH_INIT"][1],
        marks["HAKO_BENCH_PY"][1],
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--kernel", choices=["trimmed", "debian"], default="trimmed")
    parser.add_argument("--kernel-path", type=Path, help="boot this vmlinux instead of the cached one")
    parser.add_argument("--extra-args", default="", help="kernel args added to every variant")
    parser.add_argument(
        "--argsets",
        default="-",
        help="'|'-separated sets of extra kernel args ('-' = none); every variant boots with each set",
    )
    parser.add_argument("--plain", action="store_true", help="Kernel.cmdline, not Kernel.cmdline_for('tcg')")
    parser.add_argument("--machine", default=MACHINE, help="the -M value (plus Kernel.microvm_options)")
    args = parser.parse_args()
    k = kernel(args.kernel)
    if args.kernel_path:
        k = dataclasses.replace(k, path=args.kernel_path)
    kargs = (*(k.cmdline if args.plain else k.cmdline_for("tcg")), *args.extra_args.split())
    print(f"kernel {k.path}; {args.boots} boots per variant; args: {' '.join(kargs)}")
    print(
        f"{'variant':40} {'MB':>6} {'host:init':>9} {'host:py':>8} {'host:exit':>9} {'guest:init':>10} "
        f"{'guest:py':>8}"
    )
    runs: dict[str, tuple[GuestImage, list[str], list[Boot]]] = {}
    for name in args.variants.split(","):
        v = VARIANTS[name]
        img = guest_image(k.kind, build=True, format=v.format, compression=v.compression, init=STUB_INIT)
        for argset in args.argsets.split("|"):
            extra = () if argset.strip() == "-" else tuple(argset.split())
            label = name if not extra else f"{name} +{' '.join(extra)}"
            runs[label] = (img, qemu_argv(k, img, args.machine, (*kargs, *extra)), [])
    # Round-robin, so that load from elsewhere hits every variant alike; each round in the
    # opposite order of the last: in a fixed order, which variant came first moved the medians
    # by tens of ms (two variants measured 49 ms apart one way, then 85 ms the other).
    order = list(runs.values())
    for round_ in range(args.boots):
        for _img, argv, boots in order if round_ % 2 == 0 else reversed(order):
            boots.append(boot(argv))
    for name, (img, _argv, boots) in runs.items():

        def med(field: str, boots: list[Boot] = boots) -> float:
            return float(statistics.median(getattr(b, field) for b in boots))

        print(
            f"{name:40} {img.size_bytes / 1e6:6.1f} {med('host_init'):9.2f} {med('host_py'):8.2f} "
            f"{med('host_exit'):9.2f} {med('guest_init'):10.2f} {med('guest_py'):8.2f}",
            flush=True,
        )
    for name, (_img, argv, _boots) in runs.items():
        print(f"QEMU line ({name}):", " ".join(argv))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    os._exit(130)
