"""The physical-memory interface every backend implements.

Modelled on memflow's ``PhysicalMemory``: a backend provides ``read``,
``ranges`` and ``metadata``; batched and partial reads are derived from them.
There is deliberately no write method: shadowvol never writes guest memory.

:class:`BufferMemory` is the one implementation for any memory that is a
bytes-like buffer (an mmap of a shared RAM file, an mmap of a dump, an
anonymous mmap in tests) plus a map of guest-physical segments.
"""

from __future__ import annotations

import bisect
import mmap
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendError, InvalidAddressError

__all__ = [
    "EpochPageCache",
    "PAGE_SIZE",
    "PhysicalMemory",
    "PartialRead",
    "Segment",
    "BufferMemory",
    "merge_ranges",
]

PAGE_SIZE = 0x1000


@dataclass
class PartialRead:
    """A read that may have crossed holes.

    ``data`` always has the requested length; bytes in ``failed`` runs
    (``(address, length)`` pairs, page-granular) are filled with ``pad``.
    """

    address: int
    data: bytes
    failed: list[tuple[int, int]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True if no part of the read failed."""
        return not self.failed


class PhysicalMemory(ABC):
    """Guest-physical memory, read-only.

    ``read`` raises :class:`InvalidAddressError` (``layer=self.name``) for
    any byte outside :meth:`ranges`.
    """

    name: str = "physical"

    @abstractmethod
    def read(self, paddr: int, length: int) -> bytes:
        """Return ``length`` bytes at guest-physical ``paddr``."""

    @abstractmethod
    def ranges(self) -> list[tuple[int, int]]:
        """Guest-physical RAM as sorted, disjoint ``[start, end)`` pairs."""

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """Facts about the source: at least backend, size, source, live."""

    def read_partial(self, paddr: int, length: int, pad: bytes = b"\0") -> PartialRead:
        """Read what is readable; report unreadable pages instead of raising."""
        try:
            return PartialRead(paddr, self.read(paddr, length))
        except InvalidAddressError:
            pass
        out = bytearray()
        failed: list[tuple[int, int]] = []
        addr, end = paddr, paddr + length
        while addr < end:
            chunk = min(end, (addr | (PAGE_SIZE - 1)) + 1) - addr
            try:
                out += self.read(addr, chunk)
            except InvalidAddressError:
                out += pad * chunk
                if failed and failed[-1][0] + failed[-1][1] == addr:
                    failed[-1] = (failed[-1][0], failed[-1][1] + chunk)
                else:
                    failed.append((addr, chunk))
            addr += chunk
        return PartialRead(paddr, bytes(out), failed)

    def find(self, needle: bytes, start: int = 0, end: int | None = None,
             chunk: int = 32 << 20) -> Iterator[int]:
        """Physical address of every occurrence of ``needle`` lying in RAM within
        ``[start, end)``, in order, each once.

        Reads ``chunk`` bytes at a time (plus the needle's length, so matches
        across a chunk boundary are found; a match is reported by the chunk it
        starts in).
        """
        if not needle:
            raise ValueError("empty needle")
        for lo, hi in self.ranges():
            lo, hi = max(lo, start), hi if end is None else min(hi, end)
            for off in range(lo, hi, chunk):
                data = self.read_partial(off, min(chunk + len(needle) - 1, hi - off)).data
                i = data.find(needle)
                while 0 <= i < chunk:
                    yield off + i
                    i = data.find(needle, i + 1)

    def size(self) -> int:
        """Bytes of RAM (sum of :meth:`ranges`)."""
        return sum(end - start for start, end in self.ranges())

    def is_valid(self, paddr: int, length: int = 1) -> bool:
        """True if ``[paddr, paddr+length)`` lies inside one RAM range."""
        return any(start <= paddr and paddr + length <= end for start, end in self.ranges())

    def close(self) -> None:
        """Release the source (sockets, mmaps, attached debuggers)."""

    def __enter__(self) -> "PhysicalMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EpochPageCache(PhysicalMemory):
    """Opt-in middleware for a source whose every read is a hypervisor round trip (``xp``
    through libvirt, ~6 ms): whole 4 KiB pages, fetched once and kept until
    :meth:`invalidate` (the end of an epoch, as :class:`shadowvol.paging.TranslationCache`).
    A running guest is then seen as one snapshot per epoch, page by page, as LibVMI's own
    page cache does. Bounded: past ``max_pages`` the cache starts over."""

    def __init__(self, inner: PhysicalMemory, max_pages: int = 16384) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_pages = max_pages
        self._pages: dict[int, bytes] = {}
        self.fetches = 0  # pages read from ``inner`` since the last invalidate (for tests and bench)

    def invalidate(self) -> None:
        self._pages.clear()
        self.fetches = 0

    def _page(self, page: int) -> bytes:
        data = self._pages.get(page)
        if data is None:
            data = self.inner.read(page, PAGE_SIZE)
            if len(self._pages) >= self.max_pages:
                self._pages.clear()
            self._pages[page] = data
            self.fetches += 1
        return data

    def read(self, paddr: int, length: int) -> bytes:
        if length <= 0:
            return self.inner.read(paddr, length)
        out = bytearray()
        addr, end = paddr, paddr + length
        try:
            while addr < end:
                page = addr & ~(PAGE_SIZE - 1)
                take = min(end, page + PAGE_SIZE) - addr
                out += self._page(page)[addr - page:addr - page + take]
                addr += take
        except InvalidAddressError:
            # A page only partly in RAM: read exactly what was asked, uncached.
            return self.inner.read(paddr, length)
        return bytes(out)

    def ranges(self) -> list[tuple[int, int]]:
        return self.inner.ranges()

    def metadata(self) -> dict[str, Any]:
        return {**self.inner.metadata(), "page_cache": "per epoch"}

    def close(self) -> None:
        self._pages.clear()
        self.inner.close()


@dataclass(frozen=True)
class Segment:
    """Guest-physical ``[start, end)`` stored at ``offset`` in a buffer."""

    start: int
    end: int
    offset: int

    @property
    def length(self) -> int:
        return self.end - self.start


def merge_ranges(ranges: Iterator[tuple[int, int]] | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge touching or overlapping ``[start, end)`` pairs."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


class BufferMemory(PhysicalMemory):
    """Physical memory backed by a buffer (``bytes`` or ``mmap``) and segments.

    The segment holding physical address 0 (or else the largest) is the fast
    path: a read inside it costs two comparisons and one slice, or one
    ``pread`` when the buffer maps a file whose descriptor ``fd`` is given
    (and then owned: closed by :meth:`close`).

    Why ``pread`` for a mapped file: a load through a shared file mapping
    faults in the page *and its neighbours* (the kernel's fault-around, 64 KiB
    by default, even under MADV_RANDOM), and every page mapped counts in our
    RSS. Stock ``linux.psaux`` at 2,000 tasks touches 12,700 distinct guest
    pages (52 MB) yet showed 224 MB of guest RAM in its RSS. ``pread`` copies
    just the bytes asked for, from the same page cache, for about 0.5 µs more
    per read; the mapping stays for :meth:`find`, which scans at memory speed.
    A file that shrinks under us gives a one-line error instead of SIGBUS.
    """

    def __init__(self, buffer: bytes | mmap.mmap, segments: Sequence[Segment], name: str = "physical",
                 meta: dict[str, Any] | None = None, fd: int | None = None) -> None:
        if not isinstance(buffer, (bytes, mmap.mmap)):
            raise TypeError("BufferMemory needs bytes or an mmap (their slices are bytes)")
        segs = sorted(segments, key=lambda s: s.start)
        for a, b in zip(segs, segs[1:]):
            if b.start < a.end:
                raise ValueError(f"overlapping segments {a} and {b}")
        for s in segs:
            if s.end < s.start or s.offset < 0 or s.offset + s.length > len(buffer):
                raise ValueError(f"segment {s} lies outside the buffer ({len(buffer):#x} bytes)")
        self.name = name
        self._buf = buffer
        self._fd = fd
        self._segments = segs
        self._starts = [s.start for s in segs]
        # RAM ranges are fixed for the buffer's life: merged once (is_valid runs per page).
        self._ranges = tuple(merge_ranges((s.start, s.end) for s in segs if s.end > s.start))
        self._range_starts = [a for a, _ in self._ranges]
        self._meta = dict(meta or {})
        self._closed = False
        fast = next((s for s in segs if s.start == 0), max(segs, key=lambda s: s.length, default=None))
        if fast is None:
            self._fast_start, self._fast_end, self._fast_delta = 0, -1, 0
        else:
            self._fast_start, self._fast_end, self._fast_delta = fast.start, fast.end, fast.offset - fast.start

    def read(self, paddr: int, length: int) -> bytes:
        if self._fast_start <= paddr and paddr + length <= self._fast_end and length >= 0:
            paddr += self._fast_delta
            fd = self._fd
            if fd is None:
                return self._buf[paddr:paddr + length]
            data = _pread(fd, length, paddr)
            if len(data) == length:
                return data
            return self._short(paddr - self._fast_delta, length)
        return self._read_slow(paddr, length)

    def _slice(self, off: int, length: int) -> bytes:
        """``length`` bytes at buffer offset ``off`` (inside the buffer's size)."""
        if self._fd is None:
            return self._buf[off:off + length]
        data = _pread(self._fd, length, off)
        if len(data) != length:
            raise BackendError(f"{self.name}: the file behind the buffer ended at offset {off + len(data):#x} "
                               "(it shrank since it was opened)")
        return data

    def _short(self, paddr: int, length: int) -> bytes:
        raise BackendError(f"{self.name}: the file behind the buffer is shorter than when it was opened "
                           f"(read of {length} bytes at physical {paddr:#x})")

    def _read_slow(self, paddr: int, length: int) -> bytes:
        if length < 0:
            raise ValueError("negative length")
        if self._closed:
            raise BackendError(f"{self.name}: read after close")
        if length == 0:
            return b""
        parts: list[bytes] = []
        addr, end = paddr, paddr + length
        i = bisect.bisect_right(self._starts, addr) - 1
        while addr < end:
            if i < 0 or i >= len(self._segments) or not (self._segments[i].start <= addr < self._segments[i].end):
                raise InvalidAddressError(self.name, addr, "not in guest RAM")
            seg = self._segments[i]
            stop = min(end, seg.end)
            off = seg.offset + addr - seg.start
            parts.append(self._slice(off, stop - addr))
            addr = stop
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def find(self, needle: bytes, start: int = 0, end: int | None = None,
             chunk: int = 32 << 20) -> Iterator[int]:
        """As :meth:`PhysicalMemory.find`, searching the buffer in place (no copy:
        ``mmap.find`` runs at memory speed, where copying 512 MiB costs 0.8 s)."""
        if not needle:
            raise ValueError("empty needle")
        stop = (1 << 64) if end is None else end
        segs = self._segments
        for k, seg in enumerate(segs):
            lo, hi = max(seg.start, start), min(seg.end, stop)
            if lo >= hi:
                continue
            delta = seg.offset - seg.start
            i = self._buf.find(needle, lo + delta, hi + delta + len(needle) - 1)
            limit = min(seg.end, hi + len(needle) - 1) + delta
            while i >= 0 and i + len(needle) <= limit:
                yield i - delta
                i = self._buf.find(needle, i + 1, hi + delta + len(needle) - 1)
            # A match across two physically adjacent segments (stored apart in the buffer).
            if k + 1 < len(segs) and segs[k + 1].start == seg.end and len(needle) > 1:
                edge = max(lo, seg.end - len(needle) + 1)
                if edge < hi:
                    data = self.read(edge, seg.end - edge + min(len(needle) - 1, segs[k + 1].length))
                    j = data.find(needle)
                    while 0 <= j and edge + j < hi and edge + j + len(needle) > seg.end:
                        yield edge + j
                        j = data.find(needle, j + 1)

    def segments(self) -> list[Segment]:
        """The guest-physical -> buffer-offset map."""
        return list(self._segments)

    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def is_valid(self, paddr: int, length: int = 1) -> bool:
        i = bisect.bisect_right(self._range_starts, paddr) - 1
        return i >= 0 and paddr + length <= self._ranges[i][1]

    def metadata(self) -> dict[str, Any]:
        meta = {"backend": type(self).__name__, "size": self.size(), "source": None, "live": False}
        meta.update(self._meta)
        return meta

    def close(self) -> None:
        buf, self._buf = self._buf, b""
        fd, self._fd = self._fd, None
        self._closed = True
        self._fast_end = -1
        self._segments = []
        self._starts = []
        self._ranges = ()
        self._range_starts = []
        if isinstance(buf, mmap.mmap):
            buf.close()
        if fd is not None:
            os.close(fd)


_pread = os.pread


def map_file_readonly(path: str, what: str, flags: int = mmap.MAP_SHARED) -> mmap.mmap:
    """mmap a whole file read-only; ``what`` names it in the one-line errors."""
    mm, fd = open_file_readonly(path, what, flags)
    os.close(fd)
    return mm


def open_file_readonly(path: str, what: str, flags: int = mmap.MAP_SHARED) -> tuple[mmap.mmap, int]:
    """A whole file mapped read-only, and its open descriptor (the caller's to
    close: :class:`BufferMemory` reads through it with ``pread``)."""
    import stat as _stat

    # stat before open: a FIFO would block open() forever, a device never ends.
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BackendError(f"cannot open {what} {path}: {exc.strerror}") from None
    if not _stat.S_ISREG(st.st_mode):
        kind = "a directory" if _stat.S_ISDIR(st.st_mode) else "a FIFO" if _stat.S_ISFIFO(st.st_mode) else \
            "a device" if (_stat.S_ISCHR(st.st_mode) or _stat.S_ISBLK(st.st_mode)) else "not a regular file"
        raise BackendError(f"{what} {path} is {kind}: give a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise BackendError(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        if not _stat.S_ISREG(os.fstat(fd).st_mode):
            raise BackendError(f"{what} {path} is not a regular file")
        size = os.fstat(fd).st_size
        if size == 0:
            raise BackendError(f"{what} {path} is empty")
        try:
            mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
        except OSError as exc:
            raise BackendError(f"cannot map {what} {path}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return mm, fd
