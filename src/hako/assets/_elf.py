"""Just enough ELF (64-bit, little-endian) to find which shared libraries a binary needs, and where
it asks the dynamic loader to look for them."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29


@dataclass(frozen=True)
class Dynamic:
    interpreter: str | None  # PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2
    needed: tuple[str, ...]  # DT_NEEDED sonames, in order
    runpath: tuple[str, ...] = ()  # DT_RUNPATH or DT_RPATH directories, as written ($ORIGIN unexpanded)


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def dynamic(path: Path) -> Dynamic:
    """PT_INTERP, DT_NEEDED and DT_RUNPATH (else DT_RPATH) of an ELF64 LE file; static binaries
    give (None, ())."""
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
    search_offsets: dict[int, int] = {}  # tag (DT_RPATH, DT_RUNPATH): string offset
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
        elif tag in (DT_RPATH, DT_RUNPATH):
            search_offsets[tag] = val
    if strtab_vaddr is None:
        return Dynamic(interp, ())
    strtab = next((o + strtab_vaddr - v for v, o, s in loads if v <= strtab_vaddr < v + s), None)
    if strtab is None:
        raise ValueError(f"{path}: DT_STRTAB is outside every PT_LOAD segment")
    needed = tuple(_string(data, strtab + offset) for offset in needed_offsets)
    # The loader ignores DT_RPATH when DT_RUNPATH is present.
    search = search_offsets.get(DT_RUNPATH, search_offsets.get(DT_RPATH))
    runpath = () if search is None else tuple(d for d in _string(data, strtab + search).split(":") if d)
    return Dynamic(interp, needed, runpath)


def _string(data: bytes, start: int) -> str:
    return data[start : data.index(b"\0", start)].decode()
