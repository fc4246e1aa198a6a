"""Asset cache keys, the kernel fragment check, module load order: no root, no VM, no apt."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hako.assets import _cache, _debs, _elf, _image, _kconfig, _modules, _trimmed
from hako.assets._progress import Reporter
from hako.errors import AssetError

# -- cache keys -----------------------------------------------------------------------------------


def _trimmed_key(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    version: str,
    fragment: str,
    recipe: str = _trimmed.RECIPE,
) -> str:
    frag = tmp_path / f"frag-{abs(hash(fragment))}.config"
    frag.write_text(fragment)
    monkeypatch.setattr(_trimmed, "fragment_path", lambda: frag)
    monkeypatch.setattr(_trimmed, "_source_version", lambda: version)
    monkeypatch.setattr(_trimmed, "RECIPE", recipe)
    return _trimmed.key()


def test_kernel_key_changes_with_each_input(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = _trimmed_key(monkeypatch, tmp_path, "6.1.192-2", "CONFIG_A=y\n")
    assert base == _trimmed_key(monkeypatch, tmp_path, "6.1.192-2", "CONFIG_A=y\n")
    assert base != _trimmed_key(monkeypatch, tmp_path, "6.1.193-1", "CONFIG_A=y\n")
    assert base != _trimmed_key(monkeypatch, tmp_path, "6.1.192-2", "CONFIG_A=n\n")
    assert base != _trimmed_key(monkeypatch, tmp_path, "6.1.192-2", "CONFIG_A=y\n", recipe="trimmed-999")


def test_cache_key_parts_are_length_prefixed() -> None:
    assert _cache.cache_key("ab", "c") != _cache.cache_key("a", "bc")
    assert _cache.cache_key("x") == _cache.cache_key(b"x")


def test_image_sources_digest_follows_guest_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for pkg in _image.GUEST_PACKAGES:
        (tmp_path / pkg / "__pycache__").mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "py.typed").write_text("")
    monkeypatch.setattr(_image, "guest_sources", lambda: tmp_path)
    before = _image.sources_digest()
    (tmp_path / "hako_agent" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"ignored")
    (tmp_path / "hako_agent" / "notes.txt").write_text("ignored")
    assert _image.sources_digest() == before
    (tmp_path / "hako_agent" / "main.py").write_text("def main() -> None: ...\n")
    changed = _image.sources_digest()
    assert changed != before
    assert _image.sources_digest(init="#!/bin/sh\n") != changed
    assert "hako_agent/main.py" in _image.guest_source_files(tmp_path)


def test_new_entry_is_atomic(tmp_path: Path) -> None:
    final = tmp_path / "kernel" / "abc"
    with pytest.raises(RuntimeError), _cache.new_entry(final) as tmp:
        (tmp / "vmlinux").write_bytes(b"half")
        raise RuntimeError("build failed")
    assert not final.exists()
    assert list((tmp_path / "kernel").iterdir()) == []
    with _cache.new_entry(final) as tmp:
        (tmp / "vmlinux").write_bytes(b"whole")
        _cache.write_info(tmp, {"kind": "trimmed", "built_at": 1.0})
    assert (final / "vmlinux").read_bytes() == b"whole"
    assert [p.name for p in (tmp_path / "kernel").iterdir()] == ["abc"]


def test_stale_build_dirs_of_dead_builders_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".tmp-999999999-xyz"
    stale.mkdir()
    _cache.remove_stale(tmp_path)
    assert not stale.exists()


def test_newest_entry_matches_info(tmp_path: Path) -> None:
    for name, built, kind in (("a", 1.0, "debian"), ("b", 2.0, "debian"), ("c", 3.0, "trimmed")):
        (tmp_path / name).mkdir()
        _cache.write_info(tmp_path / name, {"kind": kind, "built_at": built})
    assert _cache.newest_entry(tmp_path, {"kind": "debian"}) == tmp_path / "b"
    assert _cache.newest_entry(tmp_path, {"kind": "other"}) is None


# -- kernel config fragment -----------------------------------------------------------------------

FRAGMENT = """# comment
CONFIG_VIRTIO=y
CONFIG_LOCALVERSION="-hako"
CONFIG_VT=n
CONFIG_KALLSYMS=n
CONFIG_NR_CPUS=64
"""


def test_fragment_check_accepts_a_config_where_everything_stuck() -> None:
    config = 'CONFIG_VIRTIO=y\nCONFIG_LOCALVERSION="-hako"\n# CONFIG_VT is not set\nCONFIG_NR_CPUS=64\n'
    _kconfig.check_fragment(FRAGMENT, config)  # KALLSYMS absent counts as n


def test_fragment_check_names_each_symbol_that_did_not_stick() -> None:
    config = 'CONFIG_LOCALVERSION="-hako"\nCONFIG_VT=y\nCONFIG_NR_CPUS=8\n'
    with pytest.raises(AssetError) as err:
        _kconfig.check_fragment(FRAGMENT, config)
    msg = str(err.value)
    assert "CONFIG_VIRTIO=y (got absent)" in msg
    assert "CONFIG_VT=n (got y)" in msg
    assert "CONFIG_NR_CPUS=64 (got 8)" in msg
    assert "3 symbol(s)" in msg and "\n" not in msg


def test_the_real_fragment_parses_and_keeps_what_the_guest_needs() -> None:
    want = _kconfig.parse(_trimmed.fragment_path().read_text())
    for sym in (
        "PVH",
        "VIRTIO_MMIO",
        "VIRTIO_PCI",
        "VIRTIO_BLK",
        "VIRTIO_NET",
        "VIRTIO_CONSOLE",
        "VIRTIO_VSOCKETS",
        "NET_9P_VIRTIO",
        "9P_FS",
        "EXT4_FS",
        "EROFS_FS",
        "OVERLAY_FS",
        "UTS_NS",
        "IPC_NS",
        "PID_NS",
        "NET_NS",
        "MEMCG",
        "CGROUP_PIDS",
        "CGROUP_SCHED",
        "CGROUP_FREEZER",
        "SERIAL_8250_CONSOLE",
        "HW_RANDOM_VIRTIO",
        "DEVTMPFS",
        "TMPFS",
        "UNIX",
        "INET",
        "SECCOMP",
        "RD_GZIP",
        "RD_LZ4",
        "CPU_MITIGATIONS",
    ):
        assert want.get(f"CONFIG_{sym}") == "y", sym
    for sym in ("VT", "INPUT", "KALLSYMS", "MODULES"):
        assert want.get(f"CONFIG_{sym}") == "n", sym


# -- kernel modules -------------------------------------------------------------------------------

MODULES_DEP = """kernel/virtio/virtio_ring.ko:
kernel/virtio/virtio.ko: kernel/virtio/virtio_ring.ko
kernel/virtio/virtio_mmio.ko: kernel/virtio/virtio.ko kernel/virtio/virtio_ring.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/virtio/virtio.ko kernel/virtio/virtio_ring.ko
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/char/hw_random/virtio-rng.ko.xz: kernel/virtio/virtio.ko kernel/virtio/virtio_ring.ko
"""


def test_load_order_puts_every_module_after_its_dependencies() -> None:
    deps = _modules.parse_modules_dep(MODULES_DEP)
    plan = _modules.load_order(["9p", "9pnet_virtio", "virtio-rng", "ext4"], deps, {"ext4", "crc16"})
    order = [_modules.module_name(p) for p in plan.order]
    assert order == ["9pnet", "netfs", "fscache", "9p", "virtio_ring", "virtio", "9pnet_virtio", "virtio_rng"]
    assert plan.builtin == ("ext4",)
    assert plan.order[-1] == "kernel/char/hw_random/virtio-rng.ko.xz"
    for i, path in enumerate(plan.order):
        loaded = {_modules.module_name(p) for p in plan.order[:i]}
        assert set(deps[_modules.module_name(path)].depends) <= loaded


def test_unknown_module_and_cycles_are_asset_errors() -> None:
    deps = _modules.parse_modules_dep(MODULES_DEP)
    with pytest.raises(AssetError, match="nosuch is neither a module nor built into"):
        _modules.load_order(["nosuch"], deps, set())
    cyclic = _modules.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(AssetError, match="cycle a -> b -> a"):
        _modules.load_order(["a"], cyclic, set())


# -- Debian package plumbing ----------------------------------------------------------------------


def test_apt_output_parsing() -> None:
    policy = """busybox-static:
  Installed: (none)
  Candidate: 1:1.35.0-4+deb12u1+b1
  Version table:
libc6:amd64:
  Installed: 2.36-9
  Candidate: 2.36-9+deb12u14
nothere:
  Installed: (none)
  Candidate: (none)
"""
    assert _debs.parse_policy(policy) == {
        "busybox-static": "1:1.35.0-4+deb12u1+b1",
        "libc6": "2.36-9+deb12u14",
    }
    depends = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n  Depends: kmod\n"
    assert _debs.parse_depends(depends, "linux-image-") == "linux-image-6.1.0-56-amd64"
    assert _debs.deb_filename("busybox-static", "1:1.35.0-4") == "busybox-static_1%3a1.35.0-4_*.deb"


def test_elf_needed_of_a_host_binary() -> None:
    ls = Path("/bin/ls").resolve()
    if not _elf.is_elf(ls):
        pytest.skip("/bin/ls is not an ELF file here")
    dyn = _elf.dynamic(ls)
    assert "libc.so.6" in dyn.needed
    assert dyn.interpreter and dyn.interpreter.endswith("ld-linux-x86-64.so.2")


def test_plain_progress_prints_a_few_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    reporter = Reporter(True, out)
    with reporter.counter("make", 100, "objects") as advance:
        for _ in range(120):
            advance(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # start, 25 %, 50 %, 75 %, done
    assert "120 objects" in lines[-1]
    silent = io.StringIO()
    with Reporter(False, silent).counter("make", 10, "objects") as advance:
        advance(10)
    assert silent.getvalue() == ""


# -- the image's /init ----------------------------------------------------------------------------


def test_init_runs_the_agent_main_with_our_packages_first(tmp_path: Path) -> None:
    shebang, _, body = _image.INIT.partition("\n")
    assert shebang == "#!/usr/bin/python3.11 -IS"  # the kernel passes one option token
    agent = tmp_path / "hako_agent"
    agent.mkdir()
    (agent / "__init__.py").write_text("")
    (agent / "main.py").write_text(
        "import os, sys\n"
        "def main() -> int:\n"
        "    print(sys.path[0], os.environ['PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION'])\n"
        "    return 3\n"
    )
    script = tmp_path / "init"
    script.write_text(body.replace(f'"{_image.GUEST_LIB}"', f'"{tmp_path}"'))
    env = {k: v for k, v in os.environ.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
    proc = subprocess.run(
        [sys.executable, "-IS", str(script)], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.split() == [str(tmp_path), _image.PROTOBUF_IMPLEMENTATION]


def test_tcg_kernel_args_skip_the_uniprocessor_patching_and_add_the_kernels_own(tmp_path: Path) -> None:
    from hako.assets import Kernel

    k = Kernel("trimmed", tmp_path / "vmlinux", "6.1-test", ("console=ttyS0", "quiet"), (), ("noapictimer",))
    tcg = k.cmdline_for("tcg")
    assert tcg[:2] == ("console=ttyS0", "quiet")
    assert {"noapictimer", "noreplace-smp", "tsc=reliable"} <= set(tcg)
    # KVM's CPUs have a TSC-deadline timer and patch their text fast: they keep the defaults.
    assert k.cmdline_for("kvm") == ("console=ttyS0", "quiet")


def test_only_the_trimmed_kernel_gives_up_the_apic_timer_under_tcg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Debian's kernel stalls in container creation with the PIT as its only clock event device."""
    from hako.assets import _debian

    (tmp_path / "vmlinux").touch()
    monkeypatch.setattr(_trimmed, "SOURCE_TARBALL", tmp_path / "vmlinux")
    monkeypatch.setattr(_trimmed, "entry", lambda: tmp_path)
    monkeypatch.setattr(_cache, "newest_entry", lambda root, match: tmp_path)
    monkeypatch.setattr(_cache, "read_info", lambda path: {"release": "6.1-test"})
    trimmed, debian = _trimmed.find(), _debian.find()
    assert trimmed is not None and debian is not None
    assert "noapictimer" in trimmed.cmdline_for("tcg")
    assert "noapictimer" not in debian.cmdline_for("tcg")
    assert "noreplace-smp" in debian.cmdline_for("tcg")


def test_installed_versions_are_remembered_while_dpkgs_database_is_unchanged(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    status = tmp_path / "status"
    status.write_text("one\n")
    monkeypatch.setattr(_debs, "DPKG_STATUS", status)
    queries: list[str] = []

    def dpkg_query(argv: list[str], what: str) -> str:
        queries.append(argv[-1])
        return "install ok installed\t6.1.192-1"

    monkeypatch.setattr(_debs, "run", dpkg_query)
    memo = tmp_path / "cache"
    assert _debs.installed_version("linux-source-6.1", memo_dir=memo) == "6.1.192-1"
    assert _debs.installed_version("linux-source-6.1", memo_dir=memo) == "6.1.192-1"
    assert queries == ["linux-source-6.1"]  # the second answer came from the memo
    assert _debs.installed_version("linux-source-6.1") == "6.1.192-1"  # no memo_dir: asks
    assert len(queries) == 2

    replaced = tmp_path / "status.new"  # as dpkg does: a new file renamed over the old one
    replaced.write_text("one\ntwo\n")
    replaced.replace(status)
    assert _debs.installed_version("linux-source-6.1", memo_dir=memo) == "6.1.192-1"
    assert len(queries) == 3  # the database changed: asked again
