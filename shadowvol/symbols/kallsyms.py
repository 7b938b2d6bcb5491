"""Kernel symbols from the embedded kallsyms tables (kernel/kallsyms.c,
scripts/kallsyms.c) or from a System.map file.

The tables are found by content, without a symbol table, so the same code
runs on a vmlinux's bytes or on bytes read from a live guest. Every function
takes a bytes-like buffer plus ``base``, the virtual address of ``buf[0]``;
results are link-time (unrelocated) addresses when the buffer comes from the
ELF image, and run-time addresses when it comes from guest memory.

How the tables are located:

1. ``kallsyms_token_table``: 256 NUL-terminated tokens. Digits are common in
   symbol names, so they are never replaced by pairs and tokens 0x30..0x39 are
   the run ``"0\\0" "1\\0" ... "9\\0"``.
2. ``kallsyms_token_index``: 256 u16 offsets into the token table, at the
   first 8-aligned address after the table; entry 0x30 must point at "0".
3. ``kallsyms_markers``: u32 (u64 before v4.20) offsets into
   ``kallsyms_names`` of every 256th symbol, starting with 0; found before the
   token table (directly, or behind ``kallsyms_seqs_of_names`` on v6.2/v6.3).
4. ``kallsyms_names``/``kallsyms_num_syms``: ``num_syms`` sits 8 bytes before
   ``names``; a candidate is accepted when walking 256 entries lands on
   ``markers[1]`` and walking all of them ends at the markers.
5. ``kallsyms_offsets`` + ``kallsyms_relative_base`` (or absolute
   ``kallsyms_addresses``): before ``num_syms`` up to v6.3, after
   ``kallsyms_token_index`` since v6.4 (commit 404bad70fcf7 "scripts/kallsyms:
   change the output order"); the variant whose addresses are sorted wins.
6. ``kallsyms_seqs_of_names`` (v6.2, and backported to 6.1 stable): 3 bytes
   per symbol between the markers and the token table (after
   ``kallsyms_relative_base`` since v6.4); recognised by its size and by
   holding symbol indexes only.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from shadowvol.errors import ProfileError

__all__ = [
    "Symbol", "KallsymsTables", "find_kallsyms", "read_kallsyms", "kallsyms_from_elf",
    "parse_system_map", "size_bounds", "unique_by_name",
]

_DIGITS = b"".join(bytes([c]) + b"\0" for c in b"0123456789")
_MAX_SYMS = 4_000_000


@dataclass(frozen=True, slots=True)
class Symbol:
    """One kernel symbol: ``nm``-style type letter (T, t, D, d, B, b, R, r,
    A, ...), name, and address."""

    name: str
    address: int
    type: str


@dataclass(frozen=True, slots=True)
class KallsymsTables:
    """Virtual addresses of the kallsyms tables found in a buffer."""

    num_syms: int
    names: int
    markers: int
    marker_width: int
    token_table: int
    token_index: int
    addresses: int  # kallsyms_offsets or kallsyms_addresses
    relative_base: int | None  # None: absolute kallsyms_addresses
    layout: str  # "pre-6.4" or "6.4+"
    #: Address of ``kallsyms_relative_base`` itself (None with absolute addresses).
    relative_base_address: int | None = None
    #: ``kallsyms_seqs_of_names`` (None on kernels without it).
    seqs_of_names: int | None = None


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def _u16s(buf: bytes, off: int, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}H", buf, off)


def _find_token_table(buf: bytes, base: int) -> list[tuple[int, int, list[bytes]]]:
    """Candidate (token_table offset, token_index offset, tokens)."""
    found = []
    pos = buf.find(_DIGITS)
    while pos >= 0:
        # The tokens after "9": 0x3a..0xff, each NUL-terminated.
        end = pos
        ok = True
        for _ in range(256 - 0x30):
            nul = buf.find(b"\0", end)
            if nul < 0 or nul - end > 256:
                ok = False
                break
            end = nul + 1
        if ok:
            # The index is aligned (.balign 8); the table may end on an odd
            # address (6.1 rt, 6.12), so step from the first even one.
            for index_off in range(end + (base + end) % 2, end + 16, 2):
                if index_off + 512 > len(buf):
                    continue
                idx = _u16s(buf, index_off, 256)
                start = pos - idx[0x30]
                if idx[0] != 0 or start < 0 or end - start != _token_table_len(idx, buf, start):
                    continue
                if any(b >= a for a, b in zip(idx[1:], idx)):
                    continue
                tokens = [buf[start + idx[k]:start + (idx[k + 1] if k < 255 else end - start) - 1]
                          for k in range(256)]
                if tokens[0x30:0x3a] == [bytes([c]) for c in b"0123456789"]:
                    found.append((start, index_off, tokens))
                    break
        pos = buf.find(_DIGITS, pos + 1)
    return found


def _token_table_len(idx: tuple[int, ...], buf: bytes, start: int) -> int:
    """Length of the token table whose index is ``idx`` (last token + NUL)."""
    last = start + idx[255]
    nul = buf.find(b"\0", last)
    return -1 if nul < 0 else nul + 1 - start


def _name_entry(buf: bytes, off: int) -> tuple[int, int]:
    """(payload offset, payload length) of the kallsyms_names entry at ``off``.
    Lengths >= 0x80 take two bytes (v6.1, commit 73bbb94466fd)."""
    n = buf[off]
    if n & 0x80:
        return off + 2, (n & 0x7F) | (buf[off + 1] << 7)
    return off + 1, n


def _walk_names(buf: bytes, off: int, count: int, limit: int) -> int:
    """Offset after ``count`` entries of kallsyms_names from ``off``, or -1."""
    for _ in range(count):
        if off >= limit:
            return -1
        payload, length = _name_entry(buf, off)
        if length == 0:
            return -1
        off = payload + length
    return off if off <= limit else -1


def _marker_candidates(buf: bytes, base: int, lo: int, hi: int, width: int):
    """Yield (offset, markers) of increasing runs starting with 0 in [lo, hi)."""
    fmt = "<I" if width == 4 else "<Q"
    zero = b"\0" * width
    pos = buf.find(zero, lo, hi)
    while pos >= 0:
        if (base + pos) % 8 == 0 and pos + 2 * width <= len(buf):
            first = struct.unpack_from(fmt, buf, pos + width)[0]
            if 256 * 2 <= first <= 256 * 0x4002:
                markers = [0, first]
                off = pos + 2 * width
                while off + width <= hi:
                    value = struct.unpack_from(fmt, buf, off)[0]
                    if not 0 < value - markers[-1] <= 256 * 0x4002:
                        break
                    markers.append(value)
                    off += width
                yield pos, markers
        pos = buf.find(zero, pos + 1, hi)


def _find_names(buf: bytes, base: int, markers_off: int, markers: list[int]) -> tuple[int, int] | None:
    """(names offset, num_syms) for markers found at ``markers_off``."""
    blocks = len(markers)
    biggest = max(b - a for a, b in zip(markers, markers[1:]))
    lowest = markers_off - markers[-1] - 2 * biggest - 4096
    start = markers_off - markers[-1]
    start -= (base + start) % 8
    for names in range(start, max(lowest, 8) - 1, -8):
        num = struct.unpack_from("<I", buf, names - 8)[0]
        if not 256 * (blocks - 1) < num <= 256 * blocks:
            continue
        if _walk_names(buf, names, 256, markers_off) != names + markers[1]:
            continue
        end = _walk_names(buf, names + markers[-1], num - 256 * (blocks - 1), markers_off)
        if end >= 0 and _align(base + end, 8) == base + markers_off:
            return names, num
    return None


def _read_addresses(buf: bytes, base: int, num: int, names_off: int, index_off: int):
    """Yield (layout, table offset, relative_base or None, its offset or None, addresses)."""
    after_index = _align(base + index_off + 512, 8) - base
    rel_pre = names_off - 16
    candidates = [
        ("pre-6.4", rel_pre - _align(4 * num, 8), rel_pre, True),
        ("pre-6.4", names_off - 8 - 8 * num, None, False),
        ("6.4+", after_index, _align(base + after_index + 4 * num, 8) - base, True),
        ("6.4+", after_index, None, False),
    ]
    for layout, table, rel_off, relative in candidates:
        if table < 0 or (rel_off is not None and rel_off + 8 > len(buf)):
            continue
        decodings = []
        if relative:
            if table + 4 * num > len(buf):
                continue
            rel_base = struct.unpack_from("<Q", buf, rel_off)[0]
            offsets = struct.unpack_from(f"<{num}i", buf, table)
            # CONFIG_KALLSYMS_ABSOLUTE_PERCPU: non-negative entries are
            # absolute, negative ones are relative_base - 1 - entry.
            decodings.append([o if o >= 0 else rel_base - 1 - o for o in offsets])
            decodings.append([rel_base + (o & 0xFFFFFFFF) for o in offsets])
        else:
            if table + 8 * num > len(buf):
                continue
            rel_base = None
            decodings.append(list(struct.unpack_from(f"<{num}Q", buf, table)))
        for addrs in decodings:
            if all(a <= b for a, b in zip(addrs, addrs[1:])) and addrs[-1] > addrs[0]:
                yield layout, table, rel_base, rel_off if relative else None, addrs
                break


def find_kallsyms(buf: bytes | memoryview, base: int = 0) -> tuple[KallsymsTables, list[Symbol]]:
    """Locates the kallsyms tables in ``buf`` and decodes every symbol.

    :param buf: kernel image bytes (a section, a segment, or guest memory).
    :param base: virtual address of ``buf[0]``.
    :raises ProfileError: when no consistent set of tables is found.
    """
    data = buf if isinstance(buf, bytes) else bytes(buf)
    try:
        return _find_kallsyms(data, base)
    except (IndexError, ValueError, OverflowError, struct.error) as exc:
        # A table that points past the buffer (hostile or truncated memory).
        raise ProfileError(f"corrupt kallsyms tables: {exc}") from None


def _find_kallsyms(data: bytes, base: int) -> tuple[KallsymsTables, list[Symbol]]:
    for table_off, index_off, tokens in _find_token_table(data, base):
        lo = max(0, table_off - 8 * 1024 * 1024)
        for width in (4, 8):
            runs = sorted(_marker_candidates(data, base, lo, table_off, width), key=lambda r: -len(r[1]))
            for markers_off, markers in runs:
                found = _find_names(data, base, markers_off, markers)
                if found is None:
                    continue
                names_off, num = found
                for layout, addr_off, rel_base, rel_off, addrs in _read_addresses(
                        data, base, num, names_off, index_off):
                    symbols = _decode_names(data, names_off, num, tokens, addrs)
                    after = _align(base + markers_off + width * ((num + 255) // 256), 8) - base
                    seqs = _seqs_of_names(data, after, table_off, num)
                    if seqs is None and rel_off is not None and layout == "6.4+":
                        seqs = _seqs_after_relative_base(data, rel_off + 8, num)
                    tables = KallsymsTables(
                        num_syms=num, names=base + names_off, markers=base + markers_off,
                        marker_width=width, token_table=base + table_off,
                        token_index=base + index_off, addresses=base + addr_off,
                        relative_base=rel_base, layout=layout,
                        relative_base_address=None if rel_off is None else base + rel_off,
                        seqs_of_names=None if seqs is None else base + seqs)
                    return tables, symbols
    raise ProfileError("no kallsyms tables found (kernel built without CONFIG_KALLSYMS?)")


def _seqs_of_names(buf: bytes, start: int, token_table: int, num: int) -> int | None:
    """Offset of ``kallsyms_seqs_of_names`` (u8[3 * num], big-endian symbol
    indexes in name order) if it fills the gap between the markers and the
    token table, else None."""
    if start + 3 * num > len(buf) or not 0 <= token_table - (start + 3 * num) < 8:
        return None
    for i in range(0, min(num, 64)):
        if int.from_bytes(buf[start + 3 * i:start + 3 * i + 3], "big") >= num:
            return None
    return start


def _seqs_after_relative_base(buf: bytes, start: int, num: int) -> int | None:
    """6.4+ layout: ``kallsyms_seqs_of_names`` follows ``kallsyms_relative_base``
    (commit 404bad70fcf7); accepted when it is a permutation of 0..num-1."""
    if start + 3 * num > len(buf):
        return None
    seqs = {int.from_bytes(buf[start + 3 * i:start + 3 * i + 3], "big") for i in range(num)}
    return start if len(seqs) == num and max(seqs) < num else None


def _decode_names(buf: bytes, off: int, num: int, tokens: list[bytes], addrs: list[int]) -> list[Symbol]:
    """Expands ``num`` compressed names; the first character is the type."""
    out = []
    for i in range(num):
        payload, length = _name_entry(buf, off)
        off = payload + length
        raw = b"".join([tokens[c] for c in buf[payload:off]])
        text = raw.decode("utf-8", "replace")
        out.append(Symbol(text[1:], addrs[i], text[:1]))
    return out


def read_kallsyms(buf: bytes | memoryview, base: int = 0) -> list[Symbol]:
    """Symbols from the kallsyms tables in ``buf`` (see :func:`find_kallsyms`)."""
    return find_kallsyms(buf, base)[1]


def kallsyms_from_elf(path: Path) -> tuple[KallsymsTables, list[Symbol]]:
    """Runs :func:`find_kallsyms` over each loadable, non-empty ELF segment of
    a vmlinux (the tables live in .rodata)."""
    from elftools.elf.elffile import ELFFile

    from shadowvol.symbols.vmlinuz import elf_errors

    with open(path, "rb") as fh:
        try:
            elf = ELFFile(fh)
            segments = [(seg["p_vaddr"], seg.data()) for seg in elf.iter_segments()
                        if seg["p_type"] == "PT_LOAD" and seg["p_filesz"]]
        except elf_errors() as exc:
            raise ProfileError(f"{path}: corrupt ELF ({type(exc).__name__}: {exc})") from None
    for vaddr, data in segments:
        if _DIGITS in data:
            try:
                return find_kallsyms(data, vaddr)
            except ProfileError:
                continue
    raise ProfileError(f"{path}: no kallsyms tables found")


_MAP_LINE = re.compile(rb"^([0-9a-fA-F]+)\s+([A-Za-z?])\s+(\S+)", re.M)


def parse_system_map(text: bytes | str) -> list[Symbol]:
    """Symbols of a System.map file ("ffffffff81000000 T _text" lines)."""
    raw = text.encode() if isinstance(text, str) else text
    syms = [Symbol(m[3].decode(errors="replace"), int(m[1], 16), m[2].decode(errors="replace"))
            for m in _MAP_LINE.finditer(raw)]
    if len(syms) < 2:
        raise ProfileError("System.map holds no symbols (Debian ships a stub; the real one is "
                           "in linux-image-<release>-dbg)")
    return syms


def size_bounds(symbols: list[Symbol]) -> dict[int, int]:
    """Upper bound of each symbol's size by address: the distance to the next
    higher symbol address (absent for the highest address)."""
    addrs = sorted({s.address for s in symbols})
    return {a: b - a for a, b in zip(addrs, addrs[1:])}


def unique_by_name(symbols: list[Symbol]) -> dict[str, Symbol]:
    """One symbol per name: global (upper-case type) beats local; among
    equals the lowest address wins, so the choice does not depend on the
    source's order (kallsyms is sorted by address, an ELF symtab by file):
    profiles from kallsyms and from the symtab agree on every address."""
    out: dict[str, Symbol] = {}
    for sym in symbols:
        old = out.get(sym.name)
        if old is None:
            out[sym.name] = sym
            continue
        rank_old, rank_new = old.type.isupper(), sym.type.isupper()
        if rank_new > rank_old or (rank_new == rank_old and sym.address < old.address):
            out[sym.name] = sym
    return out
