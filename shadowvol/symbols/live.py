"""A profile built from a running guest's own memory, when none is stored.

The kernel image is physically contiguous, and it carries what a profile
needs: the ``.BTF`` section (types), the kallsyms tables (symbols) and
``linux_banner``. We find each by its signature in guest-physical memory:

- BTF: its header (magic 0xeB9F, version 1, 24-byte header), largest
  candidate first (module BTF is small and vmalloc'ed). Each candidate must
  pass every check (header, kallsyms' ``__stop_BTF - __start_BTF``, the
  banner at ``linux_banner``, the type graph); on any failure the next one
  is tried (free RAM and loader copies hold stale or partial blobs).
- kallsyms: the token table's run of single-digit tokens ("0\\0" .. "9\\0"),
  then the tables around it (:func:`shadowvol.symbols.kallsyms.find_kallsyms`).
  Its addresses are runtime addresses: ``kallsyms_relative_base`` is
  relocated at boot.
- The banner: read at ``linux_banner``, placed physically relative to
  ``__start_BTF`` (free RAM may hold stale banner copies from boot).

Runtime addresses become link-time ones by subtracting the KASLR shift:
VMCOREINFO's ``KERNELOFFSET`` when known, else ``_text`` minus the x86-64
default link address of ``_text`` (``__START_KERNEL_map`` + 16 MiB). Either
way the profile is self-consistent: KASLR is re-derived at every run and
checked against the banner. Without the kernel headers only BTF per-CPU
variables and the curated statics are typed (see :mod:`.globals`).
"""

from __future__ import annotations

import re
import struct
from typing import Any, Mapping

from shadowvol.errors import ProfileError
from shadowvol.symbols import ProfileReport, assemble_profile
from shadowvol.symbols.btf import btf_size, find_btf, parse_btf
from shadowvol.symbols.kallsyms import Symbol, find_kallsyms

__all__ = ["profile_from_memory", "DEFAULT_TEXT_LINK_ADDRESS", "GUEST_BTF_NAME"]

#: ``metadata.linux.types[0].name`` of a profile built from guest memory.
GUEST_BTF_NAME = "btf:guest-memory"

#: ``_text`` at link time on x86-64 with the default CONFIG_PHYSICAL_START.
DEFAULT_TEXT_LINK_ADDRESS = 0xFFFF_FFFF_8100_0000
_TOKEN_DIGITS = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00"
_BTF_HEADER = b"\x9f\xeb\x01\x00\x18\x00\x00\x00"
_BANNER = re.compile(rb"Linux version \d+\.\d+[^\n\x00]{10,400}\n\x00")


def profile_from_memory(memory: Any, vmcoreinfo: Mapping[str, str] | None = None,
                        report: ProfileReport | None = None) -> dict[str, Any]:
    """The ISF dict for the kernel running in ``memory`` (a PhysicalMemory)."""
    rep = report if report is not None else ProfileReport()
    ranges = memory.ranges()

    def read(paddr: int, length: int) -> bytes:
        return memory.read_partial(paddr, length).data

    # Every candidate is validated (header, kallsyms, the banner where
    # kallsyms puts it relative to __start_BTF, the type graph), largest BTF
    # first, and the next one is tried on failure: free RAM and loader copies
    # hold stale or partial blobs with a valid-looking header.
    candidates = _btf_candidates(memory, read)
    if not candidates:
        raise ProfileError("no BTF in guest memory (kernel without CONFIG_DEBUG_INFO_BTF?)")
    kallsyms = _KallsymsCandidates(memory, read, ranges)
    failures: list[str] = []
    found = None
    for pa, size in candidates:
        reason = None
        for symbols, layout in kallsyms:
            try:
                found = _check_candidate(read, pa, size, symbols, vmcoreinfo)
                rep.symbol_source = f"kallsyms (guest memory, {layout} layout)"
                break
            except ProfileError as exc:
                reason = str(exc)
        if found is not None:
            break
        if not kallsyms.seen:
            raise ProfileError("no kallsyms tables in guest memory (kernel without CONFIG_KALLSYMS_ALL?)")
        failures.append(f"{pa:#x}: {reason}")
    if found is None:
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        raise ProfileError(f"none of the {len(candidates)} BTF candidates in guest memory is the kernel's: "
                           + "; ".join(failures[:3]) + more)
    best, graph, symbols, banner = found
    rep.type_source = "btf (guest memory)"
    text = next((s.address for s in symbols if s.name == "_text"), None)
    if text is None:
        raise ProfileError("guest kallsyms has no _text")
    if vmcoreinfo and "KERNELOFFSET" in vmcoreinfo:
        shift = int(vmcoreinfo["KERNELOFFSET"], 16)
    else:
        shift = text - DEFAULT_TEXT_LINK_ADDRESS
    high = 0xFFFF_8000_0000_0000
    linked = [Symbol(s.name, s.address - shift if s.address >= high else s.address, s.type)
              for s in symbols]
    rep.symbols = len(linked)
    rep.notes.append(f"addresses made link-time with shift {shift:#x} "
                     f"({'VMCOREINFO' if vmcoreinfo and 'KERNELOFFSET' in vmcoreinfo else 'default _text'})")

    import hashlib

    # The BTF hash lets a later run re-verify the profile against its guest
    # (shadowvol.target): a profile from guest memory is never trusted by banner alone.
    meta = {"symbols": [{"kind": "symtab", "name": "kallsyms:guest-memory"}],
            "types": [{"kind": "dwarf", "name": GUEST_BTF_NAME, "hash_type": "sha256",
                       "hash_value": hashlib.sha256(best[1]).hexdigest()}]}
    return assemble_profile(graph, linked, banner, report=rep, linux_metadata=meta)


def _btf_candidates(memory: Any, read: Any) -> list[tuple[int, int]]:
    """(physical address, size) of every BTF header laid out as vmlinux's
    is (types right after the 24-byte header, strings right after the
    types, both non-empty), largest first."""
    out = []
    for pa in memory.find(_BTF_HEADER):
        # struct btf_header: magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
        _, _, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack("<HBBIIIII", read(pa, 24))
        size = hdr_len + str_off + str_len
        if type_off != 0 or str_off != type_len or not type_len or not str_len or type_len % 4 \
                or size > (64 << 20):
            continue
        out.append((pa, size))
    out.sort(key=lambda c: (-c[1], c[0]))
    return out


class _KallsymsCandidates:
    """The kallsyms tables in guest memory, found lazily and kept: each
    token-table signature, decoded with the tables around it; only those
    naming _text, __start_BTF and linux_banner."""

    def __init__(self, memory: Any, read: Any, ranges: list[tuple[int, int]]) -> None:
        self._hits = iter(memory.find(_TOKEN_DIGITS))
        self._read, self._low = read, ranges[0][0]
        self.seen: list[tuple[list[Symbol], str]] = []

    def __iter__(self):
        yield from list(self.seen)
        for pa in self._hits:
            lo = max(self._low, pa - (24 << 20))
            try:
                tables, symbols = find_kallsyms(self._read(lo, pa - lo + (1 << 20)), 0)
            except ProfileError:
                continue
            names = {s.name for s in symbols}
            if not {"_text", "__start_BTF", "linux_banner"} <= names:
                continue
            self.seen.append((symbols, tables.layout))
            yield self.seen[-1]


def _check_candidate(read: Any, pa: int, size: int, symbols: list[Symbol],
                     vmcoreinfo: Mapping[str, str] | None) -> tuple[tuple[int, bytes], Any, list[Symbol], bytes]:
    """The BTF blob at ``pa`` is the running kernel's: its header is sane,
    kallsyms sizes ``.BTF`` as it (when it has ``__stop_BTF``), the banner is
    at ``linux_banner`` placed physically relative to ``__start_BTF`` (free
    RAM may hold stale banner copies from boot) and agrees with VMCOREINFO,
    and the type graph parses and has ``struct task_struct``. Raises
    ProfileError naming the first check that fails."""
    from shadowvol.symbols.typegraph import Kind

    by_name = {sym.name: sym.address for sym in symbols}
    start = by_name["__start_BTF"]
    if "__stop_BTF" in by_name and by_name["__stop_BTF"] - start != size:
        raise ProfileError(f"BTF of {size} bytes, but kallsyms' .BTF has {by_name['__stop_BTF'] - start}")
    pa_banner = pa + (by_name["linux_banner"] - start)
    m = _BANNER.match(read(pa_banner, 1024)) if pa_banner >= 0 else None
    if m is None:
        raise ProfileError(f"no Linux banner at linux_banner (physical {pa_banner:#x})")
    banner = m.group(0)
    release = (vmcoreinfo or {}).get("OSRELEASE")
    if release and not banner.startswith(f"Linux version {release} ".encode()):
        raise ProfileError(f"the banner at linux_banner is not of VMCOREINFO's release {release}")
    blob = read(pa, size)
    try:
        if find_btf(blob) != 0 or btf_size(blob) != size:
            raise ProfileError("BTF header is not vmlinux's")
        hdr_len, type_len = struct.unpack_from("<II", blob, 4)[0], struct.unpack_from("<I", blob, 12)[0]
        if blob[hdr_len + type_len] != 0 or blob[-1] != 0:
            raise ProfileError("BTF string section does not start and end with NUL")
        graph = parse_btf(blob)
    except ProfileError as exc:
        raise ProfileError(str(exc).removeprefix("corrupt BTF: ")) from None
    if graph.find_complete(Kind.STRUCT, "task_struct") is None:
        raise ProfileError("BTF has no struct task_struct")
    return (pa, blob), graph, symbols, banner
