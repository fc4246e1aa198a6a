#!/usr/bin/env python3
"""The seed's nginx table: ``ab -kn 100000 -c 100`` from the host against nginx in a container on
runc, hako over 9p and hako on a block device; then iperf3 from the host into the container.

nginx is Debian's, in an image built here (``hako image nginx``: one worker process, access log
off, a 619-byte page from the container's rootfs). Each backend serves at its own address,
reached from the host: runc's container in a network namespace of its own joined by a veth
pair, hako's sandbox on hako's default network. A short warm-up precedes each measured run.
``ab`` stops at ``--requests`` or after ``--time-limit`` seconds, whichever comes first (under
emulation 100,000 requests can take minutes); the table says how many it completed.

    sudo .venv/bin/python bench/nginx.py [--requests 100000] [--time-limit 60] [--iperf-seconds 10]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datapath import BACKENDS, bench_env, print_rows, serving
from hako.image.debian import build_iperf3_image, build_nginx_image

RATE = re.compile(r"Requests per second:\s+([\d.]+)")
COMPLETE = re.compile(r"Complete requests:\s+(\d+)")
FAILED = re.compile(r"Failed requests:\s+(\d+)")


def ab(address: str, requests: int, time_limit: int, concurrency: int = 100) -> tuple[float, int, int]:
    """Requests per second, completed and failed requests of one ``ab -k`` run."""
    argv = ["ab", "-q", "-k", "-t", str(time_limit), "-n", str(requests), "-c", str(concurrency)]
    result = subprocess.run([*argv, f"http://{address}/"], capture_output=True, text=True, check=False)
    rate, complete = RATE.search(result.stdout), COMPLETE.search(result.stdout)
    if rate is None or complete is None:
        raise SystemExit(f"ab against {address} failed: {result.stderr.strip() or result.stdout.strip()}")
    failed = FAILED.search(result.stdout)
    return float(rate.group(1)), int(complete.group(1)), int(failed.group(1)) if failed else 0


def iperf3(address: str, seconds: int, timeout: float = 120) -> float:
    """Host-to-container throughput in Gbit/s (what the server received), once the server is up."""
    argv = ["iperf3", "-c", address, "-t", str(seconds), "-J"]
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        try:
            report = json.loads(result.stdout)
        except ValueError:
            report = {"error": result.stderr.strip()}
        if "error" not in report:
            return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9
        if time.monotonic() > deadline:
            raise SystemExit(f"iperf3 against {address} failed: {report['error']}")
        time.sleep(0.5)  # not listening yet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="ab -n")
    parser.add_argument("--time-limit", type=int, default=60, help="ab -t: seconds at most per backend")
    parser.add_argument("--iperf-seconds", type=int, default=10, help="iperf3 -t")
    args = parser.parse_args()
    for tool, package in (("ab", "apache2-utils"), ("iperf3", "iperf3")):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install {package}")
    nginx_rates: dict[str, tuple[float, int, int]] = {}
    throughput: dict[str, float] = {}
    with bench_env("bench/nginx.py") as bench:
        nginx = bench.image("nginx", build_nginx_image)
        iperf = bench.image("iperf3", build_iperf3_image)
        for backend in BACKENDS:
            print(f"nginx on {backend} ...", file=sys.stderr)
            with serving(bench, backend, nginx, ["nginx"], 80) as address:
                ab(address, 1000, 30)  # warm-up: connections, page cache, translated code
                nginx_rates[backend] = ab(address, args.requests, args.time_limit)
        for backend in ("runc", "hako+block"):
            print(f"iperf3 on {backend} ...", file=sys.stderr)
            with serving(bench, backend, iperf, ["iperf3", "-s"], None) as address:
                throughput[backend] = iperf3(address, args.iperf_seconds)
        accel = bench.accel

    runc = nginx_rates["runc"][0]
    print(f"\nnginx, ab -k -c 100 -n {args.requests} (at most {args.time_limit} s); hako under {accel}")
    rows = []
    for backend in BACKENDS:
        rate, complete, failed = nginx_rates[backend]
        rows.append((backend, f"{rate:,.2f}", f"{complete:,}", f"{failed:,}", f"{rate / runc:.3f}"))
    print_rows(("backend", "requests/s", "completed", "failed", "vs runc"), rows)
    block, nine = nginx_rates["hako+block"][0], nginx_rates["hako+9p"][0]
    print(f"hako+block vs hako+9p: {block / nine:.1f}x")
    print(f"\niperf3, host to container, {args.iperf_seconds} s; hako under {accel}")
    print_rows(
        ("backend", "Gbit/s", "vs runc"),
        [(b, f"{g:.2f}", f"{g / throughput['runc']:.3f}") for b, g in throughput.items()],
    )


if __name__ == "__main__":
    main()
