"""BTF parser (include/uapi/linux/btf.h, Documentation/bpf/btf.rst).

Reads a raw BTF blob: the ``.BTF`` section of a vmlinux, or the bytes a live
kernel holds between ``__start_BTF`` and ``__stop_BTF``. Every kind up to
BTF_KIND_ENUM64 is decoded into a :class:`~shadowvol.symbols.typegraph.TypeGraph`.
Split BTF (kernel modules) is read on top of a base graph.
"""

from __future__ import annotations

import struct
from pathlib import Path

from shadowvol.errors import ProfileError
from shadowvol.symbols.typegraph import QUALIFIERS, CType, Kind, Member, TypeGraph

__all__ = ["BTF_MAGIC", "parse_btf", "find_btf", "btf_from_elf"]

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off/len, str_off/len


def _fields(blob: bytes | memoryview) -> tuple[str, int, int, int, int, int]:
    """``struct btf_header`` as read: (byte order, hdr_len, type_off,
    type_len, str_off, str_len), offsets relative to the end of the header."""
    if len(blob) < _HEADER.size:
        raise ProfileError("BTF blob is shorter than its header")
    for order in ("<", ">"):
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            order + "HBBIIIII", blob, 0)
        if magic == BTF_MAGIC:
            break
    else:
        raise ProfileError("not BTF data (bad magic)")
    if version != 1:
        raise ProfileError(f"unsupported BTF version {version}")
    return order, hdr_len, type_off, type_len, str_off, str_len


def _header(blob: bytes | memoryview) -> tuple[str, int, int, int, int, int]:
    """Decodes ``struct btf_header``: (byte order, hdr_len, type_off,
    type_len, str_off, str_len), offsets relative to the blob start; the
    blob must hold all the header says."""
    order, hdr_len, type_off, type_len, str_off, str_len = _fields(blob)
    if hdr_len + max(type_off + type_len, str_off + str_len) > len(blob):
        raise ProfileError("BTF blob is truncated")
    return order, hdr_len, hdr_len + type_off, type_len, hdr_len + str_off, str_len


def btf_size(blob: bytes | memoryview) -> int:
    """Total length of the BTF blob starting at ``blob[0]``, from its header
    alone (``blob`` may be just its 24 header bytes: how much to read next)."""
    _, hdr_len, type_off, type_len, str_off, str_len = _fields(blob)
    return hdr_len + max(type_off + type_len, str_off + str_len)


def find_btf(buf: bytes | memoryview, start: int = 0) -> int:
    """Offset of the first plausible BTF header in ``buf`` at or after
    ``start`` (for memory images holding BTF between __start_BTF and
    __stop_BTF), or -1."""
    data = buf if isinstance(buf, bytes) else bytes(buf)
    view = memoryview(data)
    pos = data.find(b"\x9f\xeb\x01", start)
    while pos >= 0:
        try:
            _, hdr_len, type_start, type_len, str_start, _ = _header(view[pos:])
        except ProfileError:
            pass
        else:
            if hdr_len == 24 and type_start == 24 and str_start == type_start + type_len and type_len:
                return pos
        pos = data.find(b"\x9f\xeb\x01", pos + 1)
    return -1


def _sign_enums(types: list[CType], kflag_known: bool) -> None:
    """Signs 32-bit enum values. Since pahole 1.24 (Linux 6.0's btf.rst),
    kind_flag 1 marks a signed enum and 0 an unsigned one; older encoders
    never set it and stored values as s32. When some enum of the blob has
    the flag, it is trusted (BLK_SEG_BOUNDARY_MASK = 0xffffffff stays
    unsigned, HvSubnodeInvalid = -1 signed, as DWARF has them); else the
    legacy s32 reading applies."""
    for t in types:
        if t.kind != Kind.ENUM:
            continue
        if t.encoding or not kflag_known:
            t.enumerators = [(n, v - (1 << 32) if v >= 0x80000000 else v) for n, v in t.enumerators]


def parse_btf(blob: bytes | memoryview, base: TypeGraph | None = None) -> TypeGraph:
    """Decodes a BTF blob into a :class:`TypeGraph`.

    :param blob: BTF bytes starting at ``struct btf_header``; trailing bytes
        are ignored.
    :param base: for split BTF (modules), the vmlinux graph; type ids and
        string offsets then continue from it. The base graph is not modified.
    """
    try:
        graph = _parse_btf(blob, base)
    except (IndexError, ValueError, OverflowError, struct.error) as exc:
        # Words or strings past their section (a hostile or truncated blob).
        raise ProfileError(f"corrupt BTF: {exc}") from None
    _check_graph(graph, 0 if base is None else len(base.types))
    return graph


#: Most types a blob may declare (vmlinux 6.1 has ~95,000, 6.12 ~130,000).
MAX_TYPES = 4_000_000


def _check_graph(graph: TypeGraph, first: int) -> None:
    """Every type id referenced is in the graph, and no chain of qualifiers,
    typedefs, pointers and arrays loops (a type pointing at itself):
    consumers follow such chains without a cycle check. Iterative, linear in
    the type count."""
    types = graph.types
    n = len(types)
    if n > MAX_TYPES:
        raise ProfileError(f"BTF declares {n} types (more than {MAX_TYPES})")
    # Kinds whose type_id is followed by consumers; in C none of these can
    # reach itself without passing through a struct/union member.
    chained = QUALIFIERS | {Kind.ARRAY, Kind.PTR, Kind.FUNC_PROTO, Kind.VAR, Kind.FUNC, Kind.DECL_TAG}
    for tid in range(first, n):
        t = types[tid]
        if t.type_id >= n or (t.kind == Kind.ARRAY and t.vlen >= n):
            raise ProfileError(f"corrupt BTF: type {tid} refers to type {max(t.type_id, t.vlen)}, "
                               f"past the last ({n - 1})")
        for m in t.members:
            if m.type_id >= n:
                raise ProfileError(f"corrupt BTF: a member of type {tid} refers to type {m.type_id}, "
                                   f"past the last ({n - 1})")
    # 0 = unvisited, 1 = on the current chain, 2 = done; depth = links to a type with a layout.
    state = bytearray(n)
    depth = [0] * n
    for start in range(first, n):
        if state[start] or types[start].kind not in chained:
            continue
        chain = []
        tid = start
        while types[tid].kind in chained and state[tid] == 0:
            state[tid] = 1
            chain.append(tid)
            tid = types[tid].type_id
        if types[tid].kind in chained and state[tid] == 1:
            raise ProfileError(f"corrupt BTF: type {tid} refers to itself through "
                               f"typedef/qualifier/pointer/array links")
        d = depth[tid]
        for c in reversed(chain):
            d += 1
            depth[c] = d
            state[c] = 2
        if d > MAX_CHAIN:
            raise ProfileError(f"corrupt BTF: type {start} is {d} typedef/qualifier/pointer/array "
                               f"links deep (more than {MAX_CHAIN})")
    _check_anonymous(types, first, chained)


#: Longest typedef/qualifier/pointer/array chain (kernels stay under 10) and
#: deepest nesting of anonymous structs/unions accepted: consumers recurse on both.
MAX_CHAIN = 48
MAX_NESTING = 48


def _check_anonymous(types: list[CType], first: int, chained: frozenset[Kind] | set[Kind]) -> None:
    """Anonymous structs/unions never contain themselves, directly or through
    other anonymous ones (C cannot name them, so no real kernel does; the ISF
    writer names each after a hash of its layout, recursively), and nest at
    most MAX_NESTING deep. Iterative depth-first search."""
    aggregates = (Kind.STRUCT, Kind.UNION)

    def inner(tid: int) -> list[int]:
        out = []
        for m in types[tid].members:
            t = m.type_id
            for _ in range(MAX_CHAIN + 1):
                if types[t].kind not in chained:
                    break
                t = types[t].type_id
            if types[t].kind in aggregates and not types[t].name:
                out.append(t)
        return out

    n = len(types)
    state = bytearray(n)  # 0 new, 1 on stack, 2 done
    height = [0] * n
    for root in range(first, n):
        t = types[root]
        if state[root] or t.kind not in aggregates or t.name:
            continue
        stack = [(root, iter(inner(root)))]
        state[root] = 1
        while stack:
            tid, it = stack[-1]
            child = next(it, None)
            if child is None:
                stack.pop()
                state[tid] = 2
                if stack:
                    parent = stack[-1][0]
                    height[parent] = max(height[parent], height[tid] + 1)
                continue
            if state[child] == 1:
                raise ProfileError(f"corrupt BTF: anonymous type {child} contains itself")
            if state[child] == 2:
                height[tid] = max(height[tid], height[child] + 1)
                continue
            if len(stack) > MAX_NESTING:
                raise ProfileError(f"corrupt BTF: anonymous types nested more than {MAX_NESTING} deep")
            state[child] = 1
            stack.append((child, iter(inner(child))))
        if height[root] > MAX_NESTING:
            raise ProfileError(f"corrupt BTF: anonymous types nested more than {MAX_NESTING} deep")


def _type_words(blob: bytes | memoryview, order: str, type_start: int, type_len: int) -> memoryview:
    """The type section as native u32 words (byte-swapped for a big-endian blob)."""
    raw = bytes(blob[type_start:type_start + type_len])
    if type_len % 4:
        raise ProfileError("BTF type section length is not a multiple of 4")
    if order != ">":
        return memoryview(raw).cast("I")
    import array

    arr = array.array("I", raw)
    arr.byteswap()
    return memoryview(arr.tobytes()).cast("I")


class _Names:
    """``name_off`` -> name in this blob's string section, continuing a split base's (cached)."""

    def __init__(self, strings: bytes, base: TypeGraph | None) -> None:
        self.strings = strings
        self.base = base
        self.base_len = base.btf_str_len if base is not None else 0
        self.cache: dict[int, str] = {}

    def __call__(self, off: int) -> str:
        if off == 0:
            return ""
        got = self.cache.get(off)
        if got is None:
            if off < self.base_len:
                got = self.base.btf_name_at(off)  # type: ignore[union-attr,misc]
            else:
                local = off - self.base_len
                end = self.strings.find(b"\0", local)
                if local >= len(self.strings) or end < 0:
                    raise ProfileError(f"corrupt BTF: name offset {off:#x} is past the string section")
                got = self.strings[local:end].decode("utf-8", "replace")
            self.cache[off] = got
        return got


def _read_members(t: CType, words: memoryview, i: int, vlen: int, name_at: _Names) -> int:
    """``struct btf_member[vlen]`` of a struct or union (bitfield offsets when kflag)."""
    members = []
    for _ in range(vlen):
        m_name, m_type, m_off = words[i], words[i + 1], words[i + 2]
        i += 3
        if t.flag:
            members.append(Member(name_at(m_name), m_type, m_off & 0xFFFFFF, m_off >> 24))
        else:
            members.append(Member(name_at(m_name), m_type, m_off, 0))
    t.members = members
    return i


def _read_enumerators(t: CType, words: memoryview, i: int, vlen: int, name_at: _Names) -> int:
    """``struct btf_enum[vlen]`` (raw u32 values: signs fixed later) or ``struct btf_enum64[vlen]``."""
    enums = []
    for _ in range(vlen):
        if t.kind == Kind.ENUM:
            e_name, val = words[i], words[i + 1]
            i += 2
        else:
            e_name, val = words[i], (words[i + 2] << 32) | words[i + 1]
            i += 3
            if t.flag and val >= 1 << 63:
                val -= 1 << 64
        enums.append((name_at(e_name), val))
    t.enumerators = enums
    return i


def _read_type(t: CType, words: memoryview, i: int, size_type: int, vlen: int, name_at: _Names) -> int:
    """Fill ``t`` from the data after its ``struct btf_type`` at ``words[i]``; the index after it."""
    kind = t.kind
    if kind == Kind.INT:
        enc = words[i]
        t.size = size_type
        t.encoding = (enc >> 24) & 0x0F
        t.bits = enc & 0xFF
        t.vlen = (enc >> 16) & 0xFF  # BTF_INT_OFFSET
        return i + 1
    if kind == Kind.ARRAY:
        t.type_id, t.vlen, t.nelems = words[i], words[i + 1], words[i + 2]  # vlen = index type
        return i + 3
    if kind in (Kind.STRUCT, Kind.UNION):
        t.size = size_type
        return _read_members(t, words, i, vlen, name_at)
    if kind in (Kind.ENUM, Kind.ENUM64):
        t.size = size_type
        t.encoding = int(t.flag)
        return _read_enumerators(t, words, i, vlen, name_at)
    if kind == Kind.FUNC_PROTO:
        t.type_id = size_type
        t.members = [Member(name_at(words[i + 2 * k]), words[i + 2 * k + 1]) for k in range(vlen)]
        return i + 2 * vlen
    if kind == Kind.VAR:
        t.type_id = size_type
        t.vlen = words[i]  # linkage
        return i + 1
    if kind == Kind.DATASEC:
        t.size = size_type
        t.members = [Member("", words[i + 3 * k], words[i + 3 * k + 1], words[i + 3 * k + 2])
                     for k in range(vlen)]
        return i + 3 * vlen
    if kind == Kind.FLOAT:
        t.size = size_type
    elif kind == Kind.DECL_TAG:
        t.type_id = size_type
        comp = words[i]
        t.vlen = comp - (1 << 32) if comp >= 0x80000000 else comp
        return i + 1
    elif kind == Kind.FUNC:
        t.type_id = size_type
        t.vlen = vlen  # linkage
    else:  # PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG
        t.type_id = size_type
    return i


def _parse_btf(blob: bytes | memoryview, base: TypeGraph | None) -> TypeGraph:
    order, _hdr_len, type_start, type_len, str_start, str_len = _header(blob)
    words = _type_words(blob, order, type_start, type_len)
    strings = bytes(blob[str_start:str_start + str_len])
    name_at = _Names(strings, base)
    types: list[CType] = list(base.types) if base is not None else [CType(Kind.UNKN, "void")]
    n = len(words)
    i = 0
    while i < n:
        if len(types) > MAX_TYPES:
            raise ProfileError(f"BTF declares more than {MAX_TYPES} types")
        if i + 3 > n:
            break
        name_off, info, size_type = words[i], words[i + 1], words[i + 2]
        kind_no = (info >> 24) & 0x1F
        try:
            kind = Kind(kind_no)
        except ValueError:
            raise ProfileError(f"unknown BTF kind {kind_no} at type {len(types)}") from None
        t = CType(kind, name_at(name_off), flag=bool(info >> 31))
        i = _read_type(t, words, i + 3, size_type, info & 0xFFFF, name_at)
        types.append(t)
    if i != n:
        raise ProfileError("BTF type section ends inside a type")

    first_new = len(base.types) if base is not None else 0
    _sign_enums(types[first_new:], any(t.kind == Kind.ENUM and t.encoding for t in types))
    graph = TypeGraph(types)
    graph.btf_str_len = name_at.base_len + len(strings)
    graph.btf_name_at = name_at
    return graph


def btf_from_elf(path_or_bytes: Path | bytes) -> bytes | None:
    """The ``.BTF`` section of an ELF file (path or bytes), or None."""
    import io

    from elftools.elf.elffile import ELFFile

    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        elf = ELFFile(io.BytesIO(path_or_bytes))
        sec = elf.get_section_by_name(".BTF")
        return None if sec is None else sec.data()
    with open(path_or_bytes, "rb") as fh:
        elf = ELFFile(fh)
        sec = elf.get_section_by_name(".BTF")
        return None if sec is None else sec.data()
