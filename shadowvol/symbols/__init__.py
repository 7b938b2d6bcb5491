"""Volatility 3 ISF profiles built from a kernel image alone.

Types come from the image's BTF (or DWARF, for a debug vmlinux), symbols
from its embedded kallsyms tables (or a System.map / ELF symtab), declared
types of globals from a header probe (:mod:`shadowvol.symbols.globals`).

Public API::

    build_profile(vmlinuz=None, vmlinux=None, system_map=None, headers=None) -> dict
    write_profile(isf, path)            # .json or .json.xz
    save_fast(isf, path) / load_fast(path)
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import marshal
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zlib import crc32 as _crc32

from shadowvol.errors import ProfileError
from shadowvol.symbols.isf import SymbolEntry, build_isf
from shadowvol.symbols.kallsyms import Symbol, find_kallsyms, parse_system_map, unique_by_name
from shadowvol.symbols.typegraph import Kind, TypeGraph

__all__ = ["build_profile", "builder_version", "PROFILE_BUILDER", "write_profile", "read_profile", "save_fast", "load_fast",
           "ProfileReport", "LazySection", "SymbolIndex", "symbols_by_address", "linux_banner", "FAST_MAGIC"]

FAST_MAGIC = b"SVISF3\n"

#: Bumped whenever the builder's output changes (types, symbols, metadata), so
#: images rebuild profiles an older shadowvol stored (``vm build``).
PROFILE_BUILDER = 3


def builder_version() -> str:
    """``metadata.producer.generator_version`` of the profiles this code builds."""
    from shadowvol import __version__

    return f"{__version__}+profile.{PROFILE_BUILDER}"


@dataclass
class ProfileReport:
    """What :func:`build_profile` did: sources, counts, notes."""

    release: str = ""
    symbol_source: str = ""
    type_source: str = ""
    symbols: int = 0
    typed_symbols: int = 0
    notes: list[str] = field(default_factory=list)


class _Image:
    """A vmlinux ELF held in memory, readable by virtual address."""

    def __init__(self, data: bytes) -> None:
        from shadowvol.symbols.vmlinuz import elf_errors, open_elf

        self.data = data
        self.elf = open_elf(data)
        try:
            self.segments = [(s["p_vaddr"], s["p_offset"], s["p_filesz"])
                             for s in self.elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        except elf_errors() as exc:
            raise ProfileError(f"corrupt ELF program headers ({type(exc).__name__}: {exc})") from None

    def read(self, va: int, size: int) -> bytes:
        for vaddr, off, filesz in self.segments:
            if vaddr <= va < vaddr + filesz:
                start = off + va - vaddr
                return self.data[start:start + min(size, vaddr + filesz - va)]
        raise ProfileError(f"address {va:#x} is not in the image")

    def section(self, name: str) -> bytes | None:
        from shadowvol.symbols.vmlinuz import elf_errors

        try:
            sec = self.elf.get_section_by_name(name)
            return None if sec is None else sec.data()
        except elf_errors() as exc:
            raise ProfileError(f"corrupt ELF section {name} ({type(exc).__name__}: {exc})") from None


def linux_banner(image_read: Any, address: int | None, rodata: bytes | None = None) -> bytes:
    """The bytes of ``linux_banner`` ("Linux version ...\\n" and its NUL), as
    Volatility's banner scanner matches them in memory."""
    if address is not None:
        chunk = image_read(address, 1024)
        end = chunk.find(b"\0")
        if chunk.startswith(b"Linux version ") and end > 0:
            return chunk[:end + 1]
    if rodata is not None:
        pos = rodata.find(b"Linux version ")
        while pos >= 0:
            end = rodata.find(b"\0", pos)
            if rodata[end - 1:end] == b"\n" and b"%" not in rodata[pos:end]:
                return rodata[pos:end + 1]
            pos = rodata.find(b"Linux version ", pos + 1)
    raise ProfileError("no Linux banner in the image")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_profile(vmlinuz: Path | None = None, vmlinux: Path | None = None,
                  system_map: Path | None = None, headers: Path | None = None,
                  report: ProfileReport | None = None) -> dict[str, Any]:
    """The ISF dict for a kernel.

    :param vmlinuz: compressed kernel (bzImage); used when ``vmlinux`` is None.
    :param vmlinux: ELF kernel; with DWARF, types come from DWARF, else BTF.
    :param system_map: symbols from this file instead of kallsyms/symtab.
    :param headers: extracted linux-headers (package root or flavour dir), to
        type ordinary globals; without it only BTF VARs and curated statics.
    :param report: filled with what was done.
    """
    from shadowvol.symbols.vmlinuz import elf_errors

    try:
        return _build_profile(vmlinuz, vmlinux, system_map, headers, report)
    except elf_errors(broad=False) as exc:
        # pyelftools parses lazily: a corrupt image can fail on any access.
        raise ProfileError(f"corrupt kernel image ({type(exc).__name__}: {exc})") from None


def _build_profile(vmlinuz: Path | None, vmlinux: Path | None, system_map: Path | None,
                   headers: Path | None, report: ProfileReport | None) -> dict[str, Any]:
    from shadowvol.safeio import check_input, read_input
    from shadowvol.symbols import btf as btf_mod

    rep = report if report is not None else ProfileReport()
    if headers is not None:
        check_input(headers, "--headers", directory=True)
    if vmlinux is not None:
        raw = read_input(vmlinux, "--vmlinux")
        source = Path(vmlinux)
        from shadowvol.symbols.vmlinuz import extract_vmlinux
        data = extract_vmlinux(raw)
    elif vmlinuz is not None:
        from shadowvol.symbols.vmlinuz import extract_vmlinux
        raw = read_input(vmlinuz, "--vmlinuz")
        source = Path(vmlinuz)
        data = extract_vmlinux(raw)
    else:
        raise ProfileError("build_profile needs vmlinuz or vmlinux")
    image = _Image(data)

    # Symbols.
    symbols: list[Symbol]
    extra: dict[str, tuple[int, str]] = {}
    if system_map is not None:
        symbols = parse_system_map(read_input(system_map, "--system-map", limit=1 << 30))
        rep.symbol_source, sym_kind, sym_file = "system-map", "system-map", Path(system_map)
    else:
        from shadowvol.symbols.dwarf import elf_symbols
        symbols = elf_symbols(image.elf)
        rep.symbol_source, sym_kind, sym_file = "symtab", "symtab", source
        if len(symbols) < 1000:
            symbols = []
            for vaddr, off, filesz in image.segments:
                seg = data[off:off + filesz]
                if b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00" not in seg:
                    continue
                try:
                    tables, symbols = find_kallsyms(seg, vaddr)
                except ProfileError:
                    continue
                rep.symbol_source = f"kallsyms ({tables.layout} layout)"
                # scripts/kallsyms.c leaves its own tables out of kallsyms.
                # Types as kernel/kallsyms_internal.h declares them (unbounded
                # arrays: count 0, as DWARF has them).
                word = "unsigned int" if tables.marker_width == 4 else "unsigned long"  # u64 before 4.20
                extra = {"kallsyms_num_syms": (tables.names - 8, word),
                         "kallsyms_names": (tables.names, "u8[0]"),
                         "kallsyms_markers": (tables.markers, f"{word}[0]"),
                         "kallsyms_token_table": (tables.token_table, "char[0]"),
                         "kallsyms_token_index": (tables.token_index, "u16[0]")}
                if tables.relative_base is not None:
                    extra["kallsyms_offsets"] = (tables.addresses, "int[0]")
                if tables.relative_base_address is not None:
                    # volatility3's kallsyms API needs it for negative offsets.
                    extra["kallsyms_relative_base"] = (tables.relative_base_address, "unsigned long")
                if tables.seqs_of_names is not None:
                    extra["kallsyms_seqs_of_names"] = (tables.seqs_of_names, "u8[0]")
                break
            if not symbols:
                raise ProfileError(f"{source}: no symbol table and no kallsyms tables")
    rep.symbols = len(symbols)

    # Types.
    variables: dict[str, int] = {}
    if image.elf.get_section_by_name(".debug_info") is not None:
        from shadowvol.symbols.dwarf import graph_from_dwarf
        graph, variables = graph_from_dwarf(image.elf)
        rep.type_source = "dwarf"
        type_item = {"kind": "dwarf", "name": source.name, "hash_type": "sha256", "hash_value": _sha256(raw)}
    else:
        blob = image.section(".BTF")
        if blob is None:
            raise ProfileError(f"{source}: neither DWARF nor BTF (needs CONFIG_DEBUG_INFO_BTF)")
        graph = btf_mod.parse_btf(blob)
        rep.type_source = "btf"
        # The schema knows only dwarf/symtab/system-map kinds; BTF is DWARF-derived.
        type_item = {"kind": "dwarf", "name": f"btf:{source.name}", "hash_type": "sha256",
                     "hash_value": _sha256(raw)}

    by_name = unique_by_name(symbols)
    banner_sym = by_name.get("linux_banner")
    banner = linux_banner(image.read, banner_sym.address if banner_sym else None, image.section(".rodata"))
    sym_item = {"kind": sym_kind,
                "name": f"kallsyms:{sym_file.name}" if rep.symbol_source.startswith("kallsyms") else sym_file.name,
                "hash_type": "sha256",
                "hash_value": _sha256(raw if sym_file == source else
                                      read_input(sym_file, "--system-map", limit=1 << 30))}
    return assemble_profile(graph, symbols, banner, headers=headers, report=rep, extra=extra,
                            variables=variables, linux_metadata={"symbols": [sym_item], "types": [type_item]})


def assemble_profile(graph: TypeGraph, symbols: list[Symbol], banner: bytes, *,
                     headers: Path | None = None, report: ProfileReport | None = None,
                     extra: Mapping[str, tuple[int, str]] | None = None,
                     variables: Mapping[str, int] | None = None,
                     linux_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ISF from a type graph, link-time symbols and the banner bytes (with NUL).

    Shared by :func:`build_profile` (kernel files) and
    :func:`shadowvol.symbols.live.profile_from_memory` (a running guest).
    """
    from shadowvol import __version__
    from shadowvol.symbols.globals import parse_ctype, type_globals

    rep = report if report is not None else ProfileReport()
    by_name = unique_by_name(symbols)
    banner_sym = by_name.get("linux_banner")
    rep.release = banner.split(b" ")[2].decode(errors="replace") if banner.count(b" ") > 2 else ""
    if variables:
        typed = {n: t for n, t in variables.items() if n in by_name}
    else:
        found = type_globals(graph, symbols, headers, rep.release or None)
        rep.notes += found.notes
        typed = found.types
    char_id = parse_ctype(graph, "char") or 0
    entries: dict[str, SymbolEntry] = {}
    for name, sym in by_name.items():
        entries[name] = SymbolEntry(sym.address, typed.get(name))
    for name, (address, spec) in (extra or {}).items():
        # New kernels list the kallsyms tables in kallsyms itself (untyped):
        # the type goes to the entry at the same address.
        known = entries.get(name)
        if known is None or (known.type_id is None and known.address == address):
            entries[name] = SymbolEntry(address, parse_ctype(graph, spec))
    if banner_sym is not None:
        entries["linux_banner"] = SymbolEntry(banner_sym.address, graph.array_of(char_id, len(banner)), banner)
    rep.typed_symbols = sum(1 for e in entries.values() if e.type_id is not None)
    return build_isf(graph, entries, producer_version=builder_version(),
                     linux_metadata=linux_metadata or {})


def write_profile(isf: dict[str, Any], path: Path) -> Path:
    """Writes the ISF as JSON, xz-compressed when ``path`` ends in ``.xz``."""
    from shadowvol.safeio import atomic_write

    path = Path(path)
    return atomic_write(path, encode_profile(isf, xz=path.suffix == ".xz"), mode=0o644)


def encode_profile(isf: dict[str, Any], xz: bool) -> bytes:
    """The ISF as compact JSON bytes, xz-compressed with ``xz``."""
    text = json.dumps(isf, separators=(",", ":"), sort_keys=True).encode()
    return lzma.compress(text, preset=6) if xz else text


def read_profile(path: Path) -> dict[str, Any]:
    """Reads an ISF written by :func:`write_profile` (or any .json[.xz]), or
    a fast file written by :func:`save_fast`."""
    from shadowvol.safeio import read_input

    raw = read_input(path, "profile", limit=MAX_PROFILE)
    if raw.startswith(FAST_MAGIC):
        return load_fast(path)
    return parse_profile(raw, str(path))


#: Largest profile accepted, compressed or not (a 6.1 DWARF ISF is ~60 MB of JSON).
MAX_PROFILE = 1 << 30
#: Sections every ISF has (volatility3's schema requires them).
ISF_SECTIONS = ("metadata", "base_types", "user_types", "enums", "symbols")


def parse_profile(raw: bytes, name: str = "profile") -> dict[str, Any]:
    """An ISF dict from JSON or xz-compressed JSON bytes, with its sections
    checked as far as shadowvol itself uses them; ProfileError otherwise."""
    try:
        if raw.startswith(b"\xfd7zXZ"):
            dec = lzma.LZMADecompressor()
            raw = dec.decompress(raw, MAX_PROFILE + 1)
            if len(raw) > MAX_PROFILE or not dec.eof:
                raise ProfileError(f"{name}: xz stream truncated or larger than {MAX_PROFILE >> 20} MiB")
        isf = json.loads(raw)
    except (ValueError, lzma.LZMAError, EOFError) as exc:
        raise ProfileError(f"{name}: not an ISF profile ({type(exc).__name__}: {str(exc)[:80]})") from None
    except RecursionError:
        raise ProfileError(f"{name}: not an ISF profile (JSON nested too deep)") from None
    check_isf(isf, name)
    return isf


def check_isf(isf: Any, name: str = "profile") -> None:
    """Raises ProfileError unless ``isf`` has the ISF sections as mappings (dicts,
    or a fast copy's lazy sections) of dicts, and every symbol has an integer address."""
    if not isinstance(isf, dict):
        raise ProfileError(f"{name}: not an ISF profile (top level is not an object)")
    missing = [k for k in ISF_SECTIONS if not isinstance(isf.get(k), Mapping)]
    if missing:
        raise ProfileError(f"{name}: not an ISF profile (missing or malformed: {', '.join(missing)})")
    for section in ISF_SECTIONS[1:]:
        for key, value in isf[section].items():
            if not isinstance(value, dict):
                raise ProfileError(f"{name}: {section}.{str(key)[:60]} is not an object")
    for key, value in isf["symbols"].items():
        address = value.get("address")
        if type(address) is not int:
            raise ProfileError(f"{name}: symbol {str(key)[:60]} has no integer address")


class LazySection(dict):
    """A read-only ISF section (``user_types``, ``enums``) whose
    entries stay marshalled until first looked up; decoded entries replace
    the raw bytes in place.

    A ``dict`` subclass on purpose: volatility3 computes ``types`` as
    ``{**user_types, ...}.keys()``, which for a dict subclass copies raw
    values on CPython's fast path instead of calling ``__getitem__`` for all
    ~9,000 types (that alone cost 0.6 s per run with a Mapping).
    """

    def __getitem__(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        if type(value) is bytes:
            value = marshal.loads(value)
            dict.__setitem__(self, key, value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if dict.__contains__(self, key) else default

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        return ((k, self[k]) for k in dict.keys(self))

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        return (self[k] for k in dict.keys(self))

    def copy(self) -> dict[str, Any]:
        return dict(self.items())


def symbols_by_address(symbols: Mapping[str, Any], mask: int = 0) -> list[tuple[int, str]]:
    """(address, name) of every symbol of an ISF ``symbols`` section that has an integer
    address (``& mask`` when a mask is given), sorted: the index volatility3's
    ``get_symbols_by_location`` and check_syscall's kernel image search.

    A fast copy's section carries the index, stored when it was written (~65 ms to
    load and mask, for a kernel's 82k symbols); otherwise a :class:`LazySection`'s
    entries are read without being decoded into it (nobody keeps 82k symbol dicts
    for an index): ~0.2 s, not the ~1 s of 82k ``get_symbol`` calls."""
    stored = getattr(symbols, "by_address", None)  # the fast copy's (save_fast), unmasked and sorted
    if isinstance(stored, bytes):
        try:
            pairs = marshal.loads(stored)
            if type(pairs) is not list:
                raise ValueError("not a list")
            if mask:
                pairs = [(a & mask, n) for a, n in pairs]
                pairs.sort()  # already sorted unless masking moved some: linear
            return pairs
        except (EOFError, ValueError, TypeError):
            pass  # a damaged index: built from the entries below
    raw = dict.items(symbols) if isinstance(symbols, LazySection) else \
        symbols.raw_items() if isinstance(symbols, SymbolIndex) else symbols.items()
    loads = marshal.loads
    pairs = []
    for name, entry in raw:
        if type(entry) is bytes:
            entry = loads(entry)
        address = entry.get("address") if isinstance(entry, dict) else None
        if type(address) is int:
            pairs.append((address & mask if mask else address, name))
    pairs.sort()
    return pairs


_LAZY = ("user_types", "enums")
#: The section a fast copy holds as a :class:`SymbolIndex` over the file.
_INDEX = "symbols"


def save_fast(isf: dict[str, Any], path: Path) -> Path:
    """Writes the ISF in the fast-loading format: ``FAST_MAGIC``, a little-endian u64
    header length, the header, then the symbol index's arrays and blobs.

    The header is one ``marshal`` blob: the small sections as they are, and each entry
    of user_types and enums marshalled on its own (decoded lazily by :class:`LazySection`).
    The symbols (82k in a kernel) are not in it: they are a hash table over the names
    (:class:`SymbolIndex`), read in place, so loading them costs nothing until a lookup;
    their by-address index (:func:`symbols_by_address`) is stored beside them."""
    path = Path(path)
    head = {k: v for k, v in isf.items() if k not in _LAZY and k != _INDEX}
    for key in _LAZY:
        head[key] = {name: marshal.dumps(value) for name, value in isf[key].items()}
    parts, offsets, at = [], {}, 0
    for name, blob in SymbolIndex.encode(isf[_INDEX]).items():
        offsets[name] = (at, len(blob))
        pad = -len(blob) % 8  # each part starts 8-aligned (memoryview.cast needs no more)
        parts += [blob, b"\0" * pad]
        at += len(blob) + pad
    head[_INDEX] = {"count": len(isf[_INDEX]), "parts": offsets}
    header = marshal.dumps(head)
    header += b"\0" * (-(len(FAST_MAGIC) + 8 + len(header)) % 8)
    from shadowvol.safeio import atomic_write

    return atomic_write(path, b"".join([FAST_MAGIC, len(header).to_bytes(8, "little"), header, *parts]))


def load_fast(path: Path, lazy: bool = True, mapped: bool = False) -> dict[str, Any]:
    """Reads a file written by :func:`save_fast`. With ``lazy``, the big sections are
    :class:`LazySection` and :class:`SymbolIndex` mappings (enough for Volatility's
    ISF readers, which only use get/in/iteration); else plain dicts.

    ``mapped`` maps the file instead of reading it, for our own cache, which is only
    ever replaced whole (a rename), never rewritten in place: a run then touches the
    pages of the symbols it looks up, not the file's 12 MB."""
    from shadowvol.safeio import open_input, read_input

    raw: Any = None
    if mapped:
        import mmap

        fd, size = open_input(path, "fast profile")
        try:
            if not 0 < size <= MAX_PROFILE:
                raise ProfileError(f"{path}: not a shadowvol fast profile")
            raw = memoryview(mmap.mmap(fd, 0, prot=mmap.PROT_READ))
        except OSError:
            pass  # a file system that cannot map it: read below
        finally:
            os.close(fd)
    if raw is None:
        raw = memoryview(read_input(path, "fast profile", limit=MAX_PROFILE))
    if raw[:len(FAST_MAGIC)] != FAST_MAGIC:
        raise ProfileError(f"{path}: not a shadowvol fast profile")
    try:
        at = len(FAST_MAGIC) + 8
        header_len = int.from_bytes(raw[len(FAST_MAGIC):at], "little")
        if len(raw) < at + header_len:
            raise ValueError("short header")
        isf = marshal.loads(raw[at:at + header_len])
        if not isinstance(isf, dict) or any(k not in isf for k in (*_LAZY, _INDEX)) \
                or not isinstance(isf[_INDEX], dict):
            raise ValueError("missing sections")
        index = isf[_INDEX]
        isf[_INDEX] = SymbolIndex(raw[at + header_len:], index.get("count"), index.get("parts"), str(path))
        for key in _LAZY:
            section = LazySection(isf[key])
            isf[key] = section if lazy else {k: section[k] for k in section}
        if not lazy:
            isf[_INDEX] = dict(isf[_INDEX].items())
    except (EOFError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ProfileError(f"{path}: corrupt fast profile ({exc})") from None
    return isf


class SymbolIndex(Mapping):
    """A fast copy's ``symbols`` section, read in place: an open-addressing hash table
    (CRC-32 of the name, linear probing) over the names, each entry's value marshalled
    on its own and decoded on first lookup (then kept, as :class:`LazySection` does).

    Loading it builds no per-symbol object (marshal-decoding a dict of 82k entries
    took 24 ms of every run); a lookup is a few slices and a compare. Iteration keeps
    the ISF's order. Every offset read from the file is bounds-checked (slices of a
    memoryview), and a probe visits each slot at most once, so a damaged file gives
    misses or a :class:`ProfileError`, never a crash or a hang.
    """

    _ARRAYS = ("slots", "name_ends", "value_ends")

    def __init__(self, data: memoryview, count: Any, parts: Any, name: str = "fast profile") -> None:
        if type(count) is not int or count < 0 or not isinstance(parts, dict):
            raise ValueError("bad symbol index header")
        view = {}
        for key in (*self._ARRAYS, "names", "values", "by_address"):
            at, length = parts[key]
            if not (type(at) is int and type(length) is int and 0 <= at and 0 <= length
                    and at + length <= len(data)):
                raise ValueError(f"symbol index part {key} lies outside the file")
            view[key] = data[at:at + length]
        for key in self._ARRAYS:
            view[key] = view[key].cast("I")
        slots = view["slots"]
        if len(view["name_ends"]) != count or len(view["value_ends"]) != count \
                or len(slots) < count or not slots or len(slots) & (len(slots) - 1):
            raise ValueError("symbol index arrays do not match its count")
        self._n, self._name = count, name
        self._slots, self._mask = slots, len(slots) - 1
        self._name_ends, self._value_ends = view["name_ends"], view["value_ends"]
        self._names, self._values, self._by_address = view["names"], view["values"], view["by_address"]
        self._decoded: dict[str, Any] = {}
        self._order: list[str] | None = None

    @staticmethod
    def encode(symbols: Mapping[str, Any]) -> dict[str, bytes]:
        """The arrays and blobs :func:`save_fast` stores for a ``symbols`` section."""
        import array
        import zlib

        names, values = [], []
        name_ends, value_ends = array.array("I"), array.array("I")
        if name_ends.itemsize != 4:
            raise ValueError("no 4-byte array type for the fast format")
        n_at = v_at = 0
        for name, entry in symbols.items():
            key, value = name.encode(), marshal.dumps(entry)
            names.append(key)
            values.append(value)
            n_at += len(key)
            v_at += len(value)
            if max(n_at, v_at) >= 1 << 32:
                raise ValueError("symbol section too large for the fast format")
            name_ends.append(n_at)
            value_ends.append(v_at)
        size = 8
        while size < 2 * len(names):
            size *= 2
        slots = array.array("I", bytes(4 * size))
        for i, key in enumerate(names):
            h = zlib.crc32(key) & (size - 1)
            while slots[h]:
                h = (h + 1) & (size - 1)
            slots[h] = i + 1
        return {"slots": slots.tobytes(), "name_ends": name_ends.tobytes(), "value_ends": value_ends.tobytes(),
                "names": b"".join(names), "values": b"".join(values),
                "by_address": marshal.dumps(symbols_by_address(symbols))}

    def _find(self, name: Any) -> int:
        """The entry number of ``name``, or -1."""
        if type(name) is not str:
            return -1
        try:
            key = name.encode()
        except UnicodeEncodeError:
            return -1
        slots, mask, ends, names = self._slots, self._mask, self._name_ends, self._names
        h = _crc32(key) & mask
        for _ in range(mask + 1):
            entry = slots[h]
            if not entry:
                return -1
            i = entry - 1
            if i < self._n and names[ends[i - 1] if i else 0:ends[i]] == key:
                return i
            h = (h + 1) & mask
        return -1

    def raw(self, i: int) -> bytes:
        """Entry ``i``'s marshalled value."""
        return bytes(self._values[self._value_ends[i - 1] if i else 0:self._value_ends[i]])

    def __getitem__(self, name: str) -> Any:
        value = self._decoded.get(name)
        if value is not None:
            return value
        i = self._find(name)
        if i < 0:
            raise KeyError(name)
        try:
            value = marshal.loads(self.raw(i))
        except (EOFError, ValueError, TypeError) as exc:
            raise ProfileError(f"{self._name}: corrupt fast profile (symbol {name[:60]!r}: {exc})") from None
        self._decoded[name] = value
        return value

    def __contains__(self, name: object) -> bool:  # get(), keys() and the rest: Mapping's
        return name in self._decoded or self._find(name) >= 0

    def names(self) -> list[str]:
        """Every name, in the ISF's order (decoded once)."""
        if self._order is None:
            names, ends = bytes(self._names), self._name_ends
            try:
                self._order = [names[ends[i - 1] if i else 0:ends[i]].decode() for i in range(self._n)]
            except UnicodeDecodeError as exc:
                raise ProfileError(f"{self._name}: corrupt fast profile ({exc})") from None
        return self._order

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return self._n

    def raw_items(self) -> Iterator[tuple[str, bytes]]:
        """(name, marshalled value) of every entry, none decoded into the index."""
        return ((name, self.raw(i)) for i, name in enumerate(self.names()))

    def copy(self) -> dict[str, Any]:
        return dict(self.items())

    @property
    def by_address(self) -> bytes | None:
        """The marshalled :func:`symbols_by_address` index stored with the section."""
        return bytes(self._by_address) or None
