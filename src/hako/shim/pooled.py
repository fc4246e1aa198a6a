"""A pod's VM taken from the warm pool (``hako pool fill --network none``).

A pooled sandbox's daemon holds a VM restored from the template, set up, warmed up (a
throw-away container ran in it) and paused (:mod:`hako.runtime.pool`). For a pod, the shim's
``start`` takes one instead of forking a shim that restores a VM: it hands the daemon the pod's
socket, listening, and the daemon resumes its VM and becomes the pod's shim
(:func:`serve_adopted`). It is the same process, with the same VM, in the same mount
namespace, where QEMU's 9p export is and where the pod's rootfs mounts go.

The hand-over is one exchange on the pooled daemon's ``adopt.sock``: a JSON line (:class:`Adoption`)
with the socket's descriptor attached (SCM_RIGHTS), answered by a JSON line. It is not the
daemon's ttRPC API because ``start`` runs for every pod, pooled or not, and a ttRPC client
would cost it protobuf's import (~40 ms here) before containerd hears from it.

The pooled VM's network is a namespace of its own holding only its tap. A pod with a network
namespace (CNI, Kubernetes) has the tap moved into it and wired to the pod's veth, as a
restored VM's would be (:meth:`hako.network.sandbox.SandboxNetwork.move_into`), and the guest
is given the pod's addresses and routes, and its hostname (``UpdateSandbox``), before the
first container is created.

The daemon's mount namespace is a copy of the host's made at the fill. The pod's volumes (a
Kubernetes pod's secrets and /dev/shm, mounted since) are looked up in the host's namespace as
it is when each container is created (:func:`hako.runtime.mounts.bind` ``from_host``), and the
pool's refill is started there, not in the pod's shim's namespace.
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
    netns_path: str  # the pod's network namespace, which the VM's tap moved into ("" for none)
    settings: shim_config.ShimConfig  # the shim's config file as read for this VM
    sandbox: Sandbox
    notes: list[str]

    def fits(self, config_path: str | None, hostname: str, netns_path: str) -> bool:
        """The first container asks for this VM: the same config and network namespace (it is
        given the hostname asked for: :meth:`Sandbox.take_identity`)."""
        return (config_path, netns_path) == (self.config_path, self.netns_path)

    def discard(self) -> None:
        self.sandbox.stop()


@dataclass(frozen=True)
class Adoption:
    """What a pooled daemon needs to become a pod's shim (with the pod's socket, listening)."""

    shim_args: list[str]  # the shim's command line (-namespace, -address, -id...)
    bundle: str  # the pod's first container's bundle directory
    ttrpc_address: str  # containerd's, for events ($TTRPC_ADDRESS)
    options: bytes  # containerd's runtime options, as `start` read them
    netns_path: str = ""  # the pod's network namespace (its descriptor comes with the socket)

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


def wanted(cfg: shim_config.ShimConfig) -> bool:
    """Whether a pod whose shim's config is ``cfg`` takes its VM from the pool."""
    return cfg.pool and cfg.template == "auto"


# -- the shim's start ---------------------------------------------------------------------------
def take(args: argparse.Namespace, shim: Shim, bundle: Path, options: bytes, listener: socket.socket) -> bool:
    """Have a pooled sandbox serve the pod on ``listener`` (the caller holds the pod's lock, and
    no shim serves it); False if none was taken: the pod should not take from the pool, or
    none of its members could be taken."""
    from hako.shim import config as shim_config

    try:
        spec = json.loads((bundle / "config.json").read_text())
        cfg = shim_config.load(shim_config.config_path_of(options))
    except (OSError, ValueError, HakoError):
        return False  # the shim that starts its own VM reports what is wrong
    if not wanted(cfg):
        return False
    netns_path = shim_config.network_namespace(spec)
    adoption = Adoption(args.argv, str(bundle), os.environ.get("TTRPC_ADDRESS", ""), options, netns_path)
    # Opened here, where its path is mounted: a pooled daemon's mount namespace is a copy made
    # when the pool was filled, which may not have it.
    try:
        netns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC) if netns_path else None
    except OSError:
        return False  # the shim that starts its own VM reports it
    try:
        taken = _hand_over_to_one(cfg, listener, adoption, netns_fd)
    finally:
        if netns_fd is not None:
            os.close(netns_fd)
    if taken is None:
        return False
    state, qemu_pid = taken
    shim.record(
        shim_pid=state.daemon_pid,
        qemu_pid=qemu_pid,
        qemu_name=f"hako-{state.short_id}",
        vm_dir=str(state.dir),
        group=shim.group,
        namespace=args.namespace,
    )
    return True


def _hand_over_to_one(
    cfg: shim_config.ShimConfig, listener: socket.socket, adoption: Adoption, netns_fd: int | None
) -> tuple[SandboxState, int] | None:
    """The pooled sandbox of the pod's shape that took the pod, and its QEMU's pid."""
    from hako.runtime import pool
    from hako.runtime.state import remove_dead

    shape = pool.Shape(cfg.kernel, cfg.memory_mib, cfg.vcpus, pool.SHIM_NETWORK)
    while (state := pool.take(None, pool.SHIM_NETWORK, shape)) is not None:
        try:
            return state, hand_over(state, listener, adoption, netns_fd)
        except Refused:
            return None  # made for another configuration: so are its siblings, likely
        except (OSError, ValueError, HakoError):
            if not state.daemon_alive():
                remove_dead(state)
            # it died in the pool: the next one, or a VM of the pod's own
    return None


def hand_over(
    state: SandboxState, listener: socket.socket, adoption: Adoption, netns_fd: int | None = None
) -> int:
    """Give the pooled sandbox ``state`` the pod: ``listener``, and the pod's network namespace
    ``netns_fd`` if it has one; its QEMU's pid."""
    from hako.runtime.paths import ADOPT_SOCKET
    from hako.runtime.sockets import connect_unix

    fds = [listener.fileno()] + ([netns_fd] if netns_fd is not None else [])
    with connect_unix(state.dir / ADOPT_SOCKET) as conn:
        conn.settimeout(HANDOVER_TIMEOUT)
        socket.send_fds(conn, [adoption.encode()], fds)
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
def receive(conn: socket.socket) -> tuple[Adoption, socket.socket, int | None]:
    """The adoption a shim's start sent on ``conn``, the pod's listening socket, and the
    descriptor of the pod's network namespace (None if it has none)."""
    conn.settimeout(HANDOVER_TIMEOUT)
    first, fds, _, _ = socket.recv_fds(conn, 65536, 2)
    try:
        adoption = Adoption.decode(_read_line(conn, first))
        if len(fds) != 1 + bool(adoption.netns_path):
            raise SandboxError("an adoption comes with the pod's socket, and its network namespace if any")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return adoption, socket.socket(fileno=fds[0]), fds[1] if len(fds) > 1 else None


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


def serve_adopted(
    adoption: Adoption, listener: socket.socket, netns_fd: int | None, sandbox: Sandbox, vm_dir: Path
) -> int:
    """Serve the pod as its shim, with ``sandbox`` (resumed) its VM, moved into the pod's network
    namespace ``netns_fd`` if it has one; in the pooled sandbox's daemon, which ``start``
    handed the pod. ``vm_dir`` (the sandbox's run dir) goes with the pod."""
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
    notes = [
        f"the pod's VM: taken from the warm pool (sandbox {sandbox.config.sandbox_id[:12]}, "
        f"QEMU pid {sandbox.vm.pid}, resumed in {took * 1000:.0f} ms)"
    ]
    netns_path = adoption.netns_path
    if netns_fd is not None:
        try:
            assert sandbox.network is not None  # pooled sandboxes have a network of mode none
            sandbox.network.move_into(netns_fd)  # wired while containerd sends Create
        except HakoError as exc:
            os.close(netns_fd)
            notes.append(f"cannot move the pooled VM into the pod's network namespace: {exc}")
            netns_path = "(unmoved)"  # fits no Create: the pod gets a VM of its own
    pooled = PooledVM(config_path, netns_path, shim_config.load(config_path), sandbox, notes)
    try:
        serve(args, shim, bundle, listener, pooled)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(vm_dir)
    return 0
