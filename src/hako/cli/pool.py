"""``hako pool fill|ls|drain``: the warm pool of restored, paused sandboxes that `hako run`
and the containerd shim take.

``fill N`` keeps N of a kernel, VM size and network (made now; `hako run` and the shim refill
in the background after taking one), ``ls`` lists them, ``drain`` stops them all and keeps none.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hako import assets
from hako.cli.common import accelerator, print_table, require_root
from hako.cli.options import parse_cpus, parse_memory
from hako.cli.run import vm_size
from hako.errors import HakoError, TemplateError, UsageError
from hako.hypervisor import Accelerator, find_qemu
from hako.runtime import paths, pool, templates
from hako.runtime.config import SandboxConfig
from hako.runtime.state import SandboxState, Status, age, all_states, new_id, remove_dead, reserve

if TYPE_CHECKING:
    from hako.runtime.launch import Notifications


def add_parsers(commands: Any) -> None:
    p = commands.add_parser("pool", help="the warm pool of restored, paused VMs hako run and the shim take")
    sub = p.add_subparsers(dest="action", required=True)
    f = sub.add_parser("fill", help="keep N pooled sandboxes (made now)")
    f.add_argument("size", type=int, nargs="?", help="how many to keep (default: as set before, else 1)")
    f.add_argument("--kernel", choices=("trimmed", "debian"), default="trimmed", help="guest kernel")
    f.add_argument(
        "--memory", metavar="SIZE", help="for `hako run --memory SIZE` (a VM of that size, its own pool)"
    )
    f.add_argument("--cpus", metavar="N", help="for `hako run --cpus N` (likewise)")
    f.add_argument(
        "--network",
        choices=("bridge", "none"),
        default="bridge",
        help="bridge: for `hako run`; none: for `hako run --network none` and containerd pods",
    )
    f.add_argument("--refill", action="store_true", help=argparse.SUPPRESS)  # hako run's top-up
    f.add_argument("--shape", help=argparse.SUPPRESS)  # ... of the pool it took from
    f.set_defaults(func=fill)
    ls = sub.add_parser("ls", help="list pooled sandboxes")
    ls.set_defaults(func=list_pool)
    d = sub.add_parser("drain", help="stop every pooled sandbox and keep none")
    d.set_defaults(func=drain)


def fill(args: argparse.Namespace) -> int:
    require_root("pool fill")
    if args.size is not None and args.size < 0:
        raise UsageError(f"hako pool fill {args.size}: give a size of 0 or more")
    shape = _shape(args)
    if args.size is not None:
        pool.set_wanted(shape, args.size)
    elif pool.wanted(shape) == 0 and not args.refill:  # a top-up never revives a drained pool
        pool.set_wanted(shape, 1)
    from hako.cli.manage import remove_sandbox
    from hako.runtime.launch import preload_daemon

    with pool.locked():
        for state in pool.stale():
            remove_sandbox(state, force=True)
        if _short(shape) == 0:  # (drained meanwhile: wanted is 0)
            return 0
        if shape.network == pool.SHIM_NETWORK:
            # A pod's sandbox: a daemon each, which becomes the pod's shim (hako.shim.pooled).
            # They share what is imported before the first fork (which makes the template).
            preload_daemon(shim=True)
            while _short(shape) > 0:
                print(_add_one(shape).short_id)
        else:
            _fill_kept(shape)
    return 0


def _short(shape: pool.Shape) -> int:
    """How many sandboxes of ``shape`` the pool lacks."""
    have = [s for s in pool.members() if pool.Shape.of(s) == shape]
    return max(0, pool.wanted(shape) - len(have))


def _shape(args: argparse.Namespace) -> pool.Shape:
    if args.shape:
        try:
            return pool.Shape.parse(args.shape)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    memory = parse_memory(args.memory) if args.memory else None
    cpus = parse_cpus(args.cpus) if args.cpus else None
    return pool.Shape(args.kernel, *vm_size(memory, cpus), args.network)


def _fill_kept(shape: pool.Shape) -> None:
    """Add what the pool lacks, all served by the pool's keeper (:mod:`hako.runtime.keeper`):
    the one running, else a new one."""
    from hako.runtime.keeper import fill_by_keeper, fork_keeper
    from hako.runtime.launch import preload_daemon

    messages = fill_by_keeper(shape.key)
    if messages is not None:
        try:
            if _report(messages):
                return
        finally:
            messages.close()
        # It was closing (its last sandbox had just finished): a keeper of our own, then.

    def next_sandbox() -> tuple[SandboxState, SandboxConfig] | None:  # (run by the keeper)
        return _new_sandbox(shape) if _short(shape) > 0 else None

    preload_daemon()  # (the keeper runs on it: imported once, before the fork)
    _template(shape)  # made now if missing, by this process
    pid, messages = fork_keeper(next_sandbox, shape.key, shape.network)
    try:
        if not _report(messages):
            raise HakoError("the pool's keeper went away")
    finally:  # (an interrupted fill: the keeper adds no more once it cannot tell us)
        messages.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _report(messages: Notifications) -> bool:
    """Print the keeper's new members until it is done (True); False if it said nothing at all
    (it went away); HakoError if adding one failed."""
    said = False
    while True:
        message = messages.next()
        if message is None:
            if said:
                raise HakoError("the pool's keeper went away")
            return False
        said = True
        if "pooled" in message:
            print(str(message["pooled"])[:12])
        elif "error" in message:
            error = HakoError(str(message["error"]))
            error.exit_code = int(message.get("exit_code", 125))
            raise error
        elif "done" in message:
            return True


def _template(shape: pool.Shape) -> None:
    sandbox_id = new_id()
    config = _config(shape, sandbox_id, paths.sandbox_dir(sandbox_id), accelerator("auto"))
    if templates.for_sandbox(config, "auto", warn=_warn).template is None:
        raise TemplateError("the pool holds VMs restored from a template, and there is none")


def _config(shape: pool.Shape, sandbox_id: str, run_dir: Path, accel: Accelerator) -> SandboxConfig:
    return SandboxConfig(
        sandbox_id=sandbox_id,
        hostname=sandbox_id[:12],
        kernel=assets.kernel(shape.kernel),
        image=assets.guest_image(shape.kernel),
        memory_mib=shape.memory_mib,
        vcpus=shape.vcpus,
        accel=accel,
        run_dir=run_dir,
    )


def _new_sandbox(shape: pool.Shape) -> tuple[SandboxState, SandboxConfig]:
    """A sandbox of ``shape`` to pool: its state reserved, its configuration restoring it from
    the shape's template."""
    accel = accelerator("auto")
    sandbox_id = new_id()
    state = SandboxState(
        id=sandbox_id,
        name=f"pool-{sandbox_id[:12]}",
        image="",
        command=[],
        created=time.time(),
        kernel=shape.kernel,
        accel=accel.name,
        accel_reason=accel.reason,
        memory_mib=shape.memory_mib,
        vcpus=shape.vcpus,
    )
    find_qemu()
    config = templates.for_sandbox(_config(shape, sandbox_id, state.dir, accel), "auto", warn=_warn)
    if config.template is None:
        raise TemplateError("the pool holds VMs restored from a template, and there is none")
    state.template = config.template.name
    reserve(state)
    return state, config


def _add_one(shape: pool.Shape) -> SandboxState:
    """One sandbox of ``shape`` in the pool, with a daemon of its own."""
    from hako.runtime.launch import fork_sandbox, wait_pooled

    state, config = _new_sandbox(shape)
    pid, notify = fork_sandbox(state, config, pooled=True, network=shape.network)
    try:
        reason = wait_pooled(notify)
        if reason is not None:
            raise HakoError(f"a pooled sandbox failed to start: {reason}")
        return state
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(OSError, ValueError):
            remove_dead(SandboxState.load(state.dir))
        raise
    finally:
        notify.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def list_pool(args: argparse.Namespace) -> int:
    rows = []
    ready = pool.members()
    for state in all_states():
        if state.status != Status.POOLED:
            continue
        status = "ready" if state in ready else str(state.effective_status())
        created = age(time.time() - state.created)
        memory = f"{state.memory_mib} MiB"
        network = state.network or "bridge"
        template = state.template or "-"
        rows.append((state.short_id, state.kernel, memory, state.vcpus, network, template, status, created))
    print_table(("SANDBOX", "KERNEL", "MEMORY", "VCPUS", "NETWORK", "TEMPLATE", "STATUS", "CREATED"), rows)
    return 0


def drain(args: argparse.Namespace) -> int:
    require_root("pool drain")
    from hako.cli.manage import remove_sandbox

    for shape in pool.shapes():
        pool.set_wanted(shape, 0)
    with pool.locked():  # a fill in progress finishes first, and then sees it is not wanted
        for state in all_states():
            if state.status == Status.POOLED:
                remove_sandbox(state, force=True)
                print(state.short_id)
    return 0


def _warn(message: str) -> None:
    print(f"hako: {message}", file=sys.stderr)
