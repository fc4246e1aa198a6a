#!/usr/bin/env python3
"""``ctr run --rm ... true`` with hako's shim next to runc's: wall time, median, and the ratio.

A private containerd (its own config, root, state and sockets in a temp dir: the harness of the
containerd tests) with the busybox image built from Debian's busybox-static. Runs alternate
between the runtimes, so drift in the machine's speed hits both alike. After the runs, the
daemon is stopped and anything left behind is reported (and fails the benchmark).

    sudo .venv/bin/python bench/ctr.py [--runs 10] [--debug]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: tests.containerd, bench

from bench.boot import machine
from hako.hypervisor import choose
from tests.containerd.harness import HAKO, NAMESPACE, RUNC, Containerd, Runtime, unique_id


def run_once(daemon: Containerd, runtime: Runtime) -> float:
    ctr = daemon.ctr(NAMESPACE)
    container = unique_id(f"bench-{runtime.name}")
    started = time.perf_counter()
    result = ctr.run(runtime, container, "true")
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"ctr run with {runtime.type} failed ({result.returncode}): {result.stderr.strip()}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per runtime (median reported)")
    parser.add_argument("--debug", action="store_true", help="containerd at debug level (slower)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/ctr.py runs containerd and VMs: run it as root")

    accel = choose("auto")
    print(f"machine: {machine()}")
    print(f"accelerator for hako: {accel.name.upper()} ({accel.reason})")
    daemon = Containerd(debug=args.debug)
    problems: list[str] = []
    try:
        daemon.start()
        daemon.import_images((NAMESPACE,))
        runtimes = (RUNC, HAKO)
        for runtime in runtimes:  # one warm-up each: page cache, snapshot unpack, Python bytecode
            run_once(daemon, runtime)
        times: dict[Runtime, list[float]] = {runtime: [] for runtime in runtimes}
        for _ in range(args.runs):
            for runtime in runtimes:
                times[runtime].append(run_once(daemon, runtime))
    finally:
        problems = daemon.close()

    print(f"runs: {args.runs} per runtime, interleaved, after a warm-up each; wall time of ctr\n")
    print(f"{'ctr run --rm IMG true':<34}{'median':>10}{'min':>10}{'max':>10}")
    for runtime, values in times.items():
        label = f"{runtime.type}" + (f" ({accel.name.upper()})" if runtime.vm else "")
        print(
            f"{label:<34}{statistics.median(values) * 1000:8.0f} ms"
            f"{min(values) * 1000:8.0f} ms{max(values) * 1000:8.0f} ms"
        )
    ratio = statistics.median(times[HAKO]) / statistics.median(times[RUNC])
    print(f"\nhako / runc: {ratio:.1f}x (goal: within 3x once VM templates exist)")
    if problems:
        raise SystemExit("left behind:\n" + "\n".join(problems))


if __name__ == "__main__":
    main()
