"""Input files checked before they are opened, read within their size;
output files written atomically.

A FIFO given as ``-f`` or ``--profile`` would block ``open()`` forever, and
``/dev/zero`` would be read without end: every path the user names is
``stat``-ed first (which never blocks) and refused unless it is a regular
file (or a directory where one is expected). Reads are bounded by the size
``fstat`` reports for the descriptor actually opened.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import ShadowvolError

__all__ = ["InputError", "check_input", "read_input", "open_input", "atomic_write", "short"]


class InputError(ShadowvolError):
    """A path given by the user is missing, of the wrong kind, or too large."""


def short(text: object, limit: int = 80) -> str:
    """``repr``-free, one-line, at most ``limit`` characters: for echoing user or guest text."""
    s = str(text).replace("\n", "\\n").replace("\r", "\\r")
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_input(path: str | os.PathLike[str], what: str, directory: bool = False) -> Path:
    """``path`` if it exists and is a regular file (a directory with
    ``directory``); else one-line InputError naming ``what`` (e.g. ``-f``)."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{what} {short(p)} does not exist") from None
    except OSError as exc:
        raise InputError(f"{what} {short(p)}: {exc.strerror or exc}") from None
    if directory:
        if not stat.S_ISDIR(st.st_mode):
            raise InputError(f"{what} {short(p)} is {_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'a file'}"
                             ", not a directory")
    elif not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {short(p)} is {_kind(st.st_mode)}: give a regular file")
    return p


def open_input(path: str | os.PathLike[str], what: str) -> tuple[int, int]:
    """(descriptor, size) of a regular file, opened without blocking (O_NONBLOCK:
    a FIFO swapped in after the check cannot hang us) and re-checked with fstat."""
    p = check_input(path, what)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(f"{what} {short(p)}: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise InputError(f"{what} {short(p)} is {_kind(st.st_mode)}: give a regular file")
    return fd, st.st_size


def read_input(path: str | os.PathLike[str], what: str, limit: int = 4 << 30) -> bytes:
    """The bytes of a regular file, never more than its size (nor ``limit``)."""
    fd, size = open_input(path, what)
    try:
        if size > limit:
            raise InputError(f"{what} {short(path)} is {size} bytes, more than the {limit} accepted")
        chunks = []
        left = size
        while left > 0:
            chunk = os.read(fd, min(left, 64 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise InputError(f"{what} {short(path)}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> Path:
    """Write ``data`` to ``path`` all or nothing: a temp file in the same
    directory, fsync, rename, then fsync of the directory. A failure leaves
    the old file (if any) untouched and no temp file behind."""
    p = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise ShadowvolError(f"cannot write {short(p)}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise ShadowvolError(f"cannot write {short(p)}: {exc.strerror or exc}") from None
        raise
    try:
        dfd = os.open(p.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return p
