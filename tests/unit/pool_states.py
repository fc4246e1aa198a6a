"""Pooled sandboxes' state as a pool fill leaves it, without VMs (for the pool's unit tests)."""

from __future__ import annotations

import os

from hako.runtime import pool
from hako.runtime.state import SandboxState, Status, new_id, process_start_ticks


def pooled_state(
    template: str = "tpl-a",
    *,
    alive: bool = True,
    marked: bool = True,
    memory_mib: int = 256,
    network: str = "bridge",
) -> SandboxState:
    sandbox_id = new_id()
    state = SandboxState(
        id=sandbox_id,
        name=f"pool-{sandbox_id[:12]}",
        image="",
        command=[],
        created=0.0,
        kernel="trimmed",
        accel="tcg",
        accel_reason="test",
        memory_mib=memory_mib,
        vcpus=1,
        status=Status.POOLED,
        template=template,
        network=network,
        # a live process stands in for the daemon; a pid that cannot exist for a dead one
        daemon_pid=os.getpid() if alive else 2**22 + 1,
        daemon_start_ticks=process_start_ticks(os.getpid()),
    )
    state.dir.mkdir(parents=True)
    state.save()
    if marked:
        (state.dir / pool.POOLED_MARK).touch()
    return state
