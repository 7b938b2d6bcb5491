#!/usr/bin/env python3
"""Mutation fuzzer for shadowvol's parsers of hostile input (issue 9).

Each parser family gets real-shaped seed inputs built here (a small BTF
blob, kallsyms tables, a tiny vmlinux ELF and a bzImage around it, an ISF
profile, LiME and QEMU ELF dumps, a QMP session, a gdbstub session), then
``--count`` mutations of them (bit flips, interesting integers, truncation,
splices, duplicated runs). An input may make a parser raise the project's own
errors (:class:`shadowvol.errors.ShadowvolError`); anything else is a finding.

    python tests/fuzz/fuzz_parsers.py --count 100000 [--parser NAME] [--seed N]

prints one line per parser (inputs, project errors, non-project exceptions,
slowest input) and the first distinct findings; exits 1 if there are any.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import lzma
import os
import random
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))
from btfgen import BTFBuilder  # noqa: E402
from shadowvol.errors import ShadowvolError  # noqa: E402

#: An input running longer than this counts as a hang.
HANG_SECONDS = 20.0

BANNER = b"Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14) 12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.159-1 (2025-11-01)\n\0"


# -- seeds ---------------------------------------------------------------------

def btf_seed() -> bytes:
    """Every BTF kind once or more: ints, typedef chains, a self-referencing
    list struct, bitfields, enums, arrays, function protos, VAR + DATASEC."""
    b = BTFBuilder()
    uint = b.add("unsigned int", 1, 0, 4, struct.pack("<I", 32))
    char = b.add("char", 1, 0, 1, struct.pack("<I", (3 << 24) | 8))
    long_ = b.add("long int", 1, 0, 8, struct.pack("<I", (1 << 24) | 64))
    u32 = b.add("u32", 8, 0, uint)
    cu32 = b.add("", 10, 0, u32)
    lh = b.count + 2
    ptr_lh = b.add("", 2, 0, lh)
    b.add("list_head", 4, 2, 16, struct.pack("<III", b.s("next"), ptr_lh, 0) + struct.pack("<III", b.s("prev"), ptr_lh, 64))
    arr = b.add("", 3, 0, 0, struct.pack("<III", char, uint, 16))
    en = b.add("pid_type", 6, 2, 4, struct.pack("<Ii", b.s("PIDTYPE_PID"), 0) + struct.pack("<Ii", b.s("PIDTYPE_MAX"), 4))
    b.add("task_struct", 4, 5, 64,
          struct.pack("<III", b.s("tasks"), lh, 0) + struct.pack("<III", b.s("comm"), arr, 128)
          + struct.pack("<III", b.s("pid"), cu32, 256) + struct.pack("<III", b.s("state"), en, 288)
          + struct.pack("<III", b.s("flags"), long_, 320))
    b.add("bits", 4, 2, 4, struct.pack("<III", b.s("a"), uint, (3 << 24) | 0) + struct.pack("<III", b.s("b"), uint, (5 << 24) | 3), kflag=True)
    b.add("u", 5, 1, 8, struct.pack("<III", b.s("x"), long_, 0))
    b.add("fwd_s", 7, 0, 0)
    proto = b.add("", 13, 1, long_, struct.pack("<II", b.s("arg"), ptr_lh))
    b.add("do_thing", 12, 0, proto)
    var = b.add("runqueues", 14, 0, lh, struct.pack("<I", 1))
    b.add(".data..percpu", 15, 1, 64, struct.pack("<III", var, 0, 16))
    b.add("f", 16, 0, 8)
    b.add("tag", 17, 0, var, struct.pack("<i", -1))
    b.add("big", 19, 1, 8, struct.pack("<III", b.s("BIG"), 1, 2))
    b.add("", 9, 0, uint)  # volatile
    b.add("", 18, 0, uint)  # type tag
    return b.blob()


def kallsyms_seed() -> bytes:
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_kallsyms import build_tables, make_symbols  # type: ignore[import-not-found]

    return build_tables(make_symbols(300), "6.1", True)


def elf_image(sections: list[tuple[str, int, bytes]], vaddr: int = 0xFFFFFFFF81000000) -> bytes:
    """A minimal x86-64 ELF executable: one PT_LOAD holding ``sections``
    (name, sh_type, data) back to back, plus .shstrtab and section headers."""
    body = bytearray()
    offsets = []
    data_off = 64 + 56
    for _, _, data in sections:
        while len(body) % 8:
            body.append(0)
        offsets.append(data_off + len(body))
        body += data
    shstr = b"\0" + b"".join(n.encode() + b"\0" for n, _, _ in sections) + b".shstrtab\0"
    shstr_off = data_off + len(body)
    body += shstr
    while len(body) % 8:
        body.append(0)
    shoff = data_off + len(body)
    shdrs = [b"\0" * 64]
    name_off = 1
    for (name, sh_type, data), off in zip(sections, offsets):
        shdrs.append(struct.pack("<IIQQQQIIQQ", name_off, sh_type, 2, vaddr + off - data_off, off, len(data), 0, 0, 8, 0))
        name_off += len(name) + 1
    shdrs.append(struct.pack("<IIQQQQIIQQ", name_off, 3, 0, 0, shstr_off, len(shstr), 0, 0, 1, 0))
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, vaddr, 64, shoff, 0, 64, 56, 1, 64,
                       len(shdrs), len(shdrs) - 1)
    load = data_off + len(body)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, data_off, vaddr, vaddr - 0xFFFFFFFF80000000, load - data_off,
                       load - data_off, 0x1000)
    return ehdr + phdr + bytes(body) + b"".join(shdrs)


def vmlinux_seed() -> bytes:
    return elf_image([(".rodata", 1, b"\0" * 8 + BANNER + b"%s\0"), (".BTF", 1, btf_seed())])


def bzimage(payload: bytes, setup_sects: int = 4) -> bytes:
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x20F)
    struct.pack_into("<II", head, 0x248, 0x100, len(payload))
    return bytes(head) + b"\x90" * 0x100 + payload + b"\0" * 16


def isf_seed() -> dict[str, Any]:
    from shadowvol.symbols.btf import parse_btf
    from shadowvol.symbols.isf import SymbolEntry, build_isf

    g = parse_btf(btf_seed())
    char = g.find(1, "char")[0]  # Kind.INT
    entries = {"init_task": SymbolEntry(0xFFFFFFFF82A0C940, g.find(4, "task_struct")[0]),
               "linux_banner": SymbolEntry(0xFFFFFFFF82000100, g.array_of(char, len(BANNER)), BANNER),
               "_text": SymbolEntry(0xFFFFFFFF81000000, None)}
    return build_isf(g, entries, producer_version="fuzz", linux_metadata={})


LOW = bytes(range(256)) * 16


def lime_seed() -> bytes:
    hdr = lambda a, d: struct.pack("<IIQQ8s", 0x4C694D45, 1, a, a + len(d) - 1, b"\0" * 8) + d  # noqa: E731
    return hdr(0, LOW) + hdr(0x100000, LOW[:1024])


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name0 = name + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name0), len(desc), ntype) + pad(name0) + pad(desc)


def elfdump_seed() -> bytes:
    gprs = [0x1000 + i for i in range(16)] + [0xFFFFFFFF81000000, 0x246]
    segs = b"".join(struct.pack("<IIIIQ", 0x10 + i, 0xFFFFFFFF, 0, 0, 0x1000 * i) for i in range(10))
    cpu = struct.pack("<II", 1, 8 + 18 * 8 + 240 + 40 + 8) + struct.pack("<18Q", *gprs) + segs + \
        struct.pack("<5Q", 0x80050033, 0, 0xDEAD000, 0x1234005, 0x3506F0) + struct.pack("<Q", 0xFFFF888000000000)
    notes = _note(b"CORE", 1, b"\0" * 64) + _note(b"QEMU", 0, cpu) + \
        _note(b"VMCOREINFO", 0, b"OSRELEASE=6.1.0\nKERNELOFFSET=e000000\nSYMBOL(init_uts_ns)=ffffffff82a12340\n")
    loads = [(0, LOW), (0x100000, LOW[:1024])]
    phnum = 1 + len(loads)
    data_off = 64 + 56 * phnum
    body = bytearray(notes)
    phdrs = [struct.pack("<IIQQQQQQ", 4, 0, data_off, 0, 0, len(notes), len(notes), 0)]
    for paddr, data in loads:
        phdrs.append(struct.pack("<IIQQQQQQ", 1, 7, data_off + len(body), 0, paddr, len(data), len(data), 0))
        body += data
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0, 0, 0)
    return ehdr + b"".join(phdrs) + bytes(body)


def qmp_seed() -> bytes:
    lines = [
        {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}},
        {"return": {}},
        {"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"},
        {"return": {"status": "running", "singlestep": False, "running": True}},
        {"return": "RAX=0000000000000000 RBX=0000000000000001\nCR0=80050033 CR2=0 CR3=0000000001234000 CR4=003506f0\n"},
        {"error": {"class": "GenericError", "desc": "no such command"}},
        {"return": [{"name": "mem", "type": "child<memory-backend-file>"}]},
        {"return": "/dev/shm/guest.ram"},
        {"return": True},
    ]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


TARGET_XML = (b'<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target><architecture>i386:x86-64'
              b'</architecture><xi:include href="64bit-core.xml"/></target>')
CORE_XML = (b'<?xml version="1.0"?><feature name="org.gnu.gdb.i386.core"><reg name="rax" bitsize="64" type="int64"/>'
            b'<reg name="rip" bitsize="64" type="code_ptr" regnum="16"/><reg name="cr3" bitsize="64"/></feature>')


def gdb_seed() -> bytes:
    """Reply payloads, one per line, for: qSupported, ?, qXfer x2, g, p, m, qRcmd, Z0, D."""
    payloads = [b"PacketSize=1000;qXfer:features:read+;vContSupported+", b"T05thread:01;",
                b"l" + TARGET_XML, b"l" + CORE_XML,
                (b"00" * 8) + (b"11" * 8) + (b"22" * 8),
                b"0010a0810000ffff", b"4142434445464748" * 4, b"O" + b"hello\n".hex().encode(), b"OK",
                b"OK", b"OK", b"S05", b"E14", b"0*\"", b"}]x"]
    return b"\n".join(payloads)


# -- targets -------------------------------------------------------------------

def t_btf(data: bytes) -> None:
    from shadowvol.symbols.btf import find_btf, parse_btf
    from shadowvol.symbols.isf import build_isf

    find_btf(data)
    g = parse_btf(data)
    for tid in range(min(len(g), 64)):
        g.sizeof(tid)
        g.describe(tid)
    build_isf(g, {}, producer_version="fuzz", linux_metadata={})


def t_kallsyms(data: bytes) -> None:
    from shadowvol.symbols.kallsyms import find_kallsyms, parse_system_map

    try:
        parse_system_map(data[:4096])
    except ShadowvolError:
        pass
    find_kallsyms(data, 0xFFFFFFFF82000000)


def t_vmlinuz(data: bytes) -> None:
    from shadowvol.symbols import _Image, linux_banner
    from shadowvol.symbols.btf import parse_btf
    from shadowvol.symbols.vmlinuz import extract_vmlinux

    image = _Image(extract_vmlinux(data))
    blob = image.section(".BTF")
    rodata = image.section(".rodata")
    linux_banner(image.read, None, rodata)
    if blob is not None:
        parse_btf(blob)
    for vaddr, _off, _size in image.segments[:4]:
        image.read(vaddr, 64)


def t_isf(data: bytes) -> None:
    from shadowvol.profiles import profile_banner
    from shadowvol.symbols import parse_profile

    isf = parse_profile(data, "fuzz")
    profile_banner(isf)


def _memfd(data: bytes) -> tuple[int, str]:
    fd = os.memfd_create("fuzz")
    os.write(fd, data)
    return fd, f"/proc/self/fd/{fd}"


def t_dump(data: bytes) -> None:
    from shadowvol.backends.dump import dump_info, open_dump

    fd, path = _memfd(data)
    try:
        with open_dump(path) as d:
            dump_info(d)
            for lo, hi in d.ranges()[:4]:
                d.read_partial(lo, min(64, hi - lo))
    finally:
        os.close(fd)


class FakeSocket:
    """Serves ``data`` in small chunks to a client, then EOF; swallows what it sends."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.pos, self.chunk = data, 0, chunk

    def recv(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + min(n, self.chunk)]
        self.pos += len(out)
        return out

    def sendall(self, data: bytes) -> None:
        pass

    def settimeout(self, t: float | None) -> None:
        pass

    def gettimeout(self) -> float | None:
        return 1.0

    def setsockopt(self, *a: object) -> None:
        pass

    def getsockopt(self, *a: object) -> bytes:
        raise OSError("fake")

    def close(self) -> None:
        pass


def t_qmp(data: bytes) -> None:
    from shadowvol.backends.shadow import _backend_file
    from shadowvol.qemu.qmp import QMPClient

    q = QMPClient("fuzz.sock", timeout=2.0, sock=FakeSocket(data, 1 + len(data) % 97))  # type: ignore[arg-type]
    q.query("query-status")
    q.hmp("info registers")
    try:
        q.execute("frobnicate")
    except ShadowvolError:
        pass
    _backend_file(q, "mem")


def t_gdbstub(data: bytes) -> None:
    from shadowvol.qemu.gdbstub import GdbStub, checksum, stop_signal

    if data[:1] == b"$":  # raw stream
        stream = data
    else:  # reply payloads framed with correct checksums (unescaped, so } and * reach the decoder)
        stream = b"".join(b"+$" + p + b"#%02x" % checksum(p) for p in data.split(b"\n"))
    g = GdbStub("fuzz", timeout=2.0, connect=False)
    g.attach_socket(FakeSocket(stream, 1 + len(data) % 61))  # type: ignore[arg-type]
    g.target_xml()
    g.registers()
    g.read_registers()
    g.read_memory(0x1000, 32)
    g.monitor("info registers")
    stop_signal(g.step())  # a stop reply


def _gdb_raw_seed() -> bytes:
    from shadowvol.qemu.gdbstub import checksum

    return b"".join(b"$" + p + b"#%02x+" % checksum(p) for p in gdb_seed().split(b"\n"))


def seeds() -> dict[str, tuple[Callable[[bytes], None], list[bytes]]]:
    """Parser name -> (target, seed inputs)."""
    vmlinux = vmlinux_seed()
    isf = isf_seed()
    isf_json = json.dumps(isf).encode()
    return {
        "btf": (t_btf, [btf_seed()]),
        "kallsyms": (t_kallsyms, [kallsyms_seed(), b"ffffffff81000000 T _text\nffffffff81000100 t x\n" * 3]),
        "vmlinuz": (t_vmlinuz, [vmlinux, bzimage(gzip.compress(vmlinux)), bzimage(lzma.compress(vmlinux)),
                                bzimage(bz2.compress(vmlinux))]),
        "isf": (t_isf, [isf_json, lzma.compress(isf_json)]),
        "dump": (t_dump, [lime_seed(), elfdump_seed(), LOW]),
        "qmp": (t_qmp, [qmp_seed()]),
        "gdbstub": (t_gdbstub, [gdb_seed(), _gdb_raw_seed()]),
    }


# -- mutation ------------------------------------------------------------------

_INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
                0x80000000, 0xFFFFFFFF, 24, 64, 4096]


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        op = rng.randrange(10)
        n = len(buf)
        if n == 0:
            buf += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 32)))
            continue
        pos = rng.randrange(n)
        if op <= 1:  # bit flip
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 2:  # random byte
            buf[pos] = rng.randrange(256)
        elif op <= 4:  # interesting u8/u16/u32, aligned half the time
            width = rng.choice((1, 2, 4, 4, 8))
            if rng.random() < 0.5:
                pos -= pos % 4
            value = rng.choice(_INTERESTING + [n, n - 1, n + 1, pos, rng.randrange(1 << 32)])
            chunk = (value & ((1 << (8 * width)) - 1)).to_bytes(width, rng.choice(("little", "big")))
            buf[pos:pos + width] = chunk
        elif op == 5:  # truncate
            del buf[rng.randrange(n):]
        elif op == 6:  # delete a run
            del buf[pos:pos + rng.randrange(1, 64)]
        elif op == 7:  # duplicate a run elsewhere
            run = buf[pos:pos + rng.randrange(1, 64)]
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = run
        elif op == 8:  # splice from another seed
            other = rng.choice(others)
            if other:
                a = rng.randrange(len(other))
                buf[pos:pos + rng.randrange(1, 64)] = other[a:a + rng.randrange(1, 64)]
        else:  # random bytes
            buf[pos:pos + 4] = bytes(rng.randrange(256) for _ in range(4))
    return bytes(buf)


# -- driver --------------------------------------------------------------------

class _Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang()


def run_parser(name: str, count: int, seed: int = 0, show: int = 3) -> dict[str, Any]:
    target, inputs = seeds()[name]
    for s in inputs:  # the seeds themselves must parse (a harness sanity check), except raw LOW
        try:
            target(s)
        except ShadowvolError:
            pass
    rng = random.Random(f"{name}:{seed}")
    findings: Counter[str] = Counter()
    examples: dict[str, str] = {}
    project = 0
    slowest = 0.0
    use_alarm = hasattr(signal, "setitimer") and os.name == "posix"
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(count):
            data = mutate(rng, rng.choice(inputs), inputs)
            t0 = time.perf_counter()
            try:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
                target(data)
            except ShadowvolError:
                project += 1
            except _Hang:
                key = f"hang (> {HANG_SECONDS:g} s)"
                findings[key] += 1
                examples.setdefault(key, data[:64].hex())
            except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
                tb = traceback.extract_tb(exc.__traceback__)[-1]
                key = f"{type(exc).__name__} at {Path(tb.filename).name}:{tb.lineno} ({tb.name})"
                findings[key] += 1
                examples.setdefault(key, f"{str(exc)[:100]} | input[:64]={data[:64].hex()}")
            finally:
                if use_alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - t0)
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, old)
    return {"parser": name, "inputs": count, "project_errors": project,
            "non_project": sum(findings.values()), "slowest_s": round(slowest, 3),
            "findings": dict(findings.most_common()), "examples": examples}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000, help="inputs per parser")
    ap.add_argument("--parser", action="append", choices=sorted(seeds()), help="only these (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object per parser")
    args = ap.parse_args(argv)
    bad = 0
    for name in args.parser or sorted(seeds()):
        t0 = time.monotonic()
        r = run_parser(name, args.count, args.seed)
        r["seconds"] = round(time.monotonic() - t0, 1)
        bad += r["non_project"]
        if args.json:
            print(json.dumps(r), flush=True)
            continue
        print(f"{name:10} inputs {r['inputs']:>7}  project errors {r['project_errors']:>7}  "
              f"non-project exceptions {r['non_project']:>5}  slowest {r['slowest_s']:.3f} s  "
              f"({r['seconds']} s)", flush=True)
        for key, n in r["findings"].items():
            print(f"    {n:>6} x {key}: {r['examples'][key]}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
