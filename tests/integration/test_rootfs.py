"""The container's rootfs: a block device made from the image (the default), or shared over 9p."""

from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest

from hako.image.disk import DISK_IMAGE
from hako.image.store import ImageStore
from tests.integration.harness import BUSYBOX, Hako

pytestmark = pytest.mark.integration

ROOT_MOUNT = "awk '$2 == \"/\" {print $1, $3}' /proc/mounts"


def base_disk(image_store: Path) -> Path:
    return ImageStore(image_store).get(BUSYBOX).path / DISK_IMAGE


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_block_rootfs_is_an_ext4_disk_by_default(hako: Hako) -> None:
    result = hako("run", "--rm", BUSYBOX, "sh", "-c", f"{ROOT_MOUNT}; ls /", check=True)
    root, *listing = result.stdout.split("\n")
    device, fstype = root.split()
    assert device.startswith("/dev/vd") and fstype == "ext4", root
    assert "bin" in listing and "lost+found" not in listing


def test_9p_rootfs_on_request(hako: Hako) -> None:
    result = hako("run", "--rm", "--rootfs", "9p", BUSYBOX, "sh", "-c", ROOT_MOUNT, check=True)
    assert result.stdout.split()[1] == "9p", result.stdout


def test_writes_stay_in_the_containers_own_layer(hako: Hako, image_store: Path) -> None:
    hako("run", "--rm", BUSYBOX, "true", check=True)  # the image's disk exists from now on
    disk = base_disk(image_store)
    before = digest(disk)
    write = "echo mine > /etc/written; rm /bin/ls; cat /etc/written"
    assert hako("run", "--rm", BUSYBOX, "sh", "-c", write, check=True).stdout == "mine\n"
    after = hako("run", "--rm", BUSYBOX, "sh", "-c", "cat /etc/written; ls /bin/ls")
    assert "mine" not in after.stdout and after.stdout.strip() == "/bin/ls", after
    assert digest(disk) == before, "a container wrote to the image's base disk"


def test_the_writable_layer_lives_and_goes_with_its_container(hako: Hako) -> None:
    sandbox_id = hako(
        "run", "-d", "--name", "writer", BUSYBOX, "sh", "-c", "echo kept > /kept; sleep 1000", check=True
    ).stdout.strip()
    layer = hako.run_root / "sandboxes" / sandbox_id / "containers" / sandbox_id / "rootfs.qcow2"
    assert layer.is_file()
    deadline = time.monotonic() + 30
    while hako("exec", "writer", "cat", "/kept").stdout != "kept\n" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hako("exec", "writer", "cat", "/kept").stdout == "kept\n"
    hako("rm", "-f", "writer", check=True)
    assert not layer.exists() and hako.sandbox_dirs() == []


def test_volumes_reach_a_block_rootfs(hako: Hako, tmp_path: Path) -> None:
    shared = tmp_path / "data"
    shared.mkdir()
    (shared / "in").write_text("from host\n")
    script = f"{ROOT_MOUNT}; cat /data/in; echo back > /data/out"
    result = hako("run", "--rm", "-v", f"{shared}:/data", BUSYBOX, "sh", "-c", script, check=True)
    assert result.stdout.split("\n")[1:] == ["from host", ""], result.stdout
    assert result.stdout.split()[1] == "ext4"
    assert (shared / "out").read_text() == "back\n"


def test_cold_boot_and_template_clone_both_mount_the_disk(hako: Hako) -> None:
    # A clone's guest cached the empty slot's blocks when the template booted: it must not
    # see them in place of the disk it was given.
    for template in ("off", "auto"):
        result = hako("run", "--rm", "--template", template, BUSYBOX, "sh", "-c", ROOT_MOUNT, check=True)
        assert result.stdout.split()[1] == "ext4", (template, result.stdout)


def test_block_rootfs_needs_an_image(hako: Hako, image_store: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "rootfs").symlink_to(ImageStore(image_store).get(BUSYBOX).rootfs)
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)  # a valid config.json
    refused = hako("run", "--rm", "--rootfs", "block", str(bundle))
    assert refused.returncode == 125
    assert "--rootfs block needs an image" in refused.stderr and "\n" not in refused.stderr.strip()
    assert hako.sandbox_dirs() == []


def test_removing_the_image_removes_its_disk(hako: Hako, tmp_path: Path) -> None:
    from hako.image.busybox import build_busybox_image

    own = Hako({**hako.env, "HAKO_IMAGES": str(tmp_path / "images")}, hako.run_root)  # not the shared store
    own("image", "import", str(build_busybox_image(tmp_path / "layout")), check=True)
    own("run", "--rm", BUSYBOX, "true", check=True)
    disk = ImageStore(tmp_path / "images").get(BUSYBOX).path / DISK_IMAGE
    assert disk.is_file()
    # Not while a container uses it (as docker rmi); -f only when none of them runs.
    own("run", "-d", "--name", "user", BUSYBOX, "sleep", "1000", check=True)
    own("run", "--name", "done", BUSYBOX, "true", check=True)
    for argv in (("image", "rm", BUSYBOX), ("image", "rm", "-f", BUSYBOX)):
        refused = own(*argv)
        assert refused.returncode == 125 and "in use by running container user" in refused.stderr
    own("rm", "-f", "user", check=True)
    refused = own("image", "rm", BUSYBOX)
    assert refused.returncode == 125 and "in use by exited container done" in refused.stderr
    assert disk.is_file()
    own("image", "rm", "-f", BUSYBOX, check=True)
    assert not disk.exists()
    own("rm", "done", check=True)
