"""DWARF (via pyelftools) -> :class:`TypeGraph`, plus variables and symbols.

Used two ways:

- ``--vmlinux`` with debug info: every type of every compile unit is
  imported into a fresh graph (named aggregates, enums and typedefs are
  merged by name, as dwarf2json does), and the ELF ``.symtab`` gives symbols.
- The typed-globals probe (:mod:`shadowvol.symbols.globals`): types of a
  small object file are imported *onto* the BTF graph, reusing BTF types of
  the same name, so a variable's declared C type becomes a BTF type id.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shadowvol.errors import ProfileError
from shadowvol.symbols.kallsyms import Symbol
from shadowvol.symbols.typegraph import INT_BOOL, INT_CHAR, INT_SIGNED, CType, Kind, Member, TypeGraph

__all__ = ["DwarfImporter", "die_name", "strip_qualifiers", "open_elf", "dwarf_info", "iter_variables",
           "elf_symbols", "graph_from_dwarf"]

# DW_ATE_* base type encodings.
_ATE_BOOLEAN = 0x02
_ATE_FLOAT = 0x04
_ATE_SIGNED = 0x05
_ATE_SIGNED_CHAR = 0x06
_ATE_UNSIGNED_CHAR = 0x08

_QUAL_TAGS = {
    "DW_TAG_const_type": Kind.CONST,
    "DW_TAG_volatile_type": Kind.VOLATILE,
    "DW_TAG_restrict_type": Kind.RESTRICT,
    "DW_TAG_atomic_type": Kind.VOLATILE,
}
#: Aggregate type tags and the kind each becomes (a C++ class is a struct).
_AGGREGATE_KINDS = {
    "DW_TAG_structure_type": Kind.STRUCT,
    "DW_TAG_class_type": Kind.STRUCT,
    "DW_TAG_union_type": Kind.UNION,
    "DW_TAG_enumeration_type": Kind.ENUM,
}


def open_elf(source: Path | bytes) -> Any:
    """An ``ELFFile`` over a path or bytes (the file is read into memory)."""
    from elftools.elf.elffile import ELFFile

    data = source if isinstance(source, (bytes, bytearray)) else Path(source).read_bytes()
    return ELFFile(io.BytesIO(data))


def _attr(die: Any, name: str, default: Any = None) -> Any:
    a = die.attributes.get(name)
    return default if a is None else a.value


def die_name(die: Any) -> str:
    """DW_AT_name of a DIE as str ("" when absent)."""
    value = _attr(die, "DW_AT_name")
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else (value or "")


def _member_location(die: Any) -> int:
    """DW_AT_data_member_location as a byte offset (constant or the usual
    ``DW_OP_plus_uconst N`` expression)."""
    value = _attr(die, "DW_AT_data_member_location", 0)
    if isinstance(value, list):  # expression: [0x23 (plus_uconst), uleb...]
        if value and value[0] == 0x23:
            result, shift = 0, 0
            for byte in value[1:]:
                result |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            return result
        return 0
    return int(value)


class DwarfImporter:
    """Imports DWARF type DIEs into a :class:`TypeGraph`.

    :param graph: destination graph (may already hold BTF types).
    :param reuse_named: map named structs/unions/enums/typedefs/base types
        onto types of the same name already in ``graph``, when present.
    """

    def __init__(self, graph: TypeGraph, reuse_named: bool = True) -> None:
        self.graph = graph
        self.reuse_named = reuse_named
        self._done: dict[tuple[int, int], int] = {}  # (cu offset, die offset) -> id
        self._enum_decls: set[int] = set()  # ids of enums known from a declaration only

    def forget_unit(self) -> None:
        """Forgets DIE offsets already imported (call between compile units:
        references are unit-local, and named types are found again by name)."""
        self._done.clear()

    def _existing(self, kind: Kind, name: str) -> int | None:
        if not (self.reuse_named and name):
            return None
        if kind in (Kind.STRUCT, Kind.UNION, Kind.ENUM):
            best = self.graph.find_complete(kind, name)
            if best is None and kind == Kind.ENUM:
                best = self.graph.find_complete(Kind.ENUM64, name)
            if best is not None:
                return best
            fwd = self.graph.find(Kind.FWD, name)
            return fwd[0] if fwd else None
        ids = self.graph.find(kind, name)
        return ids[0] if ids else None

    def import_type(self, die: Any | None, array_count: Callable[[int], int] | None = None) -> int:
        """Graph id of the type ``die`` describes (None -> void).

        :param array_count: for an outermost array without bounds, computes
            the count from the element size (e.g. from a symbol's size).
        """
        if die is None:
            return 0
        key = (die.cu.cu_offset, die.offset)
        got = self._done.get(key)
        if got is not None:
            return got
        tag = die.tag
        if tag == "DW_TAG_base_type":
            return self._import_base(die, key)
        if tag in _AGGREGATE_KINDS:
            return self._import_aggregate(die, key, _AGGREGATE_KINDS[tag])
        if tag == "DW_TAG_typedef":
            found = self._existing(Kind.TYPEDEF, die_name(die))
            if found is not None:
                self._done[key] = found
                return found
            t = CType(Kind.TYPEDEF, die_name(die))
            tid = self._done[key] = self.graph.add(t)
            t.type_id = self._import_ref(die)
            return tid
        if tag == "DW_TAG_pointer_type" or tag == "DW_TAG_reference_type":
            tid = self._done[key] = self.graph.pointer_to(self._import_ref(die))
            return tid
        if tag in _QUAL_TAGS:
            tid = self._done[key] = self._import_ref(die)  # ISF has no qualifiers: look through
            return tid
        if tag == "DW_TAG_array_type":
            return self._import_array(die, key, array_count)
        if tag == "DW_TAG_subroutine_type":
            t = CType(Kind.FUNC_PROTO, type_id=self._import_ref(die))
            tid = self._done[key] = self.graph.add(t)
            for child in die.iter_children():
                if child.tag == "DW_TAG_formal_parameter":
                    t.members.append(Member(die_name(child), self._import_ref(child)))
            return tid
        if tag == "DW_TAG_unspecified_type":
            return 0
        raise ProfileError(f"unsupported DWARF type tag {tag} at {die.offset:#x}")

    def _import_base(self, die: Any, key: tuple[int, int]) -> int:
        """``DW_TAG_base_type``: an integer, char, bool or float (one per name)."""
        name = die_name(die)
        enc = _attr(die, "DW_AT_encoding", 0)
        size = _attr(die, "DW_AT_byte_size", 0)
        kind = Kind.FLOAT if enc == _ATE_FLOAT else Kind.INT
        found = self._existing(kind, name)
        if found is not None:
            self._done[key] = found
            return found
        flags = 0
        if enc in (_ATE_SIGNED, _ATE_SIGNED_CHAR):
            flags |= INT_SIGNED
        if enc in (_ATE_SIGNED_CHAR, _ATE_UNSIGNED_CHAR):
            flags |= INT_CHAR
        if enc == _ATE_BOOLEAN:
            flags |= INT_BOOL
        tid = self._done[key] = self.graph.add(CType(kind, name, size=size, encoding=flags, bits=size * 8))
        return tid

    def _import_aggregate(self, die: Any, key: tuple[int, int], kind: Kind) -> int:
        """A struct, union, class or enum: declarations, then the definition and its members."""
        g = self.graph
        name = die_name(die)
        declaration = bool(_attr(die, "DW_AT_declaration", False))
        found = self._existing(kind, name)
        if found is not None and (declaration or (g[found].kind != Kind.FWD and found not in self._enum_decls)):
            self._done[key] = found
            return found
        if declaration and kind == Kind.ENUM:
            # A declared-only enum (GNU C forward enum) is still an enum,
            # int-sized, without constants; a later definition replaces it.
            tid = self._done[key] = g.add(CType(Kind.ENUM, name, size=_attr(die, "DW_AT_byte_size", 0) or 4))
            self._enum_decls.add(tid)
            return tid
        if declaration:
            tid = self._done[key] = g.add(CType(Kind.FWD, name, flag=kind == Kind.UNION))
            return tid
        t = CType(kind, name, size=_attr(die, "DW_AT_byte_size", 0))
        tid = self._done[key] = g.add(t)  # before members: self-references
        if kind == Kind.ENUM:
            for child in die.iter_children():
                if child.tag == "DW_TAG_enumerator":
                    t.enumerators.append((die_name(child), int(_attr(child, "DW_AT_const_value", 0))))
            t.encoding = int(any(v < 0 for _, v in t.enumerators))
            return tid
        for child in die.iter_children():
            if child.tag == "DW_TAG_member":
                self._import_member(t, child)
        return tid

    def _import_member(self, t: CType, child: Any) -> None:
        """A ``DW_TAG_member`` of ``t``, with its bit offset (DWARF 4+ or DWARF 2/3 bitfields)."""
        m_type = self.import_type(child.get_DIE_from_attribute("DW_AT_type")
                                  if "DW_AT_type" in child.attributes else None)
        bit_size = _attr(child, "DW_AT_bit_size", 0)
        if "DW_AT_data_bit_offset" in child.attributes:
            bit_off = _attr(child, "DW_AT_data_bit_offset")
        elif bit_size and "DW_AT_bit_offset" in child.attributes:
            # DWARF 2/3: offset of the MSB within the storage unit.
            unit = _attr(child, "DW_AT_byte_size") or (self.graph.sizeof(m_type) or 4)
            bit_off = (_member_location(child) * 8 + unit * 8
                       - _attr(child, "DW_AT_bit_offset") - bit_size)
        else:
            bit_off = _member_location(child) * 8
        t.members.append(Member(die_name(child), m_type, bit_off, bit_size))
        if bit_size:
            t.flag = True

    def _import_array(self, die: Any, key: tuple[int, int], array_count: Callable[[int], int] | None) -> int:
        """``DW_TAG_array_type``: nested arrays, one per subrange; an unbounded outermost one
        sized by ``array_count`` (not cached: its count depends on the symbol)."""
        g = self.graph
        elem = self._import_ref(die)
        counts = []
        for child in die.iter_children():
            if child.tag == "DW_TAG_subrange_type":
                if "DW_AT_count" in child.attributes:
                    counts.append(int(_attr(child, "DW_AT_count")))
                elif "DW_AT_upper_bound" in child.attributes and isinstance(
                        _attr(child, "DW_AT_upper_bound"), int):
                    counts.append(int(_attr(child, "DW_AT_upper_bound")) + 1)
                else:
                    counts.append(-1)
        if not counts:
            counts = [-1]
        tid = elem
        for i, count in enumerate(reversed(counts)):
            if count < 0:
                outer = i == len(counts) - 1
                elem_size = g.sizeof(tid) or 0
                count = array_count(elem_size) if (outer and array_count and elem_size) else 0
            tid = g.array_of(tid, count)
        if -1 not in counts:
            self._done[key] = tid
        return tid

    def _import_ref(self, die: Any) -> int:
        if "DW_AT_type" not in die.attributes:
            return 0
        return self.import_type(die.get_DIE_from_attribute("DW_AT_type"))


def strip_qualifiers(die: Any) -> Any:
    """Follows const/volatile/restrict/atomic DIEs to the qualified type."""
    while die.tag in _QUAL_TAGS and "DW_AT_type" in die.attributes:
        die = die.get_DIE_from_attribute("DW_AT_type")
    return die


def dwarf_info(elf: Any) -> Any:
    """The ``DWARFInfo`` of an ELF file.

    Relocations are applied only to relocatable objects (``ET_REL``, such as
    the probe's ``.o``). A linked vmlinux built with ``--emit-relocs`` still
    carries ``.rela.debug_*`` sections (255 MB of them on 6.1): the linker has
    already applied them, and pyelftools would spend minutes re-applying them.
    """
    if not elf.has_dwarf_info():
        raise ProfileError("the ELF file has no DWARF debug info")
    return elf.get_dwarf_info(relocate_dwarf_sections=elf["e_type"] == "ET_REL")


def iter_variables(elf: Any) -> Iterator[Any]:
    """Top-level ``DW_TAG_variable`` DIEs of every compile unit."""
    for cu in dwarf_info(elf).iter_CUs():
        for die in cu.get_top_DIE().iter_children():
            if die.tag == "DW_TAG_variable":
                yield die


def elf_symbols(elf: Any) -> list[Symbol]:
    """Symbols of the ELF ``.symtab`` with ``nm``-like type letters."""
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        return []
    sections = list(elf.iter_sections())
    out = []
    for sym in symtab.iter_symbols():
        info = sym["st_info"]
        if not sym.name or info["type"] in ("STT_FILE", "STT_SECTION"):
            continue
        shndx = sym["st_shndx"]
        if shndx == "SHN_ABS":
            letter = "a"
        elif isinstance(shndx, int) and shndx < len(sections):
            sec = sections[shndx]
            flags = sec["sh_flags"]
            if flags & 0x4:
                letter = "t"
            elif sec["sh_type"] == "SHT_NOBITS":
                letter = "b"
            elif flags & 0x1:
                letter = "d"
            else:
                letter = "r"
        else:
            continue
        if info["bind"] in ("STB_GLOBAL", "STB_WEAK"):
            letter = letter.upper()
        out.append(Symbol(sym.name, sym["st_value"], letter))
    return out


#: Top-level DIEs that define types a profile keeps.
_TYPE_TAGS = frozenset({"DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_enumeration_type",
                        "DW_TAG_typedef", "DW_TAG_base_type"})
_LANG_RUST = 0x1C  # DW_LANG_Rust: skipped, as dwarf2json 0.9.0 does (type confusion)


def _drop_die_cache(cu: Any) -> None:
    """Frees the DIEs pyelftools cached for one compile unit (it keeps every
    DIE it ever parsed; on a kernel that is gigabytes)."""
    if hasattr(cu, "_dielist") and hasattr(cu, "_diemap"):
        cu._dielist = []
        cu._diemap = []


def graph_from_dwarf(elf: Any, progress: Callable[[str], None] | None = None
                     ) -> tuple[TypeGraph, dict[str, int]]:
    """Imports the types of an ELF's DWARF into a new graph, and returns the
    declared type of each global variable by name.

    Only what a profile needs is parsed: the top-level DIEs of each compile
    unit (``iter_children`` jumps over function bodies, lexical blocks,
    inlined subroutines and call sites through ``DW_AT_sibling``), and the
    types they reference. Named structs, unions, enums and typedefs are
    merged by name as dwarf2json does, so a struct defined again in a later
    unit is recognised from its DIE alone and its members are skipped.
    A variable's definition beats an ``extern`` declaration (which may lack
    an array bound).
    """
    graph = TypeGraph()
    importer = DwarfImporter(graph, reuse_named=True)
    variables: dict[str, int] = {}
    from_declaration: set[str] = set()
    dwarf = dwarf_info(elf)
    total = max(1, dwarf.debug_info_sec.size)
    for index, cu in enumerate(dwarf.iter_CUs()):
        if progress is not None and index % 200 == 0:
            progress(f"DWARF: unit {index}, {100 * cu.cu_offset // total}% of .debug_info, "
                     f"{len(graph)} types")
        top = cu.get_top_DIE()
        if _attr(top, "DW_AT_language") == _LANG_RUST:
            _drop_die_cache(cu)
            continue
        for die in top.iter_children():
            tag = die.tag
            if tag in _TYPE_TAGS:
                importer.import_type(die)
            elif tag == "DW_TAG_variable":
                name = die_name(die)
                spec = die
                if "DW_AT_specification" in die.attributes:
                    spec = die.get_DIE_from_attribute("DW_AT_specification")
                    name = name or die_name(spec)
                typed = die if "DW_AT_type" in die.attributes else spec
                if not name or "DW_AT_type" not in typed.attributes:
                    continue
                declaration = bool(_attr(die, "DW_AT_declaration", False))
                if name in variables and (declaration or name not in from_declaration):
                    continue
                variables[name] = importer.import_type(typed.get_DIE_from_attribute("DW_AT_type"))
                if declaration:
                    from_declaration.add(name)
                else:
                    from_declaration.discard(name)
        importer.forget_unit()
        _drop_die_cache(cu)
    return graph, variables
