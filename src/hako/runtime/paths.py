"""Where hako keeps things on the host.

State of running sandboxes lives under /run/hako (tmpfs: gone at reboot, like
the VMs), so every shell sees the same sandboxes. Environment variables move
each root, which tests use to stay out of the real ones.
"""

from __future__ import annotations

import os
from pathlib import Path


def run_root() -> Path:
    return Path(os.environ.get("HAKO_RUN", "/run/hako"))


def sandboxes_dir() -> Path:
    return run_root() / "sandboxes"


def sandbox_dir(sandbox_id: str) -> Path:
    return sandboxes_dir() / sandbox_id


def pool_file() -> Path:
    """How many pooled sandboxes to keep, per shape (:mod:`hako.runtime.pool`); there is no
    pool until it exists."""
    return run_root() / "pool.json"


API_SOCKET = "api.sock"  # in a sandbox's run dir: its daemon's API (hako.runtime.sandboxd)
ADOPT_SOCKET = "adopt.sock"  # ... and, pooled, where a containerd shim hands it a pod (hako.shim.pooled)
