"""VM templates: a sandbox booted once, saved, and restored instead of booted (Kata's "VM
templating", Firecracker's snapshots).

A template is a VM whose kernel and agent are up and which runs no container, saved once per
combination of its inputs (kernel, guest image, kernel arguments, memory, vCPUs, accelerator,
QEMU). Its guest RAM is a file that the template VM wrote through to (``share=on``); the saved
migration stream holds only device state (QEMU's ``x-ignore-shared``: about 50 KB). A clone
starts QEMU with the same devices, maps the RAM file copy-on-write (``share=off``) and loads the
device state: no kernel boot, no copy of memory, and the pages no clone has written stay shared
between all of them.

On disk, under ``<run root>/templates/<key>/`` (or ``$HAKO_TEMPLATES/<key>/``): ``memory``
(the guest RAM), ``state`` (the device state) and ``meta.json`` (the inputs, the state's
digest). The key is a digest of the
inputs, so a template is rebuilt whenever one of them changes; a template that fails its checks
is removed with a warning and the sandbox boots cold. A template is replaced by renaming a new
directory into place, never by writing into the old one: clones map the old RAM file, which
lives on until the last of them ends.

Sharing pages between tenants' VMs is a side channel (a clone can time whether a page is
shared); ``private`` mode gives each clone its own copy of the RAM file, ``off`` boots cold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hako
from hako.errors import HakoError, TemplateError
from hako.hypervisor.base import VMConfig, cpu_model
from hako.runtime import paths
from hako.runtime.config import SandboxConfig

FORMAT = 2  # 2: disk slots
MODES = ("auto", "private", "off")  # share the template's pages, copy them per clone, boot cold
MEMORY = "memory"
STATE = "state"
META = "meta.json"
WARM_UP_TIMEOUT = 30.0

Warn = Callable[[str], None]


def templates_dir() -> Path:
    """``$HAKO_TEMPLATES``, else ``<run root>/templates`` (/run/hako: tmpfs on most hosts)."""
    override = os.environ.get("HAKO_TEMPLATES")
    return Path(override) if override else paths.run_root() / "templates"


def _file_id(path: Path | str | None) -> list[object] | None:
    """What identifies a file's content cheaply: path, size and modification time."""
    if path is None:
        return None
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


def inputs(vm: VMConfig, qemu_binary: str) -> dict[str, Any]:
    """Everything a template depends on: change any of it and the template is another one."""
    return {
        "format": FORMAT,
        "hako": hako.__version__,
        "qemu": _file_id(qemu_binary),
        "kernel": _file_id(vm.kernel),
        "cmdline": list(vm.kernel_cmdline) + (["hako.debug=1"] if vm.debug else []),
        "initrd": _file_id(vm.initrd),
        "root_disk": _file_id(vm.root_disk),
        "machine": list(vm.machine_options),
        "memory_mib": vm.memory_mib,
        "vcpus": vm.vcpus,
        "accel": vm.accel.name,
        "cpu": cpu_model(vm.accel.name),
        "shared_dir": vm.shared_dir is not None,
        "disk_slots": vm.disk_slots,
    }


def key_of(template_inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template_inputs, sort_keys=True).encode()).hexdigest()[:20]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Template:
    key: str
    dir: Path

    @property
    def memory(self) -> Path:
        return self.dir / MEMORY

    @property
    def state(self) -> Path:
        return self.dir / STATE

    @property
    def meta_path(self) -> Path:
        return self.dir / META

    def meta(self) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise TemplateError(f"template {self.key}: unreadable {META}: {exc}") from exc
        return meta

    def validate(self, memory_mib: int) -> None:
        """TemplateError unless the template is complete and what its meta.json says it is."""
        meta = self.meta()
        if meta.get("format") != FORMAT or meta.get("key") != self.key:
            raise TemplateError(f"template {self.key}: made by another version of hako")
        try:
            memory_size = self.memory.stat().st_size
            state_digest = _digest(self.state)
        except OSError as exc:
            raise TemplateError(f"template {self.key}: {exc.strerror}: {exc.filename}") from exc
        if memory_size != memory_mib << 20:
            raise TemplateError(f"template {self.key}: its RAM file has {memory_size} bytes")
        if state_digest != meta.get("state_sha256"):
            raise TemplateError(f"template {self.key}: its saved state does not match its digest")


@contextlib.contextmanager
def _locked(key: str) -> Iterator[None]:
    """One process at a time makes (or replaces) the template ``key``."""
    from hako.image.filelock import exclusive_lock

    directory = templates_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with exclusive_lock(directory / f".{key}.lock", remove=True):
        yield


def lookup(vm: VMConfig, qemu_binary: str, warn: Warn) -> Template | None:
    """The valid template for ``vm``, or None. One that fails its checks is removed, with a
    warning: it will be rebuilt."""
    key = key_of(inputs(vm, qemu_binary))
    template = Template(key, templates_dir() / key)
    if not template.dir.exists():
        return None
    try:
        template.validate(vm.memory_mib)
    except TemplateError as exc:
        warn(f"{exc}: removed it, booting cold (it is rebuilt on next use)")
        discard(template)
        return None
    return template


def discard(template: Template) -> None:
    """Remove a template. Running clones keep their mapping of its RAM file."""
    with contextlib.suppress(FileNotFoundError):
        graveyard = template.dir.with_name(f".old-{template.key}-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(template.dir, graveyard)
        shutil.rmtree(graveyard, ignore_errors=True)


def create(vm: VMConfig, qemu_binary: str, boot_timeout: float, warn: Warn) -> Template:
    """Boot ``vm`` (without a container), save it as a template and return it; or return the
    valid template another process made meanwhile."""
    from hako.hypervisor.qemu import QemuVM
    from hako.runtime.agent import AgentClient

    template_inputs = inputs(vm, qemu_binary)
    key = key_of(template_inputs)
    final = Template(key, templates_dir() / key)
    with _locked(key):
        existing = lookup(vm, qemu_binary, warn)
        if existing is not None:
            return existing
        work = templates_dir() / f".new-{key}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        (work / "shared").mkdir()
        source = dataclasses.replace(
            vm,
            name=f"template-{key}",
            run_dir=work,
            shared_dir=work / "shared" if vm.shared_dir is not None else None,
            memory_file=work / MEMORY,
            memory_shared=True,
            incoming=None,
        )
        machine = QemuVM(source)
        started = time.monotonic()
        try:
            machine.start()
            agent = AgentClient(machine.agent_channel())
            try:
                check = agent.check(timeout=boot_timeout)
                # Saved once the agent's warm-up is done, so that no clone repeats it.
                deadline = time.monotonic() + WARM_UP_TIMEOUT
                while not check.warm and time.monotonic() < deadline:
                    time.sleep(0.05)
                    check = agent.check(timeout=boot_timeout)
            except HakoError as exc:
                reason = machine.exit_reason() if machine.exited.wait(1) else str(exc)
                raise TemplateError(f"the template VM did not boot: {reason}") from exc
            machine.save_state(work / STATE)
            agent.close()
        except HakoError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise TemplateError(f"cannot make the template {key}: {exc}") from exc
        finally:
            machine.kill()
            machine.stop()
        for name in ("shared", "console.log", "agent.log", "qemu.log", "qemu.cmdline"):
            target = work / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
        meta = {
            "format": FORMAT,
            "key": key,
            "inputs": template_inputs,
            "created": time.time(),
            "boot_seconds": round(time.monotonic() - started, 3),
            "kernel_release": check.kernel_release,
            "agent_version": check.agent_version,
            "state_sha256": _digest(work / STATE),
        }
        (work / META).write_text(json.dumps(meta, indent=1) + "\n")
        discard(final)  # a stale one (failed its checks), if any
        os.rename(work, final.dir)
    for key, why in prune(template_inputs, final.key).items():
        warn(f"removed template {key}: {why}")
    return final


def prune(template_inputs: dict[str, Any], keep: str) -> dict[str, str]:
    """Remove every template but ``keep`` (just made from ``template_inputs``) that nothing will
    use again, and say why, by key. Their RAM files would otherwise stay in /run (tmpfs:
    memory) until the host reboots. They are:

    - stale: made from files that have changed or gone since (an upgraded QEMU, a rebuilt
      kernel or guest image);
    - superseded: for what ``keep`` is for (the same kernel file, VM size and accelerator),
      with other inputs (kernel arguments, machine options, a rebuilt guest image, another hako).
    """
    purpose = _purpose(template_inputs)
    removed = {}
    for template, meta in listing():
        if template.key == keep:
            continue
        if _is_stale(meta):
            removed[template.key] = "its kernel, guest image or QEMU has changed since"
        elif _purpose(meta.get("inputs", {})) == purpose:
            removed[template.key] = f"{keep} replaces it (other kernel arguments, guest image or hako)"
        else:
            continue
        discard(template)
    return removed


def _is_stale(meta: dict[str, Any]) -> bool:
    """A template's files (QEMU, kernel, guest image) are no longer the ones it was made from."""
    given = meta.get("inputs", {})
    for name in ("qemu", "kernel", "initrd", "root_disk"):
        recorded = given.get(name)
        if recorded is None:
            continue
        try:
            current = _file_id(recorded[0])
        except (OSError, IndexError, TypeError):
            current = None
        if current != recorded:
            return True
    return False


# What a template is for. Another template for the same is an older version of it, made with
# other kernel arguments, machine options or another hako: nothing would use it again.
PURPOSE = ("kernel", "memory_mib", "vcpus", "accel", "shared_dir", "disk_slots")


def _purpose(template_inputs: dict[str, Any]) -> list[Any]:
    debug = "hako.debug=1" in (template_inputs.get("cmdline") or [])
    return [template_inputs.get(name) for name in PURPOSE] + [debug]


def for_sandbox(
    config: SandboxConfig,
    mode: str,
    warn: Warn,
    *,
    create_missing: bool = True,
    announce: Warn | None = None,
) -> SandboxConfig:
    """``config`` restored from its template, unless ``mode`` is "off". A missing template is
    made now if ``create_missing`` (else the sandbox boots cold); one that cannot be made
    means a cold boot with a warning."""
    if mode not in MODES:
        raise TemplateError(f"template mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "off":
        return config
    from hako.hypervisor.binary import find_qemu

    vm = config.cold().vm_config()
    qemu = find_qemu()
    template = lookup(vm, qemu, warn)
    if template is None:
        if not create_missing:
            return config
        if announce is not None:
            announce(f"making the VM template {key_of(inputs(vm, qemu))} for this configuration (once)")
        try:
            template = create(vm, qemu, config.boot_timeout, warn)
        except TemplateError as exc:
            warn(f"{exc}: booting cold")
            return config
    return dataclasses.replace(config, template=template.dir, template_private=mode == "private")


def listing() -> list[tuple[Template, dict[str, Any]]]:
    """Templates on this host with their meta.json (skipping ones being made or removed)."""
    directory = templates_dir()
    if not directory.is_dir():
        return []
    found = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        template = Template(entry.name, entry)
        try:
            found.append((template, template.meta()))
        except TemplateError:
            found.append((template, {}))
    return found


def copy_sparse(source: Path, target: Path) -> None:
    """Copy a RAM file, leaving its holes holes (most of a fresh guest's RAM is one)."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            os.lseek(src.fileno(), start, os.SEEK_SET)
            os.lseek(dst.fileno(), start, os.SEEK_SET)
            remaining = end - start
            while remaining:
                copied = os.copy_file_range(src.fileno(), dst.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
            offset = end
        dst.truncate(size)


def prepare_clone(config: SandboxConfig) -> None:
    """What a clone needs before its QEMU starts: in private mode, its own copy of the RAM."""
    if config.template is not None and config.template_private:
        copy_sparse(config.template / MEMORY, config.private_memory)


def resident_bytes(path: Path) -> int:
    """How much of a (sparse) RAM file is really there."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0
