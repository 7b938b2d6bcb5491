"""Protocol-framing tests for shadowvol.qemu.gdbstub against a scripted fake peer.

FRAMING ONLY: the fake below is not QEMU. It checks checksums, acks, nacks
and retransmission, escaping, run-length decoding, the unprompted stop
packet on connect, chunking of ``m`` and ``O`` output of ``qRcmd``. Whether
QEMU 7.2 really behaves this way is for the live tests against a real guest.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shadowvol.qemu import gdbstub
from shadowvol.errors import InvalidAddressError
from shadowvol.qemu.gdbstub import (GdbError, GdbStub, checksum, decode_payload, encode_packet, parse_target_xml,
                               stop_signal)

TARGET_XML = ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target>'
              '<architecture>i386:x86-64</architecture><xi:include href="i386-64bit.xml"/></target>')
REGNUM0 = ' regnum="0"'
GPRS = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
CORE_XML = ('<?xml version="1.0"?><!DOCTYPE feature SYSTEM "gdb-target.dtd">'
            '<feature name="org.gnu.gdb.i386.core">'
            + "".join(f'<reg name="{n}" bitsize="64" type="int64"{REGNUM0 if i == 0 else ""}/>'
                      for i, n in enumerate(GPRS))
            + '<reg name="rip" bitsize="64" type="code_ptr"/><reg name="eflags" bitsize="32" type="i386_eflags"/>'
            + "".join(f'<reg name="{s}" bitsize="32" type="int32"/>' for s in ("cs", "ss", "ds", "es", "fs", "gs"))
            + "".join(f'<reg name="{n}" bitsize="64" type="int64"/>'
                      for n in ("fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"))
            + '<reg name="st0" bitsize="80" type="i387_ext"/></feature>')


def frame(payload: bytes) -> bytes:
    """Frame without escaping: what a stub sends when the payload needs none."""
    return b"$" + payload + b"#%02x" % checksum(payload)


class FakePeer(threading.Thread):
    """A scripted gdbstub peer on one end of a socketpair."""

    def __init__(self, sock: socket.socket, handler: Callable[["FakePeer", bytes], list[bytes]],
                 greeting: bytes = b"", corrupt_first_reply: bool = False) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.handler = handler
        self.greeting = greeting
        self.corrupt_first_reply = corrupt_first_reply
        self.vcont = True  # answers vCont? as QEMU does
        self.stuck_steps = 0  # vCont;s replies that come before the CPU moved
        self.stuck_reply_thread = b""  # ...naming this thread (else the stepped one)
        self.rip = 0  # the stepped CPU's RIP
        self.received: list[bytes] = []
        self.acks = b""
        self.nacks = 0
        self.buf = b""

    def run(self) -> None:
        if self.greeting:
            self.sock.sendall(self.greeting)
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.buf += data
            while self.buf:
                c = self.buf[:1]
                if c in (b"+", b"-"):
                    self.acks += c
                    self.buf = self.buf[1:]
                    if c == b"-":
                        self.nacks += 1
                        self.sock.sendall(self.last)
                    continue
                if c == b"\x03":
                    self.buf = self.buf[1:]
                    self.sock.sendall(frame(b"T02thread:01;"))
                    continue
                end = self.buf.find(b"#")
                if c != b"$" or end < 0 or len(self.buf) < end + 3:
                    break
                raw, csum = self.buf[1:end], self.buf[end + 1:end + 3]
                self.buf = self.buf[end + 3:]
                assert int(csum, 16) == checksum(raw), "client sent a bad checksum"
                self.sock.sendall(b"+")
                payload = decode_payload(raw)
                self.received.append(payload)
                replies = self.handler(self, payload)
                for r in replies:
                    self.last = r
                    if self.corrupt_first_reply:
                        self.corrupt_first_reply = False
                        r = r[:-2] + (b"00" if r[-2:] != b"00" else b"11")
                    self.sock.sendall(r)


MEMORY = bytes(range(256)) * 32  # 8 KiB at address 0x1000


def qemu_like(peer: FakePeer, p: bytes) -> list[bytes]:
    if p.startswith(b"qSupported"):
        return [frame(b"PacketSize=1000;qXfer:features:read+;vContSupported+")]
    if p == b"?":
        return [frame(b"T05thread:01;")]
    if p.startswith(b"qXfer:features:read:"):
        annex, span = p[len(b"qXfer:features:read:"):].rsplit(b":", 1)
        off, length = (int(x, 16) for x in span.split(b","))
        doc = (TARGET_XML if annex == b"target.xml" else CORE_XML).encode()
        length = min(length, 100)  # force several chunks
        chunk = doc[off:off + length]
        return [encode_packet((b"l" if off + length >= len(doc) else b"m") + chunk)]
    if p == b"g":
        regs = b"".join(i.to_bytes(8, "little") for i in range(16))
        regs += (0xFFFFFFFF81000000).to_bytes(8, "little") + (0x246).to_bytes(4, "little")
        regs += b"".join((0x10).to_bytes(4, "little") for _ in range(6))
        regs += b"".join(v.to_bytes(8, "little") for v in (0, 0xFFFF888000000000, 0, 0x80050033, 0,
                                                            0x10A1000 | (1 << 63) | 0x5, 0x3406F0, 0, 0xD01))
        regs += b"\0" * 10
        hexed = regs.hex().encode()
        # Run-length encode runs of '0' the way stubs do ("0*" + count char).
        return [frame(hexed.replace(b"0000000000", b"0*&"))]
    if p.startswith(b"m"):
        addr, length = (int(x, 16) for x in p[1:].split(b","))
        assert length <= 0x800, "client asked for more than one 2 KiB chunk"
        if addr == 0x9000:  # a broken stub: fewer hex digits than asked for
            return [frame(b"abcd")]
        if not 0x1000 <= addr < 0x1000 + len(MEMORY):
            return [frame(b"E14")]
        return [frame(MEMORY[addr - 0x1000:addr - 0x1000 + length].hex().encode())]
    if p.startswith(b"qRcmd,"):
        cmd = bytes.fromhex(p[6:].decode())
        out = b"you said: " + cmd + b"\n"
        return [frame(b"O" + out[:5].hex().encode()), frame(b"O" + out[5:].hex().encode()), frame(b"OK")]
    if p.startswith(b"Qqemu.PhyMemMode:"):
        return [frame(b"OK")]
    if p.startswith((b"Z0,", b"z0,", b"D")):
        return [frame(b"OK")]
    if p == b"s":
        return [frame(b"T05thread:01;")]
    if p == b"vCont?" and peer.vcont:
        return [frame(b"vCont;c;C;s;S")]
    if p.startswith(b"vCont;s:") and peer.vcont:
        thread = p[len(b"vCont;s:"):]
        if peer.stuck_steps:  # a stop requested earlier is reported before the CPU moves
            peer.stuck_steps -= 1
            return [frame(b"T05thread:" + (peer.stuck_reply_thread or thread) + b";")]
        peer.rip += 3
        return [frame(b"T05thread:" + thread + b";")]
    if p.startswith(b"Hg"):
        return [frame(b"OK")]
    if p == b"p10":  # rip (regnum 16 in the target description)
        return [frame(peer.rip.to_bytes(8, "little").hex().encode())]
    if p.startswith(b"P"):
        return [frame(b"OK")]
    return [frame(b"")]


def pair(handler: Callable[[FakePeer, bytes], list[bytes]] = qemu_like, **kw: object) -> tuple[GdbStub, FakePeer]:
    a, b = socket.socketpair()
    a.settimeout(5)
    peer = FakePeer(b, handler, **kw)  # type: ignore[arg-type]
    peer.start()
    stub = GdbStub("fake", connect=False)
    stub.attach_socket(a)
    return stub, peer


def wait_for(cond: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``cond``: the peer thread handles our last ack asynchronously."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_checksum_and_escaping() -> None:
    assert encode_packet(b"g") == b"$g#67"
    assert encode_packet(b"m1000,8") == b"$m1000,8#" + b"%02x" % (sum(b"m1000,8") & 0xFF)
    escaped = encode_packet(b"a#b$c}d*")
    assert escaped == b"$a}\x03b}\x04c}]d}\x0a#" + b"%02x" % checksum(b"a}\x03b}\x04c}]d}\x0a")
    assert decode_payload(escaped[1:-3]) == b"a#b$c}d*"


def test_run_length_decoding() -> None:
    assert decode_payload(b"0* ") == b"0000"  # ' ' is 32: 3 more
    assert decode_payload(b"x0*\"y") == b"x000000y"  # '"' is 34: 5 more
    assert decode_payload(b"ab}]*!") == b"ab}}}}}"  # escaped '}' then 4 more
    with pytest.raises(GdbError):
        decode_payload(b"*!")


def test_connect_discards_unprompted_stop_and_acks() -> None:
    stub, peer = pair(greeting=frame(b"T02thread:01;"))
    assert stub.features["PacketSize"] == "1000"
    assert stub.last_stop == "T05thread:01;"
    assert peer.received[:2] == [b"qSupported:xmlRegisters=i386", b"?"]
    assert wait_for(lambda: peer.acks.count(b"+") == 3)  # unprompted stop, qSupported reply, ? reply
    assert stop_signal(stub.last_stop) == 5
    stub.close()


def test_bad_checksum_is_nacked_and_resent() -> None:
    stub, peer = pair(corrupt_first_reply=True)
    assert peer.nacks == 1
    assert stub.features["PacketSize"] == "1000"
    stub.close()


def test_read_memory_chunks_and_errors() -> None:
    stub, peer = pair()
    assert stub.read_memory(0x1000, 8) == MEMORY[:8]
    assert stub.read_memory(0x1100, 0x1000) == MEMORY[0x100:0x1100]
    assert [p for p in peer.received if p.startswith(b"m")][-2:] == [b"m1100,800", b"m1900,800"]
    with pytest.raises(InvalidAddressError) as info:
        stub.read_memory(0x10, 8, layer="gdb-phys")
    assert info.value.layer == "gdb-phys" and info.value.address == 0x10
    # A malformed reply is the stub's fault, never an unreadable address that read_partial would pad.
    with pytest.raises(GdbError, match="hex digits") as broken:
        stub.read_memory(0x9000, 8)
    assert not isinstance(broken.value, InvalidAddressError)
    stub.set_physical_mode(True)
    stub.close()
    assert wait_for(lambda: peer.received[-1] == b"D")
    assert peer.received[-2:] == [b"Qqemu.PhyMemMode:0", b"D"]


def test_registers_from_target_xml() -> None:
    stub, peer = pair()
    regs = stub.registers()
    assert [r.name for r in regs[:3]] == ["rax", "rbx", "rcx"]
    assert next(r for r in regs if r.name == "cr3").regnum == 29
    values = stub.read_registers()
    assert values["rcx"] == 2 and values["rip"] == 0xFFFFFFFF81000000 and values["eflags"] == 0x246
    assert values["cr3"] == 0x10A1000 | (1 << 63) | 0x5 and values["cr4"] == 0x3406F0
    assert values["gs_base"] == 0xFFFF888000000000 and values["efer"] == 0xD01
    # target.xml came in several qXfer chunks
    assert sum(p.startswith(b"qXfer:features:read:i386-64bit.xml") for p in peer.received) > 1
    stub.close()


def test_no_write_path() -> None:
    """A read-only tool: the client can set breakpoints (trace), but never write registers or memory."""
    for name in ("write_register", "write_registers", "write_memory"):
        assert not hasattr(GdbStub, name), name
    src = Path(gdbstub.__file__).read_text()
    sent = set(re.findall(r"_request\((?:b|f)?[\"']([A-Za-z])", src))  # first letter of each packet sent
    assert sent and not sent & {"P", "G", "M", "X"}, sorted(sent)  # register/memory writes


def test_monitor_output_packets() -> None:
    stub, peer = pair()
    assert stub.monitor("info registers") == "you said: info registers\n"
    assert peer.received[-1] == b"qRcmd," + b"info registers".hex().encode()
    stub.close()


def test_breakpoints_step_interrupt() -> None:
    stub, peer = pair()
    stub.insert_breakpoint(0xFFFFFFFF81000000)
    assert peer.received[-1] == b"Z0,ffffffff81000000,1"
    assert stub.step_over_breakpoint(0xFFFFFFFF81000000) == "T05thread:01;"
    assert peer.received[-3:] == [b"z0,ffffffff81000000,1", b"s", b"Z0,ffffffff81000000,1"]
    stub.cont(wait=False)
    assert stub.interrupt() == "T02thread:01;"
    stub.close()


def test_step_over_breakpoint_steps_only_the_cpu_that_stopped() -> None:
    """On SMP a plain ``s`` lets every CPU run; one CPU is stepped with ``vCont;s:<thread>``
    and its RIP read back (``Hg``, ``p``): the stop reply does not say that it moved."""
    stub, peer = pair()
    peer.rip = 0xFFFFFFFF81000000
    assert stub.step_over_breakpoint(0xFFFFFFFF81000000, thread="02") == "T05thread:02;"
    sent = [p for p in peer.received if not p.startswith(b"qXfer:")]  # the target description, once
    assert sent[-6:] == [b"z0,ffffffff81000000,1", b"vCont?", b"vCont;s:02", b"Hg02", b"p10",
                         b"Z0,ffffffff81000000,1"]
    peer.rip = 0xFFFFFFFF81000000
    stub.step_over_breakpoint(0xFFFFFFFF81000000, thread="p01.03")
    assert peer.received[-5:] == [b"z0,ffffffff81000000,1", b"vCont;s:p01.03", b"Hgp01.03", b"p10",
                                  b"Z0,ffffffff81000000,1"]
    assert peer.received.count(b"vCont?") == 1  # asked once
    stub.close()


@pytest.mark.parametrize("reply_thread", [b"", b"01"])
def test_step_over_breakpoint_steps_again_until_the_cpu_moves(reply_thread: bytes) -> None:
    """A stop requested before the step (two CPUs at breakpoints at once) may answer
    it, naming this CPU or another, before the CPU moved: it is stepped again."""
    stub, peer = pair()
    peer.rip, peer.stuck_steps, peer.stuck_reply_thread = 0xFFFFFFFF81000000, 2, reply_thread
    assert stub.step_over_breakpoint(0xFFFFFFFF81000000, thread="02") == "T05thread:02;"
    assert peer.rip == 0xFFFFFFFF81000003
    sent = [p for p in peer.received if not p.startswith(b"qXfer:")]
    assert sent.count(b"vCont;s:02") == 3 and sent[-1] == b"Z0,ffffffff81000000,1"
    # A CPU that never moves is an error, and the breakpoint is back all the same.
    peer.rip, peer.stuck_steps = 0xFFFFFFFF81000000, 100
    with pytest.raises(gdbstub.GdbError, match="did not step off"):
        stub.step_over_breakpoint(0xFFFFFFFF81000000, thread="02")
    assert peer.received[-1] == b"Z0,ffffffff81000000,1"
    stub.close()


def test_step_falls_back_to_s_without_vcont() -> None:
    stub, peer = pair()
    peer.vcont = False  # the stub answers "" to vCont? (not supported)
    assert stub.step("02") == "T05thread:01;"
    assert peer.received[-2:] == [b"vCont?", b"s"]
    stub.close()


def test_parse_target_xml_regnum_order() -> None:
    regs = parse_target_xml({"target.xml": TARGET_XML, "i386-64bit.xml": CORE_XML})
    assert [r.regnum for r in regs] == list(range(len(regs)))
    assert regs[16].name == "rip" and regs[17].bitsize == 32


def test_wait_stop_slice_times_out_as_timed_out() -> None:
    """The breakpoint monitor waits in 0.25 s slices and resumes on "timed out";
    a quiet guest (no hit within a slice) must not end the trace."""
    stub, peer = pair()
    stub.cont(wait=False)
    with pytest.raises(GdbError, match=r"timed out: no complete reply within 0\.1 s"):
        stub.wait_stop(timeout=0.1)
    assert stub.interrupt() == "T02thread:01;"
    stub.close()
