"""Turn a layer blob into its uncompressed tar stream: plain, gzip, or zstd (via the zstd program).

The compression is recognised from the data's magic bytes, not trusted from the media type.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import IO

from hako.errors import ImageError
from hako.image.digest import Readable

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20


def sniff(stream: io.BufferedReader) -> str:
    """Return "gzip", "zstd" or "tar" from the first bytes, without consuming them."""
    head = stream.peek(4)[:4]
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head == ZSTD_MAGIC:
        return "zstd"
    return "tar"


@contextlib.contextmanager
def decompressed(raw: io.RawIOBase, what: str) -> Iterator[Readable]:
    """Yield the uncompressed bytes of ``raw``; every byte of ``raw`` is read before this returns."""
    buffered = io.BufferedReader(raw, _CHUNK)
    kind = sniff(buffered)
    if kind == "gzip":
        with gzip.GzipFile(fileobj=buffered, mode="rb") as unzipped:
            yield unzipped
        _exhaust(buffered)
    elif kind == "zstd":
        with _zstd(buffered, what) as stream:
            yield stream
    else:
        yield buffered
        _exhaust(buffered)


def _exhaust(stream: Readable) -> None:
    while stream.read(_CHUNK):
        pass


@contextlib.contextmanager
def _zstd(source: io.BufferedReader, what: str) -> Iterator[IO[bytes]]:
    program = shutil.which("zstd")
    if program is None:
        raise ImageError(f"{what} is zstd-compressed and the zstd program is not installed; install zstd")
    proc = subprocess.Popen(
        [program, "-d", "-c", "-q"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    feed_error: list[BaseException] = []

    def feed() -> None:
        assert proc.stdin is not None
        try:
            while chunk := source.read(_CHUNK):
                proc.stdin.write(chunk)
        except BrokenPipeError:
            pass  # zstd stopped early; its exit status says why
        except BaseException as err:  # reported on the caller's thread
            feed_error.append(err)
        finally:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()

    feeder = threading.Thread(target=feed, name="zstd-feed", daemon=True)
    feeder.start()
    ok = False
    try:
        yield proc.stdout
        _exhaust(proc.stdout)
        ok = True
    finally:
        if not ok:
            proc.kill()
        proc.stdout.close()
        feeder.join()
        stderr = proc.stderr.read().decode(errors="replace").strip()
        proc.stderr.close()
        status = proc.wait()
    if feed_error:
        raise feed_error[0]
    if status != 0:
        raise ImageError(f"{what}: zstd failed to decompress it: {stderr or f'exit status {status}'}")
