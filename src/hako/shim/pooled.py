"""A pod's VM taken from the warm pool (``hako pool fill --network none``).

A pooled sandbox's daemon holds a VM restored from the template, set up, warmed up (a
throw-away container ran in it) and paused (:mod:`hako.runtime.pool`). For a pod without a
network namespace of its own (``ctr run`` without CNI: the VM's network is an empty namespace,
as a pooled ``none`` sandbox's is), the shim's ``start`` takes one instead of forking a shim
that restores a VM: the daemon resumes its VM, listens on the pod's socket and becomes the
pod's shim (:func:`serve_adopted`). It is the same process, with the same VM, in the same mount
namespace, where QEMU's 9p export is and where the pod's rootfs mounts go; nothing is handed
between processes.

A pod with a network namespace (CNI, Kubernetes) does not take one: its VM's NIC would have to
move into that namespace and the guest be given the pod's addresses, which the agent cannot
redo yet. Such a pod's shim restores its VM from the template, as before.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hako.errors import HakoError

if TYPE_CHECKING:
    from hako.runtime.sandbox import Sandbox
    from hako.shim import config as shim_config
    from hako.shim.main import Shim
    from hako_api import daemon_pb2

NETWORK = "none"  # the pool's network a pod without a namespace of its own takes from


@dataclass
class PooledVM:
    """The pod's VM, taken from the pool as the shim started: resumed, ready for containers."""

    config_path: str | None
    settings: shim_config.ShimConfig  # the shim's config file as read for this VM
    sandbox: Sandbox
    notes: list[str]

    def fits(self, config_path: str | None, hostname: str, netns_path: str) -> bool:
        """The first container asks for this VM: the same config, no network namespace. (Its
        hostname is the pooled sandbox's; a container that names one has it in its own UTS
        namespace.)"""
        return config_path == self.config_path and not netns_path

    def discard(self) -> None:
        self.sandbox.stop()


def wanted(spec: dict[str, object], cfg: shim_config.ShimConfig) -> bool:
    """Whether a pod whose first container's spec is ``spec`` takes its VM from the pool."""
    from hako.shim.early import network_namespace

    return cfg.pool and cfg.template == "auto" and not network_namespace(spec)


def take(args: argparse.Namespace, shim: Shim, bundle: Path, options: bytes) -> bool:
    """Have a pooled sandbox become the pod's shim (the caller holds the pod's lock, and no shim
    serves it); False if none was taken: there is no pool, the pod should not take from it, or
    none of its members could be."""
    from hako.runtime import pool
    from hako.runtime.client import adopt, connect
    from hako.runtime.state import remove_dead
    from hako.shim import config as shim_config

    try:
        spec = json.loads((bundle / "config.json").read_text())
        cfg = shim_config.load(shim_config.config_path_of(options))
        template = _template(shim, cfg) if wanted(spec, cfg) else None
    except (OSError, ValueError, HakoError):
        return False  # the shim that boots its own VM reports what is wrong
    if template is None:
        return False
    ttrpc_address = os.environ.get("TTRPC_ADDRESS", "")
    while (taken := pool.take(template, NETWORK)) is not None:
        try:
            client = connect(taken)
            try:
                _, qemu_pid = adopt(client, args.argv, bundle, ttrpc_address, shim.socket, options)
            finally:
                client.close()
        except HakoError:
            if not taken.daemon_alive():
                remove_dead(taken)
            continue  # it died in the pool: the next one, or a VM of the pod's own
        shim.record(
            shim_pid=taken.daemon_pid,
            qemu_pid=qemu_pid,
            qemu_name=f"hako-{taken.short_id}",
            vm_dir=str(taken.dir),
            group=shim.group,
            namespace=args.namespace,
        )
        pool.refill_in_background(pool.Shape.of(taken))
        return True
    return False


def _template(shim: Shim, cfg: shim_config.ShimConfig) -> str | None:
    """The template the pod's VM would be restored from (None if there is none yet: then there
    are no pooled VMs of it either)."""
    from hako.hypervisor import find_qemu
    from hako.runtime import templates
    from hako.shim.early import sandbox_config

    config = sandbox_config(shim.pod_id, shim.dir, cfg, "")
    found = templates.lookup(config.vm_config(), find_qemu(), warn=lambda message: None)
    return found.key if found is not None else None


def serve_adopted(
    request: daemon_pb2.AdoptRequest, listener: socket.socket, sandbox: Sandbox, vm_dir: Path
) -> int:
    """Serve the pod as its shim, with ``sandbox`` (resumed) its VM; in the pooled sandbox's
    daemon, which ``start`` had adopt it. ``vm_dir`` (the sandbox's run dir) goes with the pod."""
    from hako.shim import config as shim_config
    from hako.shim.main import Shim, parse_args
    from hako.shim.serve import serve

    os.chdir("/")
    args = parse_args(list(request.shim_args))
    if request.ttrpc_address:
        os.environ["TTRPC_ADDRESS"] = request.ttrpc_address
    bundle = Path(request.bundle)
    shim = Shim.of(args, bundle)
    config_path = shim_config.config_path_of(request.options)
    took = sandbox.timing.get("pool_take", 0.0)
    note = (
        f"the pod's VM: taken from the warm pool (sandbox {sandbox.config.sandbox_id[:12]}, "
        f"QEMU pid {sandbox.vm.pid}, resumed in {took * 1000:.0f} ms)"
    )
    pooled = PooledVM(config_path, shim_config.load(config_path), sandbox, [note])
    try:
        serve(args, shim, bundle, listener, pooled)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(vm_dir)
    return 0
