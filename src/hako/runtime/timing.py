"""The seed's boot-time breakdown, per sandbox.

    host_startup     the hako command starting until it forks the daemon that launches QEMU
    daemon_launch    the daemon starting until it launches QEMU (the sandbox's network
                     namespace, a clone's private files)
    qemu_start       launch of QEMU until the guest kernel's clock starts
    guest_kernel     guest kernel boot, until it runs /init
    guest_userspace  /init (our agent on the guest's Python) until it answers the host
      python_start     of which: the interpreter starting, until the agent's main()
      agent_init       of which: the agent's own setup, until it serves
    boot_total       launch of QEMU until the agent answered (host clock)
    restore          instead of the boot phases, for a VM restored from a template: launch of
                     QEMU until the agent answered
    sandbox_setup    the agent setting up the sandbox (hostname, clock, entropy, the NIC)
    container_create, container_start, container_run (start until exit seen), teardown

qemu_start is derived: host time to the agent's answer minus the guest uptime
at that answer. The guest keeps its clock from its kernel's early timekeeping.
"""

from __future__ import annotations

from collections.abc import Mapping

ORDER = (
    ("host_startup", "hako start-up (to the sandbox daemon)"),
    ("daemon_launch", "sandbox daemon start-up (to QEMU launch)"),
    ("qemu_start", "QEMU start"),
    ("guest_kernel", "guest kernel"),
    ("guest_userspace", "guest userspace (to agent ready)"),
    ("python_start", "  python start"),
    ("agent_init", "  agent init"),
    ("boot_total", "boot total (launch to agent ready)"),
    ("restore", "restore from template (launch to agent ready)"),
    ("pool_take", "taken from the warm pool (resume, clock, entropy)"),
    ("sandbox_setup", "sandbox setup (network, hostname, clock)"),
    ("container_create", "container create"),
    ("container_start", "container start"),
    ("container_run", "container run (start to exit)"),
    ("teardown", "teardown"),
    ("exit_seen", "container exit until hako returns"),
    ("total", "total (command wall time)"),
)


def boot_breakdown(
    launched: float,
    answered: float,
    uptime: float,
    kernel_done: float,
    agent_start: float,
    agent_ready: float,
) -> dict[str, float]:
    """Boot phases from host monotonic times and the guest's CheckResponse figures."""
    host_total = answered - launched
    return {
        "qemu_start": max(0.0, host_total - uptime),
        "guest_kernel": kernel_done,
        "guest_userspace": max(0.0, uptime - kernel_done),
        "python_start": max(0.0, agent_start - kernel_done),
        "agent_init": max(0.0, agent_ready - agent_start),
        "boot_total": host_total,
    }


def render(timing: Mapping[str, float], accel: str, kernel: str) -> str:
    width = max(len(label) for _, label in ORDER)
    lines = [f"timing ({kernel} kernel, {accel.upper()}):"]
    for key, label in ORDER:
        if key in timing:
            lines.append(f"  {label:<{width}}  {timing[key] * 1000:8.1f} ms")
    return "\n".join(lines)
