"""PID 1 of the sandbox VM: set the guest up, then serve the host over ttRPC forever.

The image's /init is ``#!/usr/bin/python3.11 -IS`` calling :func:`main`. Boot
order, cheapest first, because every import costs real time under emulation:

1. mount /proc; leave the initramfs if / is one; mount /sys, /dev; load modules.load;
   mount /dev/pts, /dev/shm, /run, /tmp and cgroup2 (controllers enabled)
2. find the host channel (virtio-serial port ``hako.agent``, or vsock 1024 with
   ``hako.channel=vsock``) and the log port ``hako.log``
3. import protobuf + ttRPC, register the service -> agent_ready
4. serve; meanwhile a thread brings up loopback and imports the container code

Imports before ready: ctypes (mount), select, threading, hako_ttrpc and
hako_api.agent_pb2 (which bring google.protobuf); nothing for containers.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from hako_agent.service import AgentService
    from hako_ttrpc import Server

AGENT_PORT = "hako.agent"
LOG_PORT = "hako.log"
VSOCK_PORT = 1024
_PORT_WAIT = 10.0  # seconds to wait for the host to announce the agent port
_RECONNECT_POLL = 0.01


def main() -> None:
    start = time.clock_gettime(time.CLOCK_BOOTTIME)  # BootTimes.agent_start
    if os.getpid() != 1:
        raise SystemExit("hako-agent runs as PID 1 of a sandbox VM (it mounts and reboots the machine)")
    from hako_agent import linux, log, system

    linux.ignore_signal(2)  # SIGINT: a KeyboardInterrupt in PID 1 would panic the kernel
    system.mount_all(system.PROC_MOUNT)
    if system.root_is_initramfs():
        linux.umount2("/proc")
        system.leave_initramfs()
        system.mount_all(system.PROC_MOUNT)
    system.mount_all(system.EARLY_MOUNTS)
    system.ensure_stdio()
    cmdline = system.read_cmdline()
    system.load_modules()
    system.mount_all(system.LATE_MOUNTS, strict=False)
    system.enable_cgroup_controllers("/sys/fs/cgroup")
    mounted = system.boottime()

    vsock = cmdline.get("hako.channel") == "vsock"
    ports = system.virtio_ports() if vsock else system.wait_for_port(AGENT_PORT, _PORT_WAIT)
    debug = cmdline.get("hako.debug") == "1"
    if LOG_PORT in ports:
        log.configure(os.open(ports[LOG_PORT], os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC), debug=debug)
    else:
        log.configure(os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC), kmsg=True, debug=debug)
    log.info(f"agent starting (pid {os.getpid()}, channel {'vsock' if vsock else 'virtio-serial'})")
    found = system.boottime()

    import sys
    import threading

    # Lazy PLT binding for the C++ protobuf extension: Python dlopens with RTLD_NOW, which
    # resolves ~3,800 symbols of libprotobuf and libstdc++ up front (slow under emulation).
    sys.setdlopenflags(os.RTLD_LAZY)
    from hako_agent.service import AgentService, BootTimes
    from hako_api import agent_pb2
    from hako_ttrpc import Server

    service = AgentService(BootTimes(start), power_off=system.power_off)
    server = Server(log=log.error)
    server.register_service(agent_pb2.DESCRIPTOR.services_by_name["Agent"], service)
    service.boot.agent_ready = ready = system.boottime()
    log.info(f"agent ready at {ready:.3f}s (started at {start:.3f}s)")
    log.debug(
        f"boot: system set up in {mounted - start:.3f}s, channel found in {found - mounted:.3f}s, "
        f"ttRPC + protobuf imported and service registered in {ready - found:.3f}s"
    )
    threading.Thread(target=_after_ready, args=(service,), name="warm-up", daemon=True).start()

    if vsock:
        _serve_vsock(server)
    elif AGENT_PORT in ports:
        _serve_virtio(server, ports[AGENT_PORT])
    log.error(f"no host channel: virtio-serial port {AGENT_PORT!r} not found")
    while True:  # PID 1 must not exit (the kernel would panic); the host will time out
        time.sleep(3600)


def _after_ready(service: AgentService) -> None:
    from hako_agent import log, system

    start = time.monotonic()
    try:
        system.loopback_up()
    except OSError as exc:
        log.error(f"cannot bring up lo: {exc.strerror}")
    try:
        service.warm_up()
    except Exception:
        log.exception("warm-up failed")
    log.debug(f"warm-up done in {time.monotonic() - start:.3f}s")


def _serve_virtio(server: Server, path: str) -> None:
    """Serve the port; on host disconnect keep everything running and wait for a reconnect."""
    import select

    from hako_agent import log
    from hako_ttrpc import FdTransport

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            log.error(f"cannot open {path}: {exc.strerror}")
            time.sleep(1.0)
            continue
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if any(events & select.POLLHUP for _, events in poller.poll(0)):
            os.close(fd)  # the host is not connected (yet, or again)
            time.sleep(_RECONNECT_POLL)
            continue
        log.debug("host connected")
        try:
            server.serve(FdTransport(fd))
        except Exception:
            log.exception("serving the host channel failed")
        log.info("host disconnected; waiting for it to come back")


def _serve_vsock(server: Server) -> None:
    import socket

    from hako_agent import log

    while True:
        listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind((socket.VMADDR_CID_ANY, VSOCK_PORT))
            listener.listen(8)
            log.debug(f"listening on vsock port {VSOCK_PORT}")
            server.serve_listener(listener)  # each connection in its own thread
        except Exception:
            log.exception(f"serving vsock port {VSOCK_PORT} failed")
            time.sleep(1.0)
        finally:
            listener.close()


if __name__ == "__main__":
    main()
