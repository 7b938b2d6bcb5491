"""Pure parts of snapshot/watch: LiME writing (read back by backends/dump.py),
the RAM copy, vCPU registers from HMP, bundle manifests, row diffing."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from shadowvol.backends.base import BufferMemory, Segment
from shadowvol.backends.dump import open_dump
from shadowvol.bundle import is_bundle, open_bundle, sha256_file, verify_bundle
from shadowvol.errors import ShadowvolError
from shadowvol.snapshot import RamCopy, parse_registers, write_lime
from shadowvol.watch import diff_rows, grid_rows, row_key

RNG = random.Random(14)
LOW = RNG.randbytes(0x3000)
HIGH = RNG.randbytes(0x2000)
HIGH_AT = 0x1_0000_0000


def _write(path: Path, segments) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        return write_lime(segments, fd)
    finally:
        os.close(fd)


def test_lime_round_trip(tmp_path: Path) -> None:
    out = tmp_path / "m.lime"
    assert _write(out, [(0, len(LOW), LOW), (HIGH_AT, HIGH_AT + len(HIGH), HIGH)]) == len(LOW) + len(HIGH)
    with open_dump(out) as d:
        assert d.format == "lime"
        assert d.ranges() == [(0, len(LOW)), (HIGH_AT, HIGH_AT + len(HIGH))]
        assert d.read(0, len(LOW)) == LOW
        assert d.read(HIGH_AT + 0x10, 0x100) == HIGH[0x10:0x110]
    assert out.stat().st_size == 2 * 32 + len(LOW) + len(HIGH)


def test_lime_rejects_a_range_of_the_wrong_length(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        _write(tmp_path / "m.lime", [(0, 0x2000, b"x")])


def _copy_to_lime(memory, tmp_path: Path) -> Path:
    copy = RamCopy(memory)
    try:
        assert copy.copy() == sum(b - a for a, b in memory.ranges())
        out = tmp_path / "copy.lime"
        _write(out, copy.segments)
    finally:
        copy.close()
    return out


def test_ram_copy_from_a_mapped_file(tmp_path: Path) -> None:
    # a mapped memory with two segments (the shadow RAM file's layout: low RAM, then RAM above 4 GiB)
    raw = tmp_path / "ram"
    raw.write_bytes(LOW + HIGH)
    mem = open_dump(raw, segments=[Segment(0, len(LOW), 0), Segment(HIGH_AT, HIGH_AT + len(HIGH), len(LOW))])
    try:
        out = _copy_to_lime(mem, tmp_path)
    finally:
        mem.close()
    with open_dump(out) as d:
        assert d.read(0, len(LOW)) == LOW and d.read(HIGH_AT, len(HIGH)) == HIGH


def test_ram_copy_through_reads(tmp_path: Path) -> None:
    mem = BufferMemory(LOW + HIGH, [Segment(0, 0x1000, 0), Segment(0x1000, len(LOW), 0x1000),
                                    Segment(HIGH_AT, HIGH_AT + len(HIGH), len(LOW))])
    out = _copy_to_lime(mem, tmp_path)
    with open_dump(out) as d:
        assert d.ranges() == [(0, len(LOW)), (HIGH_AT, HIGH_AT + len(HIGH))]  # one header per RAM range
        assert d.read(0, len(LOW)) == LOW and d.read(HIGH_AT, len(HIGH)) == HIGH


HMP = """\
CPU#0
RAX=000000000001ad40 RBX=0000000000000000 RCX=0000000000000000 RDX=4000000000000000
R8 =0000000000022e80 R9 =000000003457aed4 R10=00000000fffffffb R11=0000000000000001
RIP=ffffffff98e17a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]
GS =0000 ffff8e9c1f200000 00000000 00000000
GDT=     fffffe0000001000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=000000000a90c0d8 CR3=0000000002742000 CR4=00750eb0
EFER=0000000000000d01
FPR0=0000000000000000 0000 FPR1=0000000000000000 0000
YMM00=0000000000000000 0000000000000000 00000000005c02ee 00000000005c02ee
CPU#1
RAX=0000000000000001 RBX=0000000000000002
CR0=80050033 CR2=0000000000000000 CR3=0000000004242000 CR4=00750eb0
"""


def test_parse_registers() -> None:
    cpus = parse_registers(HMP)
    assert len(cpus) == 2
    c0 = cpus[0]
    assert c0["rax"] == 0x1AD40 and c0["r8"] == 0x22E80 and c0["rip"] == 0xFFFFFFFF98E17A0B
    assert c0["cr3"] == 0x2742000 and c0["cr4"] == 0x750EB0 and c0["efer"] == 0xD01
    assert c0["gs_base"] == 0xFFFF8E9C1F200000 and c0["cs"] == 0x10
    assert c0["idt_base"] == 0xFFFFFE0000000000 and c0["idt_limit"] == 0xFFF
    assert not any(k.startswith(("fpr", "ymm")) for k in c0)
    assert cpus[1]["cr3"] == 0x4242000 and cpus[1]["rbx"] == 2


def _bundle(tmp_path: Path, **extra) -> Path:
    root = tmp_path / "snap"
    (root / "symbols" / "linux").mkdir(parents=True)
    (root / "memory.lime").write_bytes(b"ram")
    (root / "symbols" / "linux" / "p.json.xz").write_bytes(b"isf")
    manifest = {"memory": "memory.lime", "symbols": "symbols", "profile": "symbols/linux/p.json.xz",
                "vcpus": [{"rax": 1}, {"cr3": 0x1000, "cr4": 0x20}], "vmcoreinfo": {"OSRELEASE": "6.1"},
                "sha256": {"memory.lime": sha256_file(root / "memory.lime"),
                           "symbols/linux/p.json.xz": sha256_file(root / "symbols/linux/p.json.xz")}}
    manifest.update(extra)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_bundle_opens_and_verifies(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    assert is_bundle(root) and not is_bundle(root / "memory.lime")
    b = open_bundle(root)
    assert b.memory == root / "memory.lime" and b.profile == root / "symbols/linux/p.json.xz"
    assert b.registers() == (0x1000, 0x20) and b.vmcoreinfo() == {"OSRELEASE": "6.1"}
    assert verify_bundle(root) == []
    (root / "memory.lime").write_bytes(b"RAM")
    assert verify_bundle(root) == ["memory.lime"]


@pytest.mark.parametrize("memory", ["../../etc/passwd", "/etc/passwd", "", 5, "symbols"])
def test_bundle_paths_stay_inside(tmp_path: Path, memory) -> None:
    root = _bundle(tmp_path, memory=memory)
    with pytest.raises(ShadowvolError):
        open_bundle(root)


def test_bundle_refuses_a_symlink(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    (tmp_path / "elsewhere").write_bytes(b"x")
    (root / "memory.lime").unlink()
    (root / "memory.lime").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ShadowvolError):
        open_bundle(root)


def test_diff_rows_is_a_multiset_difference() -> None:
    a = [{"PID": 1, "COMM": "init"}, {"PID": 2, "COMM": "kthreadd"}, {"PID": 9, "COMM": "sh"},
         {"PID": 9, "COMM": "sh"}]
    b = [{"COMM": "init", "PID": 1}, {"PID": 9, "COMM": "sh"}, {"PID": 10, "COMM": "sleep"},
         {"PID": 11, "COMM": "cat"}]
    appeared, disappeared = diff_rows(a, b)
    assert appeared == [{"PID": 10, "COMM": "sleep"}, {"PID": 11, "COMM": "cat"}]  # in b's order
    assert disappeared == [{"PID": 2, "COMM": "kthreadd"}, {"PID": 9, "COMM": "sh"}]
    assert diff_rows(a, a) == ([], [])
    assert row_key({"a": 1, "b": 2}) == row_key({"b": 2, "a": 1})
    assert row_key({"a": 1}) != row_key({"a": "1"}) and row_key({"a": [1]}) == row_key({"a": [1]})
    assert diff_rows([{"a": [1]}], [{"a": [1]}, {"a": [2]}]) == ([{"a": [2]}], [])  # unhashable cells too



class BaseAbsentValue:  # the name volatility3's renderers give absent values
    pass


class UnreadableValue(BaseAbsentValue):
    pass


class _Col:
    def __init__(self, name: str) -> None:
        self.name = name


class _Node:
    def __init__(self, values) -> None:
        self.values = values


class _Grid:
    columns = [_Col("PID"), _Col("COMM"), _Col("DATA"), _Col("X")]

    def populate(self, func, acc):
        for values in ([1, "init", b"\x01\x02", UnreadableValue()], [2, "kthreadd", None, 1.5]):
            acc = func(_Node(values), acc)
        return acc


def test_grid_rows() -> None:
    assert grid_rows(_Grid()) == [{"PID": 1, "COMM": "init", "DATA": "0102", "X": None},
                                  {"PID": 2, "COMM": "kthreadd", "DATA": None, "X": 1.5}]


def test_ram_copy_refuses_more_than_the_host_has(monkeypatch) -> None:
    from shadowvol import snapshot

    monkeypatch.setattr(snapshot, "_mem_available", lambda: 0x1000)
    with pytest.raises(ShadowvolError, match="needs 0 MiB free"):
        RamCopy(BufferMemory(LOW, [Segment(0, len(LOW), 0)]))
