"""kallsyms recovery on tables built here the way scripts/kallsyms.c does."""

from __future__ import annotations

import struct
from collections import Counter

import pytest

from shadowvol.errors import ProfileError
from shadowvol.symbols.kallsyms import find_kallsyms, parse_system_map, size_bounds, unique_by_name

BASE = 0xFFFFFFFF82000000  # virtual address of the buffer
TEXT = 0xFFFFFFFF81000000


def _align(buf: bytearray, to: int = 8) -> None:
    while len(buf) % to:
        buf.append(0)


def make_symbols(n: int = 700) -> list[tuple[str, int, str]]:
    """(name, address, type): per-CPU absolute ones first, then text/data."""
    syms = [("fixed_percpu_data", 0, "A"), ("cpu_number", 0x20, "A")]
    for i in range(n):
        syms.append((f"func_{i}_do_work", TEXT + 0x10 * i, "t" if i % 3 else "T"))
    syms.append(("x" * 200, TEXT + 0x10 * n, "T"))  # two-byte length entry
    syms.append(("init_task", TEXT + 0x100000, "D"))
    syms.append(("jiffies_64", TEXT + 0x100000 + 0x2600, "D"))
    return syms


def compress(names: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Token table + compressed names: bytes used as characters stay; each
    unused byte value becomes the most frequent remaining pair."""
    table: list[bytes | None] = [None] * 256
    for name in names:
        for c in name:
            table[c] = bytes([c])
    encoded = [list(name) for name in names]
    for code in range(256):
        if table[code] is not None:
            continue
        pairs = Counter()
        for e in encoded:
            pairs.update(zip(e, e[1:]))
        if not pairs:
            table[code] = b"?"
            continue
        (a, b), _ = pairs.most_common(1)[0]
        table[code] = table[a] + table[b]  # type: ignore[operator]
        for e in encoded:
            i, out = 0, []
            while i < len(e):
                if i + 1 < len(e) and e[i] == a and e[i + 1] == b:
                    out.append(code)
                    i += 2
                else:
                    out.append(e[i])
                    i += 1
            e[:] = out
    return [t or b"?" for t in table], [bytes(e) for e in encoded]


def build_tables(syms: list[tuple[str, int, str]], layout: str = "6.1", relative: bool = True) -> bytes:
    names = [(t + n).encode() for n, _, t in syms]
    tokens, comp = compress(names)
    num = len(syms)
    rel_base = min(a for _, a, t in syms if t != "A")
    if relative:
        # KALLSYMS_ABSOLUTE_PERCPU: absolute values as-is, others rel_base - 1 - addr.
        offsets = b"".join(struct.pack("<i", a if t == "A" else rel_base - 1 - a) for _, a, t in syms)
        addr_block = bytearray(offsets)
        _align(addr_block)
        addr_block += struct.pack("<Q", rel_base)
    else:
        addr_block = bytearray(b"".join(struct.pack("<Q", a) for _, a, _ in syms))
    names_blob = bytearray()
    markers = []
    for i, c in enumerate(comp):
        if i % 256 == 0:
            markers.append(len(names_blob))
        names_blob += bytes([len(c)]) if len(c) < 0x80 else bytes([0x80 | (len(c) & 0x7F), len(c) >> 7])
        names_blob += c
    table = b"".join(t + b"\0" for t in tokens)
    index = []
    off = 0
    for t in tokens:
        index.append(off)
        off += len(t) + 1

    buf = bytearray(b"\xaa" * 40)  # unrelated data
    _align(buf)
    if layout != "6.4":
        buf += addr_block
        _align(buf)
    buf += struct.pack("<I", num)
    _align(buf)
    buf += names_blob
    _align(buf)
    buf += b"".join(struct.pack("<I", m) for m in markers)
    _align(buf)
    if layout == "6.2":
        buf += b"".join(struct.pack(">I", i)[1:] for i in range(num))  # kallsyms_seqs_of_names
        _align(buf)
    buf += table
    _align(buf)
    buf += struct.pack("<256H", *index)
    _align(buf)
    if layout == "6.4":
        buf += addr_block
        if relative:  # kallsyms_seqs_of_names last, indexes in name order
            order = sorted(range(num), key=lambda i: names[i][1:])
            buf += b"".join(struct.pack(">I", i)[1:] for i in order)
        _align(buf)
    buf += b"\xbb" * 64
    return bytes(buf)


@pytest.mark.parametrize("layout", ["6.1", "6.2", "6.4"])
@pytest.mark.parametrize("relative", [True, False])
def test_kallsyms_layouts(layout: str, relative: bool) -> None:
    syms = make_symbols()
    tables, found = find_kallsyms(build_tables(syms, layout, relative), BASE)
    assert tables.num_syms == len(syms)
    assert (tables.relative_base is not None) == relative
    assert tables.layout == ("6.4+" if layout == "6.4" else "pre-6.4")
    assert [(s.name, s.address, s.type) for s in found] == syms


def test_kallsyms_memoryview_and_offset_base() -> None:
    buf = b"\0" * 24 + build_tables(make_symbols(300))
    _, found = find_kallsyms(memoryview(buf), BASE - 24)
    assert found[-2].name == "init_task" and found[-2].address == TEXT + 0x100000


def test_kallsyms_absent() -> None:
    with pytest.raises(ProfileError):
        find_kallsyms(b"\0" * 4096, BASE)


def test_size_bounds_and_unique() -> None:
    syms = parse_system_map("ffffffff81000000 T _text\nffffffff81000000 t startup_64\n"
                            "ffffffff81000100 t helper\nffffffff81000200 T helper\n")
    assert size_bounds(syms)[0xFFFFFFFF81000000] == 0x100
    assert unique_by_name(syms)["helper"].type == "T"


def test_system_map_stub() -> None:
    with pytest.raises(ProfileError):
        parse_system_map(b"ffffffffffffffff B The_real_System.map_is_in_the_linux-image-<version>-dbg_package\n")


@pytest.mark.parametrize("layout", ["6.1", "6.2", "6.4"])
def test_kallsyms_table_addresses(layout: str) -> None:
    """kallsyms_relative_base and kallsyms_seqs_of_names are located too
    (scripts/kallsyms.c leaves its own tables out of kallsyms)."""
    syms = make_symbols()
    buf = build_tables(syms, layout, relative=True)
    tables, _ = find_kallsyms(buf, BASE)
    rel_base = min(a for _, a, t in syms if t != "A")
    assert tables.relative_base_address is not None
    off = tables.relative_base_address - BASE
    assert struct.unpack_from("<Q", buf, off)[0] == rel_base
    if layout == "6.2":
        assert tables.seqs_of_names is not None
        markers_end = tables.markers + 4 * ((len(syms) + 255) // 256)
        assert tables.seqs_of_names == (markers_end + 7) & ~7
    elif layout == "6.4":  # after kallsyms_relative_base (6.12)
        assert tables.seqs_of_names == tables.relative_base_address + 8
    else:
        assert tables.seqs_of_names is None


def _odd_token_table_symbols() -> list[tuple[str, int, str]]:
    """Symbols whose token table has an odd length, so the table ends on an
    odd address and the index starts after padding (6.1 rt, 6.12 images)."""
    for n in range(300, 340):
        syms = make_symbols(n)
        tokens, _ = compress([(t + name).encode() for name, _, t in syms])
        if sum(len(tok) + 1 for tok in tokens) % 2:
            return syms
    raise AssertionError("no odd-length token table in range")


@pytest.mark.parametrize("layout", ["6.1", "6.2", "6.4"])
@pytest.mark.parametrize("shift", [0, 1])
def test_kallsyms_token_table_of_odd_length(layout: str, shift: int) -> None:
    syms = _odd_token_table_symbols()
    buf = b"\0" * shift + build_tables(syms, layout)
    tables, found = find_kallsyms(buf, BASE - shift)
    assert tables.token_index % 8 == 0
    assert [(s.name, s.address, s.type) for s in found] == syms


def test_unique_by_name_is_order_independent() -> None:
    """Same-named locals: the lowest address wins whatever the input order
    (kallsyms is sorted by address, an ELF symtab by file)."""
    text = ("ffffffff81000300 t dup\nffffffff81000100 t dup\nffffffff81000200 t dup\n"
            "ffffffff81000400 d other\n")
    syms = parse_system_map(text)
    assert unique_by_name(syms)["dup"].address == 0xFFFFFFFF81000100
    assert unique_by_name(list(reversed(syms)))["dup"].address == 0xFFFFFFFF81000100
    both = parse_system_map("ffffffff81000100 t g\nffffffff81000200 T g\n")
    assert unique_by_name(both)["g"].type == "T"
