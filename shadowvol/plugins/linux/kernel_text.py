"""The kernel image a profile was built from, as the running kernel should hold it.

Models what the x86-64 loader and the kernel itself do to the text of
``vmlinux`` after it is built:

- KASLR (arch/x86/boot/compressed/misc.c ``handle_relocations``): the
  decompressed payload of a bzImage is ``vmlinux.bin`` (the ELF, symbols
  stripped, sections kept) followed by ``vmlinux.relocs``: read backwards
  from its end, the 32-bit relocations, a zero, the inverse 32-bit ones, a
  zero, the 64-bit ones, a zero. Each entry is the sign-extended link address
  of a word to which the virtual slide is added (subtracted for the inverse
  ones). :class:`Relocs` applies them to any window of text.
- Sites the kernel patches in itself at boot or at run time, each found from
  the image's own tables (arch/x86/kernel/alternative.c, jump_label.c,
  static_call.c, ftrace.c, include/asm-generic/vmlinux.lds.h): an output
  section of that name, or for tables the linker script folds into a bigger
  section, the image's bounding symbols (``__start_mcount_loc`` ...). The
  struct layouts come from the profile (:class:`Layout`), so a kernel whose
  ``struct alt_instr`` grew a field is read right.

Pure logic on bytes: no volatility3 here, so it is tested on synthetic ELF
images; ``linux.check_text`` feeds it live memory.
"""

from __future__ import annotations

import bisect
import struct
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional, Sequence

__all__ = ["KernelTextError", "Section", "ElfImage", "Relocs", "Layout", "PatchSite", "PatchSites",
           "patch_sites", "Difference", "compare_text", "instruction_bounds", "is_nop"]

_ELF_MAGIC = b"\x7fELF"
SHT_NOBITS = 8
MAX_TABLE_ENTRIES = 1 << 22


class KernelTextError(Exception):
    """The image is not what the check needs (not an ELF64, a table out of bounds...)."""


@dataclass(frozen=True)
class Section:
    """One ELF64 section header (Elf64_Shdr)."""

    name: str
    type: int
    addr: int
    offset: int
    size: int

    def __contains__(self, addr: int) -> bool:
        return self.addr <= addr < self.addr + self.size


class Relocs:
    """``vmlinux.relocs``: link addresses of the words KASLR relocates, sorted.

    Entries are the low 32 bits of addresses in the top 2 GiB
    (0xffffffff80000000 and up), so they sort and compare as the full
    addresses do, without sign-extending each of them.
    """

    LOW = 0xFFFF_FFFF

    def __init__(self, r32: Sequence[int], inv32: Sequence[int], r64: Sequence[int]) -> None:
        self.r32 = sorted(r32)
        self.inv32 = sorted(inv32)
        self.r64 = sorted(r64)

    @classmethod
    def from_tail(cls, tail: bytes) -> Optional["Relocs"]:
        """The three tables at the end of ``tail`` (the bytes after the ELF), or None when
        ``tail`` does not end in exactly that layout."""
        if len(tail) < 12 or len(tail) % 4:
            return None
        words = array("I")
        words.frombytes(bytes(tail))
        if words.itemsize != 4:
            return None
        words.reverse()
        tables: list[array] = []
        i = 0
        for _ in range(3):
            try:
                end = words.index(0, i)
            except ValueError:
                return None
            tables.append(words[i:end])
            i = end + 1
        if any(words[i:]):  # anything before the 64-bit table is not relocs
            return None
        return cls(*tables)

    def apply(self, buf: bytearray, base: int, delta: int) -> None:
        """Relocate ``buf`` (the image bytes at link address ``base``) by ``delta``; words
        that straddle an edge of ``buf`` are left alone (read a margin around what you need)."""
        if not delta:
            return
        low = base & self.LOW
        end = low + len(buf)
        for table, size, sign in ((self.r32, 4, 1), (self.inv32, 4, -1), (self.r64, 8, 1)):
            fmt = "<I" if size == 4 else "<Q"
            modulo = (1 << (8 * size)) - 1
            for i in range(bisect.bisect_left(table, low), bisect.bisect_left(table, end - size + 1)):
                off = table[i] - low
                value = struct.unpack_from(fmt, buf, off)[0]
                struct.pack_into(fmt, buf, off, (value + sign * delta) & modulo)


class ElfImage:
    """A vmlinux ELF64 (little-endian x86-64) read by section, with the relocs appended to it if any.

    ``data`` is any bytes-like object (an mmap of the file keeps the 50 MB off the heap).
    """

    def __init__(self, data: "bytes | memoryview | object") -> None:
        self.data = data
        head = bytes(data[:64])  # type: ignore[index]
        if len(head) < 64 or head[:4] != _ELF_MAGIC:
            raise KernelTextError("not an ELF file")
        if head[4] != 2 or head[5] != 1:
            raise KernelTextError("not a little-endian 64-bit ELF")
        shoff, = struct.unpack_from("<Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", head, 0x3A)
        size = len(data)  # type: ignore[arg-type]
        if shentsize < 64 or not 0 < shnum < 4096 or shoff + shnum * shentsize > size or shstrndx >= shnum:
            raise KernelTextError("corrupt ELF section header table")
        raw = []
        for i in range(shnum):
            _name, typ, _flags, addr, offset, sz = struct.unpack_from(
                "<IIQQQQ", bytes(data[shoff + i * shentsize:shoff + i * shentsize + 40]))  # type: ignore[index]
            raw.append((_name, typ, addr, offset, sz))
        _n, _t, _a, str_off, str_size = raw[shstrndx]
        if str_off + str_size > size:
            raise KernelTextError("corrupt ELF section name table")
        names = bytes(data[str_off:str_off + str_size])  # type: ignore[index]
        self.sections: dict[str, Section] = {}
        end = shoff + shnum * shentsize
        for name_off, typ, addr, offset, sz in raw:
            name = names[name_off:names.find(b"\0", name_off)].decode("ascii", "replace")
            if typ != SHT_NOBITS:
                if offset + sz > size:
                    raise KernelTextError(f"section {name} lies past the end of the file")
                end = max(end, offset + sz)
            self.sections.setdefault(name, Section(name, typ, addr, offset, sz))
        self.elf_end = end
        self._loaded = sorted((s for s in self.sections.values() if s.addr and s.type != SHT_NOBITS and s.size),
                              key=lambda s: s.addr)
        self._starts = [s.addr for s in self._loaded]
        self.relocs = Relocs.from_tail(bytes(data[end:])) if size > end else None  # type: ignore[index]

    def section_at(self, addr: int) -> Optional[Section]:
        """The loaded section whose link addresses contain ``addr``."""
        i = bisect.bisect_right(self._starts, addr) - 1
        return self._loaded[i] if i >= 0 and addr in self._loaded[i] else None

    def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes at link address ``addr``, all inside one section."""
        sec = self.section_at(addr)
        if sec is None or addr + size > sec.addr + sec.size:
            raise KernelTextError(f"link address {addr:#x}+{size:#x} is not in a section of the image")
        off = sec.offset + addr - sec.addr
        return bytes(self.data[off:off + size])  # type: ignore[index]

    def section_bytes(self, name: str) -> Optional[tuple[int, bytes]]:
        """(link address, contents) of section ``name``, or None if the image has none."""
        sec = self.sections.get(name)
        if sec is None or sec.type == SHT_NOBITS:
            return None
        return sec.addr, bytes(self.data[sec.offset:sec.offset + sec.size])  # type: ignore[index]

    def text(self, addr: int, size: int, delta: int) -> bytes:
        """The image's bytes at link address ``addr`` as the loader leaves them with a
        virtual slide of ``delta`` (relocations applied)."""
        margin = 8
        sec = self.section_at(addr)
        lo = max(addr - margin, sec.addr) if sec else addr
        hi = min(addr + size + margin, sec.addr + sec.size) if sec else addr + size
        buf = bytearray(self.read(lo, hi - lo))
        if delta:
            if self.relocs is None:
                raise KernelTextError("the image has no relocation table (vmlinux.relocs) and the kernel "
                                      f"runs at a KASLR slide of {delta:#x}: pass the vmlinuz, or the whole "
                                      "decompressed payload")
            self.relocs.apply(buf, lo, delta)
        return bytes(buf[addr - lo:addr - lo + size])


@dataclass(frozen=True)
class Layout:
    """A struct's size and the member offsets this module reads (from the profile)."""

    size: int
    offsets: Mapping[str, int]


@dataclass(frozen=True)
class PatchSite:
    """A range of text the kernel may rewrite: ``length`` 0 means one instruction (decoded)."""

    addr: int  # link address
    length: int
    kind: str
    target: Optional[int] = None  # a jump label's jump target (link address)


#: Tables of 32-bit offsets, each relative to its own entry: (section, kind, bytes patched; 0 = one instruction).
REL32_TABLES: tuple[tuple[str, str, int], ...] = (
    (".retpoline_sites", "retpoline", 0),
    (".return_sites", "return-thunk", 0),
    (".call_sites", "call-depth", 0),
    (".ibt_endbr_seal", "endbr-seal", 4),
    (".cfi_sites", "cfi", 0),
    (".smp_locks", "smp-lock", 1),
)
#: arch/x86/include/asm/runtime-const.h: sections of s32 offsets to the immediate patched.
RUNTIME_CONST_PREFIXES: tuple[tuple[str, int], ...] = (("runtime_ptr_", 8), ("runtime_shift_", 1))


def _table(elf: ElfImage, section: str, bounds: Mapping[str, tuple[int, int]]) -> Optional[tuple[int, bytes]]:
    """A table's (link address, bytes): its own section, else the span between its bounding symbols."""
    found = elf.section_bytes(section)
    if found is not None:
        return found
    span = bounds.get(section)
    if span is None or span[1] <= span[0]:
        return None
    return span[0], elf.read(span[0], span[1] - span[0])


def _rel32(base: int, data: bytes) -> list[int]:
    """The target of each s32 self-relative entry of a table at ``base``."""
    offs = array("i")
    offs.frombytes(data[:min(len(data) // 4, MAX_TABLE_ENTRIES) * 4])
    return [base + 4 * i + v for i, v in enumerate(offs)]


def _structs(base: int, data: bytes, layout: Layout) -> Iterator[tuple[int, int]]:
    """(address, offset in data) of each struct of a table."""
    if layout.size <= 0:
        raise KernelTextError("struct size 0 in the profile")
    for i in range(min(len(data) // layout.size, MAX_TABLE_ENTRIES)):
        yield base + i * layout.size, i * layout.size


def patch_sites(elf: ElfImage, layouts: Mapping[str, Layout], bounds: Mapping[str, tuple[int, int]],
                ranges: Optional[Sequence[tuple[int, int]]] = None) -> "PatchSites":
    """Every site the kernel patches in itself, from the image's tables.

    ``layouts``: ``alt_instr``, ``jump_entry``, ``static_call_site``,
    ``paravirt_patch_site`` (those the profile has). ``bounds``: link
    addresses (start, stop) of tables without a section of their own, keyed
    by the section name they would have (``__mcount_loc``, ``__jump_table``,
    ``.static_call_sites``). ``ranges``: sorted, disjoint (start, end) link
    ranges of the text to be compared; only sites that may overlap them are
    kept (a 6.12 kernel has ~400,000 sites, a few thousand in the syscall handlers).
    """
    sites = _Collector(ranges)
    for section, kind, length in REL32_TABLES:
        found = _table(elf, section, bounds)
        if found:
            sites.extend(_rel32(*found), length, kind)
    for name, sec in elf.sections.items():
        for prefix, length in RUNTIME_CONST_PREFIXES:
            if name.startswith(prefix):
                sites.extend(_rel32(*elf.section_bytes(name)), length, "runtime-const")
    alt = _table(elf, ".altinstructions", bounds)
    if alt and "alt_instr" in layouts:
        lay = layouts["alt_instr"]
        io, il = lay.offsets["instr_offset"], lay.offsets["instrlen"]
        for addr, off in _structs(alt[0], alt[1], lay):
            rel, = struct.unpack_from("<i", alt[1], off + io)
            sites.add(addr + io + rel, alt[1][off + il], "alternative")
    para = _table(elf, ".parainstructions", bounds)
    if para and "paravirt_patch_site" in layouts:
        lay = layouts["paravirt_patch_site"]
        for _addr, off in _structs(para[0], para[1], lay):
            instr, = struct.unpack_from("<Q", para[1], off + lay.offsets["instr"])
            sites.add(instr, para[1][off + lay.offsets["len"]], "paravirt")
    jump = _table(elf, "__jump_table", bounds)
    if jump and "jump_entry" in layouts:
        lay = layouts["jump_entry"]
        co, to = lay.offsets["code"], lay.offsets["target"]
        for addr, off in _structs(jump[0], jump[1], lay):
            code, target = struct.unpack_from("<i", jump[1], off + co)[0], struct.unpack_from("<i", jump[1], off + to)[0]
            sites.add(addr + co + code, 0, "jump-label", addr + to + target)
    calls = _table(elf, ".static_call_sites", bounds)
    if calls and "static_call_site" in layouts:
        lay = layouts["static_call_site"]
        ao = lay.offsets["addr"]
        for addr, off in _structs(calls[0], calls[1], lay):
            sites.add(addr + ao + struct.unpack_from("<i", calls[1], off + ao)[0], 5, "static-call")
    mcount = _table(elf, "__mcount_loc", bounds)
    if mcount:
        n = min(len(mcount[1]) // 8, MAX_TABLE_ENTRIES)
        sites.extend([a for a in struct.unpack_from(f"<{n}Q", mcount[1]) if a], 5, "ftrace")
    return PatchSites(sites.sites, sites.kinds)


class _Collector:
    """Patch sites as they are read, keeping those that may overlap the compared ranges."""

    REACH = 16  # a site starting this far before a range may still overlap it
    PAGE = 12

    def __init__(self, ranges: Optional[Sequence[tuple[int, int]]]) -> None:
        self.sites: list[PatchSite] = []
        self.kinds: set[str] = set()
        self._starts = [lo - self.REACH for lo, _ in ranges] if ranges is not None else None
        self._ends = [hi for _, hi in ranges] if ranges is not None else None
        self._pages = {p for lo, hi in (ranges or ()) for p in range((lo - self.REACH) >> self.PAGE,
                                                                     ((hi - 1) >> self.PAGE) + 1)}

    def add(self, addr: int, length: int, kind: str, target: Optional[int] = None) -> None:
        self.kinds.add(kind)
        if self._starts is not None:
            i = bisect.bisect_right(self._starts, addr) - 1
            if i < 0 or addr >= self._ends[i]:
                return
        self.sites.append(PatchSite(addr, length, kind, target))

    def extend(self, addrs: list[int], length: int, kind: str) -> None:
        """Sites of one kind and length (a page of the ranges first, as a cheap filter)."""
        if not addrs:
            return
        self.kinds.add(kind)
        if self._starts is not None:
            shift, pages = self.PAGE, self._pages
            addrs = [a for a in addrs if a >> shift in pages]
        for addr in addrs:
            self.add(addr, length, kind)


class PatchSites:
    """Patch sites sorted by address, looked up by range."""

    def __init__(self, sites: list[PatchSite], kinds: Optional[set[str]] = None) -> None:
        self.sites = sorted(sites, key=lambda s: s.addr)
        self._addrs = [s.addr for s in self.sites]
        #: every kind of site the image has (also those outside the compared ranges)
        self.kinds = sorted(kinds if kinds is not None else {s.kind for s in self.sites})

    def __len__(self) -> int:
        return len(self.sites)

    def within(self, start: int, end: int, reach: int = 16) -> list[PatchSite]:
        """Sites that may overlap ``[start, end)`` (starting up to ``reach`` bytes before it)."""
        return self.sites[bisect.bisect_left(self._addrs, start - reach):bisect.bisect_left(self._addrs, end)]


@dataclass(frozen=True)
class Difference:
    """Changed instructions of one function: ``[offset, offset + len(live))`` from its start."""

    offset: int
    live: bytes
    image: bytes
    sites: tuple[str, ...] = field(default=())  # kinds of patch sites whose live content was refused


def instruction_bounds(cs, code: bytes, base: int) -> list[int]:
    """Offsets of instruction starts in ``code`` (a linear sweep; an undecodable byte is one 'instruction')."""
    out: list[int] = []
    off = 0
    while off < len(code):
        n = 0
        for address, size, _m, _o in cs.disasm_lite(code[off:], base + off):
            out.append(address - base)
            n = address + size - base
        if n <= off:
            out.append(off)
            n = off + 1
        off = n
    return out


def is_nop(cs, code: bytes, base: int = 0) -> bool:
    """Whether ``code`` decodes entirely to nops (the kernel's x86_nops, of any length)."""
    end = 0
    for address, size, mnemonic, _o in cs.disasm_lite(code, base):
        if mnemonic != "nop":
            return False
        end = address + size - base
    return end == len(code)


SiteCheck = Callable[[PatchSite, int, bytes, bytes], bool]
"""(site, live address, live bytes, image bytes) -> whether the live content is one the kernel writes there."""


def compare_text(cs, addr: int, delta: int, live: bytes, image: bytes, sites: Sequence[PatchSite],
                 check: Optional[SiteCheck] = None) -> list[Difference]:
    """Where live text differs from the image's, outside what the kernel patches itself.

    ``addr``: link address of ``image`` (``live`` is at ``addr + delta``).
    Bytes of a patch site are masked; if ``check`` refuses a site's live
    content (a jump label jumping elsewhere, an ftrace site jumping out of
    the kernel), the whole site counts as changed. Changed bytes are widened
    to whole instructions of the image and merged.
    """
    n = min(len(live), len(image))
    bad = bytearray(b != i for b, i in zip(live[:n], image[:n]))
    refused: dict[int, str] = {}
    bounds = instruction_bounds(cs, image[:n], addr)
    for site in sites:
        off = site.addr - addr
        length = site.length or _insn_length(cs, image, off, addr)
        lo, hi = max(off, 0), min(off + length, n)
        if lo >= hi:
            continue
        if check is not None and off >= 0 and off + length <= n and \
                not check(site, site.addr + delta, live[off:off + length], image[off:off + length]):
            bad[lo:hi] = b"\x01" * (hi - lo)
            refused[lo] = site.kind
        else:
            bad[lo:hi] = bytes(hi - lo)
    out: list[Difference] = []
    spans = list(zip(bounds, bounds[1:] + [n]))
    i = 0
    while i < len(spans):
        if not any(bad[spans[i][0]:spans[i][1]]):
            i += 1
            continue
        j = i
        while j + 1 < len(spans) and any(bad[spans[j + 1][0]:spans[j + 1][1]]):
            j += 1
        start, end = spans[i][0], spans[j][1]
        kinds = tuple(sorted({v for o, v in refused.items() if start <= o < end}))
        out.append(Difference(start, live[start:end], image[start:end], kinds))
        i = j + 1
    return out


def _insn_length(cs, image: bytes, off: int, addr: int) -> int:
    """Length of the image's instruction at ``off`` (1 if it does not decode)."""
    if not 0 <= off < len(image):
        return 0
    for _a, size, _m, _o in cs.disasm_lite(image[off:off + 16], addr + off, 1):
        return size
    return 1
