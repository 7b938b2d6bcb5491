"""Memory dumps as physical memory: raw, LiME and QEMU ELF cores.

- raw: the file is guest-physical memory from address 0 (``pmemsave``), or
  any layout passed as segments;
- LiME: a sequence of 32-byte headers (magic 0x4C694D45, version 1,
  ``s_addr``, inclusive ``e_addr``), each followed by its range's bytes;
- ELF core from QEMU ``dump-guest-memory`` (no ``-z/-l/-s``): PT_LOAD
  segments at ``p_paddr``; the PT_NOTE holds per-CPU ``QEMU`` notes (with
  cr0..cr4) and, with ``-device vmcoreinfo``, the guest's VMCOREINFO.

A corrupt file raises :class:`BackendError` with a one-line message; a
memory range cut short by the end of the file raises its subclass
:class:`TruncatedError` (exit 3) unless opened ``partial``. Only the first ``p_filesz`` bytes of a PT_LOAD are memory here.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import BackendError, TruncatedError
from .base import DROP_EVERY, BufferMemory, Segment, map_file_readonly

__all__ = [
    "LIME_MAGIC",
    "ElfNote",
    "DumpMemory",
    "parse_lime",
    "parse_elf",
    "parse_qemu_cpu_state",
    "parse_vmcoreinfo",
    "open_dump",
    "dump_info",
]

LIME_MAGIC = 0x4C694D45
_LIME_HDR = struct.Struct("<IIQQ8s")
_ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF64_PHDR = struct.Struct("<IIQQQQQQ")
_NOTE_HDR = struct.Struct("<III")
PT_LOAD, PT_NOTE = 1, 4
EM_X86_64 = 62

_CPU_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_CPU_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")


@dataclass(frozen=True)
class ElfNote:
    """One ELF note: owner name, type and descriptor bytes."""

    name: str
    type: int
    desc: bytes


def parse_lime(buf: bytes | mmap.mmap, path: str = "dump", partial: bool = False,
               truncated: list[str] | None = None) -> list[Segment]:
    """Segments of a LiME file; BackendError if a header is bad or points past
    EOF. With ``partial``, a last range cut short by EOF is kept as far as it
    goes and described in ``truncated`` instead."""
    size = len(buf)
    segs: list[Segment] = []
    pos = 0
    while pos < size:
        if pos + _LIME_HDR.size > size:
            raise BackendError(f"{path}: truncated LiME header at offset {pos:#x}")
        magic, version, s_addr, e_addr, _ = _LIME_HDR.unpack_from(buf, pos)
        if magic != LIME_MAGIC:
            raise BackendError(f"{path}: bad LiME magic {magic:#x} at offset {pos:#x}")
        if version != 1:
            raise BackendError(f"{path}: unsupported LiME version {version} at offset {pos:#x}")
        if e_addr < s_addr:
            raise BackendError(f"{path}: LiME range {s_addr:#x}-{e_addr:#x} at offset {pos:#x} ends before it starts")
        length = e_addr - s_addr + 1
        data = pos + _LIME_HDR.size
        if data + length > size:
            msg = (f"{path}: LiME range {s_addr:#x}-{e_addr:#x} at offset {pos:#x} runs past "
                   f"end of file ({size:#x} bytes): truncated dump")
            if not partial:
                raise TruncatedError(msg + " (--partial reads what is there)")
            if truncated is not None:
                truncated.append(msg)
            if data < size:
                segs.append(Segment(s_addr, s_addr + (size - data), data))
            break
        segs.append(Segment(s_addr, e_addr + 1, data))
        pos = data + length
    _check_overlap(segs, path)
    return segs


def parse_elf(buf: bytes | mmap.mmap, path: str = "dump", partial: bool = False,
              truncated: list[str] | None = None) -> tuple[list[Segment], list[ElfNote]]:
    """PT_LOAD segments (by p_paddr) and notes of a 64-bit little-endian ELF
    core. With ``partial``, PT_LOADs cut short by EOF are kept as far as they
    go and described in ``truncated``."""
    size = len(buf)
    if size < _ELF64_EHDR.size:
        raise BackendError(f"{path}: truncated ELF header")
    ident, e_type, machine, _v, _entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, _she, _shn, _shs = \
        _ELF64_EHDR.unpack_from(buf, 0)
    if ident[4] != 2:
        raise BackendError(f"{path}: 32-bit ELF cores are not supported (need an x86-64 dump)")
    if ident[5] != 1:
        raise BackendError(f"{path}: big-endian ELF is not supported")
    if e_type != 4:
        raise BackendError(f"{path}: ELF type {e_type} is not a core file")
    if machine != EM_X86_64:
        raise BackendError(f"{path}: ELF machine {machine} is not x86-64")
    if phnum == 0xFFFF or phentsize < _ELF64_PHDR.size:
        raise BackendError(f"{path}: unsupported ELF program header layout (phnum={phnum}, phentsize={phentsize})")
    if phoff + phnum * phentsize > size:
        raise BackendError(f"{path}: ELF program headers run past end of file: truncated dump")
    segs: list[Segment] = []
    notes: list[ElfNote] = []
    for i in range(phnum):
        p_type, _pf, offset, _vaddr, paddr, filesz, _memsz, _align = _ELF64_PHDR.unpack_from(buf, phoff + i * phentsize)
        if offset + filesz > size:
            kind = "PT_LOAD" if p_type == PT_LOAD else f"segment {i}"
            msg = (f"{path}: ELF {kind} at {paddr:#x} ({filesz:#x} bytes at offset {offset:#x}) "
                   f"runs past end of file ({size:#x} bytes): truncated dump")
            if p_type != PT_LOAD:
                raise BackendError(msg)
            if not partial:
                raise TruncatedError(msg + " (--partial reads what is there)")
            if truncated is not None and len(truncated) < 8:
                truncated.append(msg)
            filesz = max(0, size - offset)
        if p_type == PT_LOAD and filesz:
            segs.append(Segment(paddr, paddr + filesz, offset))
        elif p_type == PT_NOTE:
            notes += _parse_notes(bytes(buf[offset:offset + filesz]), path)
    if not segs:
        raise BackendError(f"{path}: ELF core has no PT_LOAD segments")
    _check_overlap(segs, path)
    return segs, notes


def _parse_notes(data: bytes, path: str) -> list[ElfNote]:
    notes = []
    pos = 0
    while pos + _NOTE_HDR.size <= len(data):
        namesz, descsz, ntype = _NOTE_HDR.unpack_from(data, pos)
        pos += _NOTE_HDR.size
        name_end = pos + namesz
        desc = pos + ((namesz + 3) & ~3)
        desc_end = desc + descsz
        if desc_end > len(data):
            raise BackendError(f"{path}: ELF note runs past its PT_NOTE segment: corrupt dump")
        notes.append(ElfNote(data[pos:name_end].rstrip(b"\0").decode(errors="replace"), ntype, data[desc:desc_end]))
        pos = desc + ((descsz + 3) & ~3)
    return notes


def parse_vmcoreinfo(text: str | bytes) -> dict[str, str]:
    """``KEY=VALUE`` lines of a VMCOREINFO note, e.g. ``SYMBOL(init_uts_ns)``, ``OSRELEASE``."""
    if isinstance(text, bytes):
        text = text.rstrip(b"\0").decode(errors="replace")
    out = {}
    for line in text.splitlines():
        if "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


def parse_qemu_cpu_state(desc: bytes) -> dict[str, int]:
    """Registers from a ``QEMU`` note (struct QEMUCPUState): GPRs, rip, rflags, segment bases, cr0..cr4."""
    if len(desc) < 8:
        raise BackendError("QEMU CPU note too short")
    version, size = struct.unpack_from("<II", desc, 0)
    need = 8 + len(_CPU_GPRS) * 8 + len(_CPU_SEGS) * 24 + 5 * 8
    if len(desc) < need:
        raise BackendError(f"QEMU CPU note of {len(desc)} bytes is shorter than {need}")
    regs: dict[str, int] = {"version": version}
    pos = 8
    for name in _CPU_GPRS:
        regs[name] = struct.unpack_from("<Q", desc, pos)[0]
        pos += 8
    for name in _CPU_SEGS:
        selector, limit, _flags, _pad, base = struct.unpack_from("<IIIIQ", desc, pos)
        regs[name] = selector
        regs[f"{name}_base"] = base
        regs[f"{name}_limit"] = limit
        pos += 24
    for i in range(5):
        regs[f"cr{i}"] = struct.unpack_from("<Q", desc, pos)[0]
        pos += 8
    # kernel_gs_base was appended later without a version bump: trust ``size``.
    if size >= pos + 8 and len(desc) >= pos + 8:
        regs["kernel_gs_base"] = struct.unpack_from("<Q", desc, pos)[0]
    return regs


def _check_overlap(segs: list[Segment], path: str) -> None:
    ordered = sorted(segs, key=lambda s: s.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.end:
            raise BackendError(f"{path}: memory ranges {a.start:#x}-{a.end:#x} and {b.start:#x}-{b.end:#x} overlap")


class DumpMemory(BufferMemory):
    """A dump file mmapped read-only; ``format`` is ``raw``, ``lime`` or ``elf``."""

    def __init__(self, buffer: mmap.mmap, segments: list[Segment], fmt: str, path: str,
                 notes: list[ElfNote] | None = None) -> None:
        super().__init__(buffer, segments, name="dump",
                         drop_every=DROP_EVERY if isinstance(buffer, mmap.mmap) else 0,
                         meta={"backend": f"dump-{fmt}", "source": path, "live": False, "format": fmt})
        self.format = fmt
        self.path = path
        self._notes = list(notes or [])
        #: What is missing from a dump opened with ``partial`` (one line each).
        self.truncated: list[str] = []

    def notes(self) -> list[ElfNote]:
        """ELF notes (empty for raw and LiME)."""
        return list(self._notes)

    def vmcoreinfo(self) -> dict[str, str] | None:
        """The guest's VMCOREINFO as a dict, if the dump carries it."""
        for note in self._notes:
            if note.name == "VMCOREINFO":
                return parse_vmcoreinfo(note.desc)
        return None

    def cpu_states(self) -> list[dict[str, int]]:
        """Per-CPU registers from QEMU's ``QEMU`` notes (cr3 included)."""
        return [parse_qemu_cpu_state(n.desc) for n in self._notes if n.name == "QEMU"]


def open_dump(path: str | os.PathLike[str], segments: list[Segment] | None = None,
              partial: bool = False) -> DumpMemory:
    """Open a dump, detecting ELF core, LiME or raw; ``segments`` overrides the
    raw layout. A LiME/ELF dump shorter than its headers say raises
    BackendError, or with ``partial`` opens what is there and lists the
    shortfall in ``DumpMemory.truncated``."""
    path = str(path)
    mm = map_file_readonly(path, "dump", mmap.MAP_PRIVATE)
    truncated: list[str] = []
    try:
        head = mm[:16]
        notes: list[ElfNote] = []
        if head[:4] == b"\x7fELF":
            fmt = "elf"
            segs, notes = parse_elf(mm, path, partial, truncated)
        elif len(head) >= 4 and struct.unpack_from("<I", head)[0] == LIME_MAGIC:
            fmt = "lime"
            segs = parse_lime(mm, path, partial, truncated)
        elif head[:8] in (b"KDUMP   ", b"DISKDUMP"):
            raise BackendError(f"{path}: kdump-compressed dumps are not supported "
                               "(use dump-guest-memory without -z/-l/-s)")
        else:
            fmt = "raw"
            segs = segments if segments is not None else [Segment(0, len(mm), 0)]
        if segments is not None and fmt != "raw":
            raise BackendError(f"{path}: segments can only be given for raw dumps, this is {fmt}")
        try:
            dump = DumpMemory(mm, segs, fmt, path, notes)
            dump.truncated = truncated
            return dump
        except ValueError as exc:
            raise BackendError(f"{path}: {exc}") from None
    except BaseException:
        mm.close()
        raise


def dump_info(mem: DumpMemory) -> dict[str, Any]:
    """A summary for ``shadowvol info``: format, ranges, CPUs, vmcoreinfo keys."""
    info = mem.metadata()
    info["ranges"] = mem.ranges()
    info["cpus"] = len(mem.cpu_states())
    vmci = mem.vmcoreinfo()
    info["osrelease"] = vmci.get("OSRELEASE") if vmci else None
    return info
