"""VM templates: sandboxes restored from a saved, booted VM instead of booting one.

Each test runs with its own template store, so that what it does to templates (corrupting
them, removing them) meets no other test.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from hako.network import host
from tests.integration.harness import BUSYBOX, Hako, qemu_pids_under

pytestmark = pytest.mark.integration


@pytest.fixture
def own_templates(hako: Hako, tmp_path: Path) -> Path:
    store = tmp_path / "templates"
    hako.env["HAKO_TEMPLATES"] = str(store)
    return store


def _timing(hako: Hako, *args: str) -> tuple[dict[str, float], str]:
    result = hako("run", "--rm", "--timing-json", *args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stderr.strip().splitlines()[-1])
    figures: dict[str, float] = report["timing"]
    return figures, result.stdout


def _templates(store: Path) -> list[Path]:
    return (
        sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
        if store.is_dir()
        else []
    )


def test_first_run_makes_the_template_and_later_runs_restore_it(hako: Hako, own_templates: Path) -> None:
    first, out = _timing(hako, BUSYBOX, "echo", "one")
    assert out == "one\n"
    [template] = _templates(own_templates)
    assert {p.name for p in template.iterdir()} == {"memory", "state", "meta.json"}
    assert "restore" in first  # made first, then restored from

    second, out = _timing(hako, BUSYBOX, "echo", "two")
    assert out == "two\n"
    assert "restore" in second and "guest_kernel" not in second
    assert _templates(own_templates) == [template]  # reused, not rebuilt

    listing = hako("template", "ls", check=True).stdout
    assert template.name in listing and "256 MiB" in listing


def test_template_off_boots(hako: Hako, own_templates: Path) -> None:
    figures, out = _timing(hako, "--template", "off", BUSYBOX, "echo", "cold")
    assert out == "cold\n"
    assert "guest_kernel" in figures and "restore" not in figures
    assert _templates(own_templates) == []


def test_clones_have_their_own_identity(hako: Hako, own_templates: Path) -> None:
    """Two clones of one template: different random bytes, hostnames and boot ids, and a clock
    that is the host's now, not the template's."""
    hako("template", "create", check=True)
    script = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; date +%s; " + (
        "cat /proc/sys/kernel/random/boot_id"
    )
    time.sleep(2)  # the template's clock is now behind
    outputs = []
    for _ in range(2):
        before = time.time()
        figures, out = _timing(hako, BUSYBOX, "sh", "-c", script)
        assert "restore" in figures
        random_hex, hostname, clock, boot_id = out.split()
        assert len(random_hex) == 64
        assert before - 2 <= int(clock) <= time.time() + 2
        outputs.append((random_hex, hostname, boot_id))
    (random_a, host_a, boot_a), (random_b, host_b, boot_b) = outputs
    assert random_a != random_b
    assert host_a != host_b
    assert boot_a != boot_b


def test_volumes_and_rootfs_reach_a_restored_vm(hako: Hako, own_templates: Path, tmp_path: Path) -> None:
    volume = tmp_path / "data"
    volume.mkdir()
    (volume / "in.txt").write_text("from the host\n")
    figures, out = _timing(
        hako, "-v", f"{volume}:/data", BUSYBOX, "sh", "-c", "cat /data/in.txt; echo back > /data/out.txt"
    )
    assert "restore" in figures
    assert out == "from the host\n"
    assert (volume / "out.txt").read_text() == "back\n"


def test_private_mode_shares_no_pages_and_leaves_no_copy(hako: Hako, own_templates: Path) -> None:
    hako("template", "create", check=True)
    hako("run", "-d", "--name", "private", "--template", "private", BUSYBOX, "sleep", "1000", check=True)
    [sandbox] = hako.sandbox_dirs()
    [qemu] = qemu_pids_under(sandbox)
    maps = Path(f"/proc/{qemu}/maps").read_text()
    assert str(sandbox / "memory") in maps  # its own copy of the RAM
    assert str(own_templates) not in maps  # nothing of the template's file
    assert hako("exec", "private", "echo", "hi").stdout == "hi\n"
    hako("rm", "-f", "private", check=True)
    assert not (sandbox / "memory").exists()


def test_corrupt_template_is_detected_and_rebuilt(hako: Hako, own_templates: Path) -> None:
    hako("template", "create", check=True)
    [template] = _templates(own_templates)
    (template / "state").write_bytes(b"not a migration stream")
    result = hako("run", "--rm", BUSYBOX, "echo", "fine")
    assert (result.returncode, result.stdout) == (0, "fine\n"), result.stderr
    assert "does not match its digest" in result.stderr and "booting cold" in result.stderr
    [rebuilt] = _templates(own_templates)  # the same inputs: the same key, made anew
    meta = json.loads((rebuilt / "meta.json").read_text())
    assert meta["state_sha256"] == hashlib.sha256((rebuilt / "state").read_bytes()).hexdigest()


def test_a_template_qemu_cannot_load_falls_back_to_a_boot(hako: Hako, own_templates: Path) -> None:
    """A state that passes the checks but that QEMU refuses: the VM is booted instead, never a
    hang, and the template is removed."""
    hako("template", "create", check=True)
    [template] = _templates(own_templates)
    state = template / "state"
    state.write_bytes(state.read_bytes()[:4096])  # a truncated stream, with a digest to match
    meta = json.loads((template / "meta.json").read_text())
    meta["state_sha256"] = hashlib.sha256(state.read_bytes()).hexdigest()
    (template / "meta.json").write_text(json.dumps(meta))

    # The booted VM has a new tap: its network must work as the restored one's would have.
    reach = f"ping -c 1 -W 10 {host.gateway()} >/dev/null && echo booted"
    figures, out = _timing(hako, BUSYBOX, "sh", "-c", reach)
    assert out == "booted\n"
    assert "guest_kernel" in figures and "restore" not in figures
    assert _templates(own_templates) == []  # removed: the next run makes it anew


def test_template_rm(hako: Hako, own_templates: Path) -> None:
    made = hako("template", "create", check=True).stdout.split()[0]
    missing = hako("template", "rm", "nosuchkey")
    assert missing.returncode == 125 and "no template" in missing.stderr
    assert hako("template", "rm", made[:6], check=True).stdout.strip() == made
    assert _templates(own_templates) == []
    assert qemu_pids_under(own_templates) == []
