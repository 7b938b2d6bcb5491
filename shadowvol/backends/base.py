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
    path: a read inside it costs two comparisons and one slice.

    ``drop_every`` (for an mmap of a *file* only): after that many reads (a
    long read counts once more per 4 KiB it spans), unmap the pages our reads
    have faulted in (``MADV_DONTNEED``; the data
    stays in the file, and the next read faults it in again). A load through
    a file mapping maps the page *and its neighbours* (the kernel's
    fault-around, 64 KiB, even under MADV_RANDOM), and every page mapped
    counts in our RSS: stock ``linux.psaux`` at 2,000 tasks touches 12,700
    distinct guest pages (52 MB) but showed 224 MB of guest RAM in its RSS.
    Dropping bounds that to ``drop_every`` reads' worth (two 64 KiB runs
    each: 32 MiB at 256). Measured at 2,000 tasks: 1.5% of pslist's time,
    where copying each read with ``pread`` instead cost 6.5%. Never for
    anonymous memory, which MADV_DONTNEED would zero.
    """

    def __init__(self, buffer: bytes | mmap.mmap, segments: Sequence[Segment], name: str = "physical",
                 meta: dict[str, Any] | None = None, drop_every: int = 0) -> None:
        if not isinstance(buffer, (bytes, mmap.mmap)):
            raise TypeError("BufferMemory needs bytes or an mmap (their slices are bytes)")
        if drop_every and not isinstance(buffer, mmap.mmap):
            raise TypeError("drop_every needs an mmap of a file")
        segs = sorted(segments, key=lambda s: s.start)
        for a, b in zip(segs, segs[1:]):
            if b.start < a.end:
                raise ValueError(f"overlapping segments {a} and {b}")
        for s in segs:
            if s.end < s.start or s.offset < 0 or s.offset + s.length > len(buffer):
                raise ValueError(f"segment {s} lies outside the buffer ({len(buffer):#x} bytes)")
        self.name = name
        self._buf = buffer
        self._drop_every = max(0, drop_every)
        # Counts down to 0, where the mapped pages are dropped; without
        # dropping it starts where no run ever brings it down.
        self._until_drop = self._drop_every or _NEVER
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
            n = self._until_drop = self._until_drop - 1 - (length >> 12)
            if n <= 0:
                self._drop_pages()
            return self._buf[paddr:paddr + length]
        return self._read_slow(paddr, length)

    def _drop_pages(self) -> None:
        """Unmap the pages reads faulted in (see the class docstring); the next
        read maps them again from the file."""
        if not self._drop_every:
            self._until_drop = _NEVER
            return
        self._until_drop = self._drop_every
        self._buf.madvise(mmap.MADV_DONTNEED)

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
            n = self._until_drop = self._until_drop - 1 - ((stop - addr) >> 12)
            if n <= 0:
                self._drop_pages()
            parts.append(self._buf[off:off + stop - addr])
            addr = stop
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def find(self, needle: bytes, start: int = 0, end: int | None = None,
             chunk: int = 32 << 20) -> Iterator[int]:
        """As :meth:`PhysicalMemory.find`, searching the buffer in place (no copy:
        ``mmap.find`` runs at memory speed, where copying 512 MiB costs 0.8 s).

        Matches are searched ``chunk`` bytes of start positions at a time; with
        ``drop_every`` the pages a chunk faulted in are unmapped after it (as
        reads do), so a scan of all RAM keeps about one chunk of guest RAM in
        our RSS, not all of it (psscan at 1 GiB: 490 MB)."""
        if not needle:
            raise ValueError("empty needle")
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        stop = (1 << 64) if end is None else end
        segs = self._segments
        tail = len(needle) - 1
        for k, seg in enumerate(segs):
            lo, hi = max(seg.start, start), min(seg.end, stop)
            if lo >= hi:
                continue
            delta = seg.offset - seg.start
            limit = min(seg.end, hi + tail) + delta  # a match must end here at the latest
            for first in range(lo + delta, hi + delta, chunk):  # matches starting in [first, last)
                last = min(first + chunk, hi + delta)
                i = self._buf.find(needle, first, last + tail)
                while i >= 0 and i + len(needle) <= limit:
                    yield i - delta
                    i = self._buf.find(needle, i + 1, last + tail)
                if self._drop_every:
                    self._drop_pages()
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
        if self._fast_start <= paddr and paddr + length <= self._fast_end and length >= 0:
            return True
        i = bisect.bisect_right(self._range_starts, paddr) - 1
        return i >= 0 and paddr + length <= self._ranges[i][1]

    def metadata(self) -> dict[str, Any]:
        meta = {"backend": type(self).__name__, "size": self.size(), "source": None, "live": False}
        meta.update(self._meta)
        return meta

    def close(self) -> None:
        buf, self._buf = self._buf, b""
        self._drop_every, self._until_drop = 0, _NEVER
        self._closed = True
        self._fast_end = -1
        self._segments = []
        self._starts = []
        self._ranges = ()
        self._range_starts = []
        if isinstance(buf, mmap.mmap):
            buf.close()


#: ``drop_every`` for guest RAM and dump files (see :class:`BufferMemory`).
DROP_EVERY = 256
_NEVER = 1 << 62  # a countdown no process reaches the end of


def map_file_readonly(path: str, what: str, flags: int = mmap.MAP_SHARED) -> mmap.mmap:
    """mmap a whole file read-only; ``what`` names it in the one-line errors."""
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
            return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
        except OSError as exc:
            raise BackendError(f"cannot map {what} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
