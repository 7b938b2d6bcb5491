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
