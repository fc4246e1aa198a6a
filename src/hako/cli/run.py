"""``hako run``: a container in its own micro-VM, like ``docker run``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any

from hako import assets
from hako.cli.attach import Attachment, raw_terminal
from hako.cli.common import accelerator, process_age, require_root
from hako.cli.options import parse_cpus, parse_size, parse_volume
from hako.errors import HakoError, UsageError
from hako.hypervisor import find_qemu
from hako.image.store import ImageStore
from hako.oci.bundle import Bundle
from hako.oci.spec import RunOptions, build_spec
from hako.runtime import timing
from hako.runtime.client import connect
from hako.runtime.sandbox import SandboxConfig
from hako.runtime.sandboxd import Notifications, daemonize_and_run
from hako.runtime.state import SandboxState, new_id, random_name, reserve

BASE_VM_MEMORY_MIB = 256  # the guest itself: kernel, agent, page cache for the shared rootfs
MAX_VCPUS = 64


def add_parsers(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "run", help="run a command in a new container (a new VM)"
    )
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background and print its id")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("--name", help="name the container")
    p.add_argument(
        "-e", "--env", action="append", default=[], metavar="K=V", help="set an environment variable"
    )
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the container")
    p.add_argument("-u", "--user", metavar="UID[:GID]", help="user (name or id) to run as")
    p.add_argument(
        "-v", "--volume", action="append", default=[], metavar="HOST:CTR[:ro]", help="bind a host path"
    )
    p.add_argument("--memory", metavar="SIZE", help="memory limit of the container (e.g. 256m)")
    p.add_argument("--cpus", metavar="N", help="CPUs the container may use (e.g. 1.5)")
    p.add_argument("--kernel", choices=("trimmed", "debian"), default="trimmed", help="guest kernel")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="accelerator")
    p.add_argument("--timing", action="store_true", help="print the start-up breakdown when done")
    p.add_argument("--debug", action="store_true", help="verbose guest agent log")
    p.add_argument("image", help="image: OCI layout dir or tar, imported name, or bundle dir")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_root("run")
    if args.detach and args.rm and args.timing:
        raise UsageError("--timing needs the container in the foreground: drop -d")
    if args.tty and not args.detach and not sys.stdin.isatty() and args.interactive:
        raise UsageError("the input device is not a TTY: drop -t, or run hako from a terminal")
    memory = parse_size(args.memory) if args.memory else None
    cpus = parse_cpus(args.cpus) if args.cpus else None
    volumes = [parse_volume(v) for v in args.volume]
    accel = accelerator(args.accel)
    kernel = assets.kernel(args.kernel)
    guest_image = assets.guest_image(args.kernel)
    find_qemu()

    target = ImageStore().resolve(args.image)
    sandbox_id = new_id()
    options = RunOptions(
        args=args.command,
        env=args.env,
        workdir=args.workdir,
        user=args.user,
        terminal=args.tty,
        memory=memory,
        cpus=cpus,
        volumes=volumes,
    )
    if isinstance(target, Bundle):
        spec = build_spec(sandbox_id, options, base=target.spec, rootfs=target.rootfs)
        image_name = str(target.path)
    else:
        spec = build_spec(sandbox_id, options, image=target.config, rootfs=target.rootfs)
        image_name = target.names[0] if target.names else target.short_id
    vcpus = min(MAX_VCPUS, max(1, math.ceil(cpus or 1)))
    vm_memory = BASE_VM_MEMORY_MIB + (memory or 0) // (1 << 20)

    state = SandboxState(
        id=sandbox_id,
        name=args.name or random_name(),
        image=image_name,
        command=list(spec["process"]["args"]),
        created=time.time(),
        kernel=args.kernel,
        accel=accel.name,
        accel_reason=accel.reason,
        memory_mib=vm_memory,
        vcpus=vcpus,
        auto_remove=args.rm,
    )
    reserve(state)
    (state.dir / "config.json").write_text(json.dumps(spec, indent=1))
    config = SandboxConfig(
        sandbox_id=sandbox_id,
        hostname=spec.get("hostname") or sandbox_id[:12],
        kernel=kernel,
        image=guest_image,
        memory_mib=vm_memory,
        vcpus=vcpus,
        accel=accel,
        run_dir=state.dir,
        debug=args.debug,
    )
    pid, notify = daemonize_and_run(state, config, spec, stdin=args.interactive, attach=not args.detach)
    try:
        first = notify.next()
        if first is None or "error" in first:
            message = first["error"] if first else "the sandbox daemon died at start"
            err = HakoError(message)
            err.exit_code = int(first.get("exit_code", 125)) if first else 125
            raise err
        if args.detach:
            agent = connect(state)
            try:
                agent.start_container(sandbox_id)
            finally:
                agent.close()
            print(sandbox_id)
            return 0
        return _foreground(args, state, notify)
    finally:
        notify.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _foreground(args: argparse.Namespace, state: SandboxState, notify: Notifications) -> int:
    agent = connect(state)
    attachment = Attachment(agent, state.id, "", stdin=args.interactive, terminal=args.tty)
    try:
        attachment.start_output()
        attachment.resize()
        with raw_terminal(args.tty and args.interactive), attachment.proxy_signals():
            agent.start_container(state.id)
            attachment.start_input()
            status = agent.wait_process(state.id)
            attachment.finish_output()
    except HakoError:
        # The daemon records the failure and stops the VM once we hang up.
        agent.close()
        _final(notify)
        raise
    agent.close()
    final = _final(notify)
    if args.timing:
        figures = dict(final.get("timing", {})) if final else {}
        figures["total"] = process_age()
        print(timing.render(figures, state.accel, state.kernel), file=sys.stderr)
    if final and final.get("status") == "dead" and final.get("error"):
        print(f"hako: container {state.name}: {final['error']}", file=sys.stderr)
    return status


def _final(notify: Notifications) -> dict[str, Any] | None:
    """Wait for the daemon to finish (the VM is gone then) and return its final state."""
    while True:
        message = notify.next(timeout=60)
        if message is None:
            return None
        if "final" in message:
            final: dict[str, Any] = message["final"]
            return final
