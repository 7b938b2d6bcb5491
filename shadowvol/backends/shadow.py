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
from collections.abc import Sequence
from typing import Any

from ..errors import BackendError, InvalidAddressError, ShadowvolError
from ..qemu.monitor import xp
from ..qemu.process import qmp_socket_of, ram_by_maps, ram_by_monitor
from ..qemu.qmp import Monitor, QMPClient
from ..qemu.ramlayout import q35_layout, qemu_ram_layout
from .base import DROP_EVERY, BufferMemory, PhysicalMemory, Segment, map_file_readonly, merge_ranges

__all__ = [
    "ShadowFile",
    "ShadowProcess",
    "NoSharedRamFile",
    "open_shadow",
    "open_shadow_monitor",
]

class ShadowFile(BufferMemory):
    """A guest RAM file (``memory-backend-file,share=on``) mmapped read-only.

    ``segments`` map guest-physical ranges to file offsets; by default the
    q35 layout for the file's size. Reads see the guest live.

    ``populate`` pre-faults the whole mapping (MAP_POPULATE): about 37 ms per
    512 MiB at open instead of a minor fault on each first touch, but it
    also allocates any never-touched (sparse) pages of the RAM file (give
    ``drop_every=0`` too, or the first drop unmaps them again).
    ``drop_every``: see :class:`BufferMemory` (it keeps our RSS bounded).
    """

    def __init__(self, path: str | os.PathLike[str], segments: Sequence[Segment] | None = None,
                 name: str = "shadow", populate: bool = False, drop_every: int = DROP_EVERY) -> None:
        self.path = str(path)
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        mm = map_file_readonly(self.path, "guest RAM file", flags)
        size = len(mm)
        segs = list(segments) if segments is not None else q35_layout(size)
        try:
            super().__init__(mm, segs, name=name, drop_every=drop_every,
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
            return cls.open_monitor(qmp, path=path, name=name)

    @classmethod
    def open_monitor(cls, qmp: Monitor, path: str | None = None, name: str = "shadow") -> "ShadowFile":
        """:meth:`open_qmp` on an open monitor (a QMP client, or QMP through libvirt)."""
        block, _size, segs = qemu_ram_layout(qmp)
        if path is None:
            path = _backend_file(qmp, block)
        return cls(path, segs, name=name)


class NoSharedRamFile(BackendError):
    """The guest RAM is not a ``share=on`` memory-backend-file."""


def _backend_file(qmp: Monitor, block: str) -> str:
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
    if not os.path.isfile(str(mem_path)):
        # A mem-path directory: QEMU created an unlinked file in it (libvirt's
        # memory_backing_dir); only the process's own mapping reaches it.
        raise NoSharedRamFile(f"memory backend {block!r}: {mem_path} is not a file we can open")
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
        """Guest RAM of the QEMU behind ``qmp_path`` where QEMU says it is (``gpa2hva``), checked
        against /proc/PID/maps and against QEMU's own ``xp``."""
        with QMPClient(qmp_path) as qmp:
            return cls.open_monitor(qmp, name=name)

    @classmethod
    def open_monitor(cls, qmp: Monitor, name: str = "shadow") -> "ShadowProcess":
        """:meth:`open_qmp` on an open monitor (a QMP client, or QMP through libvirt, whose
        ``peer_pid`` is the domain's QEMU)."""
        pid, hva_segs = ram_by_monitor(qmp)
        mem = cls(pid, hva_segs, name=name)
        try:
            _check_content(mem, qmp)
        except BaseException:
            mem.close()
            raise
        return mem

    @classmethod
    def open_pid(cls, pid: int, qmp_path: str | None = None, name: str = "shadow") -> "ShadowProcess":
        """Guest RAM of QEMU process ``pid``.

        Through its QMP socket ``qmp_path`` when given and answering (the
        socket must belong to ``pid``); otherwise the unique writable mapping
        whose size is the ``-m`` RAM size, laid out by the q35 rule.
        """
        if qmp_path is not None:
            try:
                mem = cls.open_qmp(qmp_path, name=name)
            except ShadowvolError:
                pass  # busy or dead monitor: fall back to /proc/PID/maps
            else:
                if mem.pid == pid:
                    return mem
                mem.close()
                raise BackendError(f"QMP socket {qmp_path} belongs to process {mem.pid}, not {pid}")
        return cls(pid, ram_by_maps(pid), name=name)


def _check_content(mem: ShadowProcess, qmp: Monitor) -> None:
    """Compare 64 bytes read through /proc with QEMU's own ``xp`` (twice, for a live guest)."""
    seg = mem._segments[0]
    probe = seg.start + min(0x100000, max(0, seg.length - 64))
    for _ in range(2):
        if mem.read(probe, 64) == xp(qmp, probe, 64):
            return
    raise BackendError(f"guest RAM found in process {mem.pid} does not match QEMU's xp at {probe:#x}")


def open_shadow_monitor(qmp: Monitor, name: str = "shadow") -> PhysicalMemory:
    """:func:`open_shadow` for a QEMU reached through an open monitor (QMP through libvirt):
    its shared RAM file if it has one we can open, else ``/proc/PID/mem``."""
    try:
        return ShadowFile.open_monitor(qmp, name=name)
    except NoSharedRamFile:
        return ShadowProcess.open_monitor(qmp, name=name)


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
        return ShadowProcess.open_pid(pid, qmp_path=qmp_socket_of(pid), name=name)
    raise BackendError("open_shadow needs a RAM file, a QMP socket or a pid")
