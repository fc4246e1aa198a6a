"""Build the local "pause" image: the process of a CRI pod's sandbox container.

containerd's CRI plugin starts one sandbox container per pod from its ``sandbox_image`` before
the pod's containers; all it has to do is stay alive, and end promptly when it is stopped. No
registry is reachable here, so this builds one from Debian's busybox-static, with the same layer
as ``hako.image.busybox`` (so containerd unpacks it once for both). Its entrypoint is a shell
that handles SIGTERM and SIGINT itself: as PID 1 of a PID namespace it only gets the signals it
handles, and containerd's stop sends SIGTERM before it gives up and sends SIGKILL.

    python -m hako.image.pause OUTDIR [--tar] [--name NAME]

writes an OCI image layout to OUTDIR (and, with --tar, OUTDIR.tar, a tar of that layout).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hako.image.busybox import build_image_from_busybox, image_main

DEFAULT_NAME = "hako.local/pause:latest"
# Sleep in the background so that the shell is in ``wait``, which a trapped signal interrupts
# (a foreground ``sleep`` would delay the trap for up to an hour); the trap ends the sleep too.
SCRIPT = "trap 'kill $! 2>/dev/null; exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"
ENTRYPOINT = ["/bin/sh", "-c", SCRIPT]


def build_pause_image(out: Path, *, tar: bool = False, name: str = DEFAULT_NAME) -> Path:
    """Write the image layout to ``out`` (replacing a layout already there); return ``out``,
    or with ``tar`` the tar of it written beside it as ``<out>.tar``."""
    return build_image_from_busybox(
        out, tar=tar, name=name, title="pause", process={"Entrypoint": ENTRYPOINT}
    )


def main(argv: list[str] | None = None) -> int:
    return image_main(
        argv,
        prog="python -m hako.image.pause",
        description="Build the pause image (a CRI pod's sandbox container) from Debian's busybox-static.",
        build=build_pause_image,
        default_name=DEFAULT_NAME,
    )


if __name__ == "__main__":
    sys.exit(main())
