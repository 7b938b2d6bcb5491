"""Tests for shadowvol.backends.dump with raw, LiME and ELF-core files built here."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from shadowvol.backends.dump import LIME_MAGIC, open_dump, parse_qemu_cpu_state
from shadowvol.errors import BackendError, InvalidAddressError

RNG = random.Random(7)
LOW = RNG.randbytes(0x3000)
HIGH = RNG.randbytes(0x2000)
HIGH_AT = 0x1_0000_0000


def lime_header(start: int, end_inclusive: int, version: int = 1, magic: int = LIME_MAGIC) -> bytes:
    return struct.pack("<IIQQ8s", magic, version, start, end_inclusive, b"\0" * 8)


def make_lime(ranges: list[tuple[int, bytes]]) -> bytes:
    return b"".join(lime_header(a, a + len(d) - 1) + d for a, d in ranges)


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name0 = name + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name0), len(desc), ntype) + pad(name0) + pad(desc)


def qemu_cpu_note(cr3: int) -> bytes:
    gprs = [0x1000 + i for i in range(16)] + [0xFFFFFFFF81000000, 0x246]
    segs = b"".join(struct.pack("<IIIIQ", 0x10 + i, 0xFFFFFFFF, 0, 0, 0x1000 * i) for i in range(10))
    crs = struct.pack("<5Q", 0x80050033, 0, 0xDEAD000, cr3, 0x3506F0)
    return struct.pack("<II", 1, 8 + 18 * 8 + 240 + 40 + 8) + struct.pack("<18Q", *gprs) + segs + crs + \
        struct.pack("<Q", 0xFFFF888000000000)


def make_elf(loads: list[tuple[int, bytes]], notes: bytes, phnum_override: int | None = None) -> bytes:
    phnum = 1 + len(loads)
    phoff = 64
    data_off = phoff + 56 * phnum
    body = bytearray(notes)
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, data_off, 0, 0, len(notes), len(notes), 0)]
    for paddr, data in loads:
        off = data_off + len(body)
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 7, off, 0, paddr, len(data), len(data), 0))
        body += data
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 4, 62, 1, 0, phoff, 0, 0, 64, 56,
                       phnum if phnum_override is None else phnum_override, 0, 0, 0)
    return ehdr + b"".join(phdrs) + bytes(body)


VMCOREINFO = b"OSRELEASE=6.1.0-56-cloud-amd64\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff82a12340\nKERNELOFFSET=e000000\n"


def good_elf() -> bytes:
    notes = note(b"CORE", 1, b"\0" * 336) + note(b"QEMU", 0, qemu_cpu_note(0x1234000 | 0x5)) + \
        note(b"VMCOREINFO", 0, VMCOREINFO)
    return make_elf([(0, LOW), (HIGH_AT, HIGH)], notes)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_raw(tmp_path: Path) -> None:
    with open_dump(write(tmp_path, "raw.bin", LOW)) as mem:
        assert mem.format == "raw"
        assert mem.ranges() == [(0, len(LOW))]
        assert mem.read(0x1234, 16) == LOW[0x1234:0x1244]
        assert mem.metadata()["live"] is False and mem.metadata()["size"] == len(LOW)
        assert mem.vmcoreinfo() is None
        with pytest.raises(InvalidAddressError):
            mem.read(len(LOW) - 4, 8)


def test_lime(tmp_path: Path) -> None:
    with open_dump(write(tmp_path, "d.lime", make_lime([(0x1000, LOW), (HIGH_AT, HIGH)]))) as mem:
        assert mem.format == "lime"
        assert mem.ranges() == [(0x1000, 0x1000 + len(LOW)), (HIGH_AT, HIGH_AT + len(HIGH))]
        assert mem.read(0x1000, 32) == LOW[:32]
        assert mem.read(HIGH_AT + 0x1FF8, 8) == HIGH[-8:]
        with pytest.raises(InvalidAddressError):
            mem.read(0, 8)
        part = mem.read_partial(0x0FF0, 0x20)
        assert part.failed == [(0x0FF0, 0x10)] and part.data[0x10:] == LOW[:0x10]


def test_elf_core(tmp_path: Path) -> None:
    with open_dump(write(tmp_path, "core.elf", good_elf())) as mem:
        assert mem.format == "elf"
        assert mem.ranges() == [(0, len(LOW)), (HIGH_AT, HIGH_AT + len(HIGH))]
        assert mem.read(0x2FF0, 16) == LOW[-16:]
        assert mem.read(HIGH_AT, 16) == HIGH[:16]
        assert [mem.read(0, 4), mem.read(HIGH_AT + 4, 4)] == [LOW[:4], HIGH[4:8]]
        info = mem.vmcoreinfo()
        assert info is not None and info["OSRELEASE"] == "6.1.0-56-cloud-amd64"
        assert info["SYMBOL(init_uts_ns)"] == "ffffffff82a12340"
        cpus = mem.cpu_states()
        assert len(cpus) == 1 and cpus[0]["cr3"] == 0x1234005 and cpus[0]["rip"] == 0xFFFFFFFF81000000
        assert cpus[0]["kernel_gs_base"] == 0xFFFF888000000000 and cpus[0]["gs_base"] == 0x4000


def test_cpu_state_too_short() -> None:
    with pytest.raises(BackendError):
        parse_qemu_cpu_state(b"\1\0\0\0\0\0\0\0" + b"\0" * 16)


@pytest.mark.parametrize("name, data, message", [
    ("empty", b"", "empty"),
    ("lime-past-eof", make_lime([(0, LOW)])[:-100], "past end of file"),
    ("lime-second-past-eof", make_lime([(0, LOW)]) + lime_header(HIGH_AT, HIGH_AT + 0xFFFFF), "past end of file"),
    ("lime-short-header", make_lime([(0, LOW)]) + lime_header(HIGH_AT, HIGH_AT)[:20], "truncated LiME header"),
    ("lime-version", lime_header(0, 0xFFF, version=2) + LOW[:0x1000], "version"),
    ("lime-backwards", lime_header(0x2000, 0x1000) + LOW[:0x1000], "ends before it starts"),
    ("lime-bad-magic-later", make_lime([(0, LOW)]) + lime_header(HIGH_AT, HIGH_AT, magic=0x1234), "magic"),
    ("lime-overlap", make_lime([(0, LOW), (0x1000, HIGH)]), "overlap"),
    ("elf-truncated-header", good_elf()[:40], "truncated ELF header"),
    ("elf-truncated-phdrs", good_elf()[:100], "program headers"),
    ("elf-truncated-load", good_elf()[:-16], "past end of file"),
    ("elf-no-loads", make_elf([], note(b"CORE", 1, b"")), "no PT_LOAD"),
    ("elf32", b"\x7fELF\x01\x01\x01" + b"\0" * 60, "32-bit"),
    ("kdump", b"KDUMP   " + b"\0" * 4096, "kdump-compressed"),
])
def test_corrupt_dumps(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    with pytest.raises(BackendError, match=message) as info:
        open_dump(write(tmp_path, name, data))
    text = str(info.value)
    assert "\n" not in text and str(tmp_path / name) in text


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot open dump"):
        open_dump(tmp_path / "nope")
