"""The guest image: a root filesystem made only of Debian packages and hako's guest packages.

Recipe:

1. `apt-get download` :data:`PACKAGES` into ``<cache>/debs`` and `dpkg-deb -x` them into a scratch
   tree (never installed on the host).
2. Stage the guest root: busybox (+ applet links under /bin), the python3.11 binary, the standard
   library modules the agent needs, protobuf (with its C++ implementation), hako_agent, hako_ttrpc
   and hako_api under /usr/lib/hako, the shared libraries all of these need (DT_NEEDED closure),
   /init, /etc/hako/image.json and, for the Debian kernel, its modules and /etc/hako/modules.load.
   The standard library subset is modulefinder's closure over our packages plus
   :data:`EXTRA_MODULES` (imported by name), minus :data:`EXCLUDED_MODULES`.
3. Bytecode: the standard library and protobuf ship as sourceless ``.pyc`` (standard library with
   docstrings and asserts stripped, ``-OO``); our packages keep their sources next to
   ``__pycache__``. All compiled by Debian's /usr/bin/python3.11 (the guest's version) with
   ``unchecked-hash`` invalidation, so the guest never stats or hashes sources, and with
   ``-X no_debug_ranges``: code objects keep their line numbers but not the column ranges that
   3.11 adds for tracebacks' carets, which makes the image 0.26 MB smaller and what the guest
   unmarshals at boot smaller. Measured (TCG, interleaved in alternating order, medians): a stub
   /init's imports of the protobuf runtime and hako_api took 85 ms less (20 boots each), a cold
   ``hako run --rm IMG true`` 100-142 ms less (10 and 12 pairs). Compiling protobuf ``-OO``
   too (it is sourceless, so the flag does not need to match the interpreter's) made no
   difference (20 boots each: 0.66 vs 0.645 s for the imports).
4. Check that the modules import inside the staged root (chroot as root, otherwise the staged
   interpreter run through the staged ld.so).
5. Pack: ``initramfs`` (a cpio "newc" archive written by :mod:`._cpio`, with /dev/console,
   /dev/null, /dev/urandom, ...) or ``erofs`` (mkfs.erofs, booted as ``root=/dev/vda ro
   rootfstype=erofs``; /dev comes from CONFIG_DEVTMPFS_MOUNT).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from hako.errors import AssetError

from . import _cache, _cpio, _debs, _elf
from ._progress import Reporter
from ._run import last_line, need_tool, run

RECIPE = "image-4"
PACKAGES = (
    "busybox-static",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "python3-protobuf",
    "libprotobuf32",
    "libstdc++6",
    "libgcc-s1",
)
GUEST_PACKAGES = ("hako_agent", "hako_ttrpc", "hako_api")
GUEST_LIB = "/usr/lib/hako"  # our packages and google.protobuf; /init puts it first on sys.path
PYTHON = "/usr/bin/python3.11"  # in the guest, and Debian's on the host (compiles the bytecode)
STDLIB = "usr/lib/python3.11"
# C++ protobuf imports faster under TCG (descriptor/builder imports: cpp 0.33 s, python 0.63 s).
PROTOBUF_IMPLEMENTATION = "cpp"
# Imported by name (importlib, codecs lookup, C code), so modulefinder cannot see them.
EXTRA_MODULES = (
    "os",  # also the landmark by which python finds its prefix
    "encodings.aliases",
    "encodings.utf_8",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.idna",  # socket.getaddrinfo encodes every host name with the idna codec
    "encodings.raw_unicode_escape",
    "encodings.unicode_escape",
    "google.protobuf.internal.api_implementation",
    "google.protobuf.internal._api_implementation",
    "google.protobuf.pyext._message",
    "google.protobuf.pyext.cpp_message",
    "google.protobuf.descriptor_pool",
    "google.protobuf.symbol_database",
    "google.protobuf.message_factory",
    "google.protobuf.internal.builder",
)
# Never shipped. modulefinder follows every import, including optional ones (asyncio's `import ssl`)
# and those of `if __name__ == "__main__"` helpers (argparse from ast, dis, gzip, inspect, ...).
# fmt: off
EXCLUDED_MODULES = (
    # development, UI and test tooling
    "tkinter", "_tkinter", "idlelib", "turtle", "turtledemo", "test", "unittest", "doctest", "pydoc",
    "pydoc_data", "ensurepip", "lib2to3", "distutils", "venv", "pdb", "bdb", "cProfile", "profile",
    "pstats", "_lsprof", "tracemalloc", "argparse", "gettext", "py_compile", "compileall",
    "statistics", "fractions", "decimal", "_pydecimal", "importlib.metadata", "importlib.resources",
    # need libraries the image does not carry
    "curses", "_curses", "_curses_panel", "readline", "ssl", "_ssl", "_hashlib", "sqlite3", "_sqlite3",
    "dbm", "_dbm", "_gdbm", "lzma", "_lzma", "bz2", "_bz2", "_uuid", "_decimal", "_crypt", "crypt", "nis",
    # archives, network clients and mail: not the agent's business
    "zipfile", "tarfile", "email", "csv", "webbrowser", "http", "xmlrpc", "urllib.request", "ftplib",
    "smtplib", "imaplib", "poplib", "nntplib", "telnetlib", "mailbox", "getpass", "netrc",
    "multiprocessing", "concurrent.futures.process",
    # CJK codecs, audio, test extensions
    "_multibytecodec", "_codecs_cn", "_codecs_hk", "_codecs_iso2022", "_codecs_jp", "_codecs_kr",
    "_codecs_tw", "ossaudiodev", "audioop", "_ctypes_test", "_testcapi", "_testbuffer",
    "_testinternalcapi", "_testmultiphase", "_testimportmultiple", "_testclinic", "_xxtestfuzz",
    "xxlimited", "xxlimited_35",
    # other platforms
    "_osx_support", "_aix_support", "_bootsubprocess", "msvcrt", "winreg", "_winapi", "nt",
    "_overlapped", "_scproxy", "java", "org", "vms_lib", "__main__",
)
# fmt: on
DEVICES = (  # (path, major, minor, mode): an initramfs gets no devtmpfs before /init runs
    ("dev/console", 5, 1, 0o600),
    ("dev/null", 1, 3, 0o666),
    ("dev/zero", 1, 5, 0o666),
    ("dev/random", 1, 8, 0o666),
    ("dev/urandom", 1, 9, 0o666),
    ("dev/kmsg", 1, 11, 0o644),
    ("dev/tty", 5, 0, 0o666),
)
MOUNT_POINTS = ("proc", "sys", "dev", "run", "tmp", "mnt")
# What /init runs before the agent; the build check runs the same lines (see _VERIFY).
PRELUDE = f"""import os
import sys

sys.path[:0] = ["{GUEST_LIB}"]
os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "{PROTOBUF_IMPLEMENTATION}")
"""
INIT = f"""#!{PYTHON} -IS
# hako guest agent entry, PID 1. Written by hako.assets; see /etc/hako/image.json.
{PRELUDE}
from hako_agent.main import main

raise SystemExit(main())
"""
_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib", "lib")  # searched in the debs
LIBDIR = "usr/lib/x86_64-linux-gnu"  # every shared library of the image (/lib is a link to usr/lib)


def guest_sources() -> Path:
    """The directory holding hako_agent, hako_ttrpc and hako_api (the source tree's src/)."""
    here = Path(__file__).resolve().parents[2]
    if all((here / p).is_dir() for p in GUEST_PACKAGES):
        return here
    spec = importlib.util.find_spec("hako_agent")
    if spec and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).parent
    raise AssetError(
        f"guest packages {', '.join(GUEST_PACKAGES)} not found next to hako; "
        "build assets from a hako source checkout"
    )


def guest_source_files(src: Path) -> list[str]:
    """Relative paths of what we copy from our packages: .py files and py.typed."""
    names = []
    for pkg in GUEST_PACKAGES:
        for path in (src / pkg).rglob("*"):
            if (
                path.is_file()
                and (path.suffix == ".py" or path.name == "py.typed")
                and "__pycache__" not in path.parts
            ):
                names.append(path.relative_to(src).as_posix())
    return sorted(names)


def sources_digest(init: str | None = None) -> str:
    """sha256 of our packages' copied files and of /init (:data:`INIT`, or the replacement given)."""
    src = guest_sources()
    digest = _cache.tree_digest(src, guest_source_files(src))
    return hashlib.sha256((digest + "\0" + (INIT if init is None else init)).encode()).hexdigest()


def image_filename(fmt: str, compression: str) -> str:
    if fmt == "erofs":
        return "rootfs.erofs"
    return {"none": "initramfs.cpio", "gzip": "initramfs.cpio.gz", "lz4": "initramfs.cpio.lz4"}[compression]


def build_image(
    dest: Path,
    *,
    kernel_kind: str,
    fmt: str,
    compression: str,
    versions: dict[str, str] | None,
    modules: list[tuple[Path, str]],
    kernel_info: dict[str, Any],
    init: str | None,
    reporter: Reporter,
) -> Path:
    """Build one image file into the (existing, empty) directory ``dest``; returns its path.

    ``modules``: (host file, guest path) of kernel modules, in load order (Debian kernel only).
    ``init``: a replacement /init (tests); then our packages are copied but not required to import.
    """
    started = time.monotonic()
    debs = _debs.fetch(PACKAGES, _cache.cache_root() / "debs", versions)
    work = dest / "work"
    debroot, root = work / "debroot", work / "root"
    for deb in debs:
        _debs.extract(deb, debroot)
    src = guest_sources()
    sources = guest_source_files(src)
    agent_sha = _cache.tree_digest(src, sources)

    _skeleton(root, debroot)
    pylib = work / "pylib"  # google.protobuf and our packages, as modulefinder searches them
    _stage_pylib(pylib, debroot, src, sources)
    found = _find_modules(debroot, pylib, sources, strict=init is None)
    _install_python(root, debroot, pylib, src, sources, found, strict=init is None)
    for host, guest in modules:
        target = root / guest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(host, target)
    if modules:
        (root / "etc/hako/modules.load").write_text("".join(g + "\n" for _, g in modules))
    dropped = _install_libraries(root, debroot)
    built_from = {d.package: d.version for d in debs}
    built_from.update(kernel_info.get("package", {}))
    image_json = {
        "format": fmt,
        "kernel": kernel_kind,
        "built_from": built_from,
        "agent_sha256": agent_sha,
        "recipe": RECIPE,
        "protobuf_implementation": PROTOBUF_IMPLEMENTATION,
    }
    (root / "etc/hako/image.json").write_text(json.dumps(image_json, indent=2, sort_keys=True) + "\n")
    init_text = init if init is not None else INIT
    (root / "init").write_text(init_text)
    (root / "init").chmod(0o755)
    _verify(root, sources if init is None else [])
    shutil.rmtree(debroot)

    out = dest / image_filename(fmt, compression)
    if fmt == "initramfs":
        _pack_initramfs(root, out, compression)
    else:
        _pack_erofs(root, out)
    shutil.rmtree(work)
    reporter.note(
        f"image {kernel_kind}/{fmt}: {out.stat().st_size / 1e6:.1f} MB in "
        f"{time.monotonic() - started:.0f}s"
        + (f" (dropped {', '.join(dropped)}: missing libraries)" if dropped else "")
    )
    return out


# -- staging ----------------------------------------------------------------------------------


def _skeleton(root: Path, debroot: Path) -> None:
    for d in (
        *MOUNT_POINTS,
        "bin",
        "usr/bin",
        "etc/hako",
        "root",
        "var",
        GUEST_LIB.lstrip("/"),
        f"{STDLIB}/lib-dynload",
        LIBDIR,
        "lib64",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "lib").symlink_to("usr/lib")
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    shutil.copy2(debroot / "bin/busybox", root / "bin/busybox")
    applets = run([root / "bin/busybox", "--list"], what="busybox --list").split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    shutil.copy2(debroot / PYTHON.lstrip("/"), root / PYTHON.lstrip("/"))
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
    )
    (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")


def _stage_pylib(pylib: Path, debroot: Path, src: Path, sources: list[str]) -> None:
    protobuf = debroot / "usr/lib/python3/dist-packages/google/protobuf"
    if not protobuf.is_dir():
        raise AssetError(
            f"python3-protobuf has no {protobuf.relative_to(debroot)}; the package layout changed"
        )
    shutil.copytree(protobuf, pylib / "google/protobuf")
    (pylib / "google/__init__.py").write_text("")  # a regular package: there is no site.py to join portions
    for name in sources:
        (pylib / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, pylib / name)
    # modulefinder cannot walk namespace packages; for the analysis only, make them regular ones.
    for pkg in {p.parent for p in pylib.rglob("*.py")}:
        if pkg != pylib and not (pkg / "__init__.py").exists():
            (pkg / "__init__.py").write_text("")


def _module_names(sources: list[str]) -> list[str]:
    names = []
    for name in sources:
        if name.endswith(".py"):
            mod = name[:-3].replace("/", ".")
            names.append(mod.removesuffix(".__init__"))
    return names


def _find_modules(debroot: Path, pylib: Path, sources: list[str], strict: bool) -> dict[str, str | None]:
    """modulefinder's {module: file} over our packages and EXTRA_MODULES, searched only in the image."""
    stdlib = debroot / STDLIB
    job = {
        "path": [str(pylib), str(stdlib), str(stdlib / "lib-dynload")],
        "modules": [*_module_names(sources), *EXTRA_MODULES],
        "excludes": list(EXCLUDED_MODULES),
    }
    answer = _guest_python("find", job)
    errors: dict[str, str] = answer["errors"]
    ours = [m for m in errors if m.split(".")[0] in GUEST_PACKAGES]
    if ours and strict:
        first = ours[0]
        raise AssetError(f"guest package module {first} cannot be analysed: {errors[first]}")
    others = [m for m in errors if m.split(".")[0] not in GUEST_PACKAGES]
    if others:
        raise AssetError(f"image: module {others[0]} not found in the Debian packages: {errors[others[0]]}")
    files: dict[str, str | None] = answer["files"]
    return files


def _install_python(
    root: Path,
    debroot: Path,
    pylib: Path,
    src: Path,
    sources: list[str],
    found: dict[str, str | None],
    strict: bool,
) -> None:
    """Copy or compile every found module into the root, and our packages with their sources.

    Not ``strict`` (a stub /init): our packages may fail to compile; they ship as sources only.
    """
    stdlib = debroot / STDLIB
    jobs: list[list[object]] = []
    for file in sorted({f for f in found.values() if f}):
        path = Path(file)
        if path.is_relative_to(stdlib):
            rel, base, guest_base, optimize = path.relative_to(stdlib), stdlib, "/" + STDLIB, 2
        elif path.is_relative_to(pylib / "google"):
            rel, base, guest_base, optimize = path.relative_to(pylib), pylib, GUEST_LIB, 0
        elif path.is_relative_to(pylib):
            continue  # our packages: below, all of them
        else:
            raise AssetError(f"image: module file {path} is outside the staged packages")
        target = root / guest_base.lstrip("/") / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".py":
            jobs.append([str(base / rel), str(target.with_suffix(".pyc")), f"{guest_base}/{rel}", optimize])
        else:
            shutil.copy2(path, target)
    for name in sources:
        target = root / GUEST_LIB.lstrip("/") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, target)
        if name.endswith(".py"):
            pyc = target.parent / "__pycache__" / f"{target.stem}.cpython-311.pyc"
            jobs.append([str(target), str(pyc), f"{GUEST_LIB}/{name}", 0])
    answer = _guest_python("compile", {"jobs": jobs})
    errors = [e for e in answer["errors"] if strict or not e.startswith(f"{GUEST_LIB}/hako_")]
    if errors:
        raise AssetError(f"image: bytecode compilation failed: {errors[0]}")


def _install_libraries(root: Path, debroot: Path) -> list[str]:
    """Copy the DT_NEEDED closure of every ELF file in the root into /usr/lib/x86_64-linux-gnu.

    Extension modules whose libraries no package provides are dropped (importing them would fail
    anyway; their importers handle ImportError). Returns the dropped module names.
    """
    dropped: list[str] = []
    pending = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and _elf.is_elf(p)]
    have: set[str] = set()
    while pending:
        path = pending.pop()
        dyn = _elf.dynamic(path)
        if dyn.interpreter and not (root / dyn.interpreter.lstrip("/")).exists():
            _install_interpreter(root, debroot, dyn.interpreter)
        missing = [n for n in dyn.needed if n not in have and _find_library(debroot, n) is None]
        if missing:
            if "lib-dynload" in path.parts:
                path.unlink()
                dropped.append(path.name.split(".")[0])
                continue
            raise AssetError(
                f"image: {path.relative_to(root)} needs {', '.join(missing)}, which no package "
                "in hako.assets._image.PACKAGES provides; add the package"
            )
        for soname in dyn.needed:
            if soname in have:
                continue
            have.add(soname)
            found = _find_library(debroot, soname)
            assert found is not None
            target = root / LIBDIR / soname
            if not target.exists():
                shutil.copyfile(found, target)
                target.chmod(0o755)
                pending.append(target)
    return sorted(dropped)


def _install_interpreter(root: Path, debroot: Path, interpreter: str) -> None:
    """The dynamic loader in /usr/lib/x86_64-linux-gnu, and ``interpreter`` (/lib64/...) linking to it."""
    real = _resolve_in(debroot, debroot / interpreter.lstrip("/"))
    if real is None:
        raise AssetError(f"image: ELF interpreter {interpreter} not found in libc6")
    target = root / LIBDIR / Path(interpreter).name
    if not target.exists():
        shutil.copyfile(real, target)
        target.chmod(0o755)
    link = root / interpreter.lstrip("/")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def _resolve_in(base: Path, path: Path) -> Path | None:
    """``path`` with its symlinks followed inside ``base`` (absolute targets are relative to ``base``,
    and /lib is /usr/lib, as on a usr-merged Debian); None if it does not exist."""
    for _ in range(32):
        if not path.exists() and not path.is_symlink():
            rel = path.relative_to(base).as_posix()
            if not rel.startswith("lib/") and not rel.startswith("lib64/"):
                return None
            path = base / "usr" / rel
            if not path.exists() and not path.is_symlink():
                return None
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        joined = base / target.lstrip("/") if target.startswith("/") else path.parent / target
        path = Path(os.path.normpath(joined))
    return None


def _find_library(debroot: Path, soname: str) -> Path | None:
    for d in _LIB_DIRS:
        found = _resolve_in(debroot, debroot / d / soname)
        if found is not None:
            return found
    return None


# -- checking ---------------------------------------------------------------------------------

_VERIFY = f"""{PRELUDE}
failed = []
for name in sys.argv[1:]:
    try:
        __import__(name)
    except BaseException as e:
        failed.append(name + ": " + type(e).__name__ + ": " + str(e))
from google.protobuf.internal import api_implementation
if api_implementation.Type() != "{PROTOBUF_IMPLEMENTATION}":
    failed.append("protobuf implementation is " + api_implementation.Type())
print("\\n".join(failed) if failed else "ok")
"""


def _verify(root: Path, sources: list[str]) -> None:
    """Import our modules (if given) and the protobuf runtime with the staged interpreter."""
    names = [*_module_names(sources), *(m for m in EXTRA_MODULES if m != "google.protobuf.pyext.cpp_message")]
    if os.geteuid() == 0:
        argv: list[str] = [need_tool("chroot"), str(root), PYTHON, "-IS", "-c", _VERIFY, *names]
    else:  # no chroot: the staged python through the staged dynamic loader and libraries
        libs = str(root / LIBDIR)
        argv = [
            str(root / "lib64/ld-linux-x86-64.so.2"),
            "--library-path",
            libs,
            str(root / PYTHON.lstrip("/")),
            "-IS",
            "-c",
            _VERIFY.replace(f'"{GUEST_LIB}"', f'"{root}{GUEST_LIB}"'),
            *names,
        ]
    proc = subprocess.run(argv, capture_output=True, env={"PATH": "/bin", "LC_ALL": "C"}, check=False)
    out = proc.stdout.decode(errors="replace").strip()
    if proc.returncode != 0 or out != "ok":
        detail = out.splitlines()[0] if out and out != "ok" else last_line(proc.stderr)
        raise AssetError(f"image: the staged python cannot import what the agent needs: {detail}")


def _guest_python(command: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run _guestpy.py with Debian's python3.11 (the guest's version)."""
    python = PYTHON
    if not Path(python).is_file():
        raise AssetError(f"{python} not found; install Debian's python3.11 (the guest's interpreter version)")
    helper = Path(__file__).with_name("_guestpy.py")
    proc = subprocess.run(  # -X no_debug_ranges: no column tables in the bytecode (docstring, 3.)
        [python, "-I", "-S", "-X", "no_debug_ranges", str(helper), command],
        input=json.dumps(job).encode(),
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AssetError(f"image: {python} {helper.name} {command} failed: {last_line(proc.stderr)}")
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


# -- packing ----------------------------------------------------------------------------------


def _pack_initramfs(root: Path, out: Path, compression: str) -> None:
    raw = out.with_name("initramfs.cpio")
    with raw.open("wb") as f:
        writer = _cpio.CpioWriter(f)
        writer.add_tree(root)
        for name, major, minor, mode in DEVICES:
            writer.add_char_device(name, major, minor, mode)
        writer.close()
    if compression == "gzip":
        run(["gzip", "-6", "-n", raw], what="gzip initramfs")
    elif compression == "lz4":
        # The kernel's initramfs decompressor wants the legacy lz4 frame (-l).
        run(["lz4", "-l", "-9", "-q", "--rm", raw, out], what="lz4 initramfs")
    elif compression != "none":
        raise AssetError(f"unknown initramfs compression {compression!r}; use none, gzip or lz4")


def _pack_erofs(root: Path, out: Path) -> None:
    for name, _major, _minor, _mode in DEVICES:
        assert not (root / name).exists()
    run(["mkfs.erofs", "--quiet", "--all-root", "-T0", out, root], what="mkfs.erofs")
