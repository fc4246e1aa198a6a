"""containerd-shim-hako-v2, as containerd runs it (runtime v2, containerd 1.6).

    containerd-shim-hako-v2 -namespace NS -address ADDR -publish-binary BIN -id ID [-debug] start
        in the bundle directory, with TTRPC_ADDRESS set: print the address of the shim that
        serves this container's pod, starting one if there is none (one shim per pod: grouped
        by the annotation io.kubernetes.cri.sandbox-id, or by the container id)
    containerd-shim-hako-v2 -namespace NS -address ADDR -publish-binary BIN -id ID -bundle B delete
        clean up after a shim that is gone; print a DeleteResponse (protobuf) on stdout

The serving shim is forked by ``start``: its own session, its own mount
namespace (the pod's mounts cannot outlive it), logging to the bundle's ``log``
FIFO (containerd shows it at debug level) and to its state directory.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

from hako.runtime import paths
from hako.runtime.sockets import connect_unix, listen_unix

GROUP_ANNOTATION = "io.kubernetes.cri.sandbox-id"
SOCKETS = Path("/run/hako/s")  # short: containerd dials this path, and sun_path holds 108 bytes
KILLED = 128 + signal.SIGKILL


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="containerd-shim-hako-v2", add_help=False)
    for flag in ("-namespace", "-address", "-publish-binary", "-id", "-bundle", "-socket"):
        parser.add_argument(flag, default="")
    parser.add_argument("-debug", action="store_true")
    parser.add_argument("-v", "-version", dest="version", action="store_true")
    parser.add_argument("action", nargs="?", default="")
    args, _ = parser.parse_known_args(argv)
    args.argv = list(argv)  # as given: a pooled sandbox that becomes the shim parses it again
    return args


class Shim:
    """Where a pod's shim lives: its state directory and its socket, keyed like containerd's."""

    def __init__(self, address: str, namespace: str, group: str) -> None:
        key = hashlib.sha256(f"{address}/{namespace}/{group}".encode()).hexdigest()
        self.pod_id = hashlib.sha256(f"hako-pod/{key}".encode()).hexdigest()
        self.dir = paths.run_root() / "shim" / key[:32]
        self.socket = SOCKETS / f"{key[:32]}.sock"
        self.group = group

    @classmethod
    def of(cls, args: argparse.Namespace, bundle: Path) -> Shim:
        group = args.id
        with contextlib.suppress(OSError, ValueError, AttributeError):
            annotations = json.loads((bundle / "config.json").read_text()).get("annotations") or {}
            group = annotations.get(GROUP_ANNOTATION) or args.id
        return cls(args.address, args.namespace, group)

    def record(self, **values: object) -> None:
        state = self.read()
        state.update(values)
        tmp = self.dir / ".pod.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.dir / "pod.json")

    def read(self) -> dict[str, object]:
        try:
            state: dict[str, object] = json.loads((self.dir / "pod.json").read_text())
        except (OSError, ValueError):
            return {}
        return state

    def alive(self) -> bool:
        try:
            connect_unix(self.socket).close()
        except OSError:
            return False
        return True


def start(args: argparse.Namespace) -> int:
    bundle = Path.cwd()
    shim = Shim.of(args, bundle)
    shim.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    SOCKETS.mkdir(parents=True, exist_ok=True, mode=0o700)
    options = b""
    with contextlib.suppress(OSError):
        options = sys.stdin.buffer.read()  # the runtime options, as Create will send them again
    with open(shim.dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not shim.alive():
            with contextlib.suppress(FileNotFoundError):
                shim.socket.unlink()
            listener = listen_unix(shim.socket)
            if not _pooled(args, shim, bundle, options, listener):
                pid = os.fork()
                if pid == 0:
                    lock.close()  # the lock is the open file's: a child holding it would hold it forever
                    _serve_forked(args, shim, bundle, listener, options)
                shim.record(shim_pid=pid, group=shim.group, namespace=args.namespace)
            listener.close()
    address = f"unix://{shim.socket}"
    # containerd reads the bundle's ``address`` when it restarts, to reconnect to its shims
    tmp = bundle / ".address"
    tmp.write_text(address)
    os.replace(tmp, bundle / "address")
    print(address, flush=True)
    return 0


def _pooled(
    args: argparse.Namespace, shim: Shim, bundle: Path, options: bytes, listener: socket.socket
) -> bool:
    """Whether a sandbox from the warm pool now serves the pod on ``listener`` (its daemon
    became the pod's shim: :mod:`hako.shim.pooled`)."""
    if not paths.pool_file().exists():
        return False  # no pool was ever filled here: nothing to look for, or to import
    from hako.shim import pooled

    return pooled.take(args, shim, bundle, options, listener)


def _serve_forked(
    args: argparse.Namespace, shim: Shim, bundle: Path, listener: socket.socket, options: bytes
) -> NoReturn:
    code = 0
    try:
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        from hako.runtime import mounts

        # The shim's own mount namespace (it mounts the containers' rootfs there, for QEMU's
        # 9p to share): entered while single-threaded, before QEMU is started in it.
        mounts.private_namespace()
        from hako.shim.early import launch

        early = launch(shim.pod_id, shim.dir, bundle, options)  # the guest boots meanwhile
        if early is not None:
            shim.record(qemu_pid=early.vm.pid)  # for `delete`, should this process die unseen
        from hako.shim.serve import serve

        serve(args, shim, bundle, listener, early)
    except BaseException:
        code = 1
        with contextlib.suppress(Exception), open(shim.dir / "shim.log", "a") as log:
            log.write(traceback.format_exc())
    finally:
        os._exit(code)


def delete(args: argparse.Namespace) -> int:
    """containerd's clean-up after a shim that is gone: its VM, its state, the bundle's rootfs."""
    from hako_containerd.containerd.runtime.v2.task import shim_pb2

    bundle = Path(args.bundle) if args.bundle else Path.cwd()
    shim = Shim.of(args, bundle)
    if not shim.alive():
        state = shim.read()
        qemu = state.get("qemu_pid")
        name = state.get("qemu_name") or f"hako-{shim.pod_id[:12]}"  # the pool's VMs have their own
        if isinstance(qemu, int) and isinstance(name, str):
            with contextlib.suppress(OSError):
                if name.encode() in Path(f"/proc/{qemu}/cmdline").read_bytes():
                    os.kill(qemu, signal.SIGKILL)
        vm_dir = state.get("vm_dir")  # a VM taken from the pool kept its sandbox's run dir
        if isinstance(vm_dir, str) and Path(vm_dir).parent == paths.sandboxes_dir():
            shutil.rmtree(vm_dir, ignore_errors=True)
        shutil.rmtree(shim.dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            shim.socket.unlink()
    from hako.runtime import mounts

    with contextlib.suppress(Exception):
        mounts.umount(bundle / "rootfs")
    response = shim_pb2.DeleteResponse(pid=0, exit_status=KILLED)
    response.exited_at.FromNanoseconds(time.time_ns())
    sys.stdout.buffer.write(response.SerializeToString())
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> NoReturn:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        import hako

        print(f"containerd-shim-hako-v2 {hako.__version__}")
        sys.exit(0)
    if args.action == "start":
        sys.exit(start(args))
    if args.action == "delete":
        sys.exit(delete(args))
    print(f"containerd-shim-hako-v2: unknown action {args.action!r}: use start or delete", file=sys.stderr)
    sys.exit(2)
