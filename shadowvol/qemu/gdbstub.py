"""A GDB remote serial protocol client for QEMU 7.2's gdbstub.

Written against the behaviour of QEMU 7.2 (see NOTES-lab.md):

- acknowledgements are always on (7.2 has no ``QStartNoAckMode``);
- an unprompted stop packet may arrive on connect; :meth:`GdbStub.connect`
  resynchronises and discards it;
- attaching halts the VM; ``D`` (detach) resumes it;
- ``P`` needs ``qXfer:features:read:target.xml`` to have been fetched;
- ``Qqemu.PhyMemMode:1`` makes ``m`` read guest-physical addresses;
- any byte but an ack that arrives while the VM runs stops it and is dropped;
- a plain ``s`` resumes every CPU, and single-step is cleared only on the CPU
  a stop reports: step one CPU with ``vCont;s:<thread>`` (:meth:`GdbStub.step`);
- a closed connection changes nothing: breakpoints stay and a halted VM
  stays halted (``detach_guard`` detaches for a holder that died).

Register layout comes from the target description QEMU serves, so the
``g`` packet is decoded by name rather than by a hard-coded order.
"""

from __future__ import annotations

import re
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError, InvalidAddressError

__all__ = [
    "GdbError",
    "Register",
    "checksum",
    "encode_packet",
    "decode_payload",
    "parse_target_xml",
    "GdbStub",
    "stop_signal",
    "stop_thread",
]

#: Steps of one CPU off a breakpoint before giving up (see step_over_breakpoint).
STEP_TRIES = 8

#: Largest memory chunk per ``m`` packet: QEMU 7.2 advertises PacketSize=0x1000
#: and hex-encodes, so 2 KiB per reply fits.
MAX_MEM_CHUNK = 0x800

#: Most bytes buffered while waiting for one packet (QEMU's PacketSize is 4 KiB).
MAX_PACKET = 1 << 20
#: Largest qXfer object (target.xml and its includes are a few KiB each).
MAX_XFER = 1 << 20
#: Most target-description documents followed through includes.
MAX_XML_DOCS = 32

_ESCAPE = frozenset(b"$#}*")
_STOP_RE = re.compile(rb"[ST][0-9a-fA-F]{2}")


class GdbError(BackendError):
    """The gdbstub refused a request or broke the protocol."""


def checksum(payload: bytes) -> int:
    """The modulo-256 sum of the raw (escaped, encoded) payload."""
    return sum(payload) & 0xFF


def encode_packet(payload: bytes) -> bytes:
    """Frame ``payload`` as ``$payload#xx``, escaping ``$ # } *`` with ``}`` and XOR 0x20."""
    if any(b in _ESCAPE for b in payload):
        out = bytearray()
        for b in payload:
            if b in _ESCAPE:
                out += bytes((0x7D, b ^ 0x20))
            else:
                out.append(b)
        payload = bytes(out)
    return b"$" + payload + b"#%02x" % checksum(payload)


def decode_payload(raw: bytes) -> bytes:
    """Undo escaping (``}x`` -> ``x^0x20``) and run-length encoding (``c*n``: n-29 more c)."""
    if b"}" not in raw and b"*" not in raw:
        return raw
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b == 0x7D:
            if i + 1 >= n:
                raise GdbError("gdbstub packet ends in an escape character")
            out.append(raw[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A:
            if not out or i + 1 >= n:
                raise GdbError("gdbstub packet has a dangling run-length marker")
            out += bytes((out[-1],)) * (raw[i + 1] - 29)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


@dataclass(frozen=True)
class Register:
    """One register of the target description: name, bit size, number, feature."""

    name: str
    bitsize: int
    regnum: int
    feature: str
    type: str = "int"


def parse_target_xml(documents: dict[str, str], root: str = "target.xml") -> list[Register]:
    """Registers in ``g``-packet order from a target description and its includes.

    Includes are followed iteratively, each document once, so an include
    loop ends; a malformed description raises GdbError."""
    regs: list[Register] = []
    next_num = 0
    # A stack of element iterators, one per open document: document order is kept.
    stack: list[Any] = []
    opened: set[str] = set()

    def open_doc(name: str) -> None:
        if name in opened:
            raise GdbError(f"target description includes {name[:60]!r} twice (an include loop?)")
        if name not in documents:
            raise GdbError(f"target description includes {name[:60]!r}, which the gdbstub did not serve")
        opened.add(name)
        text = re.sub(r"<!DOCTYPE[^>]*>", "", documents[name])
        text = re.sub(r"<(/?)xi:", r"<\1", text).replace("xmlns:xi=", "xmlns_xi=")
        stack.append(["", ET.fromstring(text).iter()])

    try:
        open_doc(root)
        while stack:
            frame = stack[-1]
            el = next(frame[1], None)
            if el is None:
                stack.pop()
            elif el.tag == "include" and "href" in el.attrib:
                open_doc(el.attrib["href"])
            elif el.tag == "feature":
                frame[0] = el.attrib.get("name", "")
            elif el.tag == "reg":
                num = int(el.attrib.get("regnum", next_num))
                bits = int(el.attrib["bitsize"])
                if not (0 <= num < 1 << 16 and 0 < bits <= 4096):
                    raise ValueError(f"register {el.attrib.get('name', '?')[:30]!r}: regnum {num}, bitsize {bits}")
                regs.append(Register(el.attrib["name"], bits, num, frame[0], el.attrib.get("type", "int")))
                next_num = num + 1
    except (ET.ParseError, KeyError, ValueError, TypeError) as exc:
        raise GdbError(f"malformed target description: {type(exc).__name__}: {str(exc)[:80]}") from None
    return sorted(regs, key=lambda r: r.regnum)


def _unhex(reply: bytes, what: str) -> bytes:
    """The bytes of a hex-encoded reply, or GdbError."""
    try:
        return bytes.fromhex(reply.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise GdbError(f"gdbstub {what}: reply is not hex ({reply[:16].decode('ascii', 'replace')!r})") from None


def _address(target: str | tuple[str, int]) -> tuple[int, Any]:
    if isinstance(target, tuple):
        return socket.AF_INET, target
    if target.startswith("unix:"):
        return socket.AF_UNIX, target[5:].split(",")[0]
    if target.startswith("tcp:"):
        target = target[4:]
    m = re.fullmatch(r"(.*):(\d+)", target)
    if m and "/" not in target:
        return socket.AF_INET, (m.group(1) or "127.0.0.1", int(m.group(2)))
    return socket.AF_UNIX, target


class GdbStub:
    """One session with a QEMU gdbstub (unix socket path, ``unix:PATH``, ``HOST:PORT`` or (host, port)).

    Connecting halts the VM. :meth:`close` detaches, which resumes it.
    """

    def __init__(self, target: str | tuple[str, int], timeout: float = 10.0, connect: bool = True) -> None:
        self.target = target
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._last_sent = b""
        self._xml: dict[str, str] | None = None
        self._regs: list[Register] | None = None
        self._phys = False
        #: End of the current exchange (time.monotonic), or None: wait as the socket timeout says.
        self._deadline: float | None = None
        self._window: float = timeout  # the wait that _deadline bounds, for messages
        self.last_stop: str | None = None
        self.features: dict[str, str] = {}
        self._vcont: bool | None = None  # vCont with a step action, asked on first use
        if connect:
            self.connect()

    # -- transport -------------------------------------------------------

    @property
    def connected(self) -> bool:
        """The socket is open (the VM may be halted by us)."""
        return self._sock is not None

    def connect(self) -> None:
        """Open the socket, ack and drop any unprompted stop packet, and resynchronise."""
        family, addr = _address(self.target)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            raise BackendError(f"cannot connect to gdbstub {self.target}: {exc.strerror or exc}") from None
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.attach_socket(sock)

    def attach_socket(self, sock: socket.socket) -> None:
        """Use an already connected socket (tests pass one end of a socketpair)."""
        self._sock = sock
        self._buf.clear()
        # qSupported always gets a non-stop reply; stop packets that arrive
        # before it (the unprompted one on connect) are discarded by _request.
        # No "multiprocess+": with it, QEMU 7.2 answers a bare "D" with E22.
        reply = self._request(b"qSupported:xmlRegisters=i386")
        self.features = {}
        for item in reply.decode(errors="replace").split(";"):
            if "=" in item:
                k, v = item.split("=", 1)
                self.features[k] = v
            elif item:
                self.features[item[:-1]] = item[-1]
        self.last_stop = self._request(b"?", stop_reply=True).decode(errors="replace")

    def _fill(self) -> None:
        if self._sock is None:
            raise GdbError("gdbstub session is closed")
        if len(self._buf) > MAX_PACKET:
            raise GdbError(f"gdbstub {self.target}: more than {MAX_PACKET} bytes without a complete packet")
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise GdbError(f"gdbstub {self.target} timed out: no complete reply within {self._window:g} s")
            self._sock.settimeout(left)
        try:
            chunk = self._sock.recv(65536)
        except socket.timeout:
            if self._deadline is not None:
                raise GdbError(f"gdbstub {self.target} timed out: no complete reply within {self._window:g} s") from None
            raise GdbError(f"gdbstub {self.target} timed out") from None
        except OSError as exc:
            raise GdbError(f"gdbstub {self.target}: {exc.strerror or exc}") from None
        if not chunk:
            raise GdbError(f"gdbstub {self.target} closed the connection (has QEMU exited?)")
        self._buf += chunk

    def _send(self, payload: bytes) -> None:
        if self._sock is None:
            raise GdbError("gdbstub session is closed")
        self._last_sent = encode_packet(payload)
        self._sendall(self._last_sent)

    def _sendall(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except socket.timeout:
            raise GdbError(f"gdbstub {self.target} timed out") from None
        except OSError as exc:
            raise GdbError(f"gdbstub {self.target}: {exc.strerror or exc}") from None

    def _exchange(self) -> "_Deadline":
        """Context bounding one request/reply exchange by ``self.timeout`` overall."""
        return _Deadline(self, self.timeout)

    def _read_packet(self) -> bytes:
        """Next valid packet payload (decoded); handles acks, nacks and bad checksums."""
        buf = self._buf
        while True:
            # Skip acks and noise before '$'; a '-' asks us to resend.
            while True:
                start = buf.find(b"$")
                noise = buf if start < 0 else buf[:start]
                if b"-" in noise:
                    self._sendall(self._last_sent)
                if start >= 0:
                    del buf[:start]
                    break
                buf.clear()
                self._fill()
            end = buf.find(b"#")
            while end < 0 or len(buf) < end + 3:
                self._fill()
                end = buf.find(b"#")
            raw = bytes(buf[1:end])
            want = bytes(buf[end + 1:end + 3])
            del buf[:end + 3]
            try:
                ok = int(want, 16) == checksum(raw)
            except ValueError:
                ok = False
            if not ok:
                self._sendall(b"-")
                continue
            self._sendall(b"+")
            return decode_payload(raw)

    def _request(self, payload: bytes, stop_reply: bool = False) -> bytes:
        """Send a packet and return its reply; stale stop packets are skipped
        unless one is wanted. The whole exchange ends within ``self.timeout``."""
        with self._exchange():
            self._send(payload)
            while True:
                reply = self._read_packet()
                # No reply we ask for other than a stop reply looks like "Txx"/"Sxx".
                if not stop_reply and _STOP_RE.match(reply):
                    continue
                return reply

    def close(self, detach: bool = True) -> bool:
        """Leave physical mode, detach (QEMU then resumes the VM) and close the socket.
        Returns whether QEMU acknowledged the detach."""
        if self._sock is None:
            return False
        detached = False
        try:
            if detach:
                if self._phys:
                    self.set_physical_mode(False)
                detached = self._request(b"D") == b"OK"
                if not detached:
                    self._send(b"c")  # detach refused: at least resume the VM
        except BackendError:
            pass
        finally:
            try:
                self._sock.close()
            finally:
                self._sock = None
        return detached

    def __enter__(self) -> "GdbStub":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ----------------------------------------------------------

    def xfer(self, obj: str, annex: str) -> str:
        """Read a whole ``qXfer:<obj>:read:<annex>`` object."""
        out = bytearray()
        try:
            size = int(self.features.get("PacketSize", "1000"), 16) - 16
        except ValueError:
            size = 0x1000 - 16
        size = min(max(size, 64), MAX_PACKET)
        while True:
            reply = self._request(f"qXfer:{obj}:read:{annex}:{len(out):x},{size:x}".encode())
            if reply[:1] not in (b"l", b"m"):
                raise GdbError(f"gdbstub cannot read {obj} {annex[:60]}: "
                               f"{reply[:40].decode(errors='replace') or 'empty reply'}")
            out += reply[1:]
            if len(out) > MAX_XFER:
                raise GdbError(f"gdbstub {obj} {annex[:60]} is longer than {MAX_XFER} bytes")
            if reply[:1] == b"l":
                try:
                    return out.decode()
                except UnicodeDecodeError:
                    raise GdbError(f"gdbstub {obj} {annex[:60]} is not UTF-8") from None
            if len(reply) == 1:
                raise GdbError(f"gdbstub {obj} {annex[:60]}: empty chunk before the end")

    def target_xml(self) -> dict[str, str]:
        """target.xml and every file it includes, by name (fetched once)."""
        if self._xml is None:
            docs: dict[str, str] = {}
            todo = ["target.xml"]
            while todo:
                name = todo.pop()
                if name in docs:
                    continue
                if len(docs) >= MAX_XML_DOCS:
                    raise GdbError(f"target description includes more than {MAX_XML_DOCS} documents")
                docs[name] = self.xfer("features", name)
                todo += re.findall(r'<xi:include href="([^"]+)"', docs[name])
            self._xml = docs
        return self._xml

    def registers(self) -> list[Register]:
        """The register list of the target description, in ``g`` order."""
        if self._regs is None:
            self._regs = parse_target_xml(self.target_xml())
        return self._regs

    def read_registers(self) -> dict[str, int]:
        """All registers of the current CPU from ``g``, by target.xml name (cr3 if QEMU sends it).

        QEMU 7.2 x86-64 sends rax..r15, rip, eflags, cs..gs, fs_base, gs_base,
        k_gs_base, cr0, cr2, cr3, cr4, cr8, efer, then x87/SSE state.
        """
        regs = self.registers()
        hexdata = self._request(b"g")
        if hexdata[:1] == b"E":
            raise GdbError(f"gdbstub g failed: {hexdata.decode()}")
        data = _unhex(hexdata, "g")
        out: dict[str, int] = {}
        pos = 0
        for reg in regs:
            n = reg.bitsize // 8
            if pos + n > len(data):
                break
            out[reg.name] = int.from_bytes(data[pos:pos + n], "little")
            pos += n
        return out

    # -- memory -----------------------------------------------------------

    def set_physical_mode(self, on: bool) -> None:
        """Switch ``m`` between virtual (current CPU's page tables) and guest-physical addresses."""
        reply = self._request(b"Qqemu.PhyMemMode:%d" % (1 if on else 0))
        if reply != b"OK":
            raise GdbError(f"gdbstub does not support Qqemu.PhyMemMode: {reply.decode(errors='replace')}")
        self._phys = on

    def read_memory(self, addr: int, length: int, layer: str = "gdbstub") -> bytes:
        """Read with ``m`` packets of at most 2 KiB; an ``E`` reply raises InvalidAddressError,
        a reply of the wrong length GdbError."""
        out = bytearray()
        pos, end = addr, addr + length
        while pos < end:
            n = min(MAX_MEM_CHUNK, end - pos)
            reply = self._request(b"m%x,%x" % (pos, n))
            if reply[:1] == b"E":  # the stub's own "cannot read here"
                raise InvalidAddressError(layer, pos, f"gdbstub m failed ({reply[:8].decode(errors='replace')})")
            if len(reply) != 2 * n:  # a broken reply is a protocol error, never an unmapped page
                raise GdbError(f"gdbstub m at {pos:#x}: {len(reply)} hex digits for {n} bytes")
            out += _unhex(reply, "m")
            pos += n
        return bytes(out)

    # -- monitor ----------------------------------------------------------

    def monitor(self, command: str) -> str:
        """Run a QEMU monitor command through ``qRcmd`` and return its output."""
        with self._exchange():
            self._send(b"qRcmd," + command.encode().hex().encode())
            out = bytearray()
            while True:
                reply = self._read_packet()
                if reply[:1] == b"O" and reply != b"OK":
                    out += _unhex(reply[1:], "qRcmd")
                elif reply == b"OK":
                    return out.decode(errors="replace")
                elif reply[:1] == b"E":
                    raise GdbError(f"monitor command {command!r} failed: {reply[:40].decode(errors='replace')}")
                elif reply[:1] in (b"T", b"S"):
                    continue
                else:
                    out += _unhex(reply, "qRcmd")
                    return out.decode(errors="replace")
                if len(out) > MAX_XFER:
                    raise GdbError(f"monitor command {command!r}: output longer than {MAX_XFER} bytes")

    # -- execution control ------------------------------------------------

    def insert_breakpoint(self, addr: int, kind: int = 1) -> None:
        """Software breakpoint (``Z0``) at a guest-virtual address."""
        reply = self._request(b"Z0,%x,%x" % (addr, kind))
        if reply != b"OK":
            raise GdbError(f"cannot set breakpoint at {addr:#x}: {reply.decode(errors='replace') or 'unsupported'}")

    def remove_breakpoint(self, addr: int, kind: int = 1) -> None:
        """Remove a ``Z0`` breakpoint."""
        reply = self._request(b"z0,%x,%x" % (addr, kind))
        if reply != b"OK":
            raise GdbError(f"cannot remove breakpoint at {addr:#x}: {reply.decode(errors='replace')}")

    def step(self, thread: str | None = None) -> str:
        """Single-step one CPU; returns the stop reply.

        With ``thread`` (a thread-id as in a stop reply, ``thread:<id>;``), only
        that CPU runs: ``vCont;s:<id>``. A plain ``s`` resumes every CPU and
        steps the current one; on SMP another CPU can then stop the VM first
        (a breakpoint), and QEMU 7.2 clears single-step only on the CPU it
        reports, so the stepping CPU keeps it and stops the VM again later:
        after a detach, with nobody to resume it (runstate ``debug``).
        """
        if thread is not None and self._vcont_step():
            packet = b"vCont;s:" + thread.encode()
        else:
            packet = b"s"
        self.last_stop = self._request(packet, stop_reply=True).decode(errors="replace")
        return self.last_stop

    def _vcont_step(self) -> bool:
        """The stub takes ``vCont`` with a step action (asked once: ``vCont?``)."""
        if self._vcont is None:
            actions = self._request(b"vCont?").decode(errors="replace")
            self._vcont = actions.startswith("vCont") and "s" in actions.split(";")[1:]
        return self._vcont

    def cont(self, wait: bool = True, timeout: float | None = None) -> str | None:
        """Resume the VM (``c``); with ``wait``, block until it stops again and return the stop reply."""
        self._send(b"c")
        if not wait:
            return None
        return self.wait_stop(timeout)

    def wait_stop(self, timeout: float | None = None) -> str:
        """Block until the next stop reply (breakpoint hit, interrupt...)."""
        if self._sock is None:
            raise GdbError("gdbstub session is closed")
        old = self._sock.gettimeout()
        saved = self._deadline
        # An overall deadline when a timeout is given; None waits for as long
        # as the guest runs (a breakpoint may take that long to be hit).
        self._deadline = None if timeout is None else time.monotonic() + timeout
        saved_window, self._window = self._window, (self.timeout if timeout is None else timeout)
        self._sock.settimeout(timeout)
        try:
            while True:
                reply = self._read_packet()
                if reply[:1] in (b"T", b"S", b"W", b"X"):
                    self.last_stop = reply.decode(errors="replace")
                    return self.last_stop
                if reply[:1] == b"O" and reply != b"OK":
                    continue
        finally:
            self._deadline = saved
            self._window = saved_window
            if self._sock is not None:
                self._sock.settimeout(old)

    def interrupt(self, timeout: float | None = 5.0) -> str:
        """Stop a running VM (0x03) and return the stop reply."""
        self._sendall(b"\x03")
        return self.wait_stop(timeout)

    def step_over_breakpoint(self, addr: int, kind: int = 1, thread: str | None = None) -> str:
        """Leave a breakpoint at the current RIP: remove, step, re-insert (QEMU 7.2 re-stops on plain ``c``).

        ``thread``: the CPU that stopped there (see :meth:`step`); give it on SMP.
        """
        self.remove_breakpoint(addr, kind)
        try:
            for _ in range(STEP_TRIES):
                stop = self.step(thread)
                if thread is None:
                    return stop
                # The reply does not say that the CPU moved: a stop requested just
                # before (two CPUs hitting breakpoints at once) is reported as soon
                # as the VM resumes, naming either CPU. A CPU still on the
                # breakpoint would stop there again once it is re-inserted, and
                # its call would be reported twice: step it until its RIP moves.
                if self.read_register("rip", thread) != addr:
                    return stop
            raise GdbError(f"gdbstub {self.target}: thread {thread} did not step off {addr:#x} "
                           f"in {STEP_TRIES} tries (last stop {stop})")
        finally:
            self.insert_breakpoint(addr, kind)

    def read_register(self, name: str, thread: str | None = None) -> int:
        """One register by target.xml name (``p``), of ``thread`` (``Hg``) or the current CPU."""
        reg = next((r for r in self.registers() if r.name == name), None)
        if reg is None:
            raise GdbError(f"gdbstub {self.target}: no register {name!r} in the target description")
        if thread is not None:
            reply = self._request(b"Hg" + thread.encode())
            if reply != b"OK":
                raise GdbError(f"gdbstub {self.target}: Hg{thread} failed: {reply.decode(errors='replace')}")
        hexdata = self._request(b"p%x" % reg.regnum)
        if not hexdata or hexdata[:1] == b"E":
            raise GdbError(f"gdbstub {self.target}: p{reg.regnum:x} ({name}) failed: "
                           f"{hexdata.decode(errors='replace') or 'not supported'}")
        data = _unhex(hexdata, "p")
        if len(data) != reg.bitsize // 8:
            raise GdbError(f"gdbstub {self.target}: {name} is {len(data)} bytes, not {reg.bitsize // 8}")
        return int.from_bytes(data, "little")


def stop_thread(stop: str) -> str | None:
    """The thread-id of a ``T`` stop reply (``thread:<id>;``), as ``vCont`` and ``Hg`` take it."""
    m = _STOP_THREAD_RE.search(stop)
    return m.group(1) if m else None


_STOP_THREAD_RE = re.compile(r"thread:((?:p[0-9a-fA-F]+\.)?[0-9a-fA-F]+)")


def stop_signal(stop: str) -> int | None:
    """The signal number of a ``T``/``S`` stop reply (5 = SIGTRAP, 2 = SIGINT)."""
    if stop[:1] in ("T", "S") and len(stop) >= 3:
        try:
            return int(stop[1:3], 16)
        except ValueError:
            return None
    return None


class _Deadline:
    """Sets ``stub._deadline`` for one exchange (nested exchanges keep the outer one)."""

    def __init__(self, stub: GdbStub, timeout: float) -> None:
        self.stub, self.timeout, self.saved = stub, timeout, None

    def __enter__(self) -> None:
        self.saved = self.stub._deadline
        if self.saved is None:
            self.stub._deadline = time.monotonic() + self.timeout

    def __exit__(self, *exc: object) -> None:
        self.stub._deadline = self.saved
        if self.stub._sock is not None and self.saved is None:
            try:
                self.stub._sock.settimeout(self.stub.timeout)
            except OSError:
                pass
