"""A profile built from a running guest's own memory, when none is stored.

The kernel image is physically contiguous, and it carries what a profile
needs: the ``.BTF`` section (types), the kallsyms tables (symbols) and
``linux_banner``. We find each by its signature in guest-physical memory:

- BTF: its header (magic 0xeB9F, version 1, 24-byte header); the largest
  valid blob is vmlinux's (module BTF is small and vmalloc'ed).
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

    # Types: the largest valid BTF blob.
    best: tuple[int, bytes] | None = None
    for pa in memory.find(_BTF_HEADER):
        # struct btf_header: magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
        _, _, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack("<HBBIIIII", read(pa, 24))
        size = hdr_len + max(type_off + type_len, str_off + str_len)
        if size > (64 << 20) or (best is not None and size <= len(best[1])):
            continue
        blob = read(pa, size)
        if find_btf(blob) == 0 and btf_size(blob) == size:
            best = (pa, blob)
    if best is None:
        raise ProfileError("no BTF in guest memory (kernel without CONFIG_DEBUG_INFO_BTF?)")
    graph = parse_btf(best[1])
    rep.type_source = "btf (guest memory)"

    # Symbols: kallsyms tables around the token table.
    symbols: list[Symbol] | None = None
    for pa in memory.find(_TOKEN_DIGITS):
        lo = max(ranges[0][0], pa - (24 << 20))
        try:
            tables, symbols = find_kallsyms(read(lo, pa - lo + (1 << 20)), 0)
            rep.symbol_source = f"kallsyms (guest memory, {tables.layout} layout)"
            break
        except ProfileError:
            continue
    if not symbols:
        raise ProfileError("no kallsyms tables in guest memory (kernel without CONFIG_KALLSYMS_ALL?)")

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

    # The banner at linux_banner: the image is physically contiguous, so its
    # physical address follows from where __start_BTF's blob was found.
    # (Free RAM may hold stale copies of a banner from boot.)
    by_name = {sym.name: sym.address for sym in symbols}
    if "__start_BTF" not in by_name or "linux_banner" not in by_name:
        raise ProfileError("guest kallsyms lacks __start_BTF or linux_banner")
    pa_banner = best[0] + (by_name["linux_banner"] - by_name["__start_BTF"])
    raw = read(pa_banner, 1024)
    m = _BANNER.match(raw)
    if m is None:
        raise ProfileError(f"no Linux banner at linux_banner (physical {pa_banner:#x})")
    banner = m.group(0)
    import hashlib

    # The BTF hash lets a later run re-verify the profile against its guest
    # (shadowvol.target): a profile from guest memory is never trusted by banner alone.
    meta = {"symbols": [{"kind": "symtab", "name": "kallsyms:guest-memory"}],
            "types": [{"kind": "dwarf", "name": GUEST_BTF_NAME, "hash_type": "sha256",
                       "hash_value": hashlib.sha256(best[1]).hexdigest()}]}
    return assemble_profile(graph, linked, banner, report=rep, linux_metadata=meta)
