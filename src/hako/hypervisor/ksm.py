"""Letting the host's KSM (kernel samepage merging) merge a VM's memory with other sandboxes'.

Clones of one template run the same guest code on the same data: many of the pages they
write, in guest RAM and in QEMU's own heap, are identical from clone to clone. Where the host
runs KSM (``/sys/kernel/mm/ksm/run`` = 1, the administrator's choice), it merges such pages
into one, copy-on-write. Guest RAM is offered by QEMU's ``mem-merge``; the rest of QEMU's
memory, and its owner's (the sandbox daemon or the shim), by ``PR_SET_MEMORY_MERGE``
(Linux 6.4), which a process's children inherit across fork and exec.

Merged pages are shared between tenants: the same side channel as a template's shared pages,
and more (a write to a merged page takes measurably longer). See the README's security note.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

PR_SET_MEMORY_MERGE = 67
KSM_RUN = Path("/sys/kernel/mm/ksm/run")


def merge_this_process() -> bool:
    """Offer every anonymous page of this process, and of the processes it starts from now on,
    to KSM; False where the kernel cannot (older than 6.4: then only guest RAM is offered)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)) == 0


def host_merges() -> bool:
    """Whether the host runs KSM (if not, nothing offered is merged)."""
    try:
        return KSM_RUN.read_text().strip() == "1"
    except OSError:
        return False
