"""The pod's VM, launched the moment the shim starts: before containerd's Create arrives.

containerd starts a shim (``containerd-shim-hako-v2 start``) for a pod's first container and
hands it, on stdin, the same runtime options it later sends with Create; the bundle's
config.json is already written. That is all the VM needs: the shim's TOML config, the
hostname and the pod's network namespace. So the forked shim launches QEMU first (a restore
from the template, when there is one) and only then imports the rest of itself (the Task
API, containerd's types), while the guest comes up. Create then adopts this VM if it asks
for the same one (:meth:`EarlyVM.fits`), and otherwise it is stopped and Create starts its
own, as it would have anyway. Nothing here is fatal: a launch that fails leaves Create to
do it and report why.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from hako import assets
from hako.hypervisor import choose
from hako.hypervisor.qemu import QemuVM
from hako.network.sandbox import SandboxNetwork
from hako.runtime import templates
from hako.runtime.config import SandboxConfig
from hako.shim import config as shim_config


@dataclasses.dataclass
class EarlyVM:
    config_path: str | None
    hostname: str
    netns_path: str
    settings: shim_config.ShimConfig  # the shim's config file as read for this VM
    config: SandboxConfig
    vm: QemuVM
    network: SandboxNetwork | None
    notes: list[str]  # for the shim's log, which does not exist yet when this is made

    def fits(self, config_path: str | None, hostname: str, netns_path: str) -> bool:
        return (self.config_path, self.hostname, self.netns_path) == (config_path, hostname, netns_path)

    def discard(self) -> None:
        self.vm.kill()
        self.vm.stop()
        if self.network is not None:
            self.network.close()


def prepare(
    pod_id: str,
    state_dir: Path,
    cfg: shim_config.ShimConfig,
    hostname: str,
    netns_path: str,
    log: Callable[[str], None],
) -> tuple[SandboxConfig, SandboxNetwork | None]:
    """The pod's VM as ``cfg`` describes it (restored from its template if there is one), and
    the network namespace ``netns_path`` it runs in, joined (None without one: an empty one of
    its own)."""
    config = sandbox_config(pod_id, state_dir, cfg, hostname)
    config = templates.for_sandbox(config, cfg.template, warn=log, announce=log)
    if not netns_path:
        return config, None
    network = SandboxNetwork.join(pod_id, netns_path)
    return config.in_network(network), network


def sandbox_config(pod_id: str, state_dir: Path, cfg: shim_config.ShimConfig, hostname: str) -> SandboxConfig:
    """The pod's VM as ``cfg`` describes it, before a template or a network is chosen."""
    return SandboxConfig(
        sandbox_id=pod_id,
        hostname=hostname or pod_id[:12],
        kernel=assets.kernel(cfg.kernel),
        image=assets.guest_image(cfg.kernel, format=cfg.image),
        memory_mib=cfg.memory_mib,
        vcpus=cfg.vcpus,
        accel=choose(cfg.accel),
        run_dir=state_dir / "vm",
        debug=cfg.debug,
        boot_timeout=cfg.boot_timeout,
    )


def launch(pod_id: str, state_dir: Path, bundle: Path, options: bytes) -> EarlyVM | None:
    """Launch the VM for the pod whose first container's bundle is ``bundle``; None if that
    cannot be done here (Create will try, and say why)."""
    notes: list[str] = []
    network: SandboxNetwork | None = None
    try:
        spec = json.loads((bundle / "config.json").read_text())
        path = shim_config.config_path_of(options)
        hostname = str(spec.get("hostname", ""))
        netns_path = shim_config.network_namespace(spec)
        cfg = shim_config.load(path)
        config, network = prepare(pod_id, state_dir, cfg, hostname, netns_path, notes.append)
        config.prepare_host()
        vm = QemuVM(config.vm_config())
        vm.start()
    except Exception:
        if network is not None:
            network.close()
        return None
    notes.append(f"launched the pod's VM as the shim started (QEMU pid {vm.pid})")
    return EarlyVM(path, hostname, netns_path, cfg, config, vm, network, notes)
