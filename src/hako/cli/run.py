"""``hako run``: a container in its own micro-VM, like ``docker run``.

Order matters for start-up time: cheap checks, then the sandbox's daemon is
forked and starts QEMU at once; the image is resolved and the spec written while
the guest boots (and the heavy imports happen then, too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hako import assets
from hako.cli.common import accelerator, ignore_interrupts, interrupt_on, process_age, require_root
from hako.cli.options import no_new_privileges, parse_cpus, parse_memory, parse_volume, read_env_file
from hako.errors import HakoError, SandboxError, UsageError
from hako.hypervisor import find_qemu
from hako.runtime import pool, templates
from hako.runtime.config import SandboxConfig
from hako.runtime.launch import Notifications, fork_sandbox
from hako.runtime.state import (
    SPEC_FILE,
    SandboxState,
    Status,
    check_name_free,
    creation_lock,
    kill_vm,
    new_id,
    random_name,
    remove_dead,
    reserve,
)

ROOTFS_MODES = ("auto", "block", "9p")
NETWORK_MODES = ("bridge", "none")  # and ns:PATH (hako.network.sandbox, not imported here)
BASE_VM_MEMORY_MIB = 256  # the guest itself: kernel, agent, page cache for the shared rootfs
MAX_VCPUS = 64


def add_parsers(commands: Any) -> None:
    p = commands.add_parser("run", help="run a command in a new container (a new VM)")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background and print its id")
    p.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("--name", help="name the container")
    p.add_argument(
        "-e", "--env", action="append", default=[], metavar="K=V", help="set an environment variable"
    )
    p.add_argument(
        "--env-file", action="append", default=[], metavar="FILE", help="read K=V lines (or K) from a file"
    )
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the container")
    p.add_argument(
        "--entrypoint", metavar="CMD", help="run CMD instead of the image's entrypoint (and its cmd)"
    )
    p.add_argument("--hostname", metavar="NAME", help="its host name (default: its short id)")
    p.add_argument("--read-only", action="store_true", help="mount the container's root filesystem read-only")
    p.add_argument("--pids-limit", type=int, metavar="N", help="at most N processes in the container")
    for verb in ("add", "drop"):
        text = f"{verb} a capability (or ALL)"
        p.add_argument(f"--cap-{verb}", action="append", default=[], metavar="CAP", help=text)
    p.add_argument(
        "--security-opt",
        action="append",
        default=[],
        metavar="no-new-privileges",
        help="no-new-privileges: its processes cannot gain privileges (setuid, file capabilities)",
    )
    p.add_argument("-u", "--user", metavar="UID[:GID]", help="user (name or id) to run as")
    p.add_argument(
        "-v", "--volume", action="append", default=[], metavar="HOST:CTR[:ro]", help="bind a host path"
    )
    p.add_argument(
        "-p",
        "--publish",
        action="append",
        default=[],
        metavar="HOSTPORT:CTRPORT[/PROTO]",
        help="forward a host port to the container (tcp or udp)",
    )
    p.add_argument(
        "--network",
        metavar="bridge|none|ns:PATH",
        help="bridge: an address of its own, NAT to the outside, -p to publish ports (default); "
        "none: a loopback only; ns:PATH: the network namespace at PATH, configured by someone else "
        "(default for a bundle whose config.json names one)",
    )
    p.add_argument("--memory", metavar="SIZE", help="memory limit of the container (e.g. 256m)")
    p.add_argument("--cpus", metavar="N", help="CPUs the container may use (e.g. 1.5)")
    p.add_argument("--kernel", choices=("trimmed", "debian"), default="trimmed", help="guest kernel")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto", help="accelerator")
    p.add_argument(
        "--template",
        choices=templates.MODES,
        default=os.environ.get("HAKO_TEMPLATE", "auto"),
        help="restore the VM from a template, sharing its unwritten pages with other clones (auto), "
        "from a private copy of it (private), or boot it (off); default $HAKO_TEMPLATE or auto. "
        "Without --memory/--cpus a missing template is made on first use",
    )
    p.add_argument(
        "--no-pool",
        action="store_true",
        help="do not take a VM from the warm pool (hako pool), even if it has one",
    )
    p.add_argument(
        "--rootfs",
        choices=ROOTFS_MODES,
        default="auto",
        help="the container's rootfs: a block device made from the image (block), or shared from the "
        "host over virtio-9p (9p); auto: block for images, 9p for bundle directories",
    )
    p.add_argument("--timing", action="store_true", help="print the start-up breakdown to stderr when done")
    p.add_argument("--timing-json", action="store_true", help="the same as one line of JSON (for benchmarks)")
    p.add_argument("--debug", action="store_true", help="verbose guest agent log")
    p.add_argument("image", help="image: OCI layout dir or tar, imported name, or bundle dir")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments")
    p.set_defaults(func=run)


def vm_size(memory: int | None, cpus: float | None) -> tuple[int, int]:
    """The VM for a container limited to ``memory`` bytes and ``cpus`` CPUs: MiB and vCPUs (one
    rule for `hako run`, `hako template create` and the pool, so that their templates agree)."""
    return BASE_VM_MEMORY_MIB + (memory or 0) // (1 << 20), min(MAX_VCPUS, max(1, math.ceil(cpus or 1)))


def run(args: argparse.Namespace) -> int:
    require_root("run")
    if args.detach and (args.timing or args.timing_json):
        raise UsageError("--timing needs the container in the foreground: drop -d")
    memory = parse_memory(args.memory) if args.memory else None
    cpus = parse_cpus(args.cpus) if args.cpus else None
    volumes = [parse_volume(v) for v in args.volume]
    args.env = [*(item for path in args.env_file for item in read_env_file(path)), *args.env]
    args.no_new_privileges = no_new_privileges(args.security_opt)
    if args.hostname or args.cap_add or args.cap_drop:
        from hako.oci.spec import check_hostname, normalize_capabilities  # (hako.image is not light)

        if args.hostname:
            check_hostname(args.hostname)
        normalize_capabilities([*args.cap_add, *args.cap_drop])
    for volume in volumes:  # checked before any VM starts (Docker would make it: hako does not)
        if not os.path.exists(volume.source):
            raise UsageError(
                f"volume source {volume.source} does not exist on the host: create it, or fix "
                f"-v {volume.source}:{volume.destination}"
            )
    args.network = _network(args)
    ports = _ports(args)
    accel = accelerator(args.accel)
    kernel = assets.kernel(args.kernel)
    guest_image = assets.guest_image(args.kernel)
    find_qemu()

    sandbox_id = new_id()
    vm_memory, vcpus = vm_size(memory, cpus)
    state = SandboxState(
        id=sandbox_id,
        name=args.name or random_name(),
        image=args.image,
        command=list(args.command),
        created=time.time(),
        kernel=args.kernel,
        accel=accel.name,
        accel_reason=accel.reason,
        memory_mib=vm_memory,
        vcpus=vcpus,
        auto_remove=args.rm,
    )
    config = SandboxConfig(
        sandbox_id=sandbox_id,
        hostname=args.hostname or sandbox_id[:12],
        kernel=kernel,
        image=guest_image,
        memory_mib=vm_memory,
        vcpus=vcpus,
        accel=accel,
        run_dir=state.dir,
        debug=args.debug,
    )
    # A template is made on first use for the standard VM size; others use one that
    # `hako template create --memory/--cpus` made, or boot.
    config = templates.for_sandbox(
        config,
        args.template,
        warn=_warn,
        create_missing=memory is None and cpus is None,
        announce=_warn if sys.stderr.isatty() else None,
    )
    limits: dict[str, Any] = {"memory": memory, "cpus": cpus, "volumes": volumes}
    args.publish = ",".join(ports)
    pooled = args.network in ("bridge", "none")  # pools keep sandboxes of these (not a joined netns)
    if config.template is not None and args.template == "auto" and not args.no_pool and pooled:
        while (taken := pool.take(config.template.name, args.network)) is not None:
            args.startup = process_age()
            interrupt_on()  # SIGTERM and SIGHUP as Ctrl-C (see _run)
            try:
                notify = _claim(args, taken)
            except KeyboardInterrupt:  # claimed or not, it is ours: nobody else would stop it
                from hako.cli.manage import remove_sandbox

                ignore_interrupts()  # nor stop the clean-up
                remove_sandbox(taken, force=True)
                pool.refill_in_background(pool.Shape.of(taken))
                raise
            if notify is None:
                continue  # it died in the pool: the next one, or a sandbox of our own
            try:
                return _run(args, taken, taken.daemon_pid or 0, notify, claimed=True, **limits)
            finally:
                notify.close()
                pool.refill_in_background(pool.Shape.of(taken))
    reserve(state)
    pid, notify = fork_sandbox(state, config, network=args.network)
    args.startup = process_age()  # command start until the fork that starts QEMU
    try:
        return _run(args, state, pid, notify, **limits)
    finally:
        notify.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _network(args: argparse.Namespace) -> str:
    """The sandbox's network mode: as given, else the network namespace a bundle's config.json
    names (cheaply read here: QEMU starts in it, before the bundle is loaded), else bridge."""
    mode: str | None = args.network
    if mode is None:
        mode = "bridge"
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            spec = json.loads((Path(args.image) / "config.json").read_text())
            for namespace in spec["linux"]["namespaces"]:
                if namespace.get("type") == "network" and namespace.get("path"):
                    mode = f"ns:{namespace['path']}"
    if mode.startswith("ns:"):
        path = mode[3:]
        if not os.path.isabs(path) or not os.path.exists(path):
            raise UsageError(f"--network {mode}: {path} is not a network namespace (e.g. /run/netns/NAME)")
    elif mode not in NETWORK_MODES:
        raise UsageError(f"--network {mode}: use bridge, none or ns:PATH")
    return mode


def _ports(args: argparse.Namespace) -> list[str]:
    """The -p options, checked before a VM is started for them: well formed, ports free."""
    if not args.publish:
        return []
    from hako.network.host import PortMapping, check_free

    if args.network != "bridge":
        raise UsageError(f"-p needs the default network: --network {args.network} has none")
    mappings = [PortMapping.parse(text) for text in args.publish]
    for mapping in mappings:
        check_free(mapping)
    return [str(mapping) for mapping in mappings]


def _claim(args: argparse.Namespace, state: SandboxState) -> Notifications | None:
    """Claim a sandbox taken from the warm pool: it resumes, and takes the name and the host's
    clock. Its notifications come over a FIFO. None if it cannot be claimed (its daemon died
    meanwhile; a name in use is an error, as for any run)."""
    from hako.runtime.client import claim, connect

    name = args.name or random_name()
    fifo = state.dir / f".notify-{os.getpid()}"
    try:
        os.mkfifo(fifo, 0o600)
        notify = Notifications(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except OSError:
        return None  # its run dir is gone: so is it
    try:
        with creation_lock():
            check_name_free(name, state)
            client = connect(state)
            try:
                claim(client, name, auto_remove=args.rm, notify_path=fifo, hostname=args.hostname)
            finally:
                client.close()
    except UsageError:
        notify.close()
        raise
    except HakoError:
        notify.close()
        if not state.daemon_alive():
            remove_dead(state)
        return None
    finally:
        fifo.unlink(missing_ok=True)
    os.set_blocking(notify.fd, True)
    state.name, state.auto_remove = name, args.rm
    return notify


def _warn(message: str) -> None:
    print(f"hako: {message}", file=sys.stderr)


def _run(
    args: argparse.Namespace,
    state: SandboxState,
    daemon: int,
    notify: Notifications,
    *,
    claimed: bool = False,
    **limits: Any,
) -> int:
    created = False
    interrupt_on()  # SIGTERM and SIGHUP as Ctrl-C (this process only: its daemon is forked)
    try:
        if not claimed:
            notify.expect("launched")
        spec, image_name, disk = _spec(args, state.id, **limits)
        try:
            (state.dir / SPEC_FILE).write_text(json.dumps(spec, indent=1))
        except FileNotFoundError as exc:  # its daemon ended, and took its run dir along
            raise SandboxError("the sandbox ended before its container was created") from exc
        if not claimed:
            notify.expect("serving")
        from hako.runtime.client import connect

        agent = connect(state)
        try:
            metadata = {"hako-attach": "0" if args.detach else "1", "hako-image": image_name}
            if disk is not None:
                metadata["hako-disk"] = str(disk)
            if args.publish:
                metadata["hako-publish"] = args.publish
            agent.create_container(state.id, spec, stdin=args.interactive, metadata=metadata)
            created = True
            if args.detach:
                agent.start_container(state.id)
                print(state.id)
                return 0
            return _foreground(args, state, agent, notify)
        finally:
            agent.close()
    except HakoError as exc:
        if not created:
            final = _abort(state, daemon, notify)
            if final and final.get("error"):
                # The sandbox failed on its own (its VM died booting, say): its reason, not
                # ours for not reaching it (it may not have known yet that its VM was dead).
                raise HakoError(str(final["error"])) from exc
        else:
            _final(notify)  # the daemon records the failure and stops the VM once we hang up
        raise
    except KeyboardInterrupt:
        # Ctrl-C (or SIGTERM, SIGHUP) before the container ran (its VM still booting, say): it
        # never will, and nothing of it stays, as after a failure. Once it runs, the signal is
        # the container's (hako.cli.attach forwards it).
        if _never_started(state):
            ignore_interrupts()  # nor stop the clean-up
            _abort(state, daemon, notify)
        raise


def _never_started(state: SandboxState) -> bool:
    try:
        return SandboxState.load(state.dir).status in (Status.CREATING, Status.POOLED)
    except (OSError, ValueError, KeyError, TypeError):
        return True  # its record is gone (its daemon ended): nothing to wait for


def _spec(
    args: argparse.Namespace, sandbox_id: str, **limits: Any
) -> tuple[dict[str, Any], str, Path | None]:
    """The container's spec, what to call its image, and the image as a disk (a block rootfs)."""
    from hako.image.store import ImageStore
    from hako.oci.bundle import Bundle
    from hako.oci.spec import RunOptions, build_spec

    store = ImageStore()
    target = store.resolve(args.image)
    options = RunOptions(
        args=args.command,
        entrypoint=None if args.entrypoint is None else [args.entrypoint] if args.entrypoint else [],
        env=args.env,
        workdir=args.workdir,
        user=args.user,
        terminal=args.tty,
        hostname=args.hostname,
        read_only=args.read_only,
        pids_limit=args.pids_limit if args.pids_limit and args.pids_limit > 0 else None,  # -1: unlimited
        no_new_privileges=args.no_new_privileges,
        cap_add=args.cap_add,
        cap_drop=args.cap_drop,
        **limits,
    )
    if isinstance(target, Bundle):
        if args.rootfs == "block":
            raise UsageError(
                f"--rootfs block needs an image: {args.image} is a bundle directory; use --rootfs 9p"
            )
        spec = build_spec(sandbox_id, options, base=target.spec, rootfs=target.rootfs)
        return spec, str(target.path), None
    name = target.names[0] if target.names else target.short_id
    disk = store.disk(target) if args.rootfs != "9p" else None
    return build_spec(sandbox_id, options, image=target.config, rootfs=target.rootfs), name, disk


def _abort(state: SandboxState, daemon: int, notify: Notifications) -> dict[str, Any] | None:
    """Nothing was created: stop the daemon (and so its VM, which dies with it) and leave no
    trace. Returns the daemon's final state."""
    if state.shared_daemon:  # a pool's keeper: it serves others too, so it is asked, not signalled
        from hako.runtime.client import destroy

        try:
            destroy(state)
        except HakoError:
            kill_vm(state)  # (its daemon then finishes with it)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGTERM)
    final = _final(notify)
    shutil.rmtree(state.dir, ignore_errors=True)
    return final


def _foreground(args: argparse.Namespace, state: SandboxState, agent: Any, notify: Notifications) -> int:
    from hako.cli.attach import Attachment, raw_terminal
    from hako.runtime import timing

    attachment = Attachment(agent, state.id, "", stdin=args.interactive, terminal=args.tty)
    attachment.start_output()
    attachment.resize()
    with raw_terminal(args.tty and args.interactive), attachment.proxy_signals():
        agent.start_container(state.id)
        attachment.start_input()
        status: int = agent.wait_process(state.id)
        exit_seen = time.monotonic()
        attachment.finish_output()
    agent.close()
    final = _final(notify)
    if args.timing or args.timing_json:
        figures = dict(final.get("timing", {})) if final else {}
        figures["host_startup"] = args.startup
        figures["exit_seen"] = time.monotonic() - exit_seen
        figures["total"] = process_age()
        if args.timing_json:
            report = {"accel": state.accel, "kernel": state.kernel, "timing": figures}
            print(json.dumps(report), file=sys.stderr)
        else:
            print(timing.render(figures, state.accel, state.kernel), file=sys.stderr)
    if final and final.get("status") == "dead" and final.get("error"):
        print(f"hako: container {state.name}: {final['error']}", file=sys.stderr)
    return status


def _final(notify: Notifications) -> dict[str, Any] | None:
    """Wait for the daemon to finish (the VM is gone then) and return its final state."""
    while True:
        message = notify.next(timeout=120)
        if message is None:
            return None
        if "final" in message:
            final: dict[str, Any] = message["final"]
            return final
