"""Linux system calls the standard library lacks, through ctypes (x86_64 numbers).

Every wrapper raises :class:`OSError` with the errno and what it was applied to.
They are safe to call in a child forked from the multithreaded agent: the libc
symbols are resolved here, at import, so a call makes no import, takes no lock
and allocates nothing beyond the call's own arguments.
"""

from __future__ import annotations

import ctypes
import os

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MS_LAZYTIME = 0x2000000

MNT_FORCE = 0x1
MNT_DETACH = 0x2

# clone(2) / unshare(2) / setns(2) namespace flags
CLONE_NEWTIME = 0x80
CLONE_NEWNS = 0x20000
CLONE_NEWCGROUP = 0x2000000
CLONE_NEWUTS = 0x4000000
CLONE_NEWIPC = 0x8000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

# reboot(2)
RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC

# ioctls
TIOCSCTTY = 0x540E
TIOCSWINSZ = 0x5414
TIOCGPTN = 0x80045430
TIOCSPTLCK = 0x40045431
SIOCGIFFLAGS = 0x8913
BLKFLSBUF = 0x1261  # write back and drop a block device's cached blocks
SIOCSIFFLAGS = 0x8914
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207

_SYS_CAPGET = 125
_SYS_CAPSET = 126
_SYS_PIVOT_ROOT = 155
_SYS_FINIT_MODULE = 313
_SYS_CLOSE_RANGE = 436

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_umount2 = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_setns = _libc.setns
_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_sethostname = _libc.sethostname
_sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_reboot = _libc.reboot
_reboot.argtypes = [ctypes.c_int]
_signal = _libc.signal
_signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
_signal.restype = ctypes.c_void_p
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


_CapDataPair = _CapData * 2


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _b(value: str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return os.fsencode(value)


def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | bytes | None,
    flags: int = 0,
    data: str | bytes | None = None,
) -> None:
    _check(
        _mount(_b(source), _b(target), _b(fstype), flags, _b(data) or None), f"mount {os.fsdecode(target)}"
    )


def umount2(target: str | bytes, flags: int = 0) -> None:
    _check(_umount2(_b(target), flags), f"umount {os.fsdecode(target)}")


def unshare(flags: int) -> None:
    _check(_unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_setns(fd, nstype), "setns")


def pivot_root(new_root: str | bytes, put_old: str | bytes) -> None:
    _check(
        _syscall(_SYS_PIVOT_ROOT, ctypes.c_char_p(_b(new_root)), ctypes.c_char_p(_b(put_old))), "pivot_root"
    )


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set the calling thread's capability sets (64-bit masks)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair(
        _CapData(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF),
        _CapData(effective >> 32, permitted >> 32, inheritable >> 32),
    )
    _check(_syscall(_SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)), "capset")


def finit_module(fd: int, params: str = "") -> None:
    _check(
        _syscall(_SYS_FINIT_MODULE, ctypes.c_int(fd), ctypes.c_char_p(params.encode()), ctypes.c_int(0)),
        "finit_module",
    )


def close_range(first: int, last: int) -> None:
    """Close every fd in [first, last]; falls back to os.closerange on old kernels."""
    if first > last:
        return
    if _syscall(_SYS_CLOSE_RANGE, ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(0)) < 0:
        os.closerange(first, min(last, 65535) + 1)


def reboot(cmd: int) -> None:
    _check(_reboot(cmd), "reboot")


def reset_signal(signum: int) -> None:
    """Restore the default disposition (Python ignores SIGPIPE and SIGXFSZ; exec keeps SIG_IGN)."""
    _signal(signum, None)  # SIG_DFL is 0


def ignore_signal(signum: int) -> None:
    _signal(signum, 1)  # SIG_IGN
