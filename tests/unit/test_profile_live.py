"""A profile from a guest's own memory (shadowvol.symbols.live) on synthetic
RAM: every BTF candidate is validated and the next one tried on failure."""

from __future__ import annotations

import hashlib
import struct

import pytest

from shadowvol.backends.base import BufferMemory, Segment
from shadowvol.errors import ProfileError
from shadowvol.symbols.btf import BTF_MAGIC
from shadowvol.symbols.live import profile_from_memory
from test_btf import BTFBuilder
from test_kallsyms import TEXT, build_tables, make_symbols

BANNER = b"Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) (gcc 12.2.0) #1 SMP\n\0"
BTF_PA, BANNER_PA, KALLSYMS_PA = 0x200000, 0x280000, 0x300000
START_BTF = TEXT + 0x1200000  # virtual address of __start_BTF


def kernel_btf() -> bytes:
    b = BTFBuilder()
    i = b.int_("int", 4, signed=True)
    c = b.int_("char", 1, signed=True, char=True)
    arr = b.add("", 3, 0, 0, struct.pack("<III", c, i, 16))
    b.struct_("task_struct", 24, [("pid", i, 0, 0), ("tgid", i, 32, 0), ("comm", arr, 64, 0)])
    return b.blob()


def bogus_btf(size: int) -> bytes:
    """A header laid out as vmlinux's (types then strings), types of kind 31."""
    types = struct.pack("<III", 0, 31 << 24, 4) * ((size - 24 - 16) // 12)
    strings = b"\0" * (size - 24 - len(types))
    return struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings


def memory(*, bogus: bool = True, stale_banner: bool = False, real: bool = True) -> BufferMemory:
    real_btf = kernel_btf()
    ram = bytearray(4 << 20)
    if bogus:  # before the real one, and larger: tried first
        blob = bogus_btf(len(real_btf) + 4096)
        ram[0x10000:0x10000 + len(blob)] = blob
        if stale_banner:  # where linux_banner would be for this candidate
            pa = 0x10000 + (BANNER_PA - BTF_PA)
            ram[pa:pa + len(BANNER)] = BANNER
    if real:
        ram[BTF_PA:BTF_PA + len(real_btf)] = real_btf
    ram[BANNER_PA:BANNER_PA + len(BANNER)] = BANNER
    syms = make_symbols(300) + [
        ("_text", TEXT, "T"), ("__start_BTF", START_BTF, "R"),
        ("__stop_BTF", START_BTF + len(real_btf), "R"),
        ("linux_banner", START_BTF + (BANNER_PA - BTF_PA), "R")]
    syms.sort(key=lambda s: (s[2] != "A", s[1]))
    tables = build_tables(syms)
    ram[KALLSYMS_PA:KALLSYMS_PA + len(tables)] = tables
    return BufferMemory(bytes(ram), [Segment(0, len(ram), 0)])


def test_bogus_btf_candidate_before_the_real_one_is_skipped() -> None:
    isf = profile_from_memory(memory())
    assert "task_struct" in isf["user_types"]
    assert isf["symbols"]["linux_banner"]["constant_data"]
    types = isf["metadata"]["linux"]["types"]
    assert types[0]["hash_value"] == hashlib.sha256(kernel_btf()).hexdigest()


def test_bogus_candidate_with_a_banner_where_kallsyms_puts_it_is_skipped() -> None:
    """Even when the stale blob has a banner at the right distance, its type
    graph does not parse (or its size disagrees with __stop_BTF): next one."""
    isf = profile_from_memory(memory(stale_banner=True))
    assert isf["metadata"]["linux"]["types"][0]["hash_value"] == hashlib.sha256(kernel_btf()).hexdigest()


def test_only_bogus_candidates_say_why_each_failed() -> None:
    with pytest.raises(ProfileError, match=r"none of the 1 BTF candidates .*0x10000: "):
        profile_from_memory(memory(real=False))
