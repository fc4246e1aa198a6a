#!/usr/bin/env python3
"""The seed's IO table: dd and fio inside a container, on runc, hako over 9p, hako on a block device.

The same fio image (Debian's fio and busybox, ``hako image fio``) runs one script per backend,
writing and reading in the container's own rootfs (its writable layer), as the seed's
``$dest_mnt`` test did:

- dd, 4 KiB direct writes then reads of a 64 MiB file (``oflag=direct``, ``iflag=direct``);
- fio, libaio with O_DIRECT, in the seed's three job shapes: 128 KiB blocks at queue depth 128
  (read, write); 4 KiB random at depth 32 with 16 jobs (randread, randwrite); 4 KiB at depth 1
  (read, write, randread, randwrite). Each runs ``--runtime`` seconds on a ``--size`` file.

runc's rootfs is an overlay on the host's filesystem (Docker's overlay2); hako's is its 9p
share (an overlay on the host, served by QEMU) or its qcow2 layer over the image's ext4 disk.
Prints MB/s and IOPS per test and backend.

    sudo .venv/bin/python bench/io.py [--runtime 5] [--size 64M]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datapath import BACKENDS, bench_env, print_rows, run_attached
from hako.image.debian import build_fio_image

DD_COUNT = 16384  # the seed's count=16k of bs=4k
JOBS = (  # name, rw, block size, iodepth, numjobs: the seed's three shapes
    ("seq-read 128k qd128", "read", "128k", 128, 1),
    ("seq-write 128k qd128", "write", "128k", 128, 1),
    ("rand-read 4k qd32 x16", "randread", "4k", 32, 16),
    ("rand-write 4k qd32 x16", "randwrite", "4k", 32, 16),
    ("read 4k qd1", "read", "4k", 1, 1),
    ("write 4k qd1", "write", "4k", 1, 1),
    ("rand-read 4k qd1", "randread", "4k", 1, 1),
    ("rand-write 4k qd1", "randwrite", "4k", 1, 1),
)


def script(runtime: int, size: str) -> str:
    """The shell script each container runs: markers, then what each test printed."""
    lines = [
        "set -e; mkdir -p /bench; cd /bench",
        # busybox's dd prints no rate: time it (/proc/uptime, 10 ms, on runs of seconds)
        "up() { cut -d' ' -f1 /proc/uptime; }",
        'timed() { s=$(up); dd bs=4k count=16k "$@" 2>/dev/null; echo $s $(up); }',
        "echo @dd-write; timed if=/dev/zero of=testfile oflag=direct",
        "echo @dd-read; timed if=testfile of=/dev/null iflag=direct",
        "rm -f testfile",
        # the file, laid out once, before the timed jobs
        f"fio --name=layout --filename=/bench/fio.dat --size={size} --rw=write --bs=1m --output=/dev/null",
    ]
    for name, rw, bs, depth, jobs in JOBS:
        lines.append(
            f"echo '@fio {name}'; fio --name=bench --filename=/bench/fio.dat --size={size} "
            f"--ioengine=libaio --direct=1 --rw={rw} --bs={bs} --iodepth={depth} --numjobs={jobs} "
            f"--group_reporting --time_based --runtime={runtime} --output-format=json"
        )
    lines.append("rm -f /bench/fio.dat")
    return "\n".join(lines)


def parse(output: str) -> dict[str, tuple[float, float]]:
    """Test name to (MB/s, IOPS) from the script's output."""
    results: dict[str, tuple[float, float]] = {}
    for section in ("\n" + output).split("\n@")[1:]:
        header, _, body = section.partition("\n")
        if header.startswith("dd-"):
            start, end = (float(field) for field in body.split()[:2])
            seconds = max(end - start, 0.01)
            results[header] = (DD_COUNT * 4096 / seconds / 1e6, DD_COUNT / seconds)
        elif header.startswith("fio "):
            job = json.loads(body[body.index("{") :])["jobs"][0]
            side = job["read"] if job["read"]["io_bytes"] else job["write"]
            results[header[4:]] = (side["bw_bytes"] / 1e6, side["iops"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--size", default="64M", help="fio's file size")
    args = parser.parse_args()
    with bench_env("bench/io.py") as bench:
        image = bench.image("fio", build_fio_image)
        results = {}
        for backend in BACKENDS:
            print(f"running on {backend} ...", file=sys.stderr)
            output = run_attached(bench, backend, image, ["sh", "-c", script(args.runtime, args.size)])
            results[backend] = parse(output)
        accel = bench.accel
    tests = ["dd-write", "dd-read", *(name for name, *_ in JOBS)]
    print(f"\nIO inside a container ({args.runtime} s per fio job, {args.size} file; hako under {accel})")
    rows = []
    for test in tests:
        cells = []
        for backend in BACKENDS:
            mbps, iops = results[backend].get(test, (float("nan"), float("nan")))
            cells.append(f"{mbps:8.1f} MB/s {iops:9.0f} IOPS")
        rows.append((test, *cells))
    print_rows(("test", *BACKENDS), rows)
    block, nine = results["hako+block"], results["hako+9p"]
    ratios = [f"{test} {block[test][1] / nine[test][1]:.1f}x" for test in tests if nine.get(test, (0, 0))[1]]
    print("\nhako+block vs hako+9p (IOPS): " + ", ".join(ratios))


if __name__ == "__main__":
    main()
