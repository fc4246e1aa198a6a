"""``hako assets build [--kernel trimmed|debian|all] [--format F]`` and ``hako assets status``
(also ``python -m hako.assets ...``)."""

from __future__ import annotations

import argparse
import sys

from hako.errors import HakoError

from . import IMAGE_FORMATS, KERNEL_KINDS, guest_image, kernel, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hako assets", description="Build or list hako's guest assets.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser(
        "build", help="build the guest kernels and images (cached; rebuilt when inputs change)"
    )
    build.add_argument("--kernel", choices=[*KERNEL_KINDS, "all"], default="all")
    build.add_argument(
        "--format",
        choices=[*IMAGE_FORMATS, "all"],
        default=None,
        help="image format (default: the faster one for each kernel)",
    )
    build.add_argument("--quiet", action="store_true", help="no progress output")
    sub.add_parser("status", help="list built assets")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            kinds = KERNEL_KINDS if args.kernel == "all" else (args.kernel,)
            for kind in kinds:
                formats: tuple[str | None, ...] = (args.format,)
                if args.format == "all":
                    formats = IMAGE_FORMATS if kind == "trimmed" else ("initramfs",)
                for fmt in formats:
                    img = guest_image(kind, build=True, format=fmt, progress=not args.quiet)
                    k = kernel(kind)
                    print(f"{kind}: kernel {k.release} {k.path}")
                    print(f"{kind}: image {img.format} {img.size_bytes / 1e6:.1f} MB {img.path}")
        else:
            for row in status():
                print(row)
    except HakoError as e:
        print(f"hako assets: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
