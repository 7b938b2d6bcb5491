"""x86-64 virtual-to-physical translation, with the page-table format as data.

As in Volatility 3's ``intel.py`` and memflow's x64 ``virtual_address_splits``,
4-level and 5-level (LA57) paging are two :class:`PagingFormat` values walked
by one generic routine in :class:`PagedMemory`.

Caching is explicit: a :class:`TranslationCache` holds table pages (keyed by
the physical address of the table page) and small per-address-space TLBs for
one *epoch*. Nothing is cached without one; :meth:`TranslationCache.invalidate`
starts a new epoch and drops everything. The intended policy is one epoch
per command snapshot of a live guest.

Walk semantics follow the SDM for what matters to a reader: an entry is
followed if bit 0 (P) is set; bit 7 (PS) makes a leaf only where the format
allows large pages (PDPT: 1 GiB, PD: 2 MiB) and is ignored elsewhere; frame
addresses are bits 12..51 (for large pages also cleared below the page size,
which drops the PAT bit 12). Access rights (R/W, U/S, NX) and reserved bits
are not checked.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .backends.base import PartialRead, PhysicalMemory
from .errors import InvalidAddressError

__all__ = [
    "PagingFormat",
    "FOUR_LEVEL",
    "FIVE_LEVEL",
    "CR3_ADDRESS_MASK",
    "CR4_LA57",
    "format_for_cr4",
    "TranslationCache",
    "PagedMemory",
]

CR4_LA57 = 1 << 12
#: CR3 bits 12..51: the top-level table. Bits 0..11 (PCID or PWT/PCD) and
#: bit 63 (no-flush on write) are not part of the address.
CR3_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
_PAGE = 0x1000
_PAGE_MASK = _PAGE - 1
_U64 = 1 << 64


@dataclass(frozen=True)
class PagingFormat:
    """One page-table format: table names top-down, index bits, where large pages may end the walk.

    ``index_bits`` has one entry per level followed by the page-offset bits,
    like memflow's ``virtual_address_splits``.
    """

    name: str
    level_names: tuple[str, ...]
    index_bits: tuple[int, ...]
    large_levels: frozenset[str]
    address_mask: int = 0x000F_FFFF_FFFF_F000
    present_bit: int = 0
    large_bit: int = 7
    entry_size: int = 8
    shifts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.index_bits) != len(self.level_names) + 1:
            raise ValueError("index_bits needs one entry per level plus the page-offset bits")
        shifts = []
        total = self.index_bits[-1]
        for bits in reversed(self.index_bits[:-1]):
            shifts.append(total)
            total += bits
        object.__setattr__(self, "shifts", tuple(reversed(shifts)))

    @property
    def levels(self) -> int:
        return len(self.level_names)

    @property
    def va_bits(self) -> int:
        """Implemented virtual-address bits (48 or 57)."""
        return sum(self.index_bits)

    def page_size(self, level: str) -> int:
        """Bytes mapped by one entry of table ``level`` (a 1 GiB page for PDPT)."""
        return 1 << self.shifts[self.level_names.index(level)]

    def is_canonical(self, vaddr: int) -> bool:
        """True if bits 63..va_bits-1 all equal bit va_bits-1."""
        if not 0 <= vaddr < _U64:
            return False
        top = vaddr >> (self.va_bits - 1)
        return top == 0 or top == (1 << (65 - self.va_bits)) - 1

    def canonical(self, linear: int) -> int:
        """Sign-extend a va_bits-wide address to 64 bits."""
        if linear >> (self.va_bits - 1) & 1:
            return linear | (_U64 - (1 << self.va_bits))
        return linear


FOUR_LEVEL = PagingFormat("x86-64 4-level", ("PML4", "PDPT", "PD", "PT"), (9, 9, 9, 9, 12),
                          frozenset({"PDPT", "PD"}))
FIVE_LEVEL = PagingFormat("x86-64 5-level", ("PML5", "PML4", "PDPT", "PD", "PT"), (9, 9, 9, 9, 9, 12),
                          frozenset({"PDPT", "PD"}))


def format_for_cr4(cr4: int) -> PagingFormat:
    """FIVE_LEVEL if CR4.LA57 is set, else FOUR_LEVEL."""
    return FIVE_LEVEL if cr4 & CR4_LA57 else FOUR_LEVEL


class TranslationCache:
    """Page-table pages and TLBs of one epoch, read through ``memory``.

    ``table(paddr)`` returns the decoded entries of one table page, reading
    it on first use. ``invalidate()`` bumps ``epoch`` and empties everything,
    including the TLB dicts handed to translators (cleared in place). When a
    limit is reached the corresponding store is emptied, which only makes
    later data fresher.
    """

    def __init__(self, memory: PhysicalMemory, max_tables: int = 4096, max_tlb: int = 1 << 16) -> None:
        self.memory = memory
        self.epoch = 0
        self.max_tables = max_tables
        self.max_tlb = max_tlb
        self.table_reads = 0
        self._tables: dict[int, Sequence[int]] = {}
        self._tlbs: dict[object, dict[int, int]] = {}

    def table(self, paddr: int) -> Sequence[int]:
        """The 512 entries of the table page at ``paddr`` (page aligned).

        Kept as a 4 KiB ``array('Q')``: a tuple of 512 Python ints costs about
        20 KiB, and a plugin that builds a layer per process (psaux at 2,000
        tasks) fills thousands of tables.
        """
        entries = self._tables.get(paddr)
        if entries is None:
            data = self.memory.read(paddr, _PAGE)
            self.table_reads += 1
            entries = array.array("Q", data)
            if sys.byteorder != "little":
                entries.byteswap()
            if len(self._tables) >= self.max_tables:
                self._tables.clear()
            self._tables[paddr] = entries
        return entries

    def tlb(self, key: object) -> dict[int, int]:
        """The TLB (virtual page number -> physical 4 KiB page) for one address space."""
        tlb = self._tlbs.get(key)
        if tlb is None:
            tlb = self._tlbs[key] = {}
        return tlb

    def invalidate(self) -> None:
        """Start a new epoch: forget every table page and TLB entry."""
        self.epoch += 1
        self._tables.clear()
        for tlb in self._tlbs.values():
            tlb.clear()

    def __len__(self) -> int:
        return len(self._tables)


_ENUMERATE_FROM = 64 * _PAGE
"""Longer ``mapping(ignore_errors=True)`` ranges are enumerated from the page tables."""


class PagedMemory:
    """A virtual address space: physical memory plus CR3 and a paging format.

    Without ``cache`` every translation reads the page tables afresh. With
    one, table pages and translations are reused until the cache is
    invalidated.
    """

    def __init__(self, physical: PhysicalMemory, cr3: int, fmt: PagingFormat = FOUR_LEVEL,
                 cache: TranslationCache | None = None, name: str = "kernel") -> None:
        if cache is not None and cache.memory is not physical:
            raise ValueError("the translation cache reads a different physical memory")
        if fmt.entry_size != 8 or any(b != 9 for b in fmt.index_bits[:-1]) or fmt.index_bits[-1] != 12:
            raise ValueError("PagedMemory walks 8-byte entries, 9-bit indices and 4 KiB base pages")
        self.physical = physical
        self.cr3 = cr3
        self.dtb = cr3 & CR3_ADDRESS_MASK
        self.format = fmt
        self.cache = cache
        self.name = name
        self._phys_read = physical.read
        self._mask = fmt.address_mask
        self._levels = tuple((level, shift, level in fmt.large_levels)
                             for level, shift in zip(fmt.level_names, fmt.shifts))
        self._va_top = fmt.va_bits - 1
        self._upper = (1 << (65 - fmt.va_bits)) - 1
        if cache is not None:
            self._tlb = cache.tlb((self.dtb, fmt.name))
        else:
            self._tlb = {}
        self._tlb_get = self._tlb.get
        self._use_tlb = cache is not None
        self._max_tlb = cache.max_tlb if cache is not None else 0

    def with_cr3(self, cr3: int, name: str | None = None) -> "PagedMemory":
        """Another address space (a process) on the same physical memory and cache."""
        return PagedMemory(self.physical, cr3, self.format, self.cache, name or f"{self.name}@{cr3:#x}")

    # -- translation ------------------------------------------------------

    def _entries(self, table: int) -> Sequence[int]:
        if self.cache is not None:
            return self.cache.table(table)
        return struct.unpack("<512Q", self._phys_read(table, _PAGE))

    def _entry(self, table: int, index: int) -> int:
        if self.cache is not None:
            return self.cache.table(table)[index]
        return int.from_bytes(self._phys_read(table + 8 * index, 8), "little")

    def translate(self, vaddr: int) -> tuple[int, int]:
        """(physical address, page size) for ``vaddr``; InvalidAddressError names the level that stopped the walk."""
        top = vaddr >> self._va_top
        if not (top == 0 or top == self._upper) or vaddr < 0:
            raise InvalidAddressError(self.name, vaddr, "non-canonical address")
        table = self.dtb
        mask = self._mask
        entry = self.cr3
        for level, shift, large_ok in self._levels:
            index = (vaddr >> shift) & 0x1FF
            try:
                entry = self._entry(table, index)
            except InvalidAddressError:
                raise InvalidAddressError(self.name, vaddr, f"{level} table at {table:#x} is outside guest RAM",
                                          entry=entry) from None
            if not entry & 1:
                raise InvalidAddressError(self.name, vaddr, entry=entry, level=level)
            if large_ok and entry & 0x80:
                size = 1 << shift
                return (entry & mask & -size) | (vaddr & (size - 1)), size
            table = entry & mask
        return table | (vaddr & _PAGE_MASK), _PAGE

    def _page(self, vaddr: int) -> int:
        """Physical 4 KiB page of ``vaddr`` (through the TLB when caching)."""
        vpn = vaddr >> 12
        ppage = self._tlb_get(vpn)
        if ppage is None:
            paddr, _size = self.translate(vaddr)
            ppage = paddr & ~_PAGE_MASK
            if self._use_tlb:
                self._remember(vpn, ppage)
        return ppage

    def _remember(self, vpn: int, ppage: int) -> None:
        tlb = self._tlb
        if len(tlb) >= self._max_tlb:
            tlb.clear()
        tlb[vpn] = ppage

    def vtop(self, vaddr: int) -> int:
        """Physical address of ``vaddr``."""
        return self._page(vaddr) | (vaddr & _PAGE_MASK)

    def is_valid(self, vaddr: int, length: int = 1) -> bool:
        """True if every page of ``[vaddr, vaddr+length)`` is mapped."""
        try:
            for _ in self.mapping(vaddr, length):
                pass
        except InvalidAddressError:
            return False
        return True

    # -- reading ----------------------------------------------------------

    def read(self, vaddr: int, length: int) -> bytes:
        """``length`` bytes at ``vaddr``; InvalidAddressError at the first hole."""
        off = vaddr & _PAGE_MASK
        if off + length <= _PAGE:
            ppage = self._tlb_get(vaddr >> 12)
            if ppage is None:
                ppage = self._page(vaddr)
            return self._phys_read(ppage | off, length)
        return b"".join(self._phys_read(paddr, n) for _v, n, paddr in self.mapping(vaddr, length))

    def read_partial(self, vaddr: int, length: int, pad: bytes = b"\0") -> PartialRead:
        """Read what is mapped; ``failed`` lists the unmapped (vaddr, length) runs, padded in ``data``."""
        out = bytearray()
        failed: list[tuple[int, int]] = []
        pos = vaddr
        for run_v, n, paddr in self.mapping(vaddr, length, ignore_errors=True):
            if run_v > pos:
                out += pad * (run_v - pos)
                failed.append((pos, run_v - pos))
            try:
                out += self._phys_read(paddr, n)
            except InvalidAddressError:
                out += pad * n
                failed.append((run_v, n))
            pos = run_v + n
        if pos < vaddr + length:
            out += pad * (vaddr + length - pos)
            failed.append((pos, vaddr + length - pos))
        merged: list[tuple[int, int]] = []
        for a, n in failed:
            if merged and merged[-1][0] + merged[-1][1] == a:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((a, n))
        return PartialRead(vaddr, bytes(out), merged)

    def read_padded(self, vaddr: int, length: int, pad: bytes = b"\0") -> bytes:
        """Like :meth:`read`, with unmapped bytes replaced by ``pad``."""
        return self.read_partial(vaddr, length, pad).data

    def mapping(self, vaddr: int, length: int, ignore_errors: bool = False) -> Iterator[tuple[int, int, int]]:
        """Runs ``(vaddr, length, paddr)`` covering the range, physically contiguous runs merged.

        With ``ignore_errors`` unmapped parts are skipped instead of raising.
        A range of more than ``_ENUMERATE_FROM`` bytes is enumerated from the
        page tables themselves (:meth:`iter_mapped`), so a hole costs one look
        at a non-present entry, not a failed walk and an exception per 4 KiB
        page (a scan of the kernel's virtual space meets about a million of
        those); a short one goes page by page through the TLB.
        """
        if ignore_errors and length > _ENUMERATE_FROM:
            yield from self._mapped_runs(vaddr, vaddr + length)
            return
        pos, end = vaddr, vaddr + length
        run_v = run_p = run_n = 0
        tlb_get = self._tlb_get
        while pos < end:
            try:
                ppage = tlb_get(pos >> 12)
                if ppage is not None:
                    paddr, size = ppage | (pos & _PAGE_MASK), _PAGE
                else:
                    paddr, size = self.translate(pos)
                    if self._use_tlb:
                        self._remember(pos >> 12, paddr & ~_PAGE_MASK)
            except InvalidAddressError as exc:
                if not ignore_errors:
                    raise
                if run_n:
                    yield run_v, run_n, run_p
                    run_n = 0
                pos = self._skip(pos, exc, end)
                continue
            n = min(end, (pos | (size - 1)) + 1) - pos
            if run_n and run_v + run_n == pos and run_p + run_n == paddr:
                run_n += n
            else:
                if run_n:
                    yield run_v, run_n, run_p
                run_v, run_p, run_n = pos, paddr, n
            pos += n
        if run_n:
            yield run_v, run_n, run_p

    def _mapped_runs(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """:meth:`mapping` with ``ignore_errors``: the present pages of ``[start, end)``, clipped
        to it, physically contiguous ones merged into runs."""
        run_v = run_p = run_n = 0
        for va, size, pa in self.iter_mapped(max(start, 0), min(end, _U64)):
            lo, hi = max(va, start), min(va + size, end)
            paddr = pa + (lo - va)
            if run_n and run_v + run_n == lo and run_p + run_n == paddr:
                run_n += hi - lo
                continue
            if run_n:
                yield run_v, run_n, run_p
            run_v, run_p, run_n = lo, paddr, hi - lo
        if run_n:
            yield run_v, run_n, run_p

    def _skip(self, vaddr: int, exc: InvalidAddressError, end: int) -> int:
        """First address after the region a failed walk proved unmapped."""
        if exc.level is not None:
            size = self.format.page_size(exc.level)
            return (vaddr | (size - 1)) + 1
        half = 1 << self._va_top
        if vaddr < 0:
            return 0
        if half <= vaddr < _U64 - half:
            return _U64 - half
        if vaddr >= _U64:
            return end
        return (vaddr | _PAGE_MASK) + 1

    # -- enumeration ------------------------------------------------------

    def iter_mapped(self, start: int = 0, end: int = _U64) -> Iterator[tuple[int, int, int]]:
        """Present pages ``(vaddr, page_size, paddr)`` that intersect ``[start, end)``, in address order.

        Non-present upper-level entries are skipped whole; table pages that
        cannot be read (entries pointing outside RAM) are skipped.
        """
        fmt = self.format
        half = 1 << self._va_top
        lo_end = min(end, half)
        if start < lo_end:
            yield from self._walk_range(self.dtb, 0, 0, start, lo_end)
        hi_start = max(start, _U64 - half)
        if hi_start < end:
            bias = _U64 - (1 << fmt.va_bits)
            for va, size, pa in self._walk_range(self.dtb, 0, 0, hi_start - bias, min(end, _U64) - bias):
                yield va + bias, size, pa

    def _walk_range(self, table: int, depth: int, base: int, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        level, shift, large_ok = self._levels[depth]
        try:
            entries = self._entries(table)
        except InvalidAddressError:
            return
        span = 1 << shift
        first = max(0, (lo - base) >> shift)
        last = min(511, (hi - 1 - base) >> shift)
        mask = self._mask
        if depth == len(self._levels) - 1:
            for index in range(first, last + 1):
                entry = entries[index]
                if entry & 1:
                    yield base + index * span, span, entry & mask
            return
        for index in range(first, last + 1):
            entry = entries[index]
            if not entry & 1:
                continue
            va = base + index * span
            if large_ok and entry & 0x80:
                yield va, span, entry & mask & -span
            else:
                yield from self._walk_range(entry & mask, depth + 1, va, lo, hi)
