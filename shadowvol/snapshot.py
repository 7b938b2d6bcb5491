"""Snapshots of a live VM: a LiME image, its profile and a manifest, in one folder.

``shadowvol snapshot -vm NAME -o DIR`` pauses the VM only while its RAM is
copied (a paused VM stays paused), and writes::

    DIR/memory.lime                      LiME, one header per RAM range (stock ``vol -f`` opens it)
    DIR/symbols/linux/<profile>.json.xz  the profile (``vol -s DIR/symbols``)
    DIR/manifest.json                    kernel, vCPU registers, vmcoreinfo, pause_ms, taken_at, sha256

``shadowvol -f DIR PLUGIN`` opens the bundle by its folder (:mod:`shadowvol.bundle`).
DIR must not exist; it is created 0700 and its files 0600. A failed snapshot
removes what it wrote and never leaves a running VM paused.
"""

from __future__ import annotations

import datetime
import mmap
import json
import os
import re
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .backends.base import PhysicalMemory
from .backends.dump import LIME_MAGIC
from .bundle import MANIFEST, MEMORY_NAME, SYMBOLS_NAME, sha256_file, verify_bundle
from .errors import ShadowvolError
from .safeio import atomic_copy, atomic_file, atomic_write, fsync_dir

__all__ = [
    "RamCopy",
    "write_lime",
    "parse_registers",
    "take_snapshot",
]

_LIME_HDR = struct.Struct("<IIQQ8s")
_COPY_CHUNK = 64 << 20
Progress = Callable[[str], None]


# -- LiME -------------------------------------------------------------------


_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux 5.14+; without them pages fault in on first touch


def _populate(mm: mmap.mmap, advice: int) -> None:
    try:
        mm.madvise(advice)
    except (OSError, ValueError, AttributeError):
        pass  # an older kernel: the copy faults pages in itself


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class RamCopy:
    """Guest RAM copied into a private buffer of ours, so the VM is paused only for a memcpy.

    Build it before pausing: the destination is allocated and faulted in, and a
    mapped source (the shadow RAM file) is populated, so :meth:`copy` is one
    memory-bandwidth-bound copy. The LiME file is then written from
    :attr:`segments` after the VM runs again.
    """

    def __init__(self, memory: PhysicalMemory) -> None:
        self.memory = memory
        ranges = [(a, b) for a, b in memory.ranges() if b > a]
        total = sum(b - a for a, b in ranges)
        free = _mem_available()
        if free is not None and total > free * 0.9:
            raise ShadowvolError(f"a snapshot copies guest RAM into memory first: it needs {total >> 20} MiB "
                                 f"free, the host has {free >> 20} MiB available")
        self._buffer = mmap.mmap(-1, max(total, 1))
        _populate(self._buffer, _MADV_POPULATE_WRITE)
        view = memoryview(self._buffer)
        self.segments: list[tuple[int, int, memoryview]] = []
        pos = 0
        for a, b in ranges:
            self.segments.append((a, b, view[pos:pos + (b - a)]))
            pos += b - a
        src = getattr(memory, "_buf", None)
        if isinstance(src, mmap.mmap):
            _populate(src, _MADV_POPULATE_READ)

    def copy(self) -> int:
        """Copy every RAM range into the buffer now; returns bytes copied."""
        src, segs = getattr(self.memory, "_buf", None), getattr(self.memory, "_segments", None)
        if isinstance(src, mmap.mmap) and segs is not None:  # straight from the mapping: one memcpy
            view = memoryview(src)
            try:
                for seg in segs:
                    for start, end, dst in self.segments:
                        if start <= seg.start and seg.end <= end:
                            dst[seg.start - start:seg.end - start] = view[seg.offset:seg.offset + seg.length]
                            break
            finally:
                view.release()
            return sum(end - start for start, end, _ in self.segments)
        for start, end, dst in self.segments:
            for pa in range(start, end, _COPY_CHUNK):
                n = min(_COPY_CHUNK, end - pa)
                dst[pa - start:pa - start + n] = self.memory.read_partial(pa, n).data
        return sum(end - start for start, end, _ in self.segments)

    def close(self) -> None:
        for _, _, view in self.segments:
            view.release()
        self.segments = []
        self._buffer.close()


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view[:_COPY_CHUNK])
        view = view[n:]


def write_lime(segments: Iterable[tuple[int, int, Any]], fd: int) -> int:
    """Write ``(start, end, bytes)`` RAM ranges to ``fd`` as LiME (one 32-byte
    header per range, inclusive end address); returns RAM bytes written."""
    copied = 0
    for start, end, data in segments:
        if len(data) != end - start:
            raise ValueError(f"range {start:#x}-{end:#x} has {len(data)} bytes")
        _write_all(fd, _LIME_HDR.pack(LIME_MAGIC, 1, start, end - 1, b"\0" * 8))
        _write_all(fd, data)
        copied += end - start
    return copied


# -- vCPU registers -----------------------------------------------------------

_REG = re.compile(r"\b([A-Z][A-Z0-9]*)\s*=\s*([0-9a-fA-F]+)\b")
_KEEP = re.compile(r"(R[A-Z0-9]+|RIP|RFL|CR[0-4]|DR[0-7]|EFER|CPL|HLT)$")
_SEGMENT = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR)\s*=([0-9a-fA-F]+) ([0-9a-fA-F]+) ([0-9a-fA-F]+) ([0-9a-fA-F]+)",
                      re.M)
_TABLE = re.compile(r"^(GDT|IDT)=\s*([0-9a-fA-F]+) ([0-9a-fA-F]+)", re.M)


def parse_registers(text: str) -> list[dict[str, int]]:
    """Registers of each vCPU from HMP ``info registers -a`` (GPRs, RIP, RFLAGS,
    control/debug registers, EFER, segment selectors and bases, GDT/IDT)."""
    cpus: list[dict[str, int]] = []
    for block in re.split(r"^CPU#\d+\s*$", text, flags=re.M)[1:]:
        regs: dict[str, int] = {}
        for line in block.splitlines():
            if line.startswith(("FPR", "YMM", "XMM", "FCW")):
                continue
            for name, value in _REG.findall(line):
                if _KEEP.fullmatch(name) and name.lower() not in regs:
                    regs[name.lower()] = int(value, 16)
        for name, sel, base, limit, _flags in _SEGMENT.findall(block):
            regs[name.lower()] = int(sel, 16)
            regs[f"{name.lower()}_base"] = int(base, 16)
            regs[f"{name.lower()}_limit"] = int(limit, 16)
        for name, base, limit in _TABLE.findall(block):
            regs[f"{name.lower()}_base"] = int(base, 16)
            regs[f"{name.lower()}_limit"] = int(limit, 16)
        cpus.append(regs)
    return cpus


# -- taking a snapshot ----------------------------------------------------------


def _copy_paused(vm: str, connect: str | None, ram_copy: RamCopy) -> tuple[bool, float, float, str]:
    """Pause ``vm`` (through libvirt for a libvirt domain, so its state stays libvirt's), copy
    its RAM and read every vCPU's registers, resume it if it ran. Returns (was it running,
    pause ms, copy ms, ``info registers -a``). The pause is timed from the stop request to the
    resume's answer, monitor connections included: an upper bound of the guest's pause."""
    from .target import vm_monitor, vm_paused

    t0 = time.perf_counter()
    with vm_paused(vm, connect) as was_running:
        ram_copy.copy()
        with vm_monitor(vm, connect) as mon:  # one QMP client at a time: opened once the stop's is closed
            regs_text = mon.hmp("info registers -a")
        copy_ms = (time.perf_counter() - t0) * 1000.0
    pause_ms = (time.perf_counter() - t0) * 1000.0 if was_running else 0.0
    return was_running, pause_ms, copy_ms, regs_text


def take_snapshot(vm: str, out: str | os.PathLike[str], progress: Progress | None = None,
                  connect: str | None = None) -> dict[str, Any]:
    """Snapshot the VM ``vm`` (a registry name, ``qmp:PATH``, ``pid:N`` with a QMP socket, or a
    libvirt domain at ``connect``) into the new folder ``out``; returns the manifest."""
    from .target import open_target

    say = progress or (lambda msg: None)
    out = Path(out)
    if os.path.lexists(out):
        raise ShadowvolError(f"{out} exists: a snapshot never overwrites (give a new folder)")
    target = open_target(vm=vm, progress=say, connect=connect)
    try:
        vmcoreinfo = target.vmcoreinfo()  # before the pause: it is fixed for the boot
        try:
            os.mkdir(out, 0o700)  # the name, reserved (empty) until the whole snapshot replaces it
        except FileExistsError:
            raise ShadowvolError(f"{out} exists: a snapshot never overwrites (give a new folder)") from None
        except OSError as exc:
            raise ShadowvolError(f"cannot create {out}: {exc.strerror}") from None
        # Written whole in a scratch folder beside it, then renamed over the
        # empty reservation: a crash or a full disk never leaves a folder
        # that looks like a snapshot but is half of one.
        stage = None
        try:
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.", suffix=".tmp", dir=out.parent))
            os.chmod(stage, 0o700)  # whatever the umask
            (stage / SYMBOLS_NAME).mkdir(0o700)
            (stage / SYMBOLS_NAME / "linux").mkdir(0o700)
            ram_copy = RamCopy(target.memory)  # allocated and faulted in before the pause
            try:
                was_running, pause_ms, copy_ms, regs_text = _copy_paused(vm, connect, ram_copy)
                t1 = time.perf_counter()
                with atomic_file(stage / MEMORY_NAME, 0o600, replace=False) as fh:
                    ram = write_lime(ram_copy.segments, fh.fileno())
                write_ms = (time.perf_counter() - t1) * 1000.0
            finally:
                ram_copy.close()
            taken_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
            profile_name = target.profile_path.name
            if not profile_name.endswith((".json.xz", ".json")):
                profile_name += ".json"
            atomic_copy(target.profile_path, stage / SYMBOLS_NAME / "linux" / profile_name, mode=0o600,
                        replace=False)
            from .profiles import profile_banner

            banner = profile_banner(target.isf).rstrip(b"\0").decode(errors="replace")
            release = (vmcoreinfo or {}).get("OSRELEASE") or _release_from_banner(banner)
            files = [MEMORY_NAME, f"{SYMBOLS_NAME}/linux/{profile_name}"]
            manifest = {
                "format": "shadowvol-snapshot/1",
                "memory": MEMORY_NAME,
                "memory_format": "lime",
                "symbols": SYMBOLS_NAME,
                "profile": f"{SYMBOLS_NAME}/linux/{profile_name}",
                "kernel": {"release": release, "banner": banner},
                "location": target.location.to_json(),
                "ram_bytes": ram,
                "ranges": [[a, b] for a, b in target.memory.ranges()],
                "vcpus": parse_registers(regs_text),
                "vmcoreinfo": vmcoreinfo,
                "was_running": was_running,
                "pause_ms": round(pause_ms, 1),
                "copy_ms": round(copy_ms, 1),
                "write_ms": round(write_ms, 1),
                "taken_at": taken_at,
                "source": target.description,
                "sha256": {name: sha256_file(stage / name) for name in files},
            }
            atomic_write(stage / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), replace=False)
            for d in (stage / SYMBOLS_NAME / "linux", stage / SYMBOLS_NAME, stage):
                fsync_dir(d)
            os.rename(stage, out)  # over the empty reservation: all of it appears at once
            fsync_dir(out.parent)
            return manifest
        except BaseException:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            try:
                os.rmdir(out)  # our empty reservation (never a folder with anything in it)
            except OSError:
                pass
            raise
    finally:
        target.close()


def _release_from_banner(banner: str) -> str | None:
    m = re.match(r"Linux version (\S+)", banner)
    return m.group(1) if m else None


# -- CLI ------------------------------------------------------------------------


def cmd_snapshot(args: Any) -> int:
    import sys

    if args.verify:
        bad = verify_bundle(args.verify)
        for name in bad:
            print(f"{name}: sha256 differs from the manifest", file=sys.stderr)
        if not bad:
            print(f"{args.verify}: every file verifies")
        return 1 if bad else 0
    if not args.vm or not args.output:
        raise ShadowvolError("snapshot: give -vm NAME -o DIR (or --verify DIR)")
    m = take_snapshot(args.vm, args.output, progress=lambda msg: print(f"shadowvol: {msg}", file=sys.stderr),
                      connect=args.connect)
    if args.renderer == "json":
        print(json.dumps({k: m[k] for k in ("memory", "symbols", "kernel", "ram_bytes", "pause_ms",
                                            "copy_ms", "was_running", "taken_at", "sha256")}))
    else:
        state = f"paused {m['pause_ms']:.0f} ms" if m["was_running"] else "was paused, stays paused"
        print(f"{args.output}: {m['ram_bytes'] >> 20} MiB of RAM ({state}), kernel {m['kernel']['release']}")
        print(f"  vol -f {args.output}/{m['memory']} -s {args.output}/{m['symbols']} linux.pslist")
        print(f"  shadowvol -f {args.output} linux.pslist")
    return 0


def add_parser(sub: Any) -> None:
    """``shadowvol snapshot``."""
    from .target import add_source_options

    sp = sub.add_parser("snapshot", help="preserve a live VM's memory, profile and registers in a folder")
    add_source_options(sp, dump=False, backend=False, profile=False, required=False)  # or --verify DIR
    sp.add_argument("-o", dest="output", help="new folder for the snapshot (must not exist)")
    sp.add_argument("--verify", metavar="DIR", help="check a snapshot's files against its manifest")
    sp.add_argument("-r", dest="renderer", default="pretty", choices=["pretty", "json"])
    sp.set_defaults(func=cmd_snapshot)
