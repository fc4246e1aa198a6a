"""``hako template create|ls|rm``: the VM templates sandboxes are restored from.

``hako run`` makes the template it needs on first use; ``create`` makes one ahead of time (for
the options ``hako run`` would be given), ``ls`` lists them, ``rm`` removes them (running clones
are not affected).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from typing import Any

from hako import assets
from hako.cli.common import accelerator, print_table, require_root
from hako.cli.options import parse_cpus, parse_memory
from hako.cli.run import vm_size
from hako.errors import UsageError
from hako.hypervisor import find_qemu
from hako.runtime import paths, templates
from hako.runtime.config import SandboxConfig


def add_parsers(commands: Any) -> None:
    p = commands.add_parser("template", help="manage the VM templates sandboxes are restored from")
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("create", help="make the template `hako run` with these options would use")
    c.add_argument("--memory", metavar="SIZE", help="as hako run --memory (the VM gets 256 MiB more)")
    c.add_argument("--cpus", metavar="N", help="as hako run --cpus")
    c.add_argument("--kernel", choices=("trimmed", "debian"), default="trimmed", help="guest kernel")
    c.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="accelerator")
    c.add_argument("--debug", action="store_true", help="verbose guest agent log")
    c.set_defaults(func=create)
    ls = sub.add_parser("ls", help="list templates")
    ls.set_defaults(func=list_templates)
    rm = sub.add_parser("rm", help="remove templates")
    rm.add_argument("keys", nargs="*", metavar="KEY", help="template keys (a unique prefix will do)")
    rm.add_argument("-a", "--all", action="store_true", help="remove all templates")
    rm.set_defaults(func=remove)


def create(args: argparse.Namespace) -> int:
    require_root("template create")
    memory = parse_memory(args.memory) if args.memory else None
    cpus = parse_cpus(args.cpus) if args.cpus else None
    accel = accelerator(args.accel)
    memory_mib, vcpus = vm_size(memory, cpus)
    config = SandboxConfig(
        sandbox_id="template",
        hostname="template",
        kernel=assets.kernel(args.kernel),
        image=assets.guest_image(args.kernel),
        memory_mib=memory_mib,
        vcpus=vcpus,
        accel=accel,
        run_dir=paths.run_root() / "template-create",
        debug=args.debug,
    )
    vm = config.vm_config()
    qemu = find_qemu()
    template = templates.create(vm, qemu, config.boot_timeout, warn=_warn)
    meta = template.meta()
    print(f"{template.key}  {meta.get('kernel_release', '?')}  booted in {meta.get('boot_seconds', 0):.1f} s")
    return 0


def list_templates(args: argparse.Namespace) -> int:
    rows = []
    for template, meta in templates.listing():
        given = meta.get("inputs", {})
        created = meta.get("created")
        rows.append(
            (
                template.key,
                str(meta.get("kernel_release", "?")),
                f"{given.get('memory_mib', '?')} MiB",
                str(given.get("vcpus", "?")),
                str(given.get("accel", "?")).upper(),
                f"{templates.resident_bytes(template.memory) / (1 << 20):.0f} MiB",
                datetime.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M") if created else "?",
            )
        )
    print_table(("KEY", "KERNEL", "MEMORY", "VCPUS", "ACCEL", "RAM IN FILE", "CREATED"), rows)
    return 0


def remove(args: argparse.Namespace) -> int:
    require_root("template rm")
    known = [template for template, _ in templates.listing()]
    if args.all:
        chosen = known
    elif not args.keys:
        raise UsageError("hako template rm: name a template KEY (see `hako template ls`) or use --all")
    else:
        chosen = []
        for key in args.keys:
            matches = [t for t in known if t.key.startswith(key)]
            if len(matches) != 1:
                what = "no template" if not matches else f"{len(matches)} templates"
                raise UsageError(f"hako template rm: {what} match {key!r}: see `hako template ls`")
            chosen.append(matches[0])
    for template in chosen:
        templates.discard(template)
        print(template.key)
    return 0


def _warn(message: str) -> None:
    print(f"hako: {message}", file=sys.stderr)
