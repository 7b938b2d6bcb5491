"""Input files checked before they are opened, read within their size;
output files written atomically.

Every file shadowvol writes goes through :class:`AtomicFile` (or
:func:`atomic_file`, :func:`atomic_write`, :func:`atomic_copy` on top of it): a temp file in the
same directory, fsync, rename. A reader, a crash or a full disk never sees a
half-written profile, registry entry, image, snapshot or ``-o`` output
(``tests/unit/test_architecture.py`` fails on any other write in the
package). Exempt, and why: lock files (``O_CREAT`` with no data), and
what other programs write (QEMU's console and error logs are streams it
appends to; apt and dpkg write into our scratch directories).

A FIFO given as ``-f`` or ``--profile`` would block ``open()`` forever, and
``/dev/zero`` would be read without end: every path the user names is
``stat``-ed first (which never blocks) and refused unless it is a regular
file (or a directory where one is expected). Reads are bounded by the size
``fstat`` reports for the descriptor actually opened.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import ShadowvolError

__all__ = ["InputError", "check_input", "read_input", "open_input", "AtomicFile", "atomic_file", "atomic_write",
           "atomic_copy", "fsync_dir", "short"]


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


class AtomicFile:
    """A file that appears at its name whole (:meth:`commit`) or never (:meth:`discard`).

    The data goes to a temp file (``.NAME.XXXX.tmp``, mode 0600) in the
    target's own directory, so the final rename or link stays on one
    filesystem. ``file`` is the binary file object to write; writers that
    need the descriptor (``os.pwrite``, ``ftruncate``) use ``file.fileno()``.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o600) -> None:
        self.path = Path(path)
        self.mode = mode
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name[:64]}.", suffix=".tmp", dir=self.path.parent)
        except OSError as exc:
            raise ShadowvolError(f"cannot write {short(self.path)}: {exc.strerror or exc}") from None
        self.tmp = Path(tmp)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self, path: str | os.PathLike[str] | None = None, replace: bool = True,
               unique: bool = False) -> Path:
        """Flush, fsync, chmod, then give the data its name (``path``, default
        the one given at creation, in the same directory) and fsync the
        directory. ``replace=False`` links instead of renaming, so an existing
        file is never replaced (ShadowvolError); ``unique`` then takes the
        first free ``NAME-1.EXT``, ``NAME-2.EXT``... as ``vol -o`` does.
        Returns the name written. On any failure the temp file is gone."""
        target = Path(path) if path is not None else self.path
        try:
            self.file.flush()
            os.fchmod(self.file.fileno(), self.mode)
            os.fsync(self.file.fileno())
            self.file.close()
            if replace:
                os.replace(self.tmp, target)
            else:
                stem, ext = os.path.splitext(target.name)
                for n in range(1 << 16):
                    name = target if n == 0 else target.with_name(f"{stem}-{n}{ext}")
                    try:
                        os.link(self.tmp, name)  # atomic, and never over an existing name
                    except FileExistsError:
                        if unique:
                            continue
                        raise ShadowvolError(f"{short(target)} exists: not overwritten") from None
                    target = name
                    break
                os.unlink(self.tmp)
        except BaseException as exc:
            self.discard()
            if isinstance(exc, OSError):
                raise ShadowvolError(f"cannot write {short(target)}: {exc.strerror or exc}") from None
            raise
        fsync_dir(target.parent)
        return target

    def discard(self) -> None:
        """Drop what was written: the temp file is removed, no name appears."""
        try:
            self.file.close()
        except OSError:
            pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int = 0o600, replace: bool = True) -> Iterator[BinaryIO]:
    """An :class:`AtomicFile` as a ``with`` block: a clean exit commits it
    (``replace=False``: refuse an existing ``path``), an exception inside the
    block discards it and leaves ``path`` as it was."""
    af = AtomicFile(path, mode)
    try:
        yield af.file
    except BaseException:
        af.discard()
        raise
    af.commit(replace=replace)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the names in directory ``path`` durable (after a rename into it)."""
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, replace: bool = True) -> Path:
    """Write ``data`` to ``path`` all or nothing (:func:`atomic_file`). A
    failure leaves the old file (if any) untouched and no temp file behind."""
    with atomic_file(path, mode, replace) as fh:
        fh.write(data)
    return Path(path)


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], mode: int | None = None,
                replace: bool = True) -> Path:
    """Copy the regular file ``src`` to ``dst`` all or nothing (:func:`atomic_file`),
    in 64 MiB chunks; ``mode`` defaults to the permission bits of ``src``
    (an executable stays executable). Also fits ``shutil.copytree(copy_function=...)``."""
    fd, size = open_input(src, "copy source")
    try:
        with atomic_file(dst, stat.S_IMODE(os.fstat(fd).st_mode) if mode is None else mode, replace) as fh:
            left = size
            while left > 0:
                chunk = os.read(fd, min(left, 64 << 20))
                if not chunk:
                    break
                fh.write(chunk)
                left -= len(chunk)
    finally:
        os.close(fd)
    return Path(dst)
