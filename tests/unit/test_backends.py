"""Tests for shadowvol.backends (base, shadow, libvmi parsing) without a VM.

The HMP texts below were captured from QEMU 7.2.22 (``-machine q35 -m 64M``
with and without ``memory-backend=mem``). ShadowProcess is exercised on this
test process's own memory through /proc/self/mem.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowvol.backends.base import BufferMemory, PhysicalMemory, Segment, merge_ranges
from shadowvol.backends.libvmi import open_libvmi
from shadowvol.backends.shadow import ShadowFile, ShadowProcess
from shadowvol.qemu.monitor import control_registers, gpa2hva, parse_xp, xp
from shadowvol.qemu.process import qmp_path_from_argv, ram_size_from_argv
from shadowvol.qemu.ramlayout import GiB, parse_flat_ram, parse_ram_aliases, parse_ramblocks, q35_layout
from shadowvol.errors import BackendError, InvalidAddressError

RAMBLOCK = """\
              Block Name    PSize              Offset               Used              Total
                     mem    4 KiB  0x0000000000000000 0x0000000004000000 0x0000000004000000
   0000:00:01.0/vga.vram    4 KiB  0x0000000004080000 0x0000000001000000 0x0000000001000000
                 pc.bios    4 KiB  0x0000000004000000 0x0000000000040000 0x0000000000040000
"""

MTREE = """\
address-space: cpu-memory-0
address-space: memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000000000-000000007fffffff (prio 0, ram): alias ram-below-4g @mem 0000000000000000-000000007fffffff
    0000000000000000-ffffffffffffffff (prio -1, i/o): pci
      00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
    00000000000a0000-00000000000bffff (prio 1, i/o): alias smram-region @pci 00000000000a0000-00000000000bffff
    0000000100000000-000000017fffffff (prio 0, ram): alias ram-above-4g @mem 0000000080000000-00000000ffffffff

address-space: I/O
  0000000000000000-000000000000ffff (prio 0, i/o): io
"""

FLAT = """\
FlatView #1
 AS "cpu-smm-0", root: memory
 Root memory region: memory
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram

FlatView #2
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): mem
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  0000000000100000-0000000003ffffff (prio 0, ram): mem @0000000000100000
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
"""


def anon(size: int, seed: int = 1) -> mmap.mmap:
    mm = mmap.mmap(-1, size)
    mm[:] = random.Random(seed).randbytes(size)
    return mm


def test_buffer_memory_fast_and_slow_paths() -> None:
    mm = anon(0x6000)
    mem = BufferMemory(mm, [Segment(0, 0x2000, 0), Segment(0x2000, 0x3000, 0x4000), Segment(0x10000, 0x11000, 0x2000)])
    assert isinstance(mem, PhysicalMemory)
    assert mem.read(0x10, 8) == mm[0x10:0x18]
    assert type(mem.read(0x10, 8)) is bytes
    assert mem.read(0x1FF8, 16) == mm[0x1FF8:0x2000] + mm[0x4000:0x4008]  # crosses segments
    assert mem.read(0x10FF0, 16) == mm[0x2FF0:0x3000]
    assert mem.ranges() == [(0, 0x3000), (0x10000, 0x11000)]
    assert mem.size() == 0x4000
    with pytest.raises(InvalidAddressError) as info:
        mem.read(0x2FF8, 16)
    assert info.value.address == 0x3000 and info.value.layer == "physical"
    with pytest.raises(InvalidAddressError):
        mem.read(-8, 8)
    part = mem.read_partial(0x2FF0, 0x20, pad=b"\xEE")
    assert part.failed == [(0x3000, 0x10)] and part.data == mm[0x4FF0:0x5000] + b"\xEE" * 0x10
    assert [mem.read(0, 2), mem.read(0x10000, 2)] == [mm[0:2], mm[0x2000:0x2002]]
    mem.close()
    with pytest.raises(BackendError):
        mem.read(0, 8)


def test_buffer_memory_rejects_bad_segments() -> None:
    with pytest.raises(ValueError):
        BufferMemory(anon(0x1000), [Segment(0, 0x2000, 0)])
    with pytest.raises(ValueError):
        BufferMemory(anon(0x2000), [Segment(0, 0x1000, 0), Segment(0x800, 0x1000, 0x1000)])
    with pytest.raises(TypeError):
        BufferMemory(bytearray(10), [])  # type: ignore[arg-type]


def test_merge_ranges() -> None:
    assert merge_ranges([(5, 6), (0, 2), (2, 4), (3, 5)]) == [(0, 6)]


def test_q35_layout() -> None:
    assert q35_layout(512 << 20) == [Segment(0, 512 << 20, 0)]
    assert q35_layout(0xAFFFF000) == [Segment(0, 0xAFFFF000, 0)]
    assert q35_layout(3 * GiB) == [Segment(0, 0x80000000, 0), Segment(4 * GiB, 5 * GiB, 0x80000000)]
    assert q35_layout(3 * GiB, max_ram_below_4g=1 * GiB) == [Segment(0, GiB, 0), Segment(4 * GiB, 6 * GiB, GiB)]


def test_parse_hmp() -> None:
    blocks = parse_ramblocks(RAMBLOCK)
    assert blocks[0] == {"name": "mem", "psize": "4 KiB", "offset": 0, "used": 0x4000000, "total": 0x4000000}
    assert [b["name"] for b in blocks] == ["mem", "0000:00:01.0/vga.vram", "pc.bios"]
    block, segs = parse_ram_aliases(MTREE)  # type: ignore[misc]
    assert block == "mem"
    assert segs == [Segment(0, 0x80000000, 0), Segment(0x100000000, 0x180000000, 0x80000000)]
    assert parse_ram_aliases("address-space: memory\n") is None
    assert parse_flat_ram(FLAT, "mem") == [Segment(0, 0xA0000, 0), Segment(0x100000, 0x4000000, 0x100000)]
    assert parse_xp("0000000000001000: 0x01 0x02 0xff\r\n0000000000001003: 0x00\r\n") == b"\x01\x02\xff\x00"


def test_monitor_commands_parsed() -> None:
    """xp, gpa2hva and info registers, answered by a fake monitor with QEMU 7.2's text."""
    said: list[str] = []

    def hmp(cmd: str) -> str:
        said.append(cmd)
        if cmd.startswith("xp /"):
            n, addr = cmd[4:].split("xb ")
            return "".join(f"{int(addr, 16) + i:016x}: 0x{(int(addr, 16) + i) & 0xff:02x}\r\n" for i in range(int(n)))
        if cmd.startswith("gpa2hva"):
            return f"Host virtual address for {cmd.split()[1]} (mem) is 0x7f0012340000\r\n"
        if cmd == "info registers":
            return ("RAX=0000000000000000 RBX=ffffffff82a10940\r\nCR0=80050033 CR2=00007f CR3=000000000a50e000 "
                    "CR4=00350ef0\r\n")
        return "unknown command\r\n"

    assert xp(hmp, 0x1ffe, 0x1003) == bytes(a & 0xff for a in range(0x1ffe, 0x1ffe + 0x1003))
    assert said == ["xp /4096xb 0x1ffe", "xp /3xb 0x2ffe"]  # 4 KiB per command
    assert gpa2hva(hmp, 0x1000) == 0x7f0012340000
    assert control_registers(hmp) == (0xa50e000, 0x350ef0)
    with pytest.raises(BackendError, match="gpa2hva"):
        gpa2hva(lambda cmd: "Memory region is not RAM\r\n", 0xfee00000)
    assert control_registers(lambda cmd: "unknown command") is None
    with pytest.raises(BackendError, match="1 of 2 bytes"):
        xp(lambda cmd: "0000000000001000: 0x01\r\n", 0x1000, 2)
    with pytest.raises(BackendError, match="unexpected output"):
        parse_xp("0000000000001000: Cannot access memory\r\n")


def test_argv_parsing() -> None:
    assert qmp_path_from_argv(["qemu", "-qmp", "unix:/run/q.sock,server=on,wait=off"]) == "/run/q.sock"
    assert qmp_path_from_argv(["qemu", "-chardev", "socket,id=m0,path=/x.sock,server=on",
                                "-mon", "chardev=m0,mode=control"]) == "/x.sock"
    assert qmp_path_from_argv(["qemu", "-m", "64"]) is None
    assert ram_size_from_argv(["qemu", "-m", "512M"]) == 512 << 20
    assert ram_size_from_argv(["qemu", "-m", "size=2G,slots=2,maxmem=4G"]) == 2 << 30
    assert ram_size_from_argv(["qemu", "-m", "256"]) == 256 << 20
    assert ram_size_from_argv(["qemu"]) == 128 << 20


def test_shadow_file(tmp_path: Path) -> None:
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    path = base / f"shadowvol-test-{os.getpid()}.ram"
    data = random.Random(3).randbytes(0x40000)
    path.write_bytes(data)
    try:
        with ShadowFile(path) as mem:
            assert mem.ranges() == [(0, 0x40000)]
            assert mem.read(0x1234, 8) == data[0x1234:0x123C]
            meta = mem.metadata()
            assert meta["backend"] == "shadow-file" and meta["live"] is True and meta["size"] == 0x40000
            with pytest.raises(InvalidAddressError):
                mem.read(0x3FFFC, 8)
            # live: a write by "QEMU" shows through the read-only mapping
            with open(path, "r+b") as f:
                f.seek(0x1234)
                f.write(b"LIVEDATA")
            assert mem.read(0x1234, 8) == b"LIVEDATA"
        with ShadowFile(path, [Segment(0, 0x10000, 0), Segment(4 * GiB, 4 * GiB + 0x30000, 0x10000)]) as mem:
            assert mem.read(4 * GiB, 8) == data[0x10000:0x10008]
    finally:
        path.unlink()
    with pytest.raises(BackendError, match="cannot open"):
        ShadowFile(tmp_path / "missing.ram")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_shadow_file_rss_stays_bounded(tmp_path: Path) -> None:
    """Reads through the mapping fault in their page and its fault-around
    neighbours; every ``drop_every`` reads they are unmapped again, so our RSS
    holds at most that many reads' pages, and every read stays right."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    path = base / f"shadowvol-test-rss-{os.getpid()}.ram"
    size = 32 << 20
    with open(path, "wb") as f:
        f.write(random.Random(5).randbytes(size))
    expect = path.read_bytes()
    field = "RssShmem" if str(path).startswith("/dev/shm") else "RssFile"
    try:
        for drop_every, most in ((4, 4 * 128), (0, None)):
            with ShadowFile(path, drop_every=drop_every) as mem:
                before = _rss_kb(field)
                for paddr in range(0, size, 64 << 10):  # one read per 64 KiB: 512 reads
                    assert mem.read(paddr + 40, 8) == expect[paddr + 40:paddr + 48]
                assert mem.read(size - 0x1800, 0x1000) == expect[size - 0x1800:size - 0x800]
                grown = _rss_kb(field) - before
                for k in range(6):  # long reads count once per 4 KiB: each one drops what came before
                    assert mem.read(k << 20, 256 << 10) == expect[k << 20:(k << 20) + (256 << 10)]
                grown_long = _rss_kb(field) - before
            if most is not None:
                assert grown <= most, f"{grown} KiB of the file mapped after reads, dropping every {drop_every}"
                assert grown_long <= 256 + 128, f"{grown_long} KiB mapped after long reads"
            else:  # without dropping, each read keeps at least its own page
                assert grown >= 512 * 4 and grown_long >= 6 * 256
    finally:
        path.unlink()
    with pytest.raises(TypeError, match="mmap of a file"):
        BufferMemory(b"\0" * 4096, [Segment(0, 4096, 0)], drop_every=16)


def test_a_scan_of_a_shadow_file_keeps_about_one_chunk_mapped(tmp_path: Path) -> None:
    """``find`` over all RAM (psscan's scan) faults every page in; with
    ``drop_every`` each chunk is unmapped after it is searched, so RSS grows by
    about one chunk, not the whole RAM, and every match is found once."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    path = base / f"shadowvol-test-scan-{os.getpid()}.ram"
    size, chunk = 32 << 20, 1 << 20
    data = bytearray(random.Random(6).randbytes(size))
    hits = [5, chunk - 3, 7 * chunk, 20 * chunk + 12345, size - 6]  # straddling a chunk end, at the end
    for h in hits:
        data[h:h + 6] = b"NEEDLE"
    with open(path, "wb") as f:
        f.write(data)
    field = "RssShmem" if str(path).startswith("/dev/shm") else "RssFile"
    want = [i for i in range(size) if data.startswith(b"NEEDLE", i)]
    try:
        for drop_every in (4, 0):
            with ShadowFile(path, drop_every=drop_every) as mem:
                before = _rss_kb(field)
                assert list(mem.find(b"NEEDLE", chunk=chunk)) == want
                grown = _rss_kb(field) - before
            if drop_every:
                assert grown <= 2 * chunk // 1024, f"{grown} KiB of the file mapped after a scan"
            else:
                assert grown >= size // 1024 * 9 // 10
    finally:
        path.unlink()


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=4), st.binary(max_size=200), st.integers(1, 64), st.integers(0, 200),
       st.integers(0, 220))
def test_find_in_chunks_equals_a_plain_search(needle, data, chunk, start, end):
    """Any chunk size finds what a plain search finds in [start, end), once each, in order."""
    data = data + needle
    mem = BufferMemory(data, [Segment(0, len(data), 0)])
    want = [i for i in range(start, min(end, len(data))) if data.startswith(needle, i)]
    assert list(mem.find(needle, start, end, chunk=chunk)) == want


def test_shadow_process_on_self() -> None:
    mm = anon(0x3000, seed=9)
    buf = (ctypes.c_char * 0x3000).from_buffer(mm)
    hva = ctypes.addressof(buf)
    try:
        mem = ShadowProcess(os.getpid(), [Segment(0, 0x2000, hva), Segment(4 * GiB, 4 * GiB + 0x1000, hva + 0x2000)])
        try:
            assert mem.read(0x10, 8) == mm[0x10:0x18]
            assert mem.read(4 * GiB + 0xFF8, 8) == mm[0x2FF8:0x3000]
            assert mem.read(0x1FF8, 8) == mm[0x1FF8:0x2000]
            with pytest.raises(InvalidAddressError):
                mem.read(0x1FF8, 16)
            assert mem.ranges() == [(0, 0x2000), (4 * GiB, 4 * GiB + 0x1000)]
            mm[0x10:0x18] = b"CHANGED!"
            assert mem.read(0x10, 8) == b"CHANGED!"
        finally:
            mem.close()
    finally:
        del buf
        mm.close()


def test_shadow_process_missing() -> None:
    with pytest.raises(BackendError):
        ShadowProcess(2 ** 22 + 12345, [Segment(0, 0x1000, 0)])


def test_open_libvmi_needs_a_source() -> None:
    with pytest.raises(BackendError):
        open_libvmi(None, None)
    with pytest.raises(BackendError, match="gdbstub"):
        open_libvmi("/nonexistent/gdb.sock", None)


def test_find_reports_each_match_once_across_chunks_and_ranges():
    from shadowvol.backends.base import BufferMemory, Segment

    buf = bytearray(64 * 1024)
    hits = [100, 4094, 8190, 12288, 20000, 40000]  # straddling a chunk boundary, or starting one
    for h in hits:
        buf[h:h + 5] = b"NEEDL"
    # Two RAM ranges with a hole between them: [0, 32K) at 0 and [1M, 1M+32K) at 32K.
    mem = BufferMemory(bytes(buf), [Segment(0, 32 * 1024, 0), Segment(1 << 20, (1 << 20) + 32 * 1024, 32 * 1024)])
    want = [h if h < 32 * 1024 else (1 << 20) + h - 32 * 1024 for h in hits]
    assert list(mem.find(b"NEEDL", chunk=4096)) == want
    assert list(mem.find(b"NEEDL")) == want
    assert list(mem.find(b"absent", chunk=4096)) == []
