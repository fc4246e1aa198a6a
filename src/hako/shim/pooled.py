"""A pod's VM taken from the warm pool (``hako pool fill --network none``).

A pooled sandbox's daemon holds a VM restored from the template, set up, warmed up (a
throw-away container ran in it) and paused (:mod:`hako.runtime.pool`). For a pod without a
network namespace of its own (``ctr run`` without CNI: the VM's network is an empty namespace,
as a pooled ``none`` sandbox's is), the shim's ``start`` takes one instead of forking a shim
that restores a VM: it hands the daemon the pod's socket, listening, and the daemon resumes
its VM and becomes the pod's shim (:func:`serve_adopted`). It is the same process, with the
same VM, in the same mount namespace, where QEMU's 9p export is and where the pod's rootfs
mounts go.

The hand-over is one exchange on the pooled daemon's ``adopt.sock``: a JSON line (:class:`Adoption`)
with the socket's descriptor attached (SCM_RIGHTS), answered by a JSON line. It is not the
daemon's ttRPC API because ``start`` runs for every pod, pooled or not, and a ttRPC client
would cost it protobuf's import (~40 ms here) before containerd hears from it.

A pod with a network namespace (CNI, Kubernetes) does not take one: its VM's NIC would have to
move into that namespace and the guest be given the pod's addresses, which the agent cannot
redo yet. Such a pod's shim restores its VM from the template, as before.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hako.errors import HakoError, SandboxError

if TYPE_CHECKING:
    from hako.runtime.sandbox import Sandbox
    from hako.runtime.state import SandboxState
    from hako.shim import config as shim_config
    from hako.shim.main import Shim

HANDOVER_TIMEOUT = 30.0
MAX_MESSAGE = 1 << 20


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


@dataclass(frozen=True)
class Adoption:
    """What a pooled daemon needs to become a pod's shim (with the pod's socket, listening)."""

    shim_args: list[str]  # the shim's command line (-namespace, -address, -id...)
    bundle: str  # the pod's first container's bundle directory
    ttrpc_address: str  # containerd's, for events ($TTRPC_ADDRESS)
    options: bytes  # containerd's runtime options, as `start` read them

    def encode(self) -> bytes:
        fields: dict[str, Any] = asdict(self)
        fields["options"] = base64.b64encode(self.options).decode()
        return json.dumps(fields).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Adoption:
        fields = json.loads(line)
        fields["options"] = base64.b64decode(fields["options"])
        return cls(**fields)


class Refused(SandboxError):
    """The pooled sandbox is not the VM this pod asks for (it stays in the pool)."""


def wanted(spec: dict[str, Any], cfg: shim_config.ShimConfig) -> bool:
    """Whether a pod whose first container's spec is ``spec`` takes its VM from the pool."""
    from hako.shim.config import network_namespace

    return cfg.pool and cfg.template == "auto" and not network_namespace(spec)


# -- the shim's start ---------------------------------------------------------------------------
def take(args: argparse.Namespace, shim: Shim, bundle: Path, options: bytes, listener: socket.socket) -> bool:
    """Have a pooled sandbox serve the pod on ``listener`` (the caller holds the pod's lock, and
    no shim serves it); False if none was taken: the pod should not take from the pool, or
    none of its members could be taken."""
    from hako.runtime import pool
    from hako.runtime.state import remove_dead
    from hako.shim import config as shim_config

    try:
        spec = json.loads((bundle / "config.json").read_text())
        cfg = shim_config.load(shim_config.config_path_of(options))
    except (OSError, ValueError, HakoError):
        return False  # the shim that starts its own VM reports what is wrong
    if not wanted(spec, cfg):
        return False
    shape = pool.Shape(cfg.kernel, cfg.memory_mib, cfg.vcpus, pool.SHIM_NETWORK)
    adoption = Adoption(args.argv, str(bundle), os.environ.get("TTRPC_ADDRESS", ""), options)
    while (taken := pool.take(None, pool.SHIM_NETWORK, shape)) is not None:
        try:
            qemu_pid = hand_over(taken, listener, adoption)
        except Refused:
            return False  # made for another configuration: so are its siblings, likely
        except (OSError, ValueError, HakoError):
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
        return True
    return False


def hand_over(state: SandboxState, listener: socket.socket, adoption: Adoption) -> int:
    """Give the pooled sandbox ``state`` the pod (and ``listener``); its QEMU's pid."""
    from hako.runtime.paths import ADOPT_SOCKET
    from hako.runtime.sockets import connect_unix

    with connect_unix(state.dir / ADOPT_SOCKET) as conn:
        conn.settimeout(HANDOVER_TIMEOUT)
        socket.send_fds(conn, [adoption.encode()], [listener.fileno()])
        answer = json.loads(_read_line(conn))
    if "error" in answer:
        error = Refused if answer.get("refused") else SandboxError
        raise error(f"pooled sandbox {state.short_id}: {answer['error']}")
    return int(answer["qemu_pid"])


def _read_line(conn: socket.socket, first: bytes = b"") -> bytes:
    data = first
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk or len(data) > MAX_MESSAGE:
            raise SandboxError("the pooled sandbox hung up")
        data += chunk
    return data


# -- the pooled daemon --------------------------------------------------------------------------
def receive(conn: socket.socket) -> tuple[Adoption, socket.socket]:
    """The adoption a shim's start sent on ``conn``, and the pod's listening socket."""
    conn.settimeout(HANDOVER_TIMEOUT)
    first, fds, _, _ = socket.recv_fds(conn, 65536, 1)
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise SandboxError("an adoption comes with the pod's socket")
    listener = socket.socket(fileno=fds[0])
    try:
        return Adoption.decode(_read_line(conn, first)), listener
    except BaseException:
        listener.close()
        raise


def answer(conn: socket.socket, **fields: object) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(fields).encode() + b"\n")


def template_of(adoption: Adoption) -> str | None:
    """The key of the template the pod's VM would be restored from (None: none yet)."""
    from hako.hypervisor import find_qemu
    from hako.runtime import templates
    from hako.shim import config as shim_config
    from hako.shim.early import sandbox_config

    cfg = shim_config.load(shim_config.config_path_of(adoption.options))
    config = sandbox_config("", Path("/nonexistent"), cfg, "")
    found = templates.lookup(config.vm_config(), find_qemu(), warn=lambda message: None)
    return found.key if found is not None else None


def serve_adopted(adoption: Adoption, listener: socket.socket, sandbox: Sandbox, vm_dir: Path) -> int:
    """Serve the pod as its shim, with ``sandbox`` (resumed) its VM; in the pooled sandbox's
    daemon, which ``start`` handed the pod. ``vm_dir`` (the sandbox's run dir) goes with the pod."""
    from hako.shim import config as shim_config
    from hako.shim.main import Shim, parse_args
    from hako.shim.serve import serve

    os.chdir("/")
    args = parse_args(adoption.shim_args)
    if adoption.ttrpc_address:
        os.environ["TTRPC_ADDRESS"] = adoption.ttrpc_address
    bundle = Path(adoption.bundle)
    shim = Shim.of(args, bundle)
    config_path = shim_config.config_path_of(adoption.options)
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
