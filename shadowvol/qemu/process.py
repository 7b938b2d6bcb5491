"""A QEMU process seen from the host: its command line and where its guest RAM is mapped.

Used to read guest RAM through ``/proc/PID/mem`` (:class:`shadowvol.backends.shadow.ShadowProcess`)
and to find the QMP socket of a QEMU someone else started (``-vm pid:N``).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from ..backends.base import Segment
from ..errors import BackendError
from .monitor import gpa2hva
from .qmp import Monitor
from .ramlayout import q35_layout, qemu_ram_layout

__all__ = ["cmdline", "qmp_path_from_argv", "ram_size_from_argv", "qmp_socket_of", "maps", "check_maps",
           "ram_by_monitor", "ram_by_maps"]


def cmdline(pid: int) -> list[str]:
    """The argv of process ``pid``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError as exc:
        raise BackendError(f"no process {pid}: {exc.strerror}") from None
    return [a.decode(errors="replace") for a in argv if a]


def qmp_path_from_argv(args: Sequence[str]) -> str | None:
    """The unix socket of the QMP monitor in a QEMU command line (``-qmp unix:P`` or ``-chardev`` + ``-mon``)."""
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


def ram_size_from_argv(args: Sequence[str]) -> int:
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


def qmp_socket_of(pid: int) -> str | None:
    """The QMP socket named on QEMU ``pid``'s command line, if it exists."""
    path = qmp_path_from_argv(cmdline(pid))
    return path if path is not None and os.path.exists(path) else None


def maps(pid: int) -> list[tuple[int, int, str, str]]:
    """``/proc/PID/maps`` as (start, end, permissions, path) rows."""
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


def check_maps(pid: int, segs: Sequence[Segment]) -> None:
    """Each segment's host range (``Segment.offset`` is the host address) is one readable mapping of ``pid``."""
    rows = maps(pid)
    for seg in segs:
        hva_end = seg.offset + seg.length
        if not any(lo <= seg.offset and hva_end <= hi and perms.startswith("r") for lo, hi, perms, _ in rows):
            raise BackendError(f"guest RAM at host {seg.offset:#x}-{hva_end:#x} is not one readable mapping "
                               f"of process {pid}")


def ram_by_monitor(qmp: Monitor) -> tuple[int, list[Segment]]:
    """(QEMU pid, guest-physical segments whose ``offset`` is the host address), from QEMU's own
    RAM layout and ``gpa2hva``, checked against ``/proc/PID/maps``."""
    pid = qmp.peer_pid()
    if pid is None:
        raise BackendError(f"cannot learn the QEMU pid behind {qmp.path}")
    _block, _size, segs = qemu_ram_layout(qmp)
    hva_segs = []
    for seg in segs:
        hva = gpa2hva(qmp, seg.start)
        last = gpa2hva(qmp, seg.end - 1)
        if last - hva != seg.length - 1:
            raise BackendError(f"RAM segment {seg.start:#x}-{seg.end:#x} is not contiguous in QEMU")
        hva_segs.append(Segment(seg.start, seg.end, hva))
    check_maps(pid, hva_segs)
    return pid, hva_segs


def ram_by_maps(pid: int) -> list[Segment]:
    """Guest-physical segments (host addresses in ``offset``) of QEMU ``pid`` without a monitor: the
    unique writable mapping whose size is the ``-m`` RAM size, laid out by the q35 rule."""
    ram_size = ram_size_from_argv(cmdline(pid))
    candidates = [start for start, end, perms, path in maps(pid)
                  if end - start == ram_size and perms.startswith("rw")
                  and (not path or path.startswith("/dev/shm") or "memfd:" in path)]
    if len(candidates) != 1:
        raise BackendError(f"found {len(candidates)} mappings of {ram_size:#x} bytes in process {pid}; "
                           "cannot tell which is guest RAM (give a QMP socket)")
    return [Segment(s.start, s.end, candidates[0] + s.offset) for s in q35_layout(ram_size)]
