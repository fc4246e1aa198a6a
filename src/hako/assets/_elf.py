"""Just enough ELF (64-bit, little-endian) to find which shared libraries a binary needs."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5


@dataclass(frozen=True)
class Dynamic:
    interpreter: str | None  # PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2
    needed: tuple[str, ...]  # DT_NEEDED sonames, in order


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def dynamic(path: Path) -> Dynamic:
    """PT_INTERP and DT_NEEDED of an ELF64 LE file; static binaries give (None, ())."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dyn: tuple[int, int] | None = None
    interp = None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == PT_DYNAMIC:
            dyn = (p_offset, p_filesz)
        elif p_type == PT_INTERP:
            interp = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    if dyn is None:
        return Dynamic(interp, ())
    needed_offsets: list[int] = []
    strtab_vaddr = None
    off, size = dyn
    for pos in range(off, off + size, 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            needed_offsets.append(val)
        elif tag == DT_STRTAB:
            strtab_vaddr = val
    if strtab_vaddr is None:
        return Dynamic(interp, ())
    strtab = next((o + strtab_vaddr - v for v, o, s in loads if v <= strtab_vaddr < v + s), None)
    if strtab is None:
        raise ValueError(f"{path}: DT_STRTAB is outside every PT_LOAD segment")
    needed = []
    for name_off in needed_offsets:
        start = strtab + name_off
        needed.append(data[start : data.index(b"\0", start)].decode())
    return Dynamic(interp, tuple(needed))
