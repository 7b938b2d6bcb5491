"""The hypervisor's debug interfaces as a backend: guest-physical reads the way
LibVMI's KVM driver makes them on a stock QEMU without KVMi.

This is not the LibVMI library: it speaks the same two QEMU interfaces that
LibVMI's KVM driver falls back to, directly:

1. QEMU's gdbstub in physical-memory mode (``Qqemu.PhyMemMode:1``), about
   30-60 µs per 8-byte read, the VM halted while open;
2. QMP ``human-monitor-command xp /Nxb``, about 0.4 ms per read, the VM
   running unless ``pause=True``.

Pause policy (gdbstub): attaching halts the VM, and it stays halted while
the backend is open; :meth:`close` detaches, which resumes it. Every read is
therefore from one consistent snapshot. If a QMP socket is also given and
the VM was already paused before we attached, it is paused again after
detaching.

QEMU answers physical reads outside RAM with device or unassigned memory
instead of an error, so reads are checked against the RAM layout QEMU
reports (``info mtree``), the same layout the shadow backends use. Only the
protocol's own "cannot read" answer (a gdbstub ``E`` reply) becomes an
:class:`~shadowvol.errors.InvalidAddressError`; anything else (a broken
reply, a closed socket, a bug) propagates as itself.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

from ..errors import BackendError, InvalidAddressError, ShadowvolError
from ..qemu.detach_guard import guarded_attach, guarded_detach
from ..qemu.gdbstub import GdbStub
from ..qemu.monitor import xp
from ..qemu.qmp import Monitor, QMPClient
from ..qemu.ramlayout import qemu_ram_layout
from .base import PhysicalMemory, Segment, merge_ranges

__all__ = ["GdbPhysicalMemory", "QmpPhysicalMemory", "open_libvmi"]


class _CheckedMemory(PhysicalMemory):
    """Range checking against QEMU's RAM layout around a raw ``_raw_read``."""

    def __init__(self, segments: Sequence[Segment], name: str) -> None:
        self.name = name
        self._ranges = merge_ranges((s.start, s.end) for s in segments)

    @abstractmethod
    def _raw_read(self, paddr: int, length: int) -> bytes:
        """Read inside RAM (already range-checked) through the hypervisor interface."""

    def read(self, paddr: int, length: int) -> bytes:
        if length < 0:
            raise ValueError("negative length")
        for start, end in self._ranges:
            if start <= paddr and paddr + length <= end:
                return self._raw_read(paddr, length)
        bad = paddr
        for start, end in self._ranges:
            if start <= paddr < end:
                bad = end
        raise InvalidAddressError(self.name, bad, "not in guest RAM")

    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)


class GdbPhysicalMemory(_CheckedMemory):
    """Guest-physical reads through QEMU's gdbstub in physical-memory mode (VM halted while open)."""

    def __init__(self, gdb_target: str, qmp_path: str | None = None, name: str = "libvmi-gdb") -> None:
        self._qmp_path = qmp_path
        self._was_running = True
        if qmp_path is not None:
            with QMPClient(qmp_path) as qmp:
                self._was_running = qmp.run_state()[0]
        # Attaching halts a running VM until we detach; if we die attached, the guard does it.
        self.stub: GdbStub | None
        self.stub, self._guard = guarded_attach(gdb_target, running=self._was_running)
        try:
            _block, _size, segs = qemu_ram_layout(self.stub.monitor)
            self.stub.set_physical_mode(True)
        except BaseException:
            self.close()
            raise
        self.source = str(gdb_target)
        super().__init__(segs, name)

    def _live_stub(self) -> GdbStub:
        if self.stub is None:
            raise BackendError(f"{self.name}: read after close")
        return self.stub

    def _raw_read(self, paddr: int, length: int) -> bytes:
        return self._live_stub().read_memory(paddr, length, layer=self.name)

    def read_registers(self) -> dict[str, int]:
        """The current CPU's registers (cr3 included) from the attached stub."""
        return self._live_stub().read_registers()

    def metadata(self) -> dict[str, Any]:
        return {"backend": "libvmi-gdbstub", "size": self.size(), "source": self.source, "live": True,
                "paused": True}

    def close(self) -> None:
        """Leave the VM as we found it.

        A ``D`` (detach) makes QEMU resume the VM, so a VM that was paused
        before we attached would run for a moment (and stay running if we
        died before re-pausing it). It is left by closing the connection
        instead: QEMU keeps it paused and accepts the next debugger.
        """
        if self.stub is None:
            return
        stub, self.stub = self.stub, None
        if self._was_running:
            guard, self._guard = self._guard, None
            guarded_detach(stub, guard)  # QEMU resumes the VM
            return
        try:
            stub.set_physical_mode(False)
        except ShadowvolError:
            pass
        stub.close(detach=False)


class QmpPhysicalMemory(_CheckedMemory):
    """Guest-physical reads through HMP ``xp`` over QMP (VM keeps running unless ``pause``)."""

    def __init__(self, qmp_path: str | Monitor, pause: bool = False, name: str = "libvmi-qmp") -> None:
        """``qmp_path``: a QMP socket, or an open monitor (QMP through libvirt), closed with us."""
        self.qmp: Monitor = QMPClient(qmp_path) if isinstance(qmp_path, str) else qmp_path
        self.source = self.qmp.path
        self._resume = False
        try:
            _block, _size, segs = qemu_ram_layout(self.qmp)
            if pause and self.qmp.run_state()[0]:
                self.qmp.set_running(False)
                self._resume = True
        except BaseException:
            self.qmp.close()
            raise
        self.paused = pause
        super().__init__(segs, name)

    def _raw_read(self, paddr: int, length: int) -> bytes:
        return xp(self.qmp, paddr, length)

    def metadata(self) -> dict[str, Any]:
        return {"backend": "libvmi-qmp", "size": self.size(), "source": self.source, "live": True,
                "paused": self.paused}

    def close(self) -> None:
        if self._resume:
            try:
                self.qmp.set_running(True)
            except ShadowvolError:
                pass
            self._resume = False
        self.qmp.close()


def open_libvmi(gdb_path: str | None, qmp_path: str | None, *, pause: bool = False) -> PhysicalMemory:
    """Open the slow fallback: the gdbstub if given, else QMP ``xp``."""
    if gdb_path is not None:
        return GdbPhysicalMemory(gdb_path, qmp_path)
    if qmp_path is not None:
        return QmpPhysicalMemory(qmp_path, pause=pause)
    raise BackendError("open_libvmi needs a gdbstub socket or a QMP socket")
