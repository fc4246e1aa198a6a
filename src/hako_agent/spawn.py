"""Creating container processes: the parent's plan and the forked children that carry it out.

Like runc's ``nsexec`` + ``init``, in two shapes:

* a container's init: the agent forks **A**; A joins the container's cgroup, joins or
  unshares its namespaces and forks **B**, which is PID 1 of the new PID namespace;
  A reports B's pid and exits, so B is reparented to the agent (init, or a
  subreaper in tests) and the reaper gets its exit status. B sets up the rootfs
  (mounts, devices, pivot_root, masked/read-only paths), the hostname and the
  process (pty, rlimits, user, capabilities, no_new_privs, cwd), then waits for
  StartContainer before it executes the program.
* an exec: the agent forks **C**; C joins the cgroup and ``setns``-es into the init's
  namespaces and forks **D** inside them; D sets up the process and executes it.

The agent is multithreaded, so the children only make system calls: no imports,
no locks, no logging. Everything they need (bytes, flags, fds) is prepared by the
parent in :class:`InitPlan` / :class:`ProcessPlan`. They talk back over a CLOEXEC
status pipe, one line per message::

    P<pid>            A/C: the pid of B/D (as the agent sees it)
    R                 B/D: set up; B now waits for the start byte
    E<errno> <text>   setup failed (the child then exits)
    X<errno>          execve failed (the child then exits 127)

and end of file after ``R`` means the program was executed. A pty is allocated
inside the container (its own /dev/pts) and the master sent back over a unix
socket with SCM_RIGHTS, so ``tty`` in the container prints /dev/pts/0.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import select
import socket
import stat
import time

from hako_agent import linux
from hako_agent.errors import AgentError, ExecFailed, FailedPrecondition, exec_message
from hako_agent.spec import CAP_LAST, NAMESPACES, NS_FILES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from hako_agent.reaper import OnExit, Reaper
    from hako_agent.spec import Capabilities, Mount, Process, Spec

_SETUP_TIMEOUT = 120.0  # seconds a child may take to set up (a 9p or block mount can be slow)
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS = (
    ("/proc/self/fd", "fd"),
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("pts/ptmx", "ptmx"),
)
_STATVFS_TO_MS = (
    (os.ST_NOSUID, linux.MS_NOSUID),
    (os.ST_NODEV, linux.MS_NODEV),
    (os.ST_NOEXEC, linux.MS_NOEXEC),
    (os.ST_NOATIME, linux.MS_NOATIME),
    (os.ST_NODIRATIME, linux.MS_NODIRATIME),
    (os.ST_RELATIME, linux.MS_RELATIME),
)


# -- plans (built by the parent) ----------------------------------------------------------------


class ProcessPlan:
    """A process to execute, with everything resolved to bytes and numbers."""

    def __init__(self, process: Process) -> None:
        self.args = [os.fsencode(a) for a in process.args]
        env: dict[bytes, bytes] = {}
        for entry in process.env:
            name, _, value = entry.partition("=")
            env[os.fsencode(name)] = os.fsencode(value)
        self.env = env
        self.path_list = [os.fsencode(p) for p in process.path_list()]
        self.cwd = process.cwd
        self.uid = process.user.uid
        self.gid = process.user.gid
        self.groups = list(process.user.additional_gids)
        self.umask = process.user.umask
        self.rlimits = [(r.resource, r.soft, r.hard) for r in process.rlimits]
        self.caps: Capabilities | None = process.capabilities
        self.no_new_privileges = process.no_new_privileges
        self.oom_score_adj = process.oom_score_adj
        self.terminal = process.terminal
        self.console_size = process.console_size


class MountStep:
    __slots__ = ("data", "destination", "flags", "fstype", "propagation", "source")

    def __init__(self, mount: Mount) -> None:
        self.destination = mount.destination
        self.source = mount.source
        fstype = mount.type
        if fstype == "cgroup":  # the guest is cgroup v2 only: Docker's "cgroup" mount means cgroup2
            fstype = "cgroup2"
        self.fstype = fstype
        self.flags = mount.options.flags
        self.data = mount.options.data
        self.propagation = mount.options.propagation

    @property
    def bind(self) -> bool:
        return bool(self.flags & linux.MS_BIND)


class InitPlan:
    """The container around its init process."""

    def __init__(self, spec: Spec) -> None:
        self.rootfs = os.path.realpath(spec.root_path)
        self.unshare = 0
        self.join: list[tuple[str, int]] = []  # (namespace path, CLONE_NEW*) to setns into
        for ns in spec.namespaces:
            if ns.path:
                self.join.append((ns.path, NAMESPACES[ns.type]))
            else:
                self.unshare |= NAMESPACES[ns.type]
        self.root_propagation = spec.rootfs_propagation
        self.mounts = [MountStep(m) for m in spec.mounts]
        self.make_devices = any(m.destination == "/dev" and not m.bind for m in self.mounts)
        self.readonly_root = spec.root_readonly
        self.masked_paths = spec.masked_paths
        self.readonly_paths = spec.readonly_paths
        self.hostname = spec.hostname
        self.cwd = spec.process.cwd  # made in the rootfs if missing, as runc does
        self.sysctl = [("/proc/sys/" + key.replace(".", "/"), value) for key, value in spec.sysctl.items()]


class ChildStdio:
    """The fds a child gets as 0, 1, 2 (None for a terminal: the child makes a pty)."""

    def __init__(self, stdin: int, stdout: int, stderr: int) -> None:
        self.fds = (stdin, stdout, stderr)


# -- parent side --------------------------------------------------------------------------------


class StatusPipe:
    """The agent's end of a child's status pipe.

    Two processes write to it (A/C: ``P``, ``E``; B/D: ``R``, ``E``, ``X``), so their
    messages interleave in any order: B may well say ``R`` before A says ``P``.
    """

    def __init__(self, fd: int, what: str = "container setup") -> None:
        self.fd = fd
        self.what = what
        self.pid = 0
        self.ready = False
        self.exec_errno = 0
        self._buffer = b""

    def next(self, timeout: float = _SETUP_TIMEOUT) -> bytes:
        """The next message (without newline), or b"" at end of file."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                raise FailedPrecondition(f"{self.what} did not finish within {timeout:.0f}s")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                line, self._buffer = self._buffer, b""
                return line
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _take(self) -> bool:
        """Read and apply one message; False at end of file. Raises on ``E``."""
        message = self.next()
        if not message:
            return False
        kind, body = message[:1], message[1:]
        if kind == b"P":
            self.pid = int(body)
        elif kind == b"R":
            self.ready = True
        elif kind == b"X":
            self.exec_errno = int(body or b"0") or errno.EIO
        elif kind == b"E":
            _, _, detail = body.decode(errors="replace").partition(" ")
            raise FailedPrecondition(f"{self.what}: {detail}")
        else:
            raise FailedPrecondition(f"{self.what}: unexpected message {message!r}")
        return True

    def wait_setup(self, on_pid: Callable[[int], None]) -> None:
        """Until the process is set up (``P`` and ``R``); ``on_pid`` as soon as its pid is known."""
        while not (self.pid and self.ready):
            known = self.pid
            if not self._take():
                if not self.pid:
                    raise FailedPrecondition(f"{self.what}: the child exited without a word")
                raise FailedPrecondition(f"{self.what}: the process exited during setup")
            if self.pid and not known:
                on_pid(self.pid)

    def wait_exec(self) -> int:
        """After setup: 0 once the program runs (end of file), or the errno of its execve."""
        while not self.exec_errno and self._take():
            pass
        return self.exec_errno

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Spawned:
    """A child that finished setup: its pid, and (for a pty) the master."""

    def __init__(self, pid: int, status: StatusPipe, start_fd: int, pty_master: int) -> None:
        self.pid = pid
        self.status = status
        self.start_fd = start_fd  # write a byte to start a container init; -1 for an exec
        self.pty_master = pty_master  # -1 without a terminal

    def wait_exec(self, path: str) -> None:
        """After start: block until the program runs (EOF) or execve fails (ExecFailed)."""
        try:
            err = self.status.wait_exec()
        finally:
            self.status.close()
        if err:
            raise ExecFailed(err, path, exec_message(err, path))

    def start(self, path: str) -> None:
        """Let a created init execute its program; ExecFailed if it cannot."""
        fd, self.start_fd = self.start_fd, -1
        try:
            os.write(fd, b"1")
        except BrokenPipeError:
            raise FailedPrecondition("the container's init exited before it was started") from None
        finally:
            os.close(fd)
        self.wait_exec(path)

    def close(self) -> None:
        self.status.close()
        for fd in (self.start_fd, self.pty_master):
            if fd >= 0:
                os.close(fd)
        self.start_fd = self.pty_master = -1


def _recv_fd(sock: socket.socket) -> int:
    size = socket.CMSG_LEN(4)
    _, ancillary, _, _ = sock.recvmsg(1, size)
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= 4:
            fd = int.from_bytes(data[:4], "little")
            os.set_inheritable(fd, False)
            return fd
    raise FailedPrecondition("the container did not send its pty")


def spawn(
    reaper: Reaper,
    proc: ProcessPlan,
    stdio: ChildStdio | None,
    on_exit: OnExit,
    *,
    init: InitPlan | None = None,
    cgroup_fd: int = -1,
    join_fds: list[tuple[int, int]] | None = None,
    what: str = "container setup",
) -> Spawned:
    """Fork the intermediate child and return once the final child is set up.

    ``init``: create a container (B waits for :meth:`Spawned.start`). Otherwise an
    exec: ``join_fds`` are (fd, CLONE_NEW*) of the container's namespaces.
    The caller keeps ownership of ``stdio``, ``cgroup_fd`` and ``join_fds`` (close them after).
    """
    status_r, status_w = os.pipe()
    start_r = start_w = -1
    if init is not None:
        start_r, start_w = os.pipe()
    sock_parent = sock_child = None
    if proc.terminal:
        sock_parent, sock_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    joins = list(join_fds or [])
    if init is not None:
        for path, nstype in init.join:
            joins.append((os.open(path, os.O_RDONLY | os.O_CLOEXEC), nstype))
    keep = [status_w, start_r, cgroup_fd, *(fd for fd, _ in joins)]
    if sock_child is not None:
        keep.append(sock_child.fileno())
    keep = [fd for fd in keep if fd >= 0]
    for fd in [*keep, *(stdio.fds if stdio else ())]:
        if fd < 3:
            raise AgentError(f"internal: fd {fd} would collide with stdio (0, 1 and 2 must be open)")

    status = StatusPipe(status_r, what)
    tracked: list[int] = []
    reaper.spawning()
    try:
        pid = os.fork()
        if pid == 0:  # A or C: never returns
            _intermediate(init, proc, stdio, keep, status_w, start_r, cgroup_fd, joins, sock_child)
        reaper.forked()
        os.close(status_w)
        status_w = -1

        def track(pid: int) -> None:
            reaper.track(pid, on_exit)
            tracked.append(pid)

        status.wait_setup(track)
        child = status.pid
        master = _recv_fd(sock_parent) if sock_parent is not None else -1
        spawned = Spawned(child, status, start_w, master)
        start_w = -1
        return spawned
    except BaseException:
        status.close()
        for pid in tracked:
            reaper.kill(pid, 9)  # stuck or broken in setup: do not leave it behind
        raise
    finally:
        reaper.spawned()
        for fd in (status_w, start_r, start_w):
            if fd >= 0:
                os.close(fd)
        if init is not None:  # the namespaces opened here; join_fds belong to the caller
            for fd, _ in joins[len(join_fds or ()) :]:
                os.close(fd)
        for sock in (sock_parent, sock_child):
            if sock is not None:
                sock.close()


# -- child side: system calls only --------------------------------------------------------------


class _Failed(Exception):
    def __init__(self, err: int, text: str) -> None:
        super().__init__(text)
        self.err = err
        self.text = text


def _report(fd: int, exc: BaseException, stage: str) -> None:
    if isinstance(exc, _Failed):
        err, text = exc.err, exc.text
    elif isinstance(exc, OSError):
        err = exc.errno or errno.EIO
        text = f"{stage}: {exc.strerror}"
        if exc.filename is not None:
            text += f": {os.fsdecode(exc.filename)}"
    else:
        err, text = errno.EIO, f"{stage}: {type(exc).__name__}: {exc}"
    try:
        os.write(fd, b"E%d %s\n" % (err, text.replace("\n", " ").encode(errors="replace")))
    except OSError:
        pass


def _close_others(keep: list[int]) -> None:
    """Close every fd but 0, 1, 2 and ``keep`` (copies of other containers' pipes included)."""
    first = 3
    for fd in sorted(set(keep)):
        if fd >= first:
            linux.close_range(first, fd - 1)
            first = fd + 1
    linux.close_range(first, 0x7FFFFFFF)


def _intermediate(
    init: InitPlan | None,
    proc: ProcessPlan,
    stdio: ChildStdio | None,
    keep: list[int],
    status_fd: int,
    start_fd: int,
    cgroup_fd: int,
    joins: list[tuple[int, int]],
    sock: socket.socket | None,
) -> None:
    """A (for an init) or C (for an exec): enter the container, fork its process, report the pid."""
    stage = "preparing"
    code = 1
    try:
        if stdio is not None:
            for target, fd in enumerate(stdio.fds):
                os.dup2(fd, target)
        _close_others(keep)
        if cgroup_fd >= 0:
            stage = "joining the cgroup"
            os.write(cgroup_fd, b"0")
        for fd, nstype in joins:
            stage = "joining a namespace"
            linux.setns(fd, nstype)
            os.close(fd)
        if init is not None and init.unshare:
            stage = "creating namespaces"
            linux.unshare(init.unshare)
        stage = "forking"
        pid = os.fork()
        if pid == 0:
            _final(init, proc, status_fd, start_fd, sock)  # never returns
        os.write(status_fd, b"P%d\n" % pid)
        code = 0
    except BaseException as exc:
        _report(status_fd, exc, stage)
    finally:
        os._exit(code)


def _final(
    init: InitPlan | None, proc: ProcessPlan, status_fd: int, start_fd: int, sock: socket.socket | None
) -> None:
    """B or D: the process itself."""
    stage = "setsid"
    try:
        os.setsid()
        if init is not None:
            stage = "setting up the rootfs"
            _setup_rootfs(init)
        stage = "setting up the process"
        _setup_process(proc, sock, init is not None and init.make_devices)
        if sock is not None:
            sock.close()
        os.write(status_fd, b"R\n")
        if start_fd >= 0:
            stage = "waiting for start"
            if os.read(start_fd, 1) != b"1":
                os._exit(0)  # the agent gave up on this container
            os.close(start_fd)
        err = _exec(proc)
        os.write(status_fd, b"X%d\n" % err)
        os._exit(127)
    except BaseException as exc:
        _report(status_fd, exc, stage)
    finally:
        os._exit(1)


def secure_join(root: str, unsafe: str) -> str:
    """``root`` + ``unsafe`` with symlinks resolved as if ``root`` were /, so the result
    never leaves ``root`` (like github.com/cyphar/filepath-securejoin). Missing parts are kept."""
    parts = [p for p in unsafe.split("/") if p]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root + "/" + "/".join([*resolved, part])
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > 255:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", unsafe)
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return root.rstrip("/") + "/" + "/".join(resolved)


def _mkdir_p(path: str) -> None:
    os.makedirs(path, 0o755, exist_ok=True)


def _touch(path: str) -> None:
    _mkdir_p(os.path.dirname(path))
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644))
    except IsADirectoryError:
        pass


def _mount_flags_of(path: str) -> int:
    flags = 0
    st_flags = os.statvfs(path).f_flag
    for st_flag, ms_flag in _STATVFS_TO_MS:
        if st_flags & st_flag:
            flags |= ms_flag
    return flags


def _remount_readonly(path: str) -> None:
    linux.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | _mount_flags_of(path))


def _do_mount(rootfs: str, step: MountStep) -> None:
    target = secure_join(rootfs, step.destination)
    if step.bind:
        if os.path.isdir(step.source):
            _mkdir_p(target)
        else:
            _touch(target)
        linux.mount(step.source, target, None, step.flags & (linux.MS_BIND | linux.MS_REC))
        extra = step.flags & ~(linux.MS_BIND | linux.MS_REC)
        if extra:
            linux.mount(None, target, None, linux.MS_BIND | linux.MS_REMOUNT | extra)
    else:
        _mkdir_p(target)
        linux.mount(step.source or step.fstype, target, step.fstype, step.flags, step.data or None)
    for propagation in step.propagation:
        linux.mount(None, target, None, propagation)


def _setup_rootfs(init: InitPlan) -> None:
    rootfs = init.rootfs
    linux.mount(None, "/", None, init.root_propagation)
    linux.mount(rootfs, rootfs, None, linux.MS_BIND | linux.MS_REC)
    for step in init.mounts:
        try:
            _do_mount(rootfs, step)
        except OSError as exc:
            raise _Failed(
                exc.errno or errno.EIO,
                f"mounting {step.fstype or 'bind'} {step.source} on {step.destination}: {exc.strerror}",
            ) from None
    try:
        _mkdir_p(secure_join(rootfs, init.cwd))
    except OSError:
        pass  # a read-only rootfs, a file in the way: the chdir reports it
    if init.make_devices:
        dev = secure_join(rootfs, "/dev")
        for name in _DEVICES:
            target = f"{dev}/{name}"
            _touch(target)
            linux.mount(f"/dev/{name}", target, None, linux.MS_BIND)
        for source, name in _DEV_LINKS:
            try:
                os.symlink(source, f"{dev}/{name}")
            except FileExistsError:
                pass
    _pivot_root(rootfs)
    if init.hostname:
        linux.sethostname(init.hostname)
    for path, value in init.sysctl:  # before /proc/sys turns read-only
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise _Failed(exc.errno or errno.EIO, f"setting sysctl {path[10:]}: {exc.strerror}") from None
    for path in init.readonly_paths:
        if os.path.lexists(path):
            linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
            _remount_readonly(path)
    for path in init.masked_paths:
        if os.path.isdir(path) and not os.path.islink(path):
            linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY)
        elif os.path.lexists(path):
            linux.mount("/dev/null", path, None, linux.MS_BIND)
    if init.readonly_root:
        _remount_readonly("/")


def _pivot_root(rootfs: str) -> None:
    old_root = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new_root = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new_root)
        try:
            linux.pivot_root(".", ".")
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # "/" is the initramfs (rootfs), which cannot be pivoted away from; the agent moves
            # off it at boot, so this is a fallback: move the rootfs over / and chroot.
            linux.mount(".", "/", None, linux.MS_MOVE)
            os.chroot(".")
        else:
            os.fchdir(old_root)
            linux.mount(None, ".", None, linux.MS_SLAVE | linux.MS_REC)
            linux.umount2(".", linux.MNT_DETACH)
        os.chdir("/")
    finally:
        os.close(old_root)
        os.close(new_root)


def _open_pty(proc: ProcessPlan, console: bool) -> tuple[int, int]:
    """A pty from the container's own devpts: (master, slave)."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, linux.TIOCSPTLCK, b"\0\0\0\0")  # unlockpt
    number = int.from_bytes(fcntl.ioctl(master, linux.TIOCGPTN, b"\0\0\0\0"), "little")
    slave_path = f"/dev/pts/{number}"
    slave = os.open(slave_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    os.fchown(slave, proc.uid, -1)
    if proc.console_size is not None and proc.console_size[0] and proc.console_size[1]:
        rows, cols = proc.console_size
        winsize = rows.to_bytes(2, "little") + cols.to_bytes(2, "little") + bytes(4)
        fcntl.ioctl(slave, linux.TIOCSWINSZ, winsize)
    if console:  # the init's terminal is also its /dev/console, as runc does it
        _touch("/dev/console")
        linux.mount(slave_path, "/dev/console", None, linux.MS_BIND)
    return master, slave


def _setup_process(proc: ProcessPlan, sock: socket.socket | None, console: bool) -> None:
    if proc.terminal:
        assert sock is not None
        master, slave = _open_pty(proc, console)
        sock.sendmsg([b"m"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, master.to_bytes(4, "little"))])
        os.close(master)
        fcntl.ioctl(slave, linux.TIOCSCTTY, 0)
        for target in (0, 1, 2):
            os.dup2(slave, target)
        os.close(slave)
    if proc.oom_score_adj is not None:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        os.write(fd, b"%d" % proc.oom_score_adj)
        os.close(fd)
    for res, soft, hard in proc.rlimits:
        try:
            resource.setrlimit(res, (soft, hard))
        except (OSError, ValueError) as exc:
            raise _Failed(errno.EPERM, f"setting rlimit {res} to {soft}/{hard}: {exc}") from None
    caps = proc.caps
    if caps is not None:
        for cap in range(CAP_LAST + 1):
            if not caps.bounding >> cap & 1:
                try:
                    linux.prctl(linux.PR_CAPBSET_DROP, cap)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # a capability this kernel does not know
                        raise
        if proc.uid != 0:
            linux.prctl(linux.PR_SET_KEEPCAPS, 1)
    os.setgroups(proc.groups)
    os.setgid(proc.gid)
    os.setuid(proc.uid)
    if proc.umask is not None:
        os.umask(proc.umask)
    try:
        os.chdir(proc.cwd)
    except OSError as exc:
        raise _Failed(exc.errno or errno.EIO, f"chdir to cwd {proc.cwd!r}: {exc.strerror}") from None
    if caps is not None:
        if proc.uid != 0:
            linux.prctl(linux.PR_SET_KEEPCAPS, 0)
        linux.capset(caps.effective, caps.permitted, caps.inheritable)
        linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
        # The kernel raises an ambient capability only if it is permitted and inheritable; runc
        # skips the others (`runc spec` asks for ambient ones without inheritable), so do we.
        raisable = caps.ambient & caps.permitted & caps.inheritable
        for cap in range(CAP_LAST + 1):
            if raisable >> cap & 1:
                linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_RAISE, cap)
    if proc.no_new_privileges:
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    for signum in range(1, 32):  # the agent ignores some (SIGPIPE, SIGXFSZ, SIGINT): exec would keep that
        if signum not in (9, 19):
            linux.reset_signal(signum)


def _exec(proc: ProcessPlan) -> int:
    """execve args[0], searched in the process's own PATH; returns the errno if nothing ran."""
    program = proc.args[0]
    candidates = [program] if b"/" in program else [d + b"/" + program for d in proc.path_list]
    first_error = 0
    last_error = errno.ENOENT
    for candidate in candidates:
        try:
            os.execve(candidate, proc.args, proc.env)
        except OSError as exc:
            last_error = exc.errno or errno.ENOENT
            if last_error not in (errno.ENOENT, errno.ENOTDIR) and not first_error:
                first_error = last_error
    return first_error or last_error


def namespace_fds(pid: int, types: list[str]) -> list[tuple[int, int]]:
    """Open /proc/<pid>/ns/* for an exec to join, in the order to join them."""
    fds: list[tuple[int, int]] = []
    try:
        for ns_type, ns_file in NS_FILES.items():
            if ns_type in types:
                fds.append(
                    (os.open(f"/proc/{pid}/ns/{ns_file}", os.O_RDONLY | os.O_CLOEXEC), NAMESPACES[ns_type])
                )
    except OSError:
        for fd, _ in fds:
            os.close(fd)
        raise
    return fds
