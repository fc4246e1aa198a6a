"""VM templates without a VM: the QEMU arguments of a template and a clone, the key, the checks
on a template in store, the sparse copy of its RAM, and the choice of mode."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest

from hako.assets import GuestImage, Kernel
from hako.errors import TemplateError
from hako.hypervisor import Accelerator, VMConfig
from hako.hypervisor import base as hypervisor_base
from hako.hypervisor.qemu import build_argv
from hako.runtime import templates
from hako.runtime.config import SandboxConfig

MIB = 1 << 20


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "templates"
    monkeypatch.setenv("HAKO_TEMPLATES", str(path))
    return path


def _sandbox(tmp_path: Path, files: dict[str, Path], **overrides: object) -> SandboxConfig:
    kernel = Kernel("trimmed", files["vmlinux"], "6.1-test", ("console=ttyS0",), ("acpi=off",))
    image = GuestImage("trimmed", "initramfs", files["initramfs.cpio"], 14)
    values: dict[str, object] = {
        "sandbox_id": "f" * 64,
        "hostname": "ffffffffffff",
        "kernel": kernel,
        "image": image,
        "memory_mib": 256,
        "vcpus": 1,
        "accel": Accelerator("tcg", "test"),
        "run_dir": tmp_path / "sandbox",
    }
    values.update(overrides)
    return SandboxConfig(**values)  # type: ignore[arg-type]


def _vm(tmp_path: Path, files: dict[str, Path], **overrides: object) -> VMConfig:
    return _sandbox(tmp_path, files, **overrides).vm_config()


def _make(store: Path, vm: VMConfig, qemu: Path, *, state: bytes = b"device state") -> templates.Template:
    """A template in store as templates.create leaves it, without booting anything."""
    key = templates.key_of(templates.inputs(vm, str(qemu)))
    directory = store / key
    directory.mkdir(parents=True)
    with open(directory / "memory", "wb") as memory:
        memory.truncate(vm.memory_mib * MIB)
    (directory / "state").write_bytes(state)
    meta = {"format": templates.FORMAT, "key": key, "state_sha256": hashlib.sha256(state).hexdigest()}
    (directory / "meta.json").write_text(json.dumps(meta))
    return templates.Template(key, directory)


# -- QEMU arguments -------------------------------------------------------------------------------


def test_a_template_vm_writes_its_ram_through_to_a_file(tmp_path: Path, files: dict[str, Path]) -> None:
    vm = dataclasses.replace(_vm(tmp_path, files), memory_file=tmp_path / "ram", memory_shared=True)
    argv = build_argv("qemu", vm, qmp_fd=5, agent_fd=6, tap_fd=7)
    machine = argv[argv.index("-machine") + 1]
    assert machine.endswith(",memory-backend=mem")
    assert f"memory-backend-file,id=mem,size=256M,mem-path={tmp_path}/ram,share=on" in argv
    assert "-incoming" not in argv


def test_a_clone_maps_the_ram_copy_on_write_and_waits_for_its_state(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    config = dataclasses.replace(_sandbox(tmp_path, files), template=tmp_path / "tpl")
    argv = build_argv("qemu", config.vm_config(), qmp_fd=5, agent_fd=6, tap_fd=7)
    assert f"memory-backend-file,id=mem,size=256M,mem-path={tmp_path}/tpl/memory,share=off" in argv
    assert argv[argv.index("-incoming") + 1] == "defer"
    # the same devices as the template, in the same order: only paths differ
    plain = build_argv("qemu", config.cold().vm_config(), qmp_fd=5, agent_fd=6, tap_fd=7)
    devices = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-device"]
    assert devices == [plain[i + 1] for i, arg in enumerate(plain) if arg == "-device"]
    # the kernel and initrd are in the saved RAM: QEMU does not read them for a clone
    assert "-kernel" in plain and "-initrd" in plain
    assert "-kernel" not in argv and "-initrd" not in argv and "-append" not in argv


def test_a_private_clone_maps_its_own_copy(tmp_path: Path, files: dict[str, Path]) -> None:
    config = dataclasses.replace(_sandbox(tmp_path, files), template=tmp_path / "tpl", template_private=True)
    vm = config.vm_config()
    assert vm.memory_file == config.private_memory == tmp_path / "sandbox" / "memory"
    assert vm.incoming == tmp_path / "tpl" / "state"
    assert not vm.memory_shared


@pytest.mark.parametrize(("private", "merge"), [(False, "on"), (True, "off")])
def test_only_a_clone_that_shares_the_templates_pages_offers_its_own_to_ksm(
    tmp_path: Path, files: dict[str, Path], private: bool, merge: str
) -> None:
    shared = dataclasses.replace(
        _sandbox(tmp_path, files), template=tmp_path / "tpl", template_private=private
    )
    for config, expected in ((shared, merge), (shared.cold(), "off")):  # a boot shares nothing either
        argv = build_argv("qemu", config.vm_config(), qmp_fd=5, agent_fd=6, tap_fd=7)
        assert f",mem-merge={expected}," in argv[argv.index("-machine") + 1] + ","
        assert config.vm_config().memory_merge == (expected == "on")


def test_a_cold_config_boots(tmp_path: Path, files: dict[str, Path]) -> None:
    config = dataclasses.replace(_sandbox(tmp_path, files), template=tmp_path / "tpl", template_private=True)
    vm = config.cold().vm_config()
    assert (vm.memory_file, vm.incoming) == (None, None)


# -- key ------------------------------------------------------------------------------------------


def test_the_key_follows_every_input(tmp_path: Path, files: dict[str, Path]) -> None:
    qemu = str(files["qemu"])
    base = templates.key_of(templates.inputs(_vm(tmp_path, files), qemu))
    assert base == templates.key_of(templates.inputs(_vm(tmp_path, files), qemu))
    # not the sandbox's own paths and names: those differ between clones
    other = _vm(tmp_path, files, sandbox_id="0" * 64, hostname="x", run_dir=tmp_path / "other")
    assert templates.key_of(templates.inputs(other, qemu)) == base
    changed = [
        _vm(tmp_path, files, memory_mib=512),
        _vm(tmp_path, files, vcpus=2),
        _vm(tmp_path, files, accel=Accelerator("kvm", "test")),
        _vm(tmp_path, files, debug=True),
    ]
    keys = {templates.key_of(templates.inputs(vm, qemu)) for vm in changed}
    assert base not in keys and len(keys) == len(changed)
    os.utime(files["initramfs.cpio"], ns=(1, 1))  # a rebuilt guest image
    assert templates.key_of(templates.inputs(_vm(tmp_path, files), qemu)) != base
    files["qemu"].write_bytes(b"an upgraded qemu")
    assert templates.key_of(templates.inputs(_vm(tmp_path, files), str(files["qemu"]))) != base


def test_the_key_follows_the_cpu_model(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clone must run on the CPU its template was saved with: another model is another key."""
    qemu = str(files["qemu"])
    base = templates.key_of(templates.inputs(_vm(tmp_path, files), qemu))
    monkeypatch.setattr(hypervisor_base, "TCG_CPU", "qemu64")
    assert templates.key_of(templates.inputs(_vm(tmp_path, files), qemu)) != base


# -- checks ---------------------------------------------------------------------------------------


def test_lookup_finds_a_sound_template(tmp_path: Path, files: dict[str, Path], store: Path) -> None:
    vm = _vm(tmp_path, files)
    made = _make(store, vm, files["qemu"])
    warnings: list[str] = []
    assert templates.lookup(vm, str(files["qemu"]), warnings.append) == made
    assert warnings == []
    assert templates.lookup(_vm(tmp_path, files, memory_mib=512), str(files["qemu"]), warnings.append) is None


@pytest.mark.parametrize(
    ("damage", "complaint"),
    [
        (lambda t: t.state.write_bytes(b"something else"), "does not match its digest"),
        (lambda t: t.state.unlink(), "No such file"),
        (lambda t: os.truncate(t.memory, MIB), "RAM file has"),
        (lambda t: t.meta_path.write_text("{"), "unreadable meta.json"),
        (lambda t: t.meta_path.write_text('{"format": 0}'), "another version"),
    ],
)
def test_a_damaged_template_is_removed_with_a_warning(
    tmp_path: Path, files: dict[str, Path], store: Path, damage: object, complaint: str
) -> None:
    vm = _vm(tmp_path, files)
    made = _make(store, vm, files["qemu"])
    assert callable(damage)
    damage(made)
    warnings: list[str] = []
    assert templates.lookup(vm, str(files["qemu"]), warnings.append) is None
    assert len(warnings) == 1 and complaint in warnings[0] and "booting cold" in warnings[0]
    assert not made.dir.exists()
    assert [p for p in store.iterdir() if not p.name.startswith(".")] == []


def test_validate_names_the_template(tmp_path: Path, files: dict[str, Path], store: Path) -> None:
    made = _make(store, _vm(tmp_path, files), files["qemu"])
    with pytest.raises(TemplateError, match=made.key):
        made.validate(memory_mib=512)


def test_listing_skips_templates_being_made(tmp_path: Path, files: dict[str, Path], store: Path) -> None:
    made = _make(store, _vm(tmp_path, files), files["qemu"])
    (store / f".new-{made.key}-1").mkdir()
    (store / f".{made.key}.lock").touch()
    assert [template for template, _ in templates.listing()] == [made]


# -- RAM copies and modes -------------------------------------------------------------------------


def test_copy_sparse_keeps_data_and_holes(tmp_path: Path) -> None:
    source, target = tmp_path / "ram", tmp_path / "copy"
    with open(source, "wb") as ram:
        ram.truncate(64 * MIB)
        for offset in (0, 5 * MIB, 63 * MIB):
            ram.seek(offset)
            ram.write(os.urandom(8192))
    templates.copy_sparse(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_size == 64 * MIB
    assert target.stat().st_blocks * 512 < 4 * MIB  # the holes stayed holes


def test_mode_off_leaves_the_config_alone(tmp_path: Path, files: dict[str, Path]) -> None:
    config = _sandbox(tmp_path, files)
    assert templates.for_sandbox(config, "off", warn=pytest.fail) is config


def test_an_unknown_mode_is_an_error(tmp_path: Path, files: dict[str, Path]) -> None:
    with pytest.raises(TemplateError, match="auto, private, off"):
        templates.for_sandbox(_sandbox(tmp_path, files), "sometimes", warn=pytest.fail)


def test_without_create_missing_a_missing_template_means_a_boot(
    tmp_path: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HAKO_QEMU", str(files["qemu"]))
    files["qemu"].chmod(0o755)
    config = _sandbox(tmp_path, files)
    assert templates.for_sandbox(config, "auto", warn=pytest.fail, create_missing=False) is config


def test_a_template_in_store_is_used(
    tmp_path: Path, files: dict[str, Path], store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HAKO_QEMU", str(files["qemu"]))
    files["qemu"].chmod(0o755)
    config = _sandbox(tmp_path, files)
    made = _make(store, config.vm_config(), files["qemu"])
    used = templates.for_sandbox(config, "private", warn=pytest.fail, create_missing=False)
    assert (used.template, used.template_private) == (made.dir, True)


def test_templates_of_changed_files_are_pruned(tmp_path: Path, files: dict[str, Path], store: Path) -> None:
    vm = _vm(tmp_path, files)
    made = _make(store, vm, files["qemu"])
    meta = json.loads(made.meta_path.read_text())
    meta["inputs"] = templates.inputs(vm, str(files["qemu"]))
    made.meta_path.write_text(json.dumps(meta))
    other_size = dataclasses.replace(vm, memory_mib=512)  # a new template not for the same
    assert templates.prune(templates.inputs(other_size, str(files["qemu"])), "new") == {}
    os.utime(files["vmlinux"], ns=(2, 2))  # the kernel was rebuilt
    pruned = templates.prune(templates.inputs(other_size, str(files["qemu"])), "new")
    assert list(pruned) == [made.key] and "changed since" in pruned[made.key]
    assert not made.dir.exists()


def test_a_new_template_replaces_the_ones_it_supersedes(
    tmp_path: Path, files: dict[str, Path], store: Path
) -> None:
    """Made with other kernel arguments (or by another hako) for the same kernel, size and
    accelerator, an old template is never used again: its RAM file must not stay in tmpfs."""

    def make(vm: VMConfig) -> templates.Template:
        made = _make(store, vm, files["qemu"])
        meta = json.loads(made.meta_path.read_text())
        meta["inputs"] = templates.inputs(vm, str(files["qemu"]))
        made.meta_path.write_text(json.dumps(meta))
        return made

    old = make(_vm(tmp_path, files))
    other_size = make(_vm(tmp_path, files, memory_mib=512))
    debug = make(dataclasses.replace(_vm(tmp_path, files), debug=True))
    new_vm = dataclasses.replace(_vm(tmp_path, files), kernel_cmdline=("console=ttyS0", "noapictimer"))
    new = make(new_vm)
    assert len({old.key, other_size.key, debug.key, new.key}) == 4

    new_inputs = templates.inputs(new_vm, str(files["qemu"]))
    pruned = templates.prune(new_inputs, new.key)
    assert list(pruned) == [old.key] and "replaces it" in pruned[old.key]
    assert not old.dir.exists()
    assert other_size.dir.exists() and debug.dir.exists() and new.dir.exists()


def test_a_template_lock_leaves_no_file_behind(store: Path) -> None:
    with templates._locked("k1"):
        assert (store / ".k1.lock").exists()
    assert list(store.iterdir()) == []


def test_a_template_lock_excludes_while_its_file_comes_and_goes(store: Path) -> None:
    """Each holder removes the lock file as it lets go; whoever waited on that file must not
    then hold a lock alongside one who made a new file meanwhile."""
    import threading
    import time

    held: list[int] = []
    overlaps: list[list[int]] = []
    guard = threading.Lock()

    def hold(n: int) -> None:
        for _ in range(5):
            with templates._locked("k"):
                with guard:
                    held.append(n)
                    if len(held) > 1:
                        overlaps.append(list(held))
                time.sleep(0.002)
                with guard:
                    held.remove(n)

    threads = [threading.Thread(target=hold, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == []
    assert list(store.iterdir()) == []
