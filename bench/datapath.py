"""What the data-path benchmarks (io, nginx, iperf3) share: the same image run three ways.

- ``runc``: the image's rootfs as an overlay on the host's filesystem (Docker's overlay2), in a
  network namespace of its own joined to the host by a veth pair (Docker's default network, minus
  the bridge);
- ``hako+9p`` and ``hako+block``: ``hako run --rootfs 9p|block``, on hako's default network.

Each runs detached and is reached at its own address from the host. Everything runs against a
throw-away state and image store, and everything made is removed afterwards (by name or PID).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.boot import hako_command, machine
from hako.hypervisor import choose
from hako.image.store import ImageStore

BACKENDS = ("runc", "hako+9p", "hako+block")
RUNC_NETWORK = ("10.211.0.1", "10.211.0.2")  # host end, container end (a /30)


@dataclass
class Bench:
    scratch: Path
    env: dict[str, str]
    store: ImageStore
    accel: str  # hako's accelerator, named in every table: "TCG" or "KVM"

    def hako(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*hako_command(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise SystemExit(
                f"hako {' '.join(args[:4])} ... failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def image(self, name: str, build: Callable[[Path], Path]) -> str:
        """Build an image (``build(out)`` writes a layout) and import it; returns its name."""
        layout = build(self.scratch / name)
        imported = self.store.import_path(layout)
        return imported.names[0]


@contextlib.contextmanager
def bench_env(title: str) -> Iterator[Bench]:
    if os.geteuid() != 0:
        raise SystemExit(f"{title} runs VMs and runc: run it as root")
    for tool in ("runc",):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install {tool}")
    accel = choose("auto")
    print(f"machine: {machine()}")
    print(f"accelerator for hako: {accel.name.upper()} ({accel.reason})")
    scratch = Path(tempfile.mkdtemp(prefix="hako-bench-", dir="/var/tmp"))
    env = {**os.environ, "HAKO_RUN": str(scratch / "run"), "HAKO_IMAGES": str(scratch / "images")}
    try:
        yield Bench(scratch, env, ImageStore(scratch / "images"), accel.name.upper())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def runc_bundle(bench: Bench, image: str, args: list[str]) -> Iterator[list[str]]:
    """A runc bundle of ``image`` running ``args``: its rootfs an overlay of the image's, its
    network namespace joined to the host at RUNC_NETWORK. Yields ``runc run`` without ``-d``."""
    rootfs = bench.store.get(image).rootfs
    name = f"hakobench{os.getpid()}"
    work = bench.scratch / name
    bundle, upper, workdir, merged = (work / d for d in ("bundle", "upper", "work", "rootfs"))
    for directory in (bundle, upper, workdir, merged):
        directory.mkdir(parents=True)
    layers = f"lowerdir={rootfs},upperdir={upper},workdir={workdir}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", layers, str(merged)], check=True)
    runc = ["runc", "--root", str(work / "state")]
    try:
        _runc_network(name)
        subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"] = {"path": str(merged), "readonly": False}
        spec["process"].update(args=args, terminal=False)
        # nginx's master changes to its worker's user, as under Docker's default capabilities
        extra = ["CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_DAC_OVERRIDE"]
        caps = spec["process"]["capabilities"]
        spec["process"]["capabilities"] = {kind: sorted({*names, *extra}) for kind, names in caps.items()}
        for namespace in spec["linux"]["namespaces"]:
            if namespace["type"] == "network":
                namespace["path"] = f"/run/netns/{name}"
        (bundle / "config.json").write_text(json.dumps(spec))
        yield [*runc, "run", "--bundle", str(bundle), name]
    finally:
        subprocess.run([*runc, "delete", "-f", name], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["umount", str(merged)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def run_attached(bench: Bench, backend: str, image: str, args: list[str], timeout: float = 1800) -> str:
    """Run ``args`` in a container of ``image`` under ``backend`` to the end; its output."""
    if backend == "runc":
        with runc_bundle(bench, image, args) as run:
            result = subprocess.run(run, capture_output=True, text=True, timeout=timeout, check=False)
    else:
        rootfs = backend.partition("+")[2]
        result = bench.hako("run", "--rm", "--no-pool", "--rootfs", rootfs, image, *args, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{backend}: {' '.join(args[:3])} ... failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _runc_network(name: str) -> None:
    host_end, container_end = RUNC_NETWORK
    for argv in (
        ["ip", "netns", "add", name],
        ["ip", "link", "add", f"{name[:11]}h", "type", "veth", "peer", "name", "eth0", "netns", name],
        ["ip", "addr", "add", f"{host_end}/30", "dev", f"{name[:11]}h"],
        ["ip", "link", "set", f"{name[:11]}h", "up"],
        ["ip", "-n", name, "addr", "add", f"{container_end}/30", "dev", "eth0"],
        ["ip", "-n", name, "link", "set", "eth0", "up"],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        ["ip", "-n", name, "route", "add", "default", "via", host_end],
    ):
        subprocess.run(argv, check=True)


@contextlib.contextmanager
def hako_container(bench: Bench, image: str, args: list[str], rootfs: str) -> Iterator[str]:
    """A detached hako container of ``image`` with its rootfs over ``rootfs``; yields its address."""
    name = f"bench-{rootfs}-{os.getpid()}"
    sandbox_id = bench.hako(
        "run", "-d", "--no-pool", "--rootfs", rootfs, "--name", name, image, *args
    ).stdout.strip()
    try:
        state = json.loads((bench.scratch / "run" / "sandboxes" / sandbox_id / "state.json").read_text())
        yield str(state["address"])
    finally:
        bench.hako("rm", "-f", name, check=False)


@contextlib.contextmanager
def serving(bench: Bench, backend: str, image: str, args: list[str], port: int | None) -> Iterator[str]:
    """``image`` serving under ``backend``; yields its address once ``port`` answers (at once
    with None: for a server that a probe's connection would upset, such as iperf3's)."""
    if backend == "runc":
        with runc_bundle(bench, image, args) as run:
            run.insert(-3, "-d")
            quiet = subprocess.DEVNULL
            subprocess.run(run, check=True, stdin=quiet, stdout=quiet, stderr=quiet)
            if port is not None:
                wait_for_port(RUNC_NETWORK[1], port)
            yield RUNC_NETWORK[1]
        return
    with hako_container(bench, image, args, backend.partition("+")[2]) as address:
        if port is not None:
            wait_for_port(address, port)
        yield address


def wait_for_port(address: str, port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing answered on {address}:{port} within {timeout:g} s") from None
            time.sleep(0.2)


def print_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A table with its first column to the left and the figures to the right."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [
            cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells))
