"""DWARF import on a small C object built with gcc -g."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from shadowvol.symbols.dwarf import graph_from_dwarf, open_elf
from shadowvol.symbols.isf import SymbolEntry, build_isf

SOURCE = r"""
enum color { RED, GREEN = 5 };
typedef unsigned int u32;
struct inner { long x; };
struct thing {
    u32 a:3, b:5;
    enum color c:4;
    char name[16];
    union { int i; struct inner in; };
    int (*cb)(int);
    struct thing *next;
    const volatile struct inner arr[2][3];
};
struct thing global_thing;
int counters[7];
"""


@pytest.fixture(scope="module")
def obj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("gcc"), "gcc not installed (scripts/setup installs it)"
    d = tmp_path_factory.mktemp("dwarf")
    (d / "t.c").write_text(SOURCE)
    subprocess.run(["gcc", "-g", "-c", "-O0", "t.c", "-o", "t.o"], cwd=d, check=True)
    return d / "t.o"


def test_dwarf_types_to_isf(obj: Path) -> None:
    graph, variables = graph_from_dwarf(open_elf(obj))
    isf = build_isf(graph, {"global_thing": SymbolEntry(0x1000, variables["global_thing"]),
                            "counters": SymbolEntry(0x2000, variables["counters"])})
    fields = isf["user_types"]["thing"]["fields"]
    assert fields["a"]["type"] == {"kind": "bitfield", "bit_position": 0, "bit_length": 3,
                                   "type": {"kind": "base", "name": "unsigned int"}}
    assert fields["b"]["type"]["bit_position"] == 3
    assert fields["c"]["type"]["type"] == {"kind": "enum", "name": "color"}
    assert fields["name"]["offset"] == 2  # a, b in byte 0; c in byte 1
    anon = next(v for k, v in fields.items() if k.startswith("unnamed_field_"))
    assert anon["anonymous"] and anon["offset"] == 24
    assert fields["cb"]["type"] == {"kind": "pointer", "subtype": {"kind": "function"}}
    assert fields["next"]["type"]["subtype"] == {"kind": "struct", "name": "thing"}
    arr = fields["arr"]["type"]
    assert arr["count"] == 2 and arr["subtype"]["count"] == 3
    assert isf["enums"]["color"]["constants"] == {"RED": 0, "GREEN": 5}
    assert isf["symbols"]["counters"]["type"]["count"] == 7
    assert isf["user_types"]["thing"]["size"] == 96


# Two units linked into an executable with --emit-relocs, as a vmlinux is:
# its .rela.debug_* sections must not be applied again.
UNIT_A = r"""
typedef struct { unsigned int val; } kuid_t;
enum fwd_only;
enum fwd_later;
struct shared { int a; kuid_t uid; struct shared *next; };
struct holder { enum fwd_only *only; enum fwd_later *later; };
struct holder holder;
extern int table[];
struct shared shared_a;
kuid_t root_uid;
int main(void) {
    struct local_only { long x; } l = { 1 };
    static int counter_in_function;
    { struct in_block { char c; } b = { 2 }; (void)b; }
    return (int)l.x + counter_in_function + table[0];
}
"""
UNIT_B = r"""
struct shared { int a; struct { unsigned int val; } uid; struct shared *next; };
int table[5] = { 1, 2, 3, 4, 5 };
enum fwd_later { LATER = 3 };
enum fwd_later later_var = LATER;
struct shared shared_b;
"""


@pytest.fixture(scope="module")
def prog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("gcc"), "gcc not installed (scripts/setup installs it)"
    d = tmp_path_factory.mktemp("dwarf2")
    (d / "a.c").write_text(UNIT_A)
    (d / "b.c").write_text(UNIT_B)
    subprocess.run(["gcc", "-g", "-O0", "-no-pie", "-fno-pie", "-Wl,--emit-relocs", "a.c", "b.c",
                    "-o", "prog"], cwd=d, check=True)
    return d / "prog"


def test_linked_units_merge_and_skip_bodies(prog: Path) -> None:
    from shadowvol.symbols.dwarf import elf_symbols
    from shadowvol.symbols.typegraph import Kind

    elf = open_elf(prog)
    assert elf["e_type"] == "ET_EXEC" and elf.get_section_by_name(".rela.debug_info") is not None
    graph, variables = graph_from_dwarf(elf)
    # Named types merged by name: one struct shared for both units.
    assert len(graph.find(Kind.STRUCT, "shared")) == 1
    # Function bodies are never parsed.
    assert not graph.find(Kind.STRUCT, "local_only") and not graph.find(Kind.STRUCT, "in_block")
    assert "counter_in_function" not in variables
    # The definition (b.c, 5 elements) beats the extern declaration (a.c, no bound).
    syms = {s.name: s.address for s in elf_symbols(elf)}
    entries = {n: SymbolEntry(syms[n], variables[n])
               for n in ("table", "shared_a", "shared_b", "root_uid", "holder", "later_var")}
    isf = build_isf(graph, entries)
    assert isf["symbols"]["table"]["type"] == {"kind": "array", "count": 5,
                                               "subtype": {"kind": "base", "name": "int"}}
    # An anonymous struct is named after its typedef, as dwarf2json names it.
    assert isf["symbols"]["root_uid"]["type"] == {"kind": "struct", "name": "kuid_t"}
    assert isf["user_types"]["shared"]["fields"]["uid"]["type"] == {"kind": "struct", "name": "kuid_t"}
    assert isf["user_types"]["kuid_t"]["size"] == 4
    # Addresses from .symtab, types right: the relocated DWARF was read as linked.
    assert syms["shared_a"] != syms["shared_b"]
    assert isf["symbols"]["shared_b"]["type"] == {"kind": "struct", "name": "shared"}
    # A declared-only enum stays an enum; a later definition wins.
    assert isf["enums"]["fwd_only"]["constants"] == {} and "fwd_only" not in isf["user_types"]
    assert isf["enums"]["fwd_later"]["constants"] == {"LATER": 3}
    assert isf["user_types"]["holder"]["fields"]["later"]["type"] == {
        "kind": "pointer", "subtype": {"kind": "enum", "name": "fwd_later"}}
    producer = isf["metadata"]["producer"]
    assert producer["name"] == "dwarf2json" and producer["generator"] == "shadowvol"


def test_typedef_names_survive_btf_style_dedup() -> None:
    """BTF shares one anonymous struct between identical typedefs (kuid_t,
    vfsuid_t); each reference is named after the typedef it goes through."""
    from shadowvol.symbols.typegraph import CType, Kind, Member, TypeGraph

    g = TypeGraph()
    uint = g.add(CType(Kind.INT, "unsigned int", size=4, bits=32))
    anon = g.add(CType(Kind.STRUCT, "", size=4, members=[Member("val", uint)]))
    kuid = g.add(CType(Kind.TYPEDEF, "kuid_t", type_id=anon))
    vfsuid = g.add(CType(Kind.TYPEDEF, "vfsuid_t", type_id=anon))
    const_kuid = g.add(CType(Kind.CONST, type_id=kuid))
    cred = g.add(CType(Kind.STRUCT, "cred", size=12, members=[
        Member("uid", kuid, 0), Member("fsuid", const_kuid, 32), Member("vuid", vfsuid, 64)]))
    isf = build_isf(g, {"init_cred": SymbolEntry(0x1000, cred)})
    fields = isf["user_types"]["cred"]["fields"]
    assert fields["uid"]["type"] == {"kind": "struct", "name": "kuid_t"}
    assert fields["fsuid"]["type"] == {"kind": "struct", "name": "kuid_t"}
    assert fields["vuid"]["type"] == {"kind": "struct", "name": "vfsuid_t"}
    assert isf["user_types"]["kuid_t"] == isf["user_types"]["vfsuid_t"]
