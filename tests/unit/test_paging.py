"""Tests for shadowvol.paging against page tables built here from a fixed seed.

A random tree of tables is generated for 4-level and 5-level paging, with
4 KiB, 2 MiB and 1 GiB pages, garbage in every non-present entry (bit 0
clear, other bits random), random ignored/PAT/NX bits in present entries and
PCID plus bit 63 in CR3. The generator also records the reference mapping
(virtual page -> physical page) that translate() must agree with.
"""

from __future__ import annotations

import mmap
import random
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowvol.backends.base import BufferMemory, Segment
from shadowvol.errors import InvalidAddressError
from shadowvol.paging import (FIVE_LEVEL, FOUR_LEVEL, PagedMemory, PagingFormat, TranslationCache,
                              format_for_cr4)

RAM = 32 << 20
TABLE_AREA = 8 << 20
U64 = 1 << 64
ADDR_MASK = 0x000F_FFFF_FFFF_F000


@dataclass
class Synthetic:
    """Synthetic guest: memory, CR3, reference mappings and known holes."""

    fmt: PagingFormat
    mm: mmap.mmap
    mem: BufferMemory
    cr3: int
    pages: dict[int, tuple[int, int]] = field(default_factory=dict)  # vbase -> (pbase, size)
    holes: list[tuple[int, str, int]] = field(default_factory=list)  # (vaddr, level, entry)
    leaf_ptes: list[tuple[int, int]] = field(default_factory=list)  # (vaddr of 4K page, entry paddr)

    def reference(self, vaddr: int) -> tuple[int, int] | None:
        for size in (1 << 12, 1 << 21, 1 << 30):
            base = vaddr & -size
            hit = self.pages.get(base)
            if hit is not None and hit[1] == size:
                return hit[0] + (vaddr - base), size
        return None

    def write_entry(self, paddr: int, value: int) -> None:
        self.mm[paddr:paddr + 8] = struct.pack("<Q", value)


def build(fmt: PagingFormat, seed: int) -> Synthetic:
    rng = random.Random(seed)
    mm = mmap.mmap(-1, RAM)
    mm[TABLE_AREA:] = rng.randbytes(RAM - TABLE_AREA)
    mem = BufferMemory(mm, [Segment(0, RAM, 0)], name="synthetic")
    next_table = [0x1000]

    def alloc() -> int:
        table = next_table[0]
        next_table[0] += 0x1000
        assert next_table[0] <= TABLE_AREA
        for i in range(512):  # garbage in every entry, present bit clear
            mm[table + 8 * i:table + 8 * i + 8] = struct.pack("<Q", rng.getrandbits(64) & ~1)
        return table

    def noise_bits(large: bool) -> int:
        bits = 1 | rng.choice([0, 2]) | rng.choice([0, 4]) | rng.choice([0, 0x20, 0x40])
        bits |= rng.getrandbits(11) << 52  # ignored bits, protection keys, NX
        if large:
            bits |= rng.choice([0, 1 << 12])  # PAT bit of a large page
        return bits

    top = alloc()
    pcid = rng.getrandbits(12)
    syn = Synthetic(fmt, mm, mem, top | pcid | (1 << 63))
    shifts = fmt.shifts
    names = fmt.level_names
    depth_last = len(names) - 1

    def fill(table: int, depth: int, base: int, fanout: int) -> None:
        shift = shifts[depth]
        level = names[depth]
        if depth == 0:
            lower = rng.sample(range(0, 256), fanout // 2)
            upper = rng.sample(range(256, 512), fanout - fanout // 2)
            indices = sorted(lower + upper)
        else:
            indices = sorted(rng.sample(range(512), fanout))
        used = set(indices)
        free = [i for i in range(512) if i not in used]
        for index in free[:2]:
            va = fmt.canonical(base + (index << shift))
            entry = struct.unpack_from("<Q", mm, table + 8 * index)[0]
            syn.holes.append((va + rng.randrange(1 << shift), level, entry))
        for index in indices:
            va = base + (index << shift)
            slot = table + 8 * index
            if depth == depth_last:
                frame = rng.randrange(RAM >> 12) << 12
                syn.write_entry(slot, frame | noise_bits(False) | rng.choice([0, 0x80]))  # bit 7 = PAT here
                syn.pages[fmt.canonical(va)] = (frame, 1 << 12)
                syn.leaf_ptes.append((fmt.canonical(va), slot))
                continue
            choice = rng.random()
            if level in fmt.large_levels and choice < 0.25:
                size = 1 << shift
                if size == 1 << 21 and rng.random() < 0.7:
                    frame = rng.randrange(RAM >> 21) << 21  # readable
                else:
                    frame = rng.randrange((1 << 52) >> shift) << shift
                syn.write_entry(slot, frame | 0x80 | noise_bits(True))
                syn.pages[fmt.canonical(va)] = (frame, size)
                continue
            child = alloc()
            # PS is ignored where large pages are not allowed (PML5/PML4): set it sometimes.
            ps = 0x80 if level not in fmt.large_levels and rng.random() < 0.3 else 0
            syn.write_entry(slot, child | noise_bits(False) | ps)
            fill(child, depth + 1, va, 3 if depth + 1 < depth_last else 24)

    fill(top, 0, 0, 4)
    return syn


@pytest.fixture(scope="module", params=[FOUR_LEVEL, FIVE_LEVEL], ids=["4level", "5level"])
def syn(request: pytest.FixtureRequest) -> Synthetic:
    return build(request.param, seed=1234 + request.param.levels)


def layers(syn: Synthetic) -> list[PagedMemory]:
    return [PagedMemory(syn.mem, syn.cr3, syn.fmt, name="nocache"),
            PagedMemory(syn.mem, syn.cr3, syn.fmt, TranslationCache(syn.mem), name="cached")]


def test_formats_are_data() -> None:
    assert FOUR_LEVEL.shifts == (39, 30, 21, 12) and FOUR_LEVEL.va_bits == 48
    assert FIVE_LEVEL.shifts == (48, 39, 30, 21, 12) and FIVE_LEVEL.va_bits == 57
    assert FOUR_LEVEL.page_size("PDPT") == 1 << 30 and FOUR_LEVEL.page_size("PD") == 1 << 21
    assert format_for_cr4(0x3016F0) is FIVE_LEVEL and format_for_cr4(0x2006F0) is FOUR_LEVEL


def test_canonical() -> None:
    assert FOUR_LEVEL.is_canonical(0x00007FFF_FFFFFFFF)
    assert not FOUR_LEVEL.is_canonical(0x00008000_00000000)
    assert FOUR_LEVEL.is_canonical(0xFFFF8000_00000000)
    assert not FOUR_LEVEL.is_canonical(0xFFFF0000_00000000)
    assert FIVE_LEVEL.is_canonical(0x00008000_00000000)
    assert FIVE_LEVEL.is_canonical(0xFF000000_00000000)
    assert not FIVE_LEVEL.is_canonical(0xFE000000_00000000)
    assert not FOUR_LEVEL.is_canonical(-1) and not FOUR_LEVEL.is_canonical(U64)


def test_generator_has_every_page_size(syn: Synthetic) -> None:
    sizes = {size for _, size in syn.pages.values()}
    assert sizes == {1 << 12, 1 << 21, 1 << 30}
    assert {level for _, level, _ in syn.holes} == set(syn.fmt.level_names)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_translate_matches_reference_on_mapped(syn: Synthetic, data: st.DataObject) -> None:
    vbases = sorted(syn.pages)
    vbase = data.draw(st.sampled_from(vbases))
    pbase, size = syn.pages[vbase]
    vaddr = vbase + data.draw(st.integers(0, size - 1))
    for layer in layers(syn):
        assert layer.translate(vaddr) == (pbase + vaddr - vbase, size)
        assert layer.vtop(vaddr) == pbase + vaddr - vbase


@settings(max_examples=300, deadline=None)
@given(vaddr=st.integers(0, U64 - 1))
def test_translate_random_addresses(syn: Synthetic, vaddr: int) -> None:
    expected = syn.reference(vaddr)
    for layer in layers(syn):
        if expected is None:
            with pytest.raises(InvalidAddressError) as info:
                layer.translate(vaddr)
            assert info.value.address == vaddr
            assert info.value.level in syn.fmt.level_names or "non-canonical" in str(info.value)
        else:
            assert layer.translate(vaddr) == expected


def test_not_present_at_each_level(syn: Synthetic) -> None:
    for vaddr, level, entry in syn.holes:
        for layer in layers(syn):
            with pytest.raises(InvalidAddressError) as info:
                layer.translate(vaddr)
            assert info.value.level == level
            assert info.value.entry == entry
            assert info.value.layer == layer.name
            assert f"not present at {level}" in str(info.value)


def test_non_canonical(syn: Synthetic) -> None:
    layer = layers(syn)[1]
    bad = 0xFF00_0000_0000_0000 - 0x1000 if syn.fmt is FIVE_LEVEL else 0x0000_8000_0000_0000
    with pytest.raises(InvalidAddressError, match="non-canonical"):
        layer.translate(bad)
    with pytest.raises(InvalidAddressError, match="non-canonical"):
        layer.read(bad, 8)


def test_cr3_low_bits_and_bit63_ignored(syn: Synthetic) -> None:
    vbase, (pbase, _) = next(iter(syn.pages.items()))
    plain = PagedMemory(syn.mem, syn.cr3 & ADDR_MASK, syn.fmt)
    noisy = PagedMemory(syn.mem, syn.cr3 | 0xFFF | (1 << 63), syn.fmt)
    assert plain.translate(vbase) == noisy.translate(vbase)
    assert noisy.dtb == syn.cr3 & ADDR_MASK


def test_iter_mapped_whole_space(syn: Synthetic) -> None:
    for layer in layers(syn):
        got = list(layer.iter_mapped())
        assert [v for v, _, _ in got] == sorted(syn.pages)
        assert {v: (p, s) for v, s, p in got} == syn.pages


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_iter_mapped_subrange(syn: Synthetic, data: st.DataObject) -> None:
    vbases = sorted(syn.pages)
    a = data.draw(st.sampled_from(vbases)) + data.draw(st.integers(-(1 << 22), 1 << 22))
    b = a + data.draw(st.integers(1, 1 << 34))
    a, b = max(a, 0), min(b, U64)
    expected = [v for v in vbases if v < b and v + syn.pages[v][1] > a]
    layer = layers(syn)[data.draw(st.integers(0, 1))]
    assert [v for v, _, _ in layer.iter_mapped(a, b)] == expected


def _reference_runs(syn: Synthetic, a: int, b: int) -> list[tuple[int, int, int]]:
    """The present pages of [a, b), clipped, physically contiguous ones merged (mapping()'s runs)."""
    runs: list[tuple[int, int, int]] = []
    for v in sorted(syn.pages):
        p, s = syn.pages[v]
        lo, hi = max(v, a), min(v + s, b)
        if lo >= hi:
            continue
        pp = p + (lo - v)
        if runs and runs[-1][0] + runs[-1][1] == lo and runs[-1][2] + runs[-1][1] == pp:
            runs[-1] = (runs[-1][0], runs[-1][1] + hi - lo, runs[-1][2])
        else:
            runs.append((lo, hi - lo, pp))
    return runs


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_mapping_ignoring_errors_is_the_reference(syn: Synthetic, data: st.DataObject) -> None:
    """Short ranges (page by page through the TLB) and long ones (enumerated from the tables) alike."""
    vbases = sorted(syn.pages)
    a = data.draw(st.sampled_from(vbases)) + data.draw(st.integers(-(1 << 22), 1 << 22))
    length = data.draw(st.one_of(st.integers(1, 64 * 4096), st.integers(1, 1 << 34)))
    a = max(a, 0)
    b = min(a + length, U64)
    want = _reference_runs(syn, a, b)
    for layer in layers(syn):
        assert list(layer.mapping(a, b - a, ignore_errors=True)) == want
        assert list(layer.mapping(a, b - a, ignore_errors=True)) == want  # again, through a warm TLB


def test_mapping_ignoring_errors_whole_kernel_half(syn: Synthetic) -> None:
    top = U64 - (1 << (syn.fmt.va_bits - 1))
    for layer in layers(syn):
        assert list(layer.mapping(top, U64 - top, ignore_errors=True)) == _reference_runs(syn, top, U64)


def _expected_bytes(syn: Synthetic, vaddr: int, length: int) -> bytes | None:
    out = bytearray()
    for v in range(vaddr, vaddr + length):
        ref = syn.reference(v)
        if ref is None or ref[0] + 1 > RAM:
            return None
        out += syn.mm[ref[0]:ref[0] + 1]
    return bytes(out)


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_read_across_pages(syn: Synthetic, data: st.DataObject) -> None:
    readable = [v for v, (p, s) in syn.pages.items() if p + s <= RAM]
    vbase = data.draw(st.sampled_from(sorted(readable)))
    size = syn.pages[vbase][1]
    vaddr = vbase + data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, 3 * 4096))
    expected = _expected_bytes(syn, vaddr, length)
    for layer in layers(syn):
        if expected is None:
            with pytest.raises(InvalidAddressError):
                layer.read(vaddr, length)
            part = layer.read_partial(vaddr, length)
            assert not part.complete and len(part.data) == length
            for a, n in part.failed:
                assert all(syn.reference(x) is None or syn.reference(x)[0] >= RAM for x in (a, a + n - 1))
        else:
            assert layer.read(vaddr, length) == expected
            assert layer.read_padded(vaddr, length) == expected
        runs = list(layer.mapping(vaddr, length, ignore_errors=True))
        for v, n, p in runs:
            assert syn.reference(v)[0] == p and syn.reference(v + n - 1)[0] == p + n - 1


def test_read_partial_pads_holes(syn: Synthetic) -> None:
    vaddr, level, _ = next(h for h in syn.holes if h[1] == syn.fmt.level_names[-1])
    page = vaddr & ~0xFFF
    layer = layers(syn)[1]
    part = layer.read_partial(page - 16, 4096 + 32, pad=b"\xAA")
    assert len(part.data) == 4096 + 32
    assert (page, 4096) in [(a, n) for a, n in part.failed] or any(a <= page < a + n for a, n in part.failed)
    assert part.data[16:16 + 4096] == b"\xAA" * 4096


def test_table_outside_ram(syn: Synthetic) -> None:
    mm = mmap.mmap(-1, 0x3000)
    mem = BufferMemory(mm, [Segment(0, 0x3000, 0)])
    mm[0:8] = struct.pack("<Q", 0x7_0000_0000 | 0x3)  # PML4[0] -> table far outside RAM
    layer = PagedMemory(mem, 0, FOUR_LEVEL, TranslationCache(mem))
    with pytest.raises(InvalidAddressError, match="outside guest RAM"):
        layer.translate(0x1000)
    assert list(layer.iter_mapped()) == []
    assert layer.read_partial(0x1000, 8).failed == [(0x1000, 8)]


def test_invalidate_epoch(syn: Synthetic) -> None:
    vaddr, pte_addr = syn.leaf_ptes[0]
    old = struct.unpack_from("<Q", syn.mm, pte_addr)[0]
    cache = TranslationCache(syn.mem)
    layer = PagedMemory(syn.mem, syn.cr3, syn.fmt, cache)
    uncached = PagedMemory(syn.mem, syn.cr3, syn.fmt)
    before = layer.translate(vaddr)
    layer.read(vaddr, 8)  # fills the TLB too
    new_frame = (old & ADDR_MASK) ^ 0x5000
    try:
        syn.write_entry(pte_addr, (old & ~ADDR_MASK) | new_frame)
        # Within the epoch: the cached walk and the TLB still see the old PTE.
        assert layer.translate(vaddr) == before
        assert layer.vtop(vaddr) == before[0]
        assert uncached.translate(vaddr)[0] == new_frame | (vaddr & 0xFFF)
        epoch = cache.epoch
        cache.invalidate()
        assert cache.epoch == epoch + 1 and len(cache) == 0
        assert layer.translate(vaddr)[0] == new_frame | (vaddr & 0xFFF)
        assert layer.vtop(vaddr) == new_frame | (vaddr & 0xFFF)
        assert layer.read(vaddr, 8) == syn.mm[new_frame | (vaddr & 0xFFF):(new_frame | (vaddr & 0xFFF)) + 8]
    finally:
        syn.write_entry(pte_addr, old)


def test_cache_reads_each_table_once(syn: Synthetic) -> None:
    cache = TranslationCache(syn.mem)
    layer = PagedMemory(syn.mem, syn.cr3, syn.fmt, cache)
    for vbase in syn.pages:
        layer.translate(vbase)
    reads = cache.table_reads
    for vbase in syn.pages:
        layer.translate(vbase)
    assert cache.table_reads == reads
    other = layer.with_cr3(syn.cr3)
    other.translate(next(iter(syn.pages)))
    assert cache.table_reads == reads  # table pages are shared between address spaces


def test_cache_must_match_memory(syn: Synthetic) -> None:
    other = BufferMemory(mmap.mmap(-1, 0x1000), [Segment(0, 0x1000, 0)])
    with pytest.raises(ValueError):
        PagedMemory(syn.mem, syn.cr3, syn.fmt, TranslationCache(other))
