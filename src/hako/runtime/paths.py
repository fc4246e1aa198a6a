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


API_SOCKET = "api.sock"  # in a sandbox's run dir: its daemon's API (hako.runtime.sandboxd)
