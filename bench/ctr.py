#!/usr/bin/env python3
"""``ctr run --rm ... true`` with hako's shim next to runc's: wall time, median, and the ratio.

A private containerd (its own config, root, state and sockets in a temp dir: the harness of the
containerd tests) with the busybox image built from Debian's busybox-static. Runs alternate
between the runtimes, so drift in the machine's speed hits both alike. hako runs twice per round:
its pod's VM restored from the template (the shim's config says ``pool = false``), and taken
from the warm pool (``hako pool fill 1 --network none``; before each such run the benchmark
waits for the pool's background refill, so that it never competes for the CPU). After the runs,
the pool is drained, the daemon is stopped and anything left behind is reported (and fails the
benchmark).

    sudo .venv/bin/python bench/ctr.py [--runs 10] [--netns] [--debug]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: tests.containerd, bench

from bench.boot import machine
from hako.hypervisor import choose
from tests.containerd.harness import HAKO, NAMESPACE, RUNC, Containerd, Runtime, pod_namespace, unique_id


@dataclass(frozen=True)
class RunPath:
    """One way to run: a runtime, and for hako where its pod's VM comes from."""

    label: str
    runtime: Runtime
    options: Sequence[str] = ()
    pooled: bool = False


def hako(daemon: Containerd, *args: str) -> None:
    result = daemon.hako(*args)
    if result.returncode != 0:
        raise SystemExit(f"hako {' '.join(args)} failed: {result.stderr.strip()}")


def wait_for_pool(daemon: Containerd, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not daemon.pool_ready():
        if time.monotonic() > deadline:
            raise SystemExit("the warm pool did not refill")
        time.sleep(0.2)


def run_once(daemon: Containerd, path: RunPath, netns: bool) -> float:
    if path.pooled:
        wait_for_pool(daemon)
        time.sleep(1.0)  # the refill's own processes end just after its VM is ready
    ctr = daemon.ctr(NAMESPACE)
    container = unique_id(f"bench-{path.runtime.name}")
    with pod_namespace() if netns else contextlib.nullcontext("") as namespace:
        options = [*path.options, *(["--with-ns", f"network:{namespace}"] if namespace else [])]
        started = time.perf_counter()
        result = ctr.run(path.runtime, container, "true", options=options)
        wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"ctr run ({path.label}) failed ({result.returncode}): {result.stderr.strip()}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per runtime (median reported)")
    parser.add_argument("--debug", action="store_true", help="containerd at debug level (slower)")
    parser.add_argument(
        "--netns",
        action="store_true",
        help="each run in a network namespace of its own, as CNI makes one for a pod (--with-ns)",
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/ctr.py runs containerd and VMs: run it as root")

    accel = choose("auto")
    print(f"machine: {machine()}")
    print(f"accelerator for hako: {accel.name.upper()} ({accel.reason})")
    daemon = Containerd(debug=args.debug)
    problems: list[str] = []
    no_pool = Path(tempfile.mkdtemp(prefix="hako-bench-")) / "hako.toml"
    no_pool.write_text("[runtime]\npool = false\n")
    tcg = f" ({accel.name.upper()})"
    paths = (
        RunPath("runc", RUNC),
        RunPath(f"hako, VM from the template{tcg}", HAKO, ("--runtime-config-path", str(no_pool))),
        RunPath(f"hako, VM from the warm pool{tcg}", HAKO, pooled=True),
    )
    try:
        daemon.start()
        daemon.import_images((NAMESPACE,))
        hako(daemon, "pool", "fill", "1", "--network", "none")
        for path in paths:  # one warm-up each: page cache, snapshot unpack, Python bytecode
            run_once(daemon, path, args.netns)
        times: dict[RunPath, list[float]] = {path: [] for path in paths}
        for _ in range(args.runs):
            for path in paths:
                times[path].append(run_once(daemon, path, args.netns))
    finally:
        if daemon.pid is not None:
            hako(daemon, "pool", "drain")
        problems = daemon.close()
        no_pool.unlink(missing_ok=True)
        no_pool.parent.rmdir()

    where = ", each in a pod's network namespace (--with-ns)" if args.netns else ""
    print(f"runs: {args.runs} per path, interleaved, after a warm-up each{where}; wall time of ctr\n")
    print(f"{'ctr run --rm IMG true':<38}{'median':>10}{'min':>10}{'max':>10}{'vs runc':>10}")
    runc = statistics.median(times[paths[0]])
    for path, values in times.items():
        median = statistics.median(values)
        print(
            f"{path.label:<38}{median * 1000:8.0f} ms"
            f"{min(values) * 1000:8.0f} ms{max(values) * 1000:8.0f} ms{median / runc:9.1f}x"
        )
    if problems:
        raise SystemExit("left behind:\n" + "\n".join(problems))


if __name__ == "__main__":
    main()
