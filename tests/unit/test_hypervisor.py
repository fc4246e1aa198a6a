"""Accelerator choice and the QEMU command line, without starting QEMU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hako.errors import AcceleratorError, HypervisorError, NetworkError, UsageError
from hako.hypervisor import Accelerator, VMConfig, choose, probe_kvm
from hako.hypervisor import qemu_args as qa
from hako.hypervisor.accel import KvmProbe
from hako.hypervisor.qemu import build_argv, start_restore


def test_auto_picks_kvm_when_usable_and_tcg_otherwise() -> None:
    assert choose("auto", KvmProbe(True, "KVM is usable")).name == "kvm"
    fallback = choose("auto", KvmProbe(False, "/dev/kvm is provided by kvm_pvm"))
    assert fallback.name == "tcg" and "kvm_pvm" in fallback.reason


def test_explicit_kvm_fails_with_the_reason() -> None:
    with pytest.raises(AcceleratorError, match="kvm_pvm.*--accel tcg"):
        choose("kvm", KvmProbe(False, "/dev/kvm is provided by kvm_pvm"))


def test_tcg_never_probes_and_bad_names_are_usage_errors() -> None:
    assert choose("tcg").name == "tcg"
    with pytest.raises(UsageError, match="auto, kvm, tcg"):
        choose("hvf")


def test_probe_detects_missing_device_and_pvm(tmp_path: Path) -> None:
    missing = probe_kvm(dev=tmp_path / "kvm", sys_module=tmp_path)
    assert not missing.usable and "does not exist" in missing.reason
    (tmp_path / "kvm").touch()
    (tmp_path / "kvm_pvm").mkdir()
    pvm = probe_kvm(dev=tmp_path / "kvm", sys_module=tmp_path)
    assert not pvm.usable and "kvm_pvm" in pvm.reason


def test_probe_rejects_a_device_that_is_not_kvm(tmp_path: Path) -> None:
    (tmp_path / "kvm").touch()  # a regular file: the ioctl fails
    result = probe_kvm(dev=tmp_path / "kvm", sys_module=tmp_path)
    assert not result.usable and "KVM_GET_API_VERSION" in result.reason


def test_option_values_escape_commas_and_render_booleans() -> None:
    assert (
        qa.options("file", {"path": Path("/a,b"), "readonly": True, "x": None})
        == "file,path=/a,,b,readonly=on"
    )
    assert qa.Chardev("socket", "agent", {"fd": 7}).render() == ["-chardev", "socket,id=agent,fd=7"]
    assert qa.Accel("tcg", 64).render() == ["-accel", "tcg,tb-size=64"]
    assert qa.Accel("kvm", 64).render() == ["-accel", "kvm"]


def _config(tmp_path: Path, **overrides: object) -> VMConfig:
    values: dict[str, object] = {
        "name": "0123456789abcdef",
        "kernel": Path("/k/vmlinux"),
        "kernel_cmdline": ("console=ttyS0", "quiet", "panic=-1"),
        "machine_options": ("acpi=off", "rtc=on"),
        "initrd": Path("/k/initrd.cpio"),
        "root_disk": None,
        "memory_mib": 256,
        "vcpus": 2,
        "accel": Accelerator("tcg", "test"),
        "run_dir": tmp_path,
        "shared_dir": tmp_path / "shared",
    }
    values.update(overrides)
    return VMConfig(**values)  # type: ignore[arg-type]


def test_argv_for_a_tcg_initramfs_sandbox(tmp_path: Path) -> None:
    argv = build_argv("qemu", _config(tmp_path), qmp_fd=5, agent_fd=6, tap_fd=7)
    joined = " ".join(argv)
    assert argv[0] == "qemu"
    assert "-machine microvm,x-option-roms=off,isa-serial=on,rtc=on,mem-merge=off,acpi=off" in joined
    assert "-accel tcg" in joined
    assert argv[argv.index("-cpu") + 1] == "max,-erms"  # no byte-wise rep movsb/stosb under TCG
    assert "-m 256M" in joined and "-smp 2" in joined
    assert "-initrd /k/initrd.cpio" in joined
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet panic=-1"
    assert "socket,id=qmp,fd=5" in argv and "socket,id=agent,fd=6" in argv
    assert "virtserialport,chardev=agent,name=hako.agent" in argv
    assert "virtserialport,chardev=agentlog,name=hako.log" in argv
    assert f"local,id=shared,path={tmp_path}/shared,security_model=passthrough,multidevs=remap" in argv
    assert "virtio-9p-device,fsdev=shared,mount_tag=hako" in argv
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert argv[-2] == "-sandbox" and argv[-1].startswith("on,") and "spawn=deny" in argv[-1]


def test_argv_for_kvm_with_an_erofs_root(tmp_path: Path) -> None:
    config = _config(tmp_path, initrd=None, root_disk=Path("/k/root.erofs"), accel=Accelerator("kvm", "t"))
    argv = build_argv("qemu", config, qmp_fd=5, agent_fd=6, tap_fd=7)
    assert "-cpu" in argv and argv[argv.index("-cpu") + 1] == "host"
    assert "-initrd" not in argv
    assert "file=/k/root.erofs,if=none,id=root,format=raw,readonly=on" in argv
    assert "virtio-blk-device,drive=root" in argv


def test_every_vm_has_a_nic_on_its_tap_and_empty_disk_slots(tmp_path: Path) -> None:
    argv = build_argv("qemu", _config(tmp_path, disk_slots=2), qmp_fd=5, agent_fd=6, tap_fd=7)
    assert "tap,id=net0,fd=7" in argv
    assert "virtio-net-device,netdev=net0,mac=02:00:00:00:00:01" in argv
    for slot in (0, 1):
        empty = f"driver=null-co,node-name=slot{slot}-empty,size=1099511627776,read-zeroes=on"
        assert empty in argv
        assert f"driver=raw,node-name=slot{slot},file=slot{slot}-empty" in argv
        assert f"virtio-blk-device,drive=slot{slot},serial=hako-disk{slot}" in argv
    assert not any("slot2" in arg for arg in argv)


def test_debug_reaches_the_guest(tmp_path: Path) -> None:
    argv = build_argv("qemu", _config(tmp_path, debug=True), qmp_fd=5, agent_fd=6, tap_fd=7)
    assert "hako.debug=1" in argv[argv.index("-append") + 1]


# -- a clone's restore, over a monitor of its own ---------------------------------------------


def _fake_monitor(
    answers: list[dict[str, object]],
) -> tuple[socket.socket, threading.Thread, list[dict[str, object]]]:
    """A QEMU monitor stand-in: a greeting, then for each command read one answer (and an event
    first, as QEMU may send one at any time)."""
    ours, theirs = socket.socketpair()
    received: list[dict[str, object]] = []

    def serve() -> None:
        with theirs:
            theirs.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            reader = theirs.makefile("rb")
            for answer in answers:
                line = reader.readline()
                if not line:
                    return
                received.append(json.loads(line))
                theirs.sendall(
                    b'{"event": "RESUME", "timestamp": {}}\r\n' + json.dumps(answer).encode() + b"\r\n"
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return ours, thread, received


def test_a_clone_starts_loading_its_state_with_three_commands() -> None:
    monitor, thread, received = _fake_monitor([{"return": {}}] * 3)
    with monitor:
        start_restore(monitor, state_fd=9, timeout=5)
    thread.join(5)
    assert [c["execute"] for c in received] == [
        "qmp_capabilities",
        "migrate-set-capabilities",
        "migrate-incoming",
    ]
    assert received[1]["arguments"] == {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
    assert received[2]["arguments"] == {"uri": "fd:9"}


def test_a_refused_restore_names_qemus_reason() -> None:
    error: dict[str, object] = {"error": {"class": "GenericError", "desc": "Migration is disabled"}}
    monitor, thread, _ = _fake_monitor([{"return": {}}, {"return": {}}, error])
    with monitor, pytest.raises(HypervisorError, match="restoring the VM failed: Migration is disabled"):
        start_restore(monitor, state_fd=9, timeout=5)
    thread.join(5)


def test_a_monitor_that_closes_fails_the_restore() -> None:
    monitor, thread, _ = _fake_monitor([{"return": {}}])  # answers one command, then goes away
    with monitor, pytest.raises(HypervisorError, match="closed its monitor"):
        start_restore(monitor, state_fd=9, timeout=5)
    thread.join(5)


def test_a_clone_has_a_restore_monitor_and_a_deferred_incoming(tmp_path: Path) -> None:
    config = _config(tmp_path, incoming=tmp_path / "state")
    argv = build_argv("qemu", config, qmp_fd=5, agent_fd=6, tap_fd=7, restore_fd=8)
    assert "socket,id=restore,fd=8" in argv
    assert "chardev=restore,mode=control" in argv
    assert argv[argv.index("-incoming") + 1] == "defer"
    boot = build_argv("qemu", _config(tmp_path), qmp_fd=5, agent_fd=6, tap_fd=7, restore_fd=8)
    assert "-incoming" not in boot and "socket,id=restore,fd=8" not in boot


@pytest.mark.parametrize(("shared", "persist"), [(False, True), (True, False)])
def test_the_tap_persists_only_in_a_namespace_that_ends_with_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared: bool, persist: bool
) -> None:
    """In the sandbox's own namespace the tap outlives QEMU (a killed QEMU need not wait for it to
    be unregistered) and goes with the namespace; in a joined one (a pod's) it goes with QEMU."""
    from hako.hypervisor import qemu
    from hako.network import netns

    asked: list[bool] = []

    def open_tap(netns_fd: int, name: str = "tap0", *, persist: bool = False) -> int:
        asked.append(persist)
        raise NetworkError("no tap here")

    monkeypatch.setattr(qemu, "find_qemu", lambda: "qemu")
    monkeypatch.setattr(netns, "open_tap", open_tap)
    namespace = os.open(os.devnull, os.O_RDONLY)
    try:
        vm = qemu.QemuVM(_config(tmp_path, netns_fd=namespace, netns_shared=shared))
        with pytest.raises(NetworkError):
            vm.start()
    finally:
        os.close(namespace)
    assert asked == [persist]


def test_a_process_offers_its_memory_to_ksm_and_its_children_inherit_it() -> None:
    if not Path("/proc/self/ksm_stat").exists():
        pytest.skip("this kernel does not say (/proc/PID/ksm_stat: Linux 6.1+ with KSM)")
    script = (
        "import subprocess\n"
        "from hako.hypervisor import ksm\n"
        "if not ksm.merge_this_process():\n"
        "    print('unsupported')\n"
        "else:\n"
        "    print(open('/proc/self/ksm_stat').read())\n"
        "    print(subprocess.run(['cat', '/proc/self/ksm_stat'], capture_output=True, text=True).stdout)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    if out.strip() == "unsupported":
        pytest.skip("PR_SET_MEMORY_MERGE needs Linux 6.4")
    assert out.count("ksm_merge_any: yes") == 2, out  # this process, and what it executes (QEMU)
    before = Path("/proc/self/ksm_stat").read_text()
    assert "ksm_merge_any: yes" not in before  # the test's own process was left alone
