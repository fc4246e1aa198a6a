"""Boot the built kernels with a stub /init under TCG (QEMU microvm) and check what the guest sees.

The stub replaces the agent (whose packages change independently): it prints the kernel release,
loads /etc/hako/modules.load like the agent does, reports filesystems and virtio devices, runs the
image's Python with the protobuf runtime, and reboots (QEMU exits thanks to reboot=t and
-no-reboot). QEMU runs as the assets recommend: Kernel.microvm_options, Kernel.cmdline_for("tcg")
and GuestImage.cmdline.

The kernels come from the cache (`python -m hako.assets build`); building them here if missing
takes minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from hako.assets import GuestImage, Kernel, guest_image, kernel

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed"),
]

STUB_INIT = r"""#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "HAKO_TEST_RELEASE $(uname -r)"
if [ -f /etc/hako/modules.load ]; then
  while read -r ko; do
    insmod "$ko" || echo "HAKO_TEST_INSMOD_FAILED $ko"
  done < /etc/hako/modules.load
fi
echo "HAKO_TEST_FS $(tr '\t\n' '  ' < /proc/filesystems)"
echo "HAKO_TEST_VIRTIO $(ls /sys/bus/virtio/devices | wc -l)"
echo "HAKO_TEST_CLOCK $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
/usr/bin/python3.11 -IS -c '
import sys
sys.path[:0] = ["/usr/lib/hako"]
import json, os
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "cpp")
from google.protobuf.internal import api_implementation
from google.protobuf import descriptor_pool
info = json.load(open("/etc/hako/image.json"))
print("HAKO_TEST_PYTHON", sys.version.split()[0], api_implementation.Type(), info["kernel"], info["format"])
'
echo HAKO_TEST_DONE
reboot -f
"""


def _boot(k: Kernel, img: GuestImage) -> dict[str, str]:
    argv = [
        "qemu-system-x86_64", "-M", ",".join(["microvm,x-option-roms=off,isa-serial=on", *k.microvm_options]),
        "-accel", "tcg",
        "-cpu", "max", "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot", "-kernel", str(k.path), "-serial", "stdio",
        "-object", "rng-random,filename=/dev/urandom,id=rng0", "-device", "virtio-rng-device,rng=rng0",
        "-append", " ".join([*k.cmdline_for("tcg"), *img.cmdline]),
    ]  # fmt: skip
    if img.format == "initramfs":
        argv += ["-initrd", str(img.path)]
    else:
        argv += ["-drive", f"id=root,file={img.path},format=raw,if=none,readonly=on",
                 "-device", "virtio-blk-device,drive=root"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-2000:]
    marks: dict[str, str] = {}
    for line in out.splitlines():
        tag, _, rest = line.strip().partition(" ")
        if tag.startswith("HAKO_TEST_"):
            marks[tag] = marks.get(tag, "") + rest if tag != "HAKO_TEST_INSMOD_FAILED" else rest
    assert "HAKO_TEST_DONE" in marks, out[-2000:]
    return marks


@pytest.mark.parametrize("fmt", ["initramfs", "erofs"])
def test_trimmed_kernel_boots_the_image(fmt: str) -> None:
    k = kernel("trimmed", build=True)
    img = guest_image("trimmed", build=True, format=fmt, init=STUB_INIT)
    marks = _boot(k, img)
    assert marks["HAKO_TEST_RELEASE"] == k.release
    assert k.release.endswith("-hako") and k.release != os.uname().release
    assert marks["HAKO_TEST_PYTHON"] == f"3.11.2 cpp trimmed {fmt}"
    fs = marks["HAKO_TEST_FS"].split()
    for name in ("9p", "erofs", "ext4", "overlay", "tmpfs", "devtmpfs", "cgroup2"):
        assert name in fs, name
    assert marks["HAKO_TEST_VIRTIO"] == ("2" if fmt == "erofs" else "1")  # rng (+ the root disk)
    assert marks["HAKO_TEST_CLOCK"] in ("tsc-early", "tsc")  # not jiffies


def test_debian_kernel_boots_the_image_and_loads_its_modules() -> None:
    k = kernel("debian", build=True)
    img = guest_image("debian", build=True, init=STUB_INIT)
    marks = _boot(k, img)
    assert "HAKO_TEST_INSMOD_FAILED" not in marks
    assert marks["HAKO_TEST_RELEASE"] == k.release
    assert k.release.endswith("-amd64") and k.release != os.uname().release
    fs = marks["HAKO_TEST_FS"].split()
    for name in ("9p", "erofs", "ext4", "overlay"):
        assert name in fs, name
    assert marks["HAKO_TEST_VIRTIO"] == "1"  # the rng, which this kernel finds through ACPI
    assert marks["HAKO_TEST_PYTHON"] == "3.11.2 cpp debian initramfs"
    assert marks["HAKO_TEST_CLOCK"] in ("tsc-early", "tsc")  # not jiffies
