"""The warm pool: sandboxes restored from a template, set up, and paused, for `hako run` (and
the containerd shim: :mod:`hako.shim.pooled`) to take.

A pooled sandbox is an ordinary sandbox (a daemon, its run dir, its state) whose daemon was
told to wait: once its VM is restored, the agent has set the sandbox up (its network,
hostname and entropy given) and a throw-away container has run in it (the warm-up: see
:meth:`hako.runtime.sandbox.Sandbox.warm_up`), the VM is paused and the state says
``pooled``. Taking one is renaming its ``pooled`` mark (atomic: one taker wins), then the
daemon's ``Claim``: the VM resumes, takes the host's clock and fresh entropy, and the
sandbox becomes the new container. A paused VM uses no CPU; its memory is what a clone's is.

How many to keep, per :class:`Shape` (kernel, VM size and network), is ``<run root>/pool.json``
(``hako pool fill N [--memory/--cpus/--network]`` sets it); ``hako run`` starts a refill of
the shape it took in the background, and so does a pod that took one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from hako.runtime import paths
from hako.runtime.state import SandboxState, Status, all_states

SHIM_NETWORK = "none"  # what a containerd pod without a network namespace takes (hako.shim.pooled)
POOLED_MARK = "pooled"  # in the run dir while the sandbox waits in the pool
CLAIMED_MARK = "claimed"


@dataclass(frozen=True)
class Shape:
    """What a pool keeps: VMs of one kernel and one size, hence restored from one template, on
    one network mode. (`hako run --memory/--cpus` gives a VM of another size: it takes from that
    size's pool. `hako run --network none`, and the containerd shim for a pod without a network
    namespace of its own, take from a pool of ``none``.)"""

    kernel: str
    memory_mib: int
    vcpus: int
    network: str = "bridge"

    @property
    def key(self) -> str:
        key = f"{self.kernel}/{self.memory_mib}M/{self.vcpus}"
        return key if self.network == "bridge" else f"{key}/{self.network}"

    @classmethod
    def parse(cls, key: str) -> Shape:
        """The shape a :attr:`key` names; ValueError if it names none."""
        kernel, memory, vcpus, *network = key.split("/")
        if not kernel or not memory.endswith("M") or network not in ([], ["none"]):
            raise ValueError(f"not a pool shape: {key!r}")
        return cls(kernel, int(memory[:-1]), int(vcpus), *network)

    @classmethod
    def of(cls, state: SandboxState) -> Shape:
        return cls(state.kernel, state.memory_mib, state.vcpus, state.network or "bridge")


def _sizes() -> dict[str, int]:
    try:
        sizes = json.loads(paths.pool_file().read_text())
    except (OSError, ValueError):
        return {}
    return sizes if isinstance(sizes, dict) else {}


def wanted(shape: Shape) -> int:
    """How many pooled sandboxes to keep of ``shape`` (0: no pool)."""
    size = _sizes().get(shape.key, 0)
    return size if isinstance(size, int) and size > 0 else 0


def shapes() -> list[Shape]:
    """Every shape a pool is wanted of."""
    found = []
    for key, size in _sizes().items():
        if isinstance(size, int) and size > 0:
            with contextlib.suppress(ValueError):
                found.append(Shape.parse(key))
    return found


def set_wanted(shape: Shape, size: int) -> None:
    """Keep ``size`` of ``shape`` (not under the fill lock: a drain must not wait for a fill
    to finish to say that no more are wanted; the fill reads it before each one it makes)."""
    sizes = _sizes()
    sizes[shape.key] = size
    file = paths.pool_file()
    file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = file.with_name(f".{file.name}.{os.getpid()}")
    tmp.write_text(json.dumps(sizes))
    os.replace(tmp, file)


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """One filler (or drainer) at a time."""
    root = paths.run_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(root / "pool.lock", "w") as lock:
        # A POSIX record lock, not flock: the sandbox daemons a fill forks must not inherit it.
        fcntl.lockf(lock, fcntl.LOCK_EX)
        yield


def members(template: str | None = None, network: str | None = None) -> list[SandboxState]:
    """Pooled sandboxes that can still be taken (of ``template`` and ``network``, if given):
    alive, unclaimed, and of a template that still exists (one of changed inputs is gone: see
    :func:`stale`)."""
    return [
        state
        for state in all_states()
        if state.status == Status.POOLED
        and state.daemon_alive()
        and (template is None or state.template == template)
        and (network is None or Shape.of(state).network == network)
        and (state.dir / POOLED_MARK).exists()
        and _template_exists(state)
    ]


def stale() -> list[SandboxState]:
    """Pooled sandboxes nobody will take: their daemon died, or their template was removed
    (its kernel, guest image or QEMU changed)."""
    return [
        state
        for state in all_states()
        if state.status == Status.POOLED and (not state.daemon_alive() or not _template_exists(state))
    ]


def _template_exists(state: SandboxState) -> bool:
    from hako.runtime.templates import templates_dir

    return state.template is not None and (templates_dir() / state.template).is_dir()


def filled() -> bool:
    """Whether a pool was ever filled here (else there is no member to look for)."""
    return paths.pool_file().exists()


def take(template: str | None, network: str = "bridge", shape: Shape | None = None) -> SandboxState | None:
    """A pooled sandbox of ``template`` (and ``shape``, if given) on a ``network`` of that mode,
    now the caller's (None if the pool has none)."""
    if not filled():
        return None  # no pool was ever filled here: not worth reading every sandbox's state
    for state in members(template, network):
        if shape is not None and Shape.of(state) != shape:
            continue
        try:
            os.rename(state.dir / POOLED_MARK, state.dir / CLAIMED_MARK)
        except FileNotFoundError:
            continue  # another taker was faster
        return state
    return None


def refill_in_background(shape: Shape) -> None:
    """Start ``hako pool fill`` for ``shape``, detached, if a pool of it is wanted and is short."""
    if wanted(shape) <= len([s for s in members() if Shape.of(s) == shape]):
        return
    from hako.runtime import mounts

    with open(os.devnull, "r+b") as devnull:
        # Started in the host's mount namespace, not in this daemon's (a pod's shim refills):
        # the new members' namespaces are copies of the host's, the namespace their pods' mounts
        # are looked up in.
        mounts.in_host_namespace(
            lambda: subprocess.Popen(
                [sys.executable, "-m", "hako.cli.main", "pool", "fill", "--refill", "--shape", shape.key],
                stdin=devnull,
                stdout=devnull,
                stderr=devnull,
                start_new_session=True,
                close_fds=True,
            )
        )
