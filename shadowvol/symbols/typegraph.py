"""A C type graph shaped like BTF (include/uapi/linux/btf.h).

BTF, DWARF and the typed-globals probe all produce this one model; the ISF
writer (:mod:`shadowvol.symbols.isf`) consumes it. Type id 0 is ``void``, as
in BTF. A graph may be extended with synthetic types (pointer to X, array of
N X) via :meth:`TypeGraph.add`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from shadowvol.errors import ProfileError

__all__ = ["Kind", "Member", "CType", "TypeGraph", "QUALIFIERS"]


class Kind(enum.IntEnum):
    """BTF_KIND_* values (include/uapi/linux/btf.h)."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


#: Kinds that only qualify or rename another type (no layout of their own).
QUALIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})

# BTF_INT_* encoding bits.
INT_SIGNED = 1
INT_CHAR = 2
INT_BOOL = 4


@dataclass(slots=True)
class Member:
    """A struct/union member (``struct btf_member``), a FUNC_PROTO parameter
    (``struct btf_param``, offsets 0) or a DATASEC entry (``struct
    btf_var_secinfo``: ``bit_offset`` holds the byte offset, ``bit_size`` the
    byte size)."""

    name: str
    type_id: int
    bit_offset: int = 0
    bit_size: int = 0  # bitfield width; 0 = not a bitfield


@dataclass(slots=True)
class CType:
    """One type. Fields not meaningful for ``kind`` keep their defaults.

    ``size``: INT/FLOAT/STRUCT/UNION/ENUM/ENUM64/DATASEC byte size.
    ``type_id``: target of PTR/TYPEDEF/qualifiers/FUNC/VAR/DECL_TAG, the
    return type of FUNC_PROTO, the element of ARRAY.
    ``encoding``: BTF_INT_* bits for INT; 1 = signed for ENUM/ENUM64.
    ``vlen``: FUNC linkage, VAR linkage, DECL_TAG component_idx.
    ``flag``: BTF kind_flag (FWD: union; STRUCT/UNION: bitfield members).
    """

    kind: Kind
    name: str = ""
    size: int = 0
    type_id: int = 0
    nelems: int = 0
    encoding: int = 0
    bits: int = 0
    vlen: int = 0
    flag: bool = False
    members: list[Member] = field(default_factory=list)
    enumerators: list[tuple[str, int]] = field(default_factory=list)


class TypeGraph:
    """Types indexed by id (0 = void), with name lookups built on demand."""

    def __init__(self, types: list[CType] | None = None) -> None:
        self.types: list[CType] = types if types is not None else [CType(Kind.UNKN, "void")]
        self._by_name: dict[tuple[Kind, str], list[int]] | None = None
        self._pointer_index: dict[int, list[int]] | None = None
        #: For BTF graphs: string-section length and lookup (split BTF builds on them).
        self.btf_str_len = 0
        self.btf_name_at: Callable[[int], str] | None = None

    def __len__(self) -> int:
        return len(self.types)

    def __getitem__(self, type_id: int) -> CType:
        return self.types[type_id]

    def add(self, ctype: CType) -> int:
        """Appends a type and returns its id."""
        self.types.append(ctype)
        if self._by_name is not None and ctype.name:
            self._by_name.setdefault((ctype.kind, ctype.name), []).append(len(self.types) - 1)
        return len(self.types) - 1

    def find(self, kind: Kind, name: str) -> list[int]:
        """Ids of the types of ``kind`` called ``name``."""
        if self._by_name is None:
            index: dict[tuple[Kind, str], list[int]] = {}
            for tid, t in enumerate(self.types):
                if t.name:
                    index.setdefault((t.kind, t.name), []).append(tid)
            self._by_name = index
        return self._by_name.get((kind, name), [])

    def find_complete(self, kind: Kind, name: str) -> int | None:
        """The id of the fullest definition of ``kind name`` (most members)."""
        ids = self.find(kind, name)
        if not ids:
            return None
        return max(ids, key=lambda i: (len(self.types[i].members) or len(self.types[i].enumerators),
                                       self.types[i].size, -i))

    def strip(self, type_id: int) -> int:
        """Follows typedefs and qualifiers down to a type with a layout."""
        seen = 0
        while self.types[type_id].kind in QUALIFIERS:
            type_id = self.types[type_id].type_id
            seen += 1
            if seen > 64:
                raise ProfileError(f"qualifier loop at type {type_id}")
        return type_id

    def sizeof(self, type_id: int) -> int | None:
        """Byte size of a type, or None for void, functions and forward
        declarations."""
        count = 1
        for _ in range(64):  # iterative: nested arrays, bounded against loops
            t = self.types[self.strip(type_id)]
            if t.kind == Kind.ARRAY:
                count *= t.nelems
                type_id = t.type_id
                continue
            if t.kind == Kind.PTR:
                return 8 * count
            if t.kind in (Kind.INT, Kind.FLOAT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64,
                          Kind.DATASEC):
                return t.size * count
            return None
        raise ProfileError(f"array nesting too deep (or a loop) at type {type_id}")

    def pointer_to(self, type_id: int) -> int:
        """Id of a ``PTR`` to ``type_id`` (reused if one exists)."""
        index = self._pointers()
        if type_id in index:
            return index[type_id][0]
        tid = self.add(CType(Kind.PTR, type_id=type_id))
        index[type_id] = [tid]
        return tid

    def array_of(self, type_id: int, nelems: int) -> int:
        """Id of a new ``ARRAY`` of ``nelems`` x ``type_id``."""
        return self.add(CType(Kind.ARRAY, type_id=type_id, nelems=nelems))

    def _pointers(self) -> dict[int, list[int]]:
        if self._pointer_index is None:
            index: dict[int, list[int]] = {}
            for tid, t in enumerate(self.types):
                if t.kind == Kind.PTR:
                    index.setdefault(t.type_id, []).append(tid)
            self._pointer_index = index
        return self._pointer_index

    def describe(self, type_id: int, _depth: int = 0) -> str:
        """A C-like spelling of a type, for messages (at most 32 levels deep)."""
        if _depth > 32:
            return "..."
        describe = lambda tid: self.describe(tid, _depth + 1)  # noqa: E731
        t = self.types[type_id]
        if type_id == 0:
            return "void"
        if t.kind == Kind.PTR:
            return describe(t.type_id) + " *"
        if t.kind == Kind.ARRAY:
            return f"{describe(t.type_id)}[{t.nelems}]"
        if t.kind in (Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64):
            word = {Kind.STRUCT: "struct", Kind.UNION: "union"}.get(t.kind, "enum")
            return f"{word} {t.name or '<anon>'}"
        if t.kind in (Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.TYPE_TAG):
            return f"{t.kind.name.lower()} {describe(t.type_id)}"
        if t.kind == Kind.FUNC_PROTO:
            return f"{describe(t.type_id)} (*)(...)"
        return t.name or t.kind.name.lower()
