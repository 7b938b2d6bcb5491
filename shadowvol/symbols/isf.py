"""The one ISF writer: a :class:`TypeGraph` plus symbols -> a Volatility 3
Intermediate Symbol Format dict (volatility3/schemas/schema-6.2.0.json).

Rules, following dwarf2json:

- ISF has no typedefs or qualifiers: they are looked through.
- A pointer to a function is ``{"kind": "pointer", "subtype": {"kind": "function"}}``.
- A bitfield is ``{"kind": "bitfield", "bit_position", "bit_length", "type"}``
  where ``type`` is a base type or an enum and the field offset is that of the
  storage unit holding the bits.
- An anonymous struct/union gets a stable generated name: the typedef that
  names it (``typedef struct {...} atomic_t``) when unambiguous, otherwise
  ``unnamed_<kind>_<sha1 of its layout>``; an anonymous member is
  ``unnamed_field_<index>`` with ``"anonymous": true`` so Volatility 6.2
  flattens it into the parent.
- Forward declarations never defined become empty user types, so every
  reference resolves.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shadowvol.symbols.typegraph import INT_BOOL, INT_CHAR, INT_SIGNED, QUALIFIERS, CType, Kind, TypeGraph

__all__ = ["ISF_FORMAT", "DWARF2JSON_COMPATIBLE", "SymbolEntry", "build_isf"]

ISF_FORMAT = "6.2.0"

#: What volatility3 checks a dwarf2json version for, this writer does as
#: dwarf2json 0.9.0 does: anonymous members kept as ``unnamed_field_*`` with
#: ``"anonymous": true`` and DW_AT_data_bit_offset bitfields (0.8.0, the
#: reason ``linux.malware.hidden_modules`` wants >= 0.8.0), anonymous structs
#: named after their typedef (0.7.0), Rust units skipped (0.9.0); ``linux.kmsg``
#: wants > 0.4.1. Those checks only look at a producer called dwarf2json, so
#: the producer says dwarf2json 0.9.0 and ``generator`` names shadowvol.
#: Known differences from dwarf2json 0.9.0's output (checked with
#: ``shadowvol profile diff`` on 6.1.0-57; layouts agree except where two
#: files define a struct of the same name):
#: dwarf2json also names references to typedef'd *named* structs after the
#: typedef (``spinlock_t``; for ``kernel_cap_t`` that makes stock
#: ``linux.capabilities`` fail on kernels < 6.3), types function symbols
#: ``void``, and keeps the last of same-named symbols.
DWARF2JSON_COMPATIBLE = "0.9.0"

_AGGREGATES = (Kind.STRUCT, Kind.UNION)
_ENUMS = (Kind.ENUM, Kind.ENUM64)
_ENUM_BASES = {
    (1, False): "unsigned char", (1, True): "signed char",
    (2, False): "short unsigned int", (2, True): "short int",
    (4, False): "unsigned int", (4, True): "int",
    (8, False): "long unsigned int", (8, True): "long int",
}


@dataclass(frozen=True, slots=True)
class SymbolEntry:
    """A symbol for the ISF: address, optional type id in the graph,
    optional constant bytes (``linux_banner``)."""

    address: int
    type_id: int | None = None
    constant_data: bytes | None = None


class _Writer:
    """Converts types on demand, memoizing one descriptor per type id."""

    def __init__(self, graph: TypeGraph) -> None:
        self.g = graph
        self.user_types: dict[str, dict[str, Any]] = {}
        self.enums: dict[str, dict[str, Any]] = {}
        self.base_types: dict[str, dict[str, Any]] = {
            "pointer": {"size": 8, "signed": False, "kind": "int", "endian": "little"},
            "void": {"size": 0, "signed": False, "kind": "void", "endian": "little"},
        }
        self.desc: dict[int, dict[str, Any]] = {}
        self.names: dict[int, str] = {}
        self.pending: list[tuple[int, str]] = []
        self.done: set[str] = set()
        self.alias_layouts: dict[tuple[str, str], str] = {}
        self.typedef_names = self._typedef_names()
        self.named_defs = self._named_defs()

    # -- naming -------------------------------------------------------------
    def _typedef_names(self) -> dict[int, str]:
        """Anonymous aggregate/enum id -> the single typedef naming it."""
        seen: dict[int, set[str]] = {}
        for t in self.g.types:
            if t.kind == Kind.TYPEDEF and t.type_id:
                target = self.g[t.type_id]
                if not target.name and (target.kind in _AGGREGATES or target.kind in _ENUMS):
                    seen.setdefault(t.type_id, set()).add(t.name)
        return {tid: next(iter(n)) for tid, n in seen.items() if len(n) == 1}

    def _named_defs(self) -> dict[tuple[str, str], int]:
        """(ISF kind, name) -> id of the definition to emit (the fullest)."""
        out: dict[tuple[str, str], int] = {}
        for tid, t in enumerate(self.g.types):
            if not t.name:
                continue
            if t.kind in _AGGREGATES or t.kind == Kind.FWD:
                key = ("union" if t.kind == Kind.UNION or (t.kind == Kind.FWD and t.flag) else "struct", t.name)
            elif t.kind in _ENUMS:
                key = ("enum", t.name)
            else:
                continue
            old = out.get(key)
            if old is None or self._fullness(tid) > self._fullness(old):
                out[key] = tid
        return out

    def _fullness(self, tid: int) -> tuple[int, int, int]:
        t = self.g[tid]
        return (t.kind != Kind.FWD, len(t.members) + len(t.enumerators), t.size)

    def typedef_alias(self, tid: int) -> tuple[int, str] | None:
        """(anonymous aggregate/enum id, name) when ``tid`` reaches an
        anonymous struct/union/enum through a typedef: the type is named
        after the typedef nearest to it, as dwarf2json names it from DWARF.
        BTF deduplicates identical anonymous types (``kuid_t`` and
        ``vfsuid_t`` share one), so the name comes from the reference, not
        from the type. None when the name is taken by a named type or by a
        different layout."""
        g, alias, seen = self.g, None, 0
        while tid and g[tid].kind in QUALIFIERS and seen < 64:
            if g[tid].kind == Kind.TYPEDEF:
                alias = g[tid].name
            tid, seen = g[tid].type_id, seen + 1
        t = g[tid]
        if not alias or t.name or not (t.kind in _AGGREGATES or t.kind in _ENUMS):
            return None
        key = (self._kind_word(t), alias)
        if key in self.named_defs:
            return None
        layout = self._layout_hash(tid)
        if self.alias_layouts.setdefault(key, layout) != layout:
            return None
        return tid, alias

    def type_name(self, tid: int) -> str:
        """ISF name of a struct/union/enum/fwd type id."""
        got = self.names.get(tid)
        if got is not None:
            return got
        t = self.g[tid]
        kind_word = self._kind_word(t)
        if t.name:
            name = t.name
        else:
            alias = self.typedef_names.get(tid)
            taken = (kind_word, alias) in self.named_defs if alias else True
            if alias and not taken and alias not in self.user_types and alias not in self.enums:
                name = alias
            else:
                name = f"unnamed_{kind_word}_{self._layout_hash(tid)}"
        self.names[tid] = name
        return name

    @staticmethod
    def _kind_word(t: CType) -> str:
        if t.kind in _ENUMS:
            return "enum"
        if t.kind == Kind.UNION or (t.kind == Kind.FWD and t.flag):
            return "union"
        return "struct"

    def _layout_hash(self, tid: int) -> str:
        t = self.g[tid]
        if t.kind in _ENUMS:
            body: Any = [t.size, t.enumerators]
        else:
            body = [t.kind.name, t.size, self._fields(t)]
        blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    # -- descriptors ----------------------------------------------------------
    def base(self, t: CType) -> dict[str, Any]:
        name = t.name or f"int{t.size * 8}"
        if name not in self.base_types:
            if t.kind == Kind.FLOAT:
                kind, signed = "float", True
            elif t.encoding & INT_BOOL:
                kind, signed = "bool", False
            elif t.encoding & INT_CHAR or (t.size == 1 and "char" in name):
                kind, signed = "char", bool(t.encoding & INT_SIGNED)
            else:
                kind, signed = "int", bool(t.encoding & INT_SIGNED)
            self.base_types[name] = {"size": t.size, "signed": signed, "kind": kind, "endian": "little"}
        return {"kind": "base", "name": name}

    def descriptor(self, tid: int) -> dict[str, Any]:
        """ISF type descriptor of a type id."""
        got = self.desc.get(tid)
        if got is not None:
            return got
        orig = tid
        alias = self.typedef_alias(tid) if tid and self.g[tid].kind in QUALIFIERS else None
        tid = self.g.strip(tid) if tid else 0
        t = self.g[tid]
        if alias is not None:
            out = {"kind": self._kind_word(t), "name": alias[1]}
            self.pending.append(alias)
        elif tid == 0:
            out: dict[str, Any] = {"kind": "base", "name": "void"}
        elif t.kind in (Kind.INT, Kind.FLOAT):
            out = self.base(t)
        elif t.kind == Kind.PTR:
            target = self.g.strip(t.type_id) if t.type_id else 0
            if target and self.g[target].kind in (Kind.FUNC_PROTO, Kind.FUNC):
                out = {"kind": "pointer", "subtype": {"kind": "function"}}
            else:
                out = {"kind": "pointer", "subtype": self.descriptor(t.type_id)}
        elif t.kind == Kind.ARRAY:
            out = {"kind": "array", "count": t.nelems, "subtype": self.descriptor(t.type_id)}
        elif t.kind in _AGGREGATES or t.kind == Kind.FWD:
            word = self._kind_word(t)
            if t.name:
                tid = self.named_defs.get((word, t.name), tid)
            out = {"kind": word, "name": self.type_name(tid)}
            self.pending.append((tid, out["name"]))
        elif t.kind in _ENUMS:
            if t.name:
                tid = self.named_defs.get(("enum", t.name), tid)
            out = {"kind": "enum", "name": self.type_name(tid)}
            self.pending.append((tid, out["name"]))
        elif t.kind in (Kind.FUNC_PROTO, Kind.FUNC):
            out = {"kind": "function"}
        elif t.kind == Kind.VAR:
            out = self.descriptor(t.type_id)
        else:  # DATASEC, DECL_TAG: no ISF meaning; treat as void
            out = {"kind": "base", "name": "void"}
        self.desc[orig] = out
        return out

    def _bitfield(self, m_type: int, bit_off: int, bits: int) -> tuple[int, dict[str, Any]]:
        """(byte offset, bitfield descriptor) for a bitfield member."""
        under = self.g.strip(m_type)
        t = self.g[under]
        inner = self.descriptor(under)
        if inner["kind"] not in ("base", "enum"):
            inner = {"kind": "base", "name": "unsigned int"}
        size = t.size if t.kind in (Kind.INT, Kind.ENUM, Kind.ENUM64) and t.size else 4
        byte_off = (bit_off // (size * 8)) * size
        pos = bit_off - byte_off * 8
        if pos + bits > size * 8:
            byte_off, pos = bit_off // 8, bit_off % 8
        return byte_off, {"kind": "bitfield", "bit_position": pos, "bit_length": bits, "type": inner}

    def _fields(self, t: CType) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for index, m in enumerate(t.members):
            bit_off, bits = m.bit_offset, m.bit_size
            under = self.g.strip(m.type_id) if m.type_id else 0
            ut = self.g[under]
            if not bits and ut.kind == Kind.INT and ut.bits and ut.bits != ut.size * 8:
                bits, bit_off = ut.bits, bit_off + ut.vlen  # pre-kind_flag BTF bitfield
            if bits:
                offset, desc = self._bitfield(m.type_id, bit_off, bits)
                field: dict[str, Any] = {"type": desc, "offset": offset}
            else:
                field = {"type": self.descriptor(m.type_id), "offset": bit_off // 8}
            name = m.name
            if not name:
                if ut.kind not in _AGGREGATES:
                    continue  # unnamed padding bitfield
                name = f"unnamed_field_{index}"
                field["anonymous"] = True
            fields[name] = field
        return fields

    def flush(self) -> None:
        """Emits every aggregate/enum referenced so far (transitively)."""
        while self.pending:
            tid, name = self.pending.pop()
            t = self.g[tid]
            if t.kind in _ENUMS:
                if name in self.done:
                    continue
                self.done.add(name)
                signed = bool(t.encoding) or any(v < 0 for _, v in t.enumerators)
                size = t.size or 4
                base_name = _ENUM_BASES.get((size, signed), "int")
                if base_name not in self.base_types:
                    self.base_types[base_name] = {"size": size, "signed": signed, "kind": "int",
                                                  "endian": "little"}
                self.enums[name] = {"size": size, "base": base_name,
                                    "constants": {k: v for k, v in t.enumerators}}
                continue
            key = "u:" + name
            if key in self.done:
                continue
            self.done.add(key)
            kind = "union" if self._kind_word(t) == "union" else "struct"
            if t.kind == Kind.FWD:
                self.user_types[name] = {"kind": kind, "size": 0, "fields": {}}
            else:
                self.user_types[name] = {"kind": kind, "size": t.size, "fields": self._fields(t)}


def build_isf(graph: TypeGraph, symbols: Mapping[str, SymbolEntry], *,
              producer_version: str = "0.1.0",
              linux_metadata: Mapping[str, Any] | None = None,
              all_types: bool = True) -> dict[str, Any]:
    """Builds the ISF dict.

    :param graph: the kernel's types.
    :param symbols: name -> :class:`SymbolEntry` (addresses are link-time).
    :param linux_metadata: ``metadata.linux`` (``symbols``/``types`` lists of
        kind/name/hash_type/hash_value items).
    :param all_types: emit every named struct/union/enum (and anonymous ones
        named by a typedef), not only those the symbols reach.
    """
    w = _Writer(graph)
    if all_types:
        for tid in sorted(w.named_defs.values()) + sorted(w.typedef_names):
            w.descriptor(tid)
        for tid, t in enumerate(graph.types):  # every typedef naming an anonymous type
            if t.kind == Kind.TYPEDEF:
                w.descriptor(tid)
        for tid, t in enumerate(graph.types):
            if t.kind in (Kind.INT, Kind.FLOAT):
                w.descriptor(tid)
    out_symbols: dict[str, dict[str, Any]] = {}
    for name, entry in symbols.items():
        sym: dict[str, Any] = {"address": entry.address}
        if entry.type_id is not None:
            sym["type"] = w.descriptor(entry.type_id)
        if entry.constant_data is not None:
            sym["constant_data"] = base64.b64encode(entry.constant_data).decode()
        out_symbols[name] = sym
    w.flush()
    linux = dict(linux_metadata or {})
    return {
        "metadata": {
            "format": ISF_FORMAT,
            "producer": {
                "name": "dwarf2json",
                "version": DWARF2JSON_COMPATIBLE,
                "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "generator": "shadowvol",
                "generator_version": producer_version,
            },
            "linux": linux,
        },
        "base_types": w.base_types,
        "user_types": w.user_types,
        "enums": w.enums,
        "symbols": out_symbols,
    }
