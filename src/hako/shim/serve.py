"""The serving shim: the Task service on the pod's socket until containerd shuts it down."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

from hako.shim.early import EarlyVM
from hako.shim.events import Publisher
from hako.shim.main import Shim
from hako.shim.pod import Pod
from hako.shim.pooled import PooledVM
from hako.shim.service import SERVICE, TaskService
from hako_ttrpc import Server


class ShimLog:
    """Lines to the shim's own log file and to the bundle's ``log`` FIFO, which containerd reads."""

    def __init__(self, path: Path, fifo: Path, debug: bool) -> None:
        self._file = path.open("a", buffering=1)
        self._lock = threading.Lock()
        self.debug = debug
        try:
            self._fifo: int | None = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self._fifo = None  # nobody reads it (containerd opens it before it starts us)

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} hako-shim[{os.getpid()}]: {message}\n"
        with self._lock:
            self._file.write(line)
            if self._fifo is not None:
                # containerd may not be reading (it restarts): the file keeps the line anyway
                with contextlib.suppress(OSError):
                    os.write(self._fifo, line.encode())


def serve(
    args: argparse.Namespace,
    shim: Shim,
    bundle: Path,
    listener: socket.socket,
    early: EarlyVM | PooledVM | None,
) -> None:
    """Serve containerd's Task API for the pod (in the shim's own mount namespace, entered by
    the caller), with ``early`` the pod's VM if it was launched already, or taken from the pool."""
    log = ShimLog(shim.dir / "shim.log", bundle / "log", args.debug)
    address = os.environ.get("TTRPC_ADDRESS") or f"{args.address}.ttrpc"
    events = Publisher(address, args.namespace, log)
    pod = Pod(shim.pod_id, shim.dir, events, log, on_vm=lambda pid: shim.record(qemu_pid=pid), early=early)
    server = Server(log=log)
    stopping = threading.Event()

    def shutdown() -> None:
        if not stopping.is_set():
            stopping.set()
            log("shutting down")
            server.shutdown()

    def on_term(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    server.register_service(SERVICE, TaskService(pod, args.namespace, shutdown, log))
    log(f"serving pod {shim.group} (namespace {args.namespace}) on {shim.socket}")
    try:
        server.serve_listener(listener)
    finally:
        pod.close()
        events.close()
        with contextlib.suppress(FileNotFoundError):
            shim.socket.unlink()
        shutil.rmtree(shim.dir, ignore_errors=True)
