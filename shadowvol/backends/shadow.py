"""The fast backends: guest RAM read straight from the host, without stopping the VM.

- :class:`ShadowFile` mmaps the guest RAM file of a QEMU started with
  ``-object memory-backend-file,share=on,mem-path=/dev/shm/...`` read-only.
- :class:`ShadowProcess` reads the RAM of any QEMU process through
  ``/proc/PID/mem`` (needs ptrace access to that process).

Guest-physical -> RAM-block offsets come from QEMU itself when a QMP socket is
available (HMP ``info mtree``: the ``ram-below-4g`` / ``ram-above-4g`` aliases
of the RAM block), else from the q35 rule (:mod:`shadowvol.qemu.ramlayout`).

Reads are not atomic with respect to the running guest: a multi-word
structure may be torn. Callers that need consistency pause the VM.
"""

from __future__ import annotations

import mmap
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BackendError, InvalidAddressError, ShadowvolError
from ..qmp import QMPClient
from ..qemu.ramlayout import q35_layout, qemu_ram_layout
from .base import BufferMemory, PhysicalMemory, Segment, map_file_readonly, merge_ranges

__all__ = [
    "ShadowFile",
    "ShadowProcess",
    "NoSharedRamFile",
    "open_shadow",
]

_GPA2HVA_RE = re.compile(r"is (0x[0-9a-f]+)")


class ShadowFile(BufferMemory):
    """A guest RAM file (``memory-backend-file,share=on``) mmapped read-only.

    ``segments`` map guest-physical ranges to file offsets; by default the
    q35 layout for the file's size. Reads see the guest live.

    ``populate`` pre-faults the whole mapping (MAP_POPULATE): about 37 ms per
    512 MiB at open instead of a minor fault on each first touch, but it
    also allocates any never-touched (sparse) pages of the RAM file.
    """

    def __init__(self, path: str | os.PathLike[str], segments: Sequence[Segment] | None = None,
                 name: str = "shadow", populate: bool = False) -> None:
        self.path = str(path)
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        mm = map_file_readonly(self.path, "guest RAM file", flags)
        size = len(mm)
        segs = list(segments) if segments is not None else q35_layout(size)
        try:
            super().__init__(mm, segs, name=name,
                             meta={"backend": "shadow-file", "source": self.path, "live": True})
        except ValueError as exc:
            mm.close()
            raise BackendError(f"{self.path}: {exc}") from None

    @classmethod
    def open_qmp(cls, qmp_path: str, path: str | None = None, name: str = "shadow") -> "ShadowFile":
        """Open the RAM file of the QEMU behind ``qmp_path``, with QEMU's own layout.

        ``path`` defaults to the ``mem-path`` of the memory-backend-file
        object that holds the RAM block (it must have ``share=on``).
        """
        with QMPClient(qmp_path) as qmp:
            block, _size, segs = qemu_ram_layout(qmp)
            if path is None:
                path = _backend_file(qmp, block)
        return cls(path, segs, name=name)


class NoSharedRamFile(BackendError):
    """The guest RAM is not a ``share=on`` memory-backend-file."""


def _backend_file(qmp: QMPClient, block: str) -> str:
    """The shared mem-path behind RAM block ``block``, or BackendError."""
    objects = qmp.execute("qom-list", path="/objects")
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        raise BackendError("QMP qom-list /objects: reply is not a list of objects")
    names = [o.get("name") for o in objects if o.get("type") == "child<memory-backend-file>"]
    if block not in names:
        raise NoSharedRamFile(f"guest RAM block {block!r} is not a memory-backend-file; "
                           "use ShadowProcess (open_shadow(qmp_path, process=True))")
    mem_path = qmp.execute("qom-get", path=f"/objects/{block}", property="mem-path")
    if not qmp.execute("qom-get", path=f"/objects/{block}", property="share"):
        raise NoSharedRamFile(f"memory backend {block!r} ({mem_path}) has share=off: the file does not "
                           "reflect guest RAM")
    return str(mem_path)


class ShadowProcess(PhysicalMemory):
    """Guest RAM read from a QEMU process through ``/proc/PID/mem``.

    ``segments`` map guest-physical ranges to host virtual addresses in the
    QEMU process (``Segment.offset`` is the host address).
    """

    def __init__(self, pid: int, segments: Sequence[Segment], name: str = "shadow") -> None:
        self.pid = pid
        self.name = name
        self._segments = sorted(segments, key=lambda s: s.start)
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except OSError as exc:
            raise BackendError(f"cannot open /proc/{pid}/mem: {exc.strerror} "
                               "(needs ptrace access to the QEMU process)") from None
        first = self._segments[0]
        self._fast_start, self._fast_end, self._fast_delta = first.start, first.end, first.offset - first.start

    def read(self, paddr: int, length: int) -> bytes:
        if self._fast_start <= paddr and paddr + length <= self._fast_end and length >= 0:
            try:
                data = os.pread(self._fd, length, paddr + self._fast_delta)
            except OSError as exc:
                raise self._dead(exc) from None
            if len(data) == length:
                return data
        return self._read_slow(paddr, length)

    def _dead(self, exc: OSError | None) -> BackendError:
        reason = exc.strerror if exc else "short read"
        return BackendError(f"cannot read QEMU process {self.pid} memory ({reason}); has QEMU exited?")

    def _read_slow(self, paddr: int, length: int) -> bytes:
        if length < 0:
            raise ValueError("negative length")
        if self._fd < 0:
            raise BackendError(f"{self.name}: read after close")
        out = bytearray()
        addr, end = paddr, paddr + length
        while addr < end:
            seg = next((s for s in self._segments if s.start <= addr < s.end), None)
            if seg is None:
                raise InvalidAddressError(self.name, addr, "not in guest RAM")
            want = min(end, seg.end) - addr
            hva = seg.offset + addr - seg.start
            while want:
                try:
                    data = os.pread(self._fd, want, hva)
                except OSError as exc:
                    raise self._dead(exc) from None
                if not data:
                    raise self._dead(None)
                out += data
                hva += len(data)
                addr += len(data)
                want -= len(data)
        return bytes(out)

    def ranges(self) -> list[tuple[int, int]]:
        return merge_ranges((s.start, s.end) for s in self._segments)

    def metadata(self) -> dict[str, Any]:
        return {"backend": "shadow-process", "size": self.size(), "source": f"pid {self.pid}", "live": True,
                "pid": self.pid}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._fast_end = -1

    @classmethod
    def open_qmp(cls, qmp_path: str, name: str = "shadow") -> "ShadowProcess":
        """Locate guest RAM in the QEMU behind ``qmp_path`` (``gpa2hva``), checked against /proc/PID/maps."""
        with QMPClient(qmp_path) as qmp:
            pid = qmp.peer_pid()
            if pid is None:
                raise BackendError(f"cannot learn the QEMU pid behind {qmp_path}")
            block, _size, segs = qemu_ram_layout(qmp)
            hva_segs = []
            for seg in segs:
                hva = _gpa2hva(qmp, seg.start)
                last = _gpa2hva(qmp, seg.end - 1)
                if last - hva != seg.length - 1:
                    raise BackendError(f"RAM segment {seg.start:#x}-{seg.end:#x} is not contiguous in QEMU")
                hva_segs.append(Segment(seg.start, seg.end, hva))
            _check_maps(pid, hva_segs)
            mem = cls(pid, hva_segs, name=name)
            try:
                _check_content(mem, qmp)
            except BaseException:
                mem.close()
                raise
            return mem

    @classmethod
    def open_pid(cls, pid: int, name: str = "shadow") -> "ShadowProcess":
        """Locate guest RAM in QEMU process ``pid``.

        Uses the process's QMP socket if its command line has one; otherwise
        the unique writable mapping whose size is the ``-m`` RAM size, laid
        out with :func:`q35_layout`.
        """
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError as exc:
            raise BackendError(f"no process {pid}: {exc.strerror}") from None
        args = [a.decode(errors="replace") for a in argv if a]
        qmp_path = _qmp_path_from_argv(args)
        if qmp_path is not None and os.path.exists(qmp_path):
            try:
                return cls.open_qmp(qmp_path, name=name)
            except ShadowvolError:
                pass  # busy or dead monitor: fall back to /proc/PID/maps
        ram_size = _ram_size_from_argv(args)
        candidates = []
        for start, end, perms, path in _maps(pid):
            if end - start == ram_size and perms.startswith("rw") and (not path or path.startswith("/dev/shm")
                                                                       or "memfd:" in path):
                candidates.append(start)
        if len(candidates) != 1:
            raise BackendError(f"found {len(candidates)} mappings of {ram_size:#x} bytes in process {pid}; "
                               "cannot tell which is guest RAM (give a QMP socket)")
        segs = [Segment(s.start, s.end, candidates[0] + s.offset) for s in q35_layout(ram_size)]
        return cls(pid, segs, name=name)


def _gpa2hva(qmp: QMPClient, gpa: int) -> int:
    text = qmp.hmp(f"gpa2hva {gpa:#x}")
    m = _GPA2HVA_RE.search(text)
    if not m:
        raise BackendError(f"QEMU gpa2hva {gpa:#x}: {text.strip()}")
    return int(m.group(1), 16)


def _maps(pid: int) -> list[tuple[int, int, str, str]]:
    out = []
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError as exc:
        raise BackendError(f"cannot read /proc/{pid}/maps: {exc.strerror}") from None
    for line in lines:
        parts = line.split(None, 5)
        lo, hi = parts[0].split("-")
        out.append((int(lo, 16), int(hi, 16), parts[1], parts[5] if len(parts) > 5 else ""))
    return out


def _check_maps(pid: int, segs: Sequence[Segment]) -> None:
    maps = _maps(pid)
    for seg in segs:
        hva_end = seg.offset + seg.length
        if not any(lo <= seg.offset and hva_end <= hi and perms.startswith("r") for lo, hi, perms, _ in maps):
            raise BackendError(f"guest RAM at host {seg.offset:#x}-{hva_end:#x} is not one readable mapping "
                               f"of process {pid}")


def _check_content(mem: ShadowProcess, qmp: QMPClient) -> None:
    """Compare 64 bytes read through /proc with QEMU's own ``xp`` (twice, for a live guest)."""
    seg = mem._segments[0]
    probe = seg.start + min(0x100000, max(0, seg.length - 64))
    for _ in range(2):
        ours = mem.read(probe, 64)
        text = qmp.hmp(f"xp /64xb {probe:#x}")
        theirs = bytes(int(tok, 16) for line in text.splitlines() for tok in line.split(":", 1)[-1].split())
        if ours == theirs:
            return
    raise BackendError(f"guest RAM found in process {mem.pid} does not match QEMU's xp at {probe:#x}")


def _qmp_path_from_argv(args: Sequence[str]) -> str | None:
    chardevs: dict[str, str] = {}
    monitors: list[str] = []
    for opt, val in zip(args, args[1:]):
        opt = opt.lstrip("-")
        if opt in ("qmp", "qmp-pretty") and val.startswith("unix:"):
            return val[5:].split(",")[0]
        if opt == "chardev":
            kv = dict(p.split("=", 1) for p in val.split(",")[1:] if "=" in p)
            if val.split(",")[0] == "socket" and "id" in kv and "path" in kv:
                chardevs[kv["id"]] = kv["path"]
        if opt == "mon":
            kv = dict(p.split("=", 1) for p in val.split(",") if "=" in p)
            if kv.get("mode") == "control" and "chardev" in kv:
                monitors.append(kv["chardev"])
    return next((chardevs[m] for m in monitors if m in chardevs), None)


def _ram_size_from_argv(args: Sequence[str]) -> int:
    """The ``-m`` size (QEMU's default unit is MiB; default 128 MiB)."""
    for opt, val in zip(args, args[1:]):
        if opt.lstrip("-") == "m":
            parts = dict(p.split("=", 1) if "=" in p else ("size", p) for p in val.split(","))
            text = parts.get("size", "128").strip()
            m = re.fullmatch(r"(\d+)([kKmMgGtT]?)[bB]?", text)
            if not m:
                raise BackendError(f"cannot parse -m {shlex.quote(val)}")
            unit = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
            return int(m.group(1)) * unit
    return 128 << 20


def open_shadow(qmp_path: str | None = None, *, ram_file: str | None = None, pid: int | None = None,
                process: bool = False, name: str = "shadow") -> PhysicalMemory:
    """Open the fastest live view available.

    With ``ram_file``: mmap it (layout from QMP if given, else q35). With
    ``qmp_path``: the shared RAM file if the RAM is a ``share=on``
    memory-backend-file (unless ``process``), else ``/proc/PID/mem``.
    With only ``pid``: ``/proc/PID/mem``.
    """
    if ram_file is not None:
        if qmp_path is not None:
            return ShadowFile.open_qmp(qmp_path, path=ram_file, name=name)
        return ShadowFile(ram_file, name=name)
    if qmp_path is not None:
        if not process:
            try:
                return ShadowFile.open_qmp(qmp_path, name=name)
            except NoSharedRamFile:
                pass
        return ShadowProcess.open_qmp(qmp_path, name=name)
    if pid is not None:
        return ShadowProcess.open_pid(pid, name=name)
    raise BackendError("open_shadow needs a RAM file, a QMP socket or a pid")
