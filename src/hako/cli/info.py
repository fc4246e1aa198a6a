"""``hako check``, ``hako assets`` and ``hako image``: the host, the guest assets, the image store."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hako
from hako import assets
from hako.cli.common import require_root
from hako.errors import HakoError, UsageError
from hako.hypervisor import choose, find_qemu, probe_kvm
from hako.image.busybox import build_busybox_image
from hako.image.debian import build_fio_image, build_iperf3_image, build_nginx_image
from hako.image.store import ImageStore

# `hako image KIND OUT [--tar]`: the images built here, for the demo, the tests and benchmarks.
IMAGE_BUILDERS: dict[str, tuple[Callable[..., Path], str]] = {
    "busybox": (build_busybox_image, "build a busybox image layout from Debian's busybox-static"),
    "nginx": (build_nginx_image, "build an nginx image layout (port 80) from Debian's nginx"),
    "fio": (build_fio_image, "build a fio image layout from Debian's fio"),
    "iperf3": (build_iperf3_image, "build an iperf3 image layout (server on port 5201) from Debian's iperf3"),
}


def add_parsers(commands: Any) -> None:
    p = commands.add_parser("check", help="what this host offers hako")
    p.set_defaults(func=check)

    p = commands.add_parser("assets", help="build or inspect the guest kernels and images", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="build [--kernel K] [--format F] | status")
    p.set_defaults(func=assets_command)

    p = commands.add_parser("image", help="manage images")
    sub = p.add_subparsers(dest="image_command", required=True)
    i = sub.add_parser("import", help="import an OCI image layout (dir or tar) or a docker-save tar")
    i.add_argument("path")
    i.add_argument("--name", help="name it")
    i.set_defaults(func=image_import)
    ls = sub.add_parser("ls", help="list images")
    ls.set_defaults(func=image_ls)
    r = sub.add_parser("rm", help="remove an image")
    r.add_argument("-f", "--force", action="store_true", help="even if exited containers used it")
    r.add_argument("image")
    r.set_defaults(func=image_rm)
    for kind, (build, help_text) in IMAGE_BUILDERS.items():
        b = sub.add_parser(kind, help=help_text)
        b.add_argument("out", help="output directory (with --tar, the tar is OUT.tar beside it)")
        b.add_argument("--tar", action="store_true", help="also write OUT.tar, a tar of the layout")
        b.set_defaults(func=image_build, build=build)

    p = commands.add_parser("images", help="list images")
    p.set_defaults(func=image_ls)


def check(args: argparse.Namespace) -> int:
    ok = True
    print(f"hako {hako.__version__} on {platform.platform()}, Python {platform.python_version()}")
    try:
        qemu = find_qemu()
        version = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=False).stdout
        print(f"QEMU: {qemu}: {version.splitlines()[0] if version else 'unknown version'}")
    except HakoError as exc:
        ok = False
        print(f"QEMU: {exc}")
    kvm = probe_kvm()
    print(f"KVM: {'usable' if kvm.usable else 'not usable'}: {kvm.reason}")
    print(f"accelerator (auto): {choose('auto', kvm).reason}")
    for device, use in (
        ("/dev/vhost-net", "virtio-net in the host kernel"),
        ("/dev/vhost-vsock", "vsock channel"),
    ):
        print(f"{device}: {'present' if os.path.exists(device) else 'absent'} ({use})")
    for tool, package, use in (
        ("qemu-img", "qemu-utils", "block rootfs: --rootfs block"),
        ("mkfs.ext4", "e2fsprogs", "block rootfs: --rootfs block"),
        ("nft", "nftables", "the default network: NAT and -p"),
    ):
        found = shutil.which(tool)
        print(f"{tool}: {found or f'not found (apt-get install {package})'} ({use})")
    print(f"running as root: {'yes' if os.geteuid() == 0 else 'no (hako run needs root)'}")
    for status in assets.status():
        print(f"asset: {status}")
        ok = ok and (status.built or not status.required)
    if not ok:
        print("to set up: apt-get install qemu-system-x86, then `hako assets build`", file=sys.stderr)
    return 0 if ok else 1


def assets_command(args: argparse.Namespace) -> int:
    from hako.assets.__main__ import main as assets_main

    return assets_main(args.args)


def image_import(args: argparse.Namespace) -> int:
    require_root("image import")
    image = ImageStore().import_path(Path(args.path), name=args.name)
    print(f"{image.id} {' '.join(image.names)}")
    return 0


def image_ls(args: argparse.Namespace) -> int:
    require_root("images")
    print(f"{'IMAGE ID':<14}{'NAMES'}")
    for image in ImageStore().list():
        print(f"{image.short_id:<14}{', '.join(image.names) or '<none>'}")
    return 0


def image_rm(args: argparse.Namespace) -> int:
    """As ``docker rmi``: not while a container uses the image (a running one's rootfs would go
    from under it); with ``-f``, not while a running one does."""
    from hako.runtime.state import Status, using

    require_root("image rm")
    store = ImageStore()
    image = store.get(args.image)
    for state in using(image.path):
        running = state.effective_status() not in (Status.EXITED, Status.DEAD)
        if running or not args.force:
            remedy = f"hako rm -f {state.name}" if running else f"hako rm {state.name}, or hako image rm -f"
            raise UsageError(
                f"image {args.image} is in use by {'running' if running else 'exited'} container "
                f"{state.name} ({state.short_id}): {remedy}"
            )
    store.remove(image.id)
    print(image.id)
    return 0


def image_build(args: argparse.Namespace) -> int:
    path = args.build(Path(args.out), tar=args.tar)
    print(path)
    return 0
