#!/usr/bin/env python3
"""Start-up paths side by side: a cold boot, a restore from a VM template, and the host's own
sandboxes (runc, and gVisor's runsc with its ptrace platform) for the same busybox.

Medians of N runs (default 10), interleaved so that drift in the machine's speed hits all
paths alike:

- to agent ready: the sandbox daemon starting (it makes the network namespace, then launches
  QEMU) until the guest agent answers (``boot_total`` for a boot, ``restore`` for a clone),
  or the claim of a paused VM from the warm pool (``pool_take``: resume, clock, entropy), as
  ``hako run`` records them;
- ``hako run --rm IMG true``, wall time, for each path;
- ``runc run`` and ``runsc --platform=ptrace run`` of a bundle with the same rootfs, wall time;
- under TCG, the boot of a stub guest, the yardstick of the machine's speed for emulated code
  (bench/boot.py's ``stub_boot``);

then the host memory per idle cloned sandbox (PSS of its QEMU and of its daemon, with
``--clones`` of them running at once; the template's pages are shared between them), for
clones that ``hako run -d`` restored (a daemon each) and for clones it took from a warm pool
(one daemon process serves them all, the pool's keeper: each is counted its share of it), and
those again with the host's KSM
on (turned on for the measurement and restored after: it merges the identical pages that
clones write, which they offer as clones sharing the template's pages do; see
:mod:`hako.hypervisor.ksm`). QEMU's figure names the part that is TCG's translated code, which
KVM does not have.

Runs against a throw-away state, image and template store. Needs root, QEMU, the guest
assets, runc and runsc (Debian packages).

    sudo .venv/bin/python bench/start.py [--runs 10] [--clones 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for bench.boot

from bench.boot import (
    IMAGE,
    hako_command,
    host_ksm,
    machine,
    make_bundle,
    measure_memory,
    run_once,
    stub_boot,
    timed,
)
from hako.hypervisor import choose
from hako.image.busybox import build_busybox_image
from hako.image.store import ImageStore


def wait_for_pool(env: dict[str, str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = subprocess.run(
            [*hako_command(), "pool", "ls"], env=env, capture_output=True, text=True, check=False
        )
        if " ready " in listing.stdout:
            return
        time.sleep(0.2)
    raise SystemExit("the warm pool did not refill")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per path (median reported)")
    parser.add_argument("--clones", type=int, default=20, help="idle clones for the memory figure")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/start.py runs VMs and containers: run it as root")
    for tool in ("runc", "runsc"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install {tool}")

    scratch = Path(tempfile.mkdtemp(prefix="hako-bench-"))
    env = {
        **os.environ,
        "HAKO_RUN": str(scratch / "run"),
        "HAKO_IMAGES": str(scratch / "images"),
        "HAKO_TEMPLATES": str(scratch / "templates"),
    }
    try:
        store = ImageStore(scratch / "images")
        store.import_path(build_busybox_image(scratch / "busybox"))
        (scratch / "run").mkdir()
        (scratch / "run" / "tcg-notice").touch()
        bundle = scratch / "bundle"
        make_bundle(store, bundle)
        accel = choose("auto")
        print(f"machine: {machine()}")
        print(f"accelerator: {accel.name.upper()} ({accel.reason})")
        print(f"runs: {args.runs} per path, interleaved, medians; image: {IMAGE}\n")

        run_once(env, "trimmed", template="auto")  # makes the template (and warms the caches)
        runc_root, runsc_root = scratch / "runc", scratch / "runsc"
        runsc = ["runsc", "--platform=ptrace", "--network=none"]
        paths: dict[str, Callable[[int], float]] = {
            "runc": lambda i: timed(
                ["runc", "--root", str(runc_root), "run", "--bundle", str(bundle), f"b{i}"]
            ),
            "runsc": lambda i: timed(
                [*runsc, "--root", str(runsc_root), "run", "--bundle", str(bundle), f"g{i}"]
            ),
        }
        stub = stub_boot() if accel.name == "tcg" else None  # the TCG yardstick (bench/boot.py)
        stubs: list[float] = []
        walls: dict[str, list[float]] = {name: [] for name in ("boot", "restore", "pool", *paths)}
        ready: dict[str, list[float]] = {"boot": [], "restore": [], "pool": []}
        subprocess.run([*hako_command(), "pool", "fill", "1"], env=env, check=True, capture_output=True)
        for i in range(args.runs):
            cold = run_once(env, "trimmed", template="off")
            walls["boot"].append(cold["wall"])
            ready["boot"].append(cold.get("daemon_launch", 0) + cold["boot_total"])
            clone = run_once(env, "trimmed", template="auto")
            if "restore" not in clone:
                raise SystemExit("hako run did not restore from the template: see its daemon.log")
            walls["restore"].append(clone["wall"])
            ready["restore"].append(clone.get("daemon_launch", 0) + clone["restore"])
            taken = run_once(env, "trimmed", template="auto", pool=True)
            if "pool_take" not in taken:
                raise SystemExit("hako run did not take a VM from the pool: see hako pool ls")
            walls["pool"].append(taken["wall"])
            ready["pool"].append(taken["pool_take"])
            wait_for_pool(env)  # the refill hako run started: not during the next measurements
            for name, run in paths.items():
                walls[name].append(run(i))
            if stub is not None:
                stubs.append(stub())
        subprocess.run([*hako_command(), "pool", "drain"], env=env, check=True, capture_output=True)

        def ms(values: list[float]) -> str:
            return f"{statistics.median(values) * 1000:8.0f} ms"

        tag = accel.name.upper()
        runc = statistics.median(walls["runc"])
        gvisor = statistics.median(walls["runsc"])

        def row(label: str, ready_ms: str, key: str) -> None:
            wall = statistics.median(walls[key])
            print(f"{label:<44}{ready_ms:>16}{ms(walls[key]):>20}{wall / runc:8.1f}x{wall / gvisor:8.1f}x")

        print(f"{'path':<44}{'to agent ready':>16}{'run --rm IMG true':>20}{'vs runc':>9}{'vs runsc':>9}")
        row(f"hako, cold boot ({tag})", ms(ready["boot"]), "boot")
        row(f"hako, restored from a template ({tag})", ms(ready["restore"]), "restore")
        row(f"hako, taken from the warm pool ({tag})", ms(ready["pool"]), "pool")
        row("runc run", "", "runc")
        row("runsc --platform=ptrace run", "", "runsc")
        if stubs:
            print(f"the TCG yardstick, a stub guest boot (bench/boot.py's stub_boot): {ms(stubs).strip()}")

        print(f"\nhost memory per idle cloned sandbox ({args.clones} running, medians):")
        restored = measure_memory(env, args.clones, template="auto")
        print(f"  restored by hako run -d:  {restored.describe()}")
        pooled = measure_memory(env, args.clones, template="auto", pool=True)
        print(f"  taken from the warm pool: {pooled.describe()}")
        with host_ksm():
            merged = measure_memory(env, args.clones, template="auto", pool=True, ksm=True)
        print(f"  taken from the warm pool, the host's KSM on: {merged.describe()}")
        print(f"  for comparison, a booted sandbox (3 running): {measure_memory(env, 3).describe()}")
    finally:
        for root in (scratch / "runc", scratch / "runsc"):
            if root.is_dir():
                for container in root.iterdir():
                    tool = "runc" if root.name == "runc" else "runsc"
                    subprocess.run([tool, "--root", str(root), "delete", "-f", container.name], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
