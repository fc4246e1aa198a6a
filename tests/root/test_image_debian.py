"""The nginx, fio and iperf3 images, built from Debian's archive, run with nothing from the host.

Each image is built, imported into a private store and its programs run in the unpacked rootfs
under ``chroot``: the library check at build time is only a claim until the binaries start.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hako.image.busybox import build_busybox_image
from hako.image.debian import INDEX_HTML, build_fio_image, build_iperf3_image, build_nginx_image
from hako.image.store import Image, ImageStore

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chroot)"),
    pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs Debian's apt to fetch the packages"),
]

PROBE_PACKAGE = "libsctp1"  # small: whether `apt-get download` reaches the archive at all
WWW_DATA = 33  # the nginx image's worker user, as Debian numbers it


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hako-test-debian-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def store(workdir: Path) -> ImageStore:
    probe = workdir / "probe"
    probe.mkdir()
    done = subprocess.run(
        ["apt-get", "download", "-q", PROBE_PACKAGE], cwd=probe, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("E: ")]
        pytest.skip(f"apt-get download cannot reach the Debian archive: {(errors or ['no error'])[-1]}")
    return ImageStore(root=workdir / "store")


def _import(build: Callable[..., Path], kind: str, workdir: Path, store: ImageStore) -> Image:
    return store.import_path(build(workdir / "layouts" / kind))


@pytest.fixture(scope="module")
def nginx(workdir: Path, store: ImageStore) -> Image:
    return _import(build_nginx_image, "nginx", workdir, store)


@pytest.fixture(scope="module")
def fio(workdir: Path, store: ImageStore) -> Image:
    return _import(build_fio_image, "fio", workdir, store)


@pytest.fixture(scope="module")
def iperf3(workdir: Path, store: ImageStore) -> Image:
    return _import(build_iperf3_image, "iperf3", workdir, store)


def _env(image: Image) -> dict[str, str]:
    """The image's environment only (its PATH finds /usr/sbin/nginx), nothing of the host's."""
    return dict(item.split("=", 1) for item in image.config.env)


def _chroot(image: Image, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(image.rootfs), *argv],
        env=_env(image),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_fio_runs(fio: Image) -> None:
    assert fio.config.cmd == ("fio", "--version")
    done = _chroot(fio, *fio.config.cmd)
    assert done.returncode == 0, done.stderr
    assert re.match(r"fio-3\.\d+", done.stdout)


def test_iperf3_runs(iperf3: Image) -> None:
    assert iperf3.config.cmd == ("iperf3", "-s")
    assert iperf3.config.exposed_ports == ("5201/tcp",)
    done = _chroot(iperf3, "iperf3", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("iperf 3.")


def test_nginx_config_is_valid(nginx: Image) -> None:
    assert nginx.config.cmd == ("nginx",)
    assert nginx.config.exposed_ports == ("80/tcp",)
    done = _chroot(nginx, "nginx", "-t", "-c", "/etc/nginx/nginx.conf")
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _children(pid: int) -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children.update(map(int, (task / "children").read_text().split()))
    return children


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited with {proc.returncode}: {log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nginx did not listen on port {port}: {log.read_text()}")


def test_nginx_serves_the_page(nginx: Image, workdir: Path) -> None:
    """nginx started as the image's config says, but on a free port of 127.0.0.1 (the image's
    config rewritten into a copy), so that it can run beside anything on the host's port 80."""
    port = _free_port()
    conf = (nginx.rootfs / "etc/nginx/nginx.conf").read_text()
    listens = ("listen 80 default_server;", "listen [::]:80 default_server;")
    assert all(line in conf for line in listens)
    test_conf = nginx.rootfs / "etc/nginx/test.conf"
    test_conf.write_text(conf.replace(listens[0], f"listen 127.0.0.1:{port};").replace(listens[1], ""))
    log = workdir / "nginx.log"
    with log.open("wb") as out:
        # chroot execs nginx: the PID is nginx's master process.
        proc = subprocess.Popen(
            ["chroot", str(nginx.rootfs), "nginx", "-c", "/etc/nginx/test.conf"],
            env=_env(nginx),
            stdout=out,
            stderr=out,
        )
    workers: set[int] = set()
    try:
        _wait_for_port(port, proc, log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/html"  # from mime.types
            assert response.read().decode() == INDEX_HTML
        workers = _children(proc.pid)  # one served the page, so it is there
        assert [_uid(pid) for pid in workers] == [WWW_DATA]  # the preset's user, by name
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:
            with contextlib.suppress(OSError):  # gone with the master, as it should be
                if b"nginx" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        test_conf.unlink()


def test_images_share_busybox_layer(
    nginx: Image, fio: Image, iperf3: Image, workdir: Path, store: ImageStore
) -> None:
    busybox = store.import_path(build_busybox_image(workdir / "layouts" / "busybox"))
    for image in (nginx, fio, iperf3):
        assert len(image.layers) == 2
        assert image.layers[0] == busybox.layers[0]


def test_rebuild_gives_the_same_image_and_the_tar_imports(
    iperf3: Image, workdir: Path, store: ImageStore
) -> None:
    tar = build_iperf3_image(workdir / "again" / "iperf3", tar=True)
    assert tar == workdir / "again" / "iperf3.tar"
    assert store.import_path(tar).id == iperf3.id
