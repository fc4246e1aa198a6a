"""A private containerd for tests and benchmarks, driven with ctr, and a check that nothing is left.

:class:`Containerd` runs ``containerd`` from Debian with its own config, root, state, gRPC and
ttRPC sockets, all in one temp dir, so it never meets the system's containerd
(/run/containerd/containerd.sock, /var/lib/containerd). It finds shims on a PATH that starts with
the repo's ``.venv/bin`` (where ``containerd-shim-hako-v2`` is installed), and it is stopped by
its PID. Its environment sets ``HAKO_RUN`` inside the temp dir, which the shims it starts inherit.

:class:`Ctr` runs ``ctr --address <sock> -n <namespace> ...``. :meth:`Containerd.sweep` finds
what a test left behind (tasks, containers, active snapshots, processes started for it: shims,
QEMU, runc containers; mounts, sockets, state), removes it and returns what it found, so that a
fixture can fail the test that left it. :meth:`Containerd.close` does the same for the whole
daemon, stops it and removes the temp dir.

Two things are not configurable in containerd 1.6 and land outside the temp dir: the shim
library puts shim sockets in /run/containerd/s (named by a hash of our address, namespace and
ID, so they never collide), and runc and the CRI plugin create cgroups named after the
namespace. Both are checked and removed like the rest. ``ctr`` is always given ``--fifo-dir``
and, for runc, ``--runc-root`` inside the temp dir, so /run/containerd/{fifo,runc} are not used.

Plain classes and functions, so that ``bench/ctr.py`` uses them too; the pytest fixtures in
``conftest.py`` are thin wrappers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from hako.image.busybox import build_busybox_image
from hako.image.pause import build_pause_image

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"

NAMESPACE = "hako-test"  # where the ctr tests and the benchmark run
CRI_NAMESPACE = "k8s.io"  # the CRI plugin's, fixed
BUSYBOX = "hako.local/busybox:latest"
PAUSE = "hako.local/pause:latest"

SHIM_SOCKETS = Path("/run/containerd/s")  # containerd 1.6's shim library: not configurable
CONTAINERD_RUN = Path("/run/containerd")
HAKO_RUN_DEFAULT = Path("/run/hako")
CGROUP_ROOT = Path("/sys/fs/cgroup")

# Debian's containernetworking-plugins: where present, pods may have networks of their own
CNI_PLUGINS = Path("/usr/lib/cni")
CNI_BRIDGE = "hakotest0"
CNI_SUBNET = "10.212.0.0/24"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Runtime:
    """A containerd runtime as ctr names it (``type``) and as CRI names it (``name``, the handler)."""

    name: str
    type: str
    shim: str
    vm: bool

    def __str__(self) -> str:
        return self.name


RUNC = Runtime("runc", "io.containerd.runc.v2", "containerd-shim-runc-v2", vm=False)
HAKO = Runtime("hako", "io.containerd.hako.v2", "containerd-shim-hako-v2", vm=True)
RUNTIMES = (RUNC, HAKO)


class HarnessError(Exception):
    """containerd could not be set up or stopped as the harness needs."""


# -- paths and config ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Everything of one private containerd, under ``base``."""

    base: Path

    @property
    def config(self) -> Path:
        return self.base / "config.toml"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def address(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def ttrpc_address(self) -> Path:
        return self.base / "containerd.sock.ttrpc"

    @property
    def log(self) -> Path:
        return self.base / "containerd.log"

    @property
    def runc_root(self) -> Path:
        return self.base / "runc"

    @property
    def fifo_dir(self) -> Path:
        return self.base / "fifo"

    @property
    def cni_bin(self) -> Path:
        return self.base / "cni" / "bin"

    @property
    def cni_conf(self) -> Path:
        return self.base / "cni" / "conf"

    @property
    def hako_run(self) -> Path:
        return self.base / "hako-run"

    @property
    def images(self) -> Path:
        return self.base / "images"

    @property
    def pod_logs(self) -> Path:
        return self.base / "pod-logs"


# Plugins this harness does not use. "opt" would create /opt/containerd; the others are
# snapshotters that do not work here, and the restart monitor. (The v1 runtime is not used
# either, but containerd 1.6's tasks service will not load without it.)
DISABLED_PLUGINS = (
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.restart",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.native",
    "io.containerd.snapshotter.v1.zfs",
)


def _toml(value: str | bool | Sequence[str]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, for the paths and names used here
    return "[" + ", ".join(json.dumps(item) for item in value) + "]"


def cni_available() -> bool:
    return all((CNI_PLUGINS / plugin).is_file() for plugin in ("bridge", "host-local", "loopback"))


def cni_conflist(paths: Paths) -> dict[str, Any]:
    """A bridge network of the tests' own, addresses kept under ``paths``."""
    ipam = {
        "type": "host-local",
        "ranges": [[{"subnet": CNI_SUBNET}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": str(paths.base / "cni" / "ipam"),
    }
    bridge = {"type": "bridge", "bridge": CNI_BRIDGE, "isGateway": True, "ipMasq": False, "ipam": ipam}
    return {"cniVersion": "1.0.0", "name": "hako-test", "plugins": [bridge]}


def render_config(paths: Paths, *, hako_config: Path | None = None, debug: bool = True) -> str:
    """containerd's config.toml (version 2) for a private daemon under ``paths.base``.

    CRI: the sandbox image is the local pause image, runtime handlers ``runc`` and ``hako``.
    CNI: the conf dir is one of our own (the host's /etc/cni/net.d is never read). Where Debian's
    CNI plugins are installed (:func:`cni_available`) it holds a bridge network of our own
    (:func:`cni_conflist`) and pods may have network namespaces of their own; otherwise it is
    empty, which leaves the CRI plugin's network "not ready": RunPodSandbox still works for a pod
    on the host's network (NamespaceOption network=NODE), which skips CNI. Network namespaces
    are mounted under our state dir, not /run/netns.
    """
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    runtimes = f"{cri}.containerd.runtimes"
    lines = [
        "version = 2",
        f"root = {_toml(str(paths.root))}",
        f"state = {_toml(str(paths.state))}",
        f"disabled_plugins = {_toml(DISABLED_PLUGINS)}",
        f"required_plugins = {_toml(['io.containerd.grpc.v1.cri'])}",
        "",
        "[grpc]",
        f"  address = {_toml(str(paths.address))}",
        "",
        "[ttrpc]",
        f"  address = {_toml(str(paths.ttrpc_address))}",
        "",
        "[debug]",
        f"  level = {_toml('debug' if debug else 'info')}",
        "",
        f"[{cri}]",
        f"  sandbox_image = {_toml(PAUSE)}",
        f"  restrict_oom_score_adj = {_toml(True)}",
        f"  netns_mounts_under_state_dir = {_toml(True)}",
        f"  disable_apparmor = {_toml(True)}",
        f"  stream_server_address = {_toml('127.0.0.1')}",
        f"  stream_server_port = {_toml('0')}",
        "",
        f"[{cri}.cni]",
        f"  bin_dir = {_toml(str(CNI_PLUGINS if cni_available() else paths.cni_bin))}",
        f"  conf_dir = {_toml(str(paths.cni_conf))}",
        "",
        f"[{cri}.containerd]",
        f"  snapshotter = {_toml('overlayfs')}",
        f"  default_runtime_name = {_toml('runc')}",
        "",
        f"[{runtimes}.runc]",
        f"  runtime_type = {_toml(RUNC.type)}",
        f"[{runtimes}.runc.options]",
        f"  Root = {_toml(str(paths.runc_root))}",
        "",
        f"[{runtimes}.hako]",
        f"  runtime_type = {_toml(HAKO.type)}",
    ]
    if hako_config is not None:
        # The shim gets these as runtimeoptions.v1.Options (the CRI plugin's type for a runtime
        # that is not runc), on stdin at start and in CreateTaskRequest.options.
        lines += [f"[{runtimes}.hako.options]", f"  ConfigPath = {_toml(str(hako_config))}"]
    return "\n".join(lines) + "\n"


# -- processes, mounts, sockets -----------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    cmdline: str

    def __str__(self) -> str:
        return f"{self.pid} {self.cmdline[:200]}"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, ...] ([] if gone)."""
    text = _read(Path(f"/proc/{pid}/stat")).decode(errors="replace")
    return text.rpartition(")")[2].split()


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that is not a zombie."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def _pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def processes_mentioning(text: str, *, exclude: Iterable[int] = ()) -> list[Proc]:
    """Live processes whose command line or environment mentions ``text`` (a temp dir: what
    containerd started for it inherits its environment), and their descendants."""
    needle = text.encode()
    skip = {os.getpid(), *exclude}
    parents: dict[int, int] = {}
    found: dict[int, Proc] = {}
    for pid in _pids():
        fields = _stat_fields(pid)
        if not fields or fields[0] in ("Z", "X"):
            continue
        parents[pid] = int(fields[1])
        if pid in skip:
            continue
        cmdline = _read(Path(f"/proc/{pid}/cmdline"))
        if needle in cmdline or needle in _read(Path(f"/proc/{pid}/environ")):
            found[pid] = Proc(pid, cmdline.replace(b"\0", b" ").decode(errors="replace").strip())
    grown = True
    while grown:  # descendants: a container's processes mention nothing of ours
        grown = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found and pid not in skip:
                cmdline = _read(Path(f"/proc/{pid}/cmdline")).replace(b"\0", b" ")
                found[pid] = Proc(pid, cmdline.decode(errors="replace").strip())
                grown = True
    return sorted(found.values(), key=lambda proc: proc.pid)


def qemu_processes(base: Path, *, exclude: Iterable[int] = ()) -> list[Proc]:
    return [p for p in processes_mentioning(str(base), exclude=exclude) if "qemu-system" in p.cmdline]


def shim_processes(base: Path, runtime: Runtime | None = None, *, exclude: Iterable[int] = ()) -> list[Proc]:
    runtimes = [runtime] if runtime is not None else list(RUNTIMES)
    procs = processes_mentioning(str(base), exclude=exclude)
    return [p for p in procs if any(_runs_shim(p, r) for r in runtimes)]


def _runs_shim(proc: Proc, runtime: Runtime) -> bool:
    """Whether ``proc`` is ``runtime``'s shim: its binary, or a script or module an interpreter runs."""
    words = proc.cmdline.split()
    if any(Path(word).name == runtime.shim for word in words[:2]):
        return True
    return runtime == HAKO and "hako.shim" in words[:3]


def kill_all(procs: Iterable[Proc], timeout: float = 5.0) -> None:
    pids = [p.pid for p in procs]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _unescape_mountinfo(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mounts_under(path: Path) -> list[str]:
    """Mount points in our mount namespace under ``path``, or whose source or options name it."""
    prefix = str(path)
    found = []
    for line in _read(Path("/proc/self/mountinfo")).decode(errors="replace").splitlines():
        if prefix in _unescape_mountinfo(line):
            found.append(_unescape_mountinfo(line.split()[4]))
    return found


def unmount_all(mountpoints: Iterable[str]) -> list[str]:
    """Unmount, deepest first; return those that could not be unmounted."""
    failed = []
    for mountpoint in sorted(set(mountpoints), key=lambda m: m.count("/"), reverse=True):
        done = subprocess.run(["umount", mountpoint], capture_output=True, check=False)
        if done.returncode != 0:
            done = subprocess.run(["umount", "--lazy", mountpoint], capture_output=True, check=False)
        if done.returncode != 0:
            failed.append(mountpoint)
    return failed


def sockets_in(directory: Path) -> set[Path]:
    if not directory.is_dir():
        return set()
    found = set()
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                if path.is_socket():
                    found.add(path)
    return found


def listening_socket_paths() -> set[str]:
    paths = set()
    for line in _read(Path("/proc/net/unix")).decode(errors="replace").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8:
            paths.add(fields[7])
    return paths


def cgroup_hierarchies() -> list[Path]:
    """The mounted cgroup hierarchies (cgroup v2 alone, or v1's per-controller trees)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    if not CGROUP_ROOT.is_dir():
        return []
    return sorted(p for p in CGROUP_ROOT.iterdir() if (p / "cgroup.procs").exists())


def remove_cgroup_tree(path: Path) -> bool:
    """rmdir a cgroup and its children, deepest first (only empty cgroups can go)."""
    dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for directory in [*dirs, path]:
        with contextlib.suppress(OSError):
            directory.rmdir()
    return not path.exists()


def run_in_pty(argv: Sequence[str], *, timeout: float = 120.0) -> tuple[int, str]:
    """Run ``argv`` with a new pseudo-terminal as its stdin, stdout and stderr (what ``ctr -t``
    needs); return its exit code and everything it wrote to the terminal."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(list(argv), timeout, b"".join(chunks))
            if select.select([master], [], [], min(remaining, 0.5))[0]:
                try:
                    data = os.read(master, 4096)
                except OSError as err:
                    if err.errno != errno.EIO:  # EIO: no process has the terminal open any more
                        raise
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break  # gone, and nothing more to read
        returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return returncode, b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


POD_SUBNET_HOST, POD_SUBNET_POD = "10.213.77.1", "10.213.77.2"  # a /24 of pod_namespace's


@contextlib.contextmanager
def pod_namespace() -> Iterator[str]:
    """A network namespace as CNI's bridge plugin leaves one for a pod: a veth ``eth0`` with
    the address POD_SUBNET_POD and a default route, its peer on the host with POD_SUBNET_HOST
    (``ip netns``); its path, for ``ctr run --with-ns network:PATH``."""
    name = unique_id("hako-pod")
    peer = f"hp{name[-10:]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for step in (
            ["link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", name],
            ["addr", "add", f"{POD_SUBNET_HOST}/24", "dev", peer],
            ["link", "set", peer, "up"],
            ["-n", name, "addr", "add", f"{POD_SUBNET_POD}/24", "dev", "eth0"],
            ["-n", name, "link", "set", "eth0", "up"],
            ["-n", name, "route", "add", "default", "via", POD_SUBNET_HOST],
        ):
            subprocess.run(["ip", *step], check=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "link", "del", peer], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], check=True)


# -- ctr ------------------------------------------------------------------------------------------


@dataclass
class Ctr:
    """``ctr`` against one private containerd, in one namespace."""

    containerd: Containerd
    namespace: str = NAMESPACE
    binary: str = field(default_factory=lambda: shutil.which("ctr") or "ctr")

    def argv(self, *args: str) -> list[str]:
        return [self.binary, "--address", str(self.containerd.paths.address), "-n", self.namespace, *args]

    def __call__(
        self, *args: str, timeout: float = 60.0, input: str | None = None, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*args), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ctr {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def runtime_flags(self, runtime: Runtime) -> list[str]:
        """``--runtime`` and what keeps the runtime's files in our temp dir."""
        flags = ["--runtime", runtime.type]
        if runtime == RUNC:
            flags += ["--runc-root", str(self.containerd.paths.runc_root)]
        elif self.containerd.hako_config is not None:
            flags += ["--runtime-config-path", str(self.containerd.hako_config)]
        return flags

    def run_argv(
        self,
        runtime: Runtime,
        container_id: str,
        *command: str,
        image: str = BUSYBOX,
        rm: bool = True,
        detach: bool = False,
        tty: bool = False,
        options: Sequence[str] = (),
    ) -> list[str]:
        self.containerd.seen_ids.add(container_id)
        flags = ["--fifo-dir", str(self.containerd.paths.fifo_dir), *self.runtime_flags(runtime)]
        flags += ["--rm"] * rm + ["-d"] * detach + ["-t"] * tty
        return self.argv("run", *flags, *options, image, container_id, *command)

    def run(
        self,
        runtime: Runtime,
        container_id: str,
        *command: str,
        image: str = BUSYBOX,
        rm: bool = True,
        detach: bool = False,
        options: Sequence[str] = (),
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """``ctr run`` (``--rm`` unless told otherwise); stdin is not a terminal."""
        argv = self.run_argv(
            runtime, container_id, *command, image=image, rm=rm, detach=detach, options=options
        )
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )

    def exec(
        self, container_id: str, exec_id: str, *command: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        fifo = ["--fifo-dir", str(self.containerd.paths.fifo_dir)]
        return self("task", "exec", *fifo, "--exec-id", exec_id, container_id, *command, timeout=timeout)

    def tasks(self) -> dict[str, str]:
        """Task ID -> status (RUNNING, PAUSED, STOPPED, ...) from ``ctr task ls``."""
        listing = self("task", "ls", check=True).stdout.splitlines()[1:]
        return {fields[0]: fields[2] for fields in map(str.split, listing) if len(fields) >= 3}

    def containers(self) -> list[str]:
        return self("container", "ls", "-q", check=True).stdout.split()

    def wait_for_status(self, container_id: str, status: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = self.tasks().get(container_id)
            if seen == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"task {container_id} is {seen}, not {status}, after {timeout:.0f} s")

    def remove(self, container_id: str) -> None:
        """Kill, delete and remove ``container_id`` whatever state it is in (for clean-ups)."""
        if container_id in self.tasks():
            self("task", "kill", "-s", "SIGKILL", container_id, timeout=30)
            with contextlib.suppress(AssertionError):
                self.wait_for_status(container_id, "STOPPED", timeout=30)
            self("task", "delete", "-f", container_id, timeout=60)
        self("container", "delete", container_id, timeout=60)

    def active_snapshots(self) -> list[str]:
        listing = self("snapshots", "ls", check=True).stdout.splitlines()[1:]
        return [fields[0] for fields in map(str.split, listing) if fields and fields[-1] == "Active"]


# -- containerd -----------------------------------------------------------------------------------


@dataclass
class _Baseline:
    """What existed before our containerd started, so that only what is ours is removed."""

    shim_sockets: set[Path] = field(default_factory=set)
    hako_sockets: set[Path] = field(default_factory=set)
    containerd_run_dirs: set[Path] = field(default_factory=set)
    cgroups: set[Path] = field(default_factory=set)
    own_sockets: set[Path] = field(default_factory=set)


class Containerd:
    """A private containerd in ``base`` (a new temp dir, removed by :meth:`close`, if not given)."""

    def __init__(
        self, base: Path | None = None, *, hako_config: Path | None = None, debug: bool = True
    ) -> None:
        self._owns_base = base is None
        self.paths = Paths(Path(tempfile.mkdtemp(prefix="hako-ctrd-")) if base is None else base)
        self.hako_config = hako_config
        self.debug = debug
        self.process: subprocess.Popen[bytes] | None = None
        self.namespaces: set[str] = {NAMESPACE}
        self.seen_ids: set[str] = set()  # container, sandbox and pod IDs: what shim sockets are named by
        self._baseline = _Baseline()
        self._images: dict[str, Path] = {}
        self._closed = False
        self.binary = shutil.which("containerd") or "containerd"

    # lifecycle

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    @property
    def env(self) -> dict[str, str]:
        """containerd's environment, which the shims it starts inherit."""
        path = os.environ.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONTAINERD_", "HAKO_"))}
        return {**env, "PATH": f"{VENV_BIN}:{path}", "HAKO_RUN": str(self.paths.hako_run)}

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if self.pid is not None:
            return
        paths = self.paths
        if self.process is None:  # first start: the tree and the baseline
            for directory in (
                paths.root,
                paths.state,
                paths.runc_root,
                paths.fifo_dir,
                paths.cni_bin,
                paths.cni_conf,
                paths.hako_run,
                paths.pod_logs,
            ):
                directory.mkdir(parents=True, exist_ok=True)
            (paths.hako_run / "tcg-notice").touch()  # hako's once-per-host TCG notice: not in tests
            if cni_available():
                (paths.cni_conf / "10-hako-test.conflist").write_text(json.dumps(cni_conflist(paths)))
            paths.config.write_text(render_config(paths, hako_config=self.hako_config, debug=self.debug))
            self._baseline = _Baseline(
                shim_sockets=set(SHIM_SOCKETS.iterdir()) if SHIM_SOCKETS.is_dir() else set(),
                hako_sockets=sockets_in(HAKO_RUN_DEFAULT),
                containerd_run_dirs={p for p in (CONTAINERD_RUN, SHIM_SOCKETS) if p.exists()},
                cgroups={p for h in cgroup_hierarchies() for p in h.iterdir() if p.is_dir()},
            )
        with paths.log.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "--config", str(paths.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # a ^C to the tests reaches the tests, which stop it in order
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise HarnessError(
                    f"containerd exited ({self.process.returncode}) while starting:\n{self.log_tail()}"
                )
            if not paths.address.is_socket():
                done = None
            else:
                done = subprocess.run(
                    [
                        shutil.which("ctr") or "ctr",
                        "--address",
                        str(paths.address),
                        "--connect-timeout",
                        "2s",
                        "version",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=10,
                    check=False,
                )
            if done is not None and done.returncode == 0 and "Server:" in done.stdout:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"containerd did not answer within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)
        if not self._baseline.own_sockets:
            self._baseline.own_sockets = sockets_in(paths.base)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM containerd by its PID, then SIGKILL. Shims keep running, as they should."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def hako(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """hako as this containerd's shims see it (the same run root: pool and templates)."""
        return subprocess.run(
            [str(VENV_BIN / "hako"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )

    def pool_ready(self) -> list[str]:
        """The pooled sandboxes ready to be taken, by short id."""
        listing = self.hako("pool", "ls").stdout.splitlines()[1:]
        return [line.split()[0] for line in listing if " ready " in line]

    def log_tail(self, lines: int = 40) -> str:
        text = _read(self.paths.log).decode(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    # images

    def build_images(self) -> dict[str, Path]:
        """The busybox and pause images as OCI layout tars (built once per daemon)."""
        if not self._images:
            self.paths.images.mkdir(parents=True, exist_ok=True)
            self._images = {
                BUSYBOX: build_busybox_image(self.paths.images / "busybox", tar=True),
                PAUSE: build_pause_image(self.paths.images / "pause", tar=True),
            }
        return self._images

    def import_images(self, namespaces: Iterable[str] = (NAMESPACE, CRI_NAMESPACE)) -> None:
        """Import busybox and pause into each namespace, as hako.local/busybox:latest and
        hako.local/pause:latest (the names the layouts' index.json give their manifests)."""
        for namespace in namespaces:
            self.namespaces.add(namespace)
            ctr = self.ctr(namespace)
            for name, tar in self.build_images().items():
                ctr("images", "import", str(tar), timeout=120, check=True)
                if name not in ctr("images", "ls", "-q", check=True).stdout.split():
                    raise HarnessError(f"importing {tar} into {namespace} did not give {name}")

    def ctr(self, namespace: str = NAMESPACE) -> Ctr:
        self.namespaces.add(namespace)
        return Ctr(self, namespace)

    # what is ours, and what was left

    def processes(self) -> list[Proc]:
        """Processes started for this daemon (shims, runc, QEMU, ...), not containerd itself."""
        exclude = [self.pid] if self.pid is not None else []
        return processes_mentioning(str(self.paths.base), exclude=exclude)

    def shims(self, runtime: Runtime | None = None) -> list[Proc]:
        exclude = [self.pid] if self.pid is not None else []
        return shim_processes(self.paths.base, runtime, exclude=exclude)

    def qemus(self) -> list[Proc]:
        exclude = [self.pid] if self.pid is not None else []
        return qemu_processes(self.paths.base, exclude=exclude)

    def runc_containers(self) -> list[tuple[Path, str]]:
        """(runc root, container ID) of runc's state under our runc root (one root per namespace)."""
        found = []
        if self.paths.runc_root.is_dir():
            for root in self.paths.runc_root.iterdir():
                found += (
                    [(root, entry.name) for entry in root.iterdir() if entry.is_dir()]
                    if root.is_dir()
                    else []
                )
        return found

    def mounts(self) -> list[str]:
        return mounts_under(self.paths.base)

    def shim_socket(self, namespace: str, group_id: str) -> Path:
        """Where containerd 1.6's shim library puts the socket of the shim serving ``group_id``
        (a container ID, or a pod's sandbox ID) for this daemon: a hash of address, namespace, ID."""
        key = os.path.join(str(self.paths.address), namespace, group_id)
        return SHIM_SOCKETS / hashlib.sha256(key.encode()).hexdigest()

    def new_sockets(self, namespaces: Iterable[str]) -> list[Path]:
        """Sockets of ours that were not there when the daemon came up: under our dir, shim
        sockets in /run/containerd/s, and those under /run/hako that name one of our IDs.
        (Others may be using those two directories at the same time.)"""
        ours = sockets_in(self.paths.base) - self._baseline.own_sockets
        shim = {self.shim_socket(ns, i) for ns in namespaces for i in self.seen_ids}
        shim = {path for path in shim if os.path.lexists(path)}
        hako = sockets_in(HAKO_RUN_DEFAULT) - self._baseline.hako_sockets
        hako = {path for path in hako if any(i in str(path) for i in self.seen_ids)}
        return sorted(ours | shim | hako)

    def _state_left(self, namespaces: Iterable[str]) -> list[Path]:
        dirs = [self.paths.hako_run / "sandboxes"]
        for namespace in namespaces:
            dirs += [
                self.paths.state / "io.containerd.runtime.v2.task" / namespace,
                self.paths.root / "io.containerd.runtime.v2.task" / namespace,
            ]
            if namespace == CRI_NAMESPACE:
                for where in (self.paths.state, self.paths.root):
                    cri = where / "io.containerd.grpc.v1.cri"
                    dirs += [cri / "sandboxes", cri / "containers"]
        return [entry for d in dirs if d.is_dir() for entry in sorted(d.iterdir())]

    def _namespace_cgroups(self, namespaces: Iterable[str]) -> list[Path]:
        """Cgroups left under the per-namespace cgroups that runc and CRI create (if those are ours)."""
        parents = [h / name for h in cgroup_hierarchies() for name in set(namespaces)]
        ours = [p for p in parents if p.is_dir() and p not in self._baseline.cgroups]
        return [child for parent in ours for child in parent.iterdir() if child.is_dir()]

    def sweep(self, namespaces: Iterable[str] | None = None, *, settle: float = 20.0) -> list[str]:
        """Remove whatever is left of the tests in ``namespaces`` (default: all used) and return a
        description of each thing found. Processes get ``settle`` seconds to end by themselves."""
        namespaces = sorted(self.namespaces if namespaces is None else namespaces)
        problems: list[str] = []
        if self.pid is None:
            problems.append(f"containerd is not running:\n{self.log_tail()}")
            with contextlib.suppress(HarnessError):
                self.start()
        if self.pid is not None:
            for namespace in namespaces:
                ctr = self.ctr(namespace)
                self.seen_ids.update(ctr.containers())
                for task, status in ctr.tasks().items():
                    problems.append(f"task {namespace}/{task} left {status}")
                for container in ctr.containers():
                    problems.append(f"container {namespace}/{container} left")
                    ctr.remove(container)
                for snapshot in ctr.active_snapshots():
                    problems.append(f"active snapshot {namespace}/{snapshot} left")
                    ctr("snapshots", "rm", snapshot, timeout=60)
        problems += self._sweep_host(settle, namespaces)
        return problems

    def _sweep_host(self, settle: float, namespaces: Sequence[str]) -> list[str]:
        problems: list[str] = []
        deadline = time.monotonic() + settle
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        leftovers = self.processes()
        problems += [f"process left: {proc}" for proc in leftovers]
        kill_all(leftovers)
        for root, container in self.runc_containers():
            problems.append(f"runc container {container} left in {root}")
            subprocess.run(
                ["runc", "--root", str(root), "delete", "--force", container],
                capture_output=True,
                timeout=30,
                check=False,
            )
        mounts = self.mounts()
        problems += [f"mount left: {mountpoint}" for mountpoint in mounts]
        problems += [f"could not unmount {mountpoint}" for mountpoint in unmount_all(mounts)]
        listening = listening_socket_paths()
        for path in self.new_sockets(namespaces):
            problems.append(f"socket left: {path}")
            if str(path) not in listening and (
                path.parent == SHIM_SOCKETS or self.paths.base in path.parents
            ):
                path.unlink(missing_ok=True)
        problems += [f"state left: {path}" for path in self._state_left(namespaces)]
        for cgroup in self._namespace_cgroups(namespaces):
            problems.append(f"cgroup left: {cgroup}")
            remove_cgroup_tree(cgroup)
        return problems

    def close(self) -> list[str]:
        """Remove what is left, stop containerd, remove the temp dir; return what was left."""
        if self._closed:
            return []
        self._closed = True
        problems = self.sweep() if self.pid is not None else []
        self.stop()
        problems += self._sweep_host(0.0, sorted(self.namespaces))
        # Directories that our containerd or its shims created outside our temp dir, if empty.
        for directory in (SHIM_SOCKETS, CONTAINERD_RUN):
            if directory not in self._baseline.containerd_run_dirs:
                with contextlib.suppress(OSError):
                    directory.rmdir()
        for hierarchy in cgroup_hierarchies():
            for name in self.namespaces:
                cgroup = hierarchy / name
                if cgroup.is_dir() and cgroup not in self._baseline.cgroups:
                    remove_cgroup_tree(cgroup)
        # The CNI bridge plugin's bridge, which it keeps; by name, ours (no pod is left on it).
        subprocess.run(["ip", "link", "del", CNI_BRIDGE], capture_output=True, check=False)
        if self._owns_base:
            if self.mounts():
                problems.append(f"{self.paths.base} not removed: mounts remain under it")
            else:
                shutil.rmtree(self.paths.base, ignore_errors=True)
        return problems

    def __enter__(self) -> Containerd:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        problems = self.close()
        if problems and kind is None:
            raise HarnessError("left behind:\n" + "\n".join(problems))


def host_kernel_release() -> str:
    return os.uname().release
