"""BTF parser and ISF conversion on BTF blobs built here (include/uapi/linux/btf.h)."""

from __future__ import annotations

import struct

import pytest

from shadowvol.errors import ProfileError
from shadowvol.symbols.btf import BTF_MAGIC, find_btf, parse_btf
from shadowvol.symbols.isf import SymbolEntry, build_isf
from shadowvol.symbols.typegraph import Kind

from btfgen import BTFBuilder


@pytest.fixture()
def sample() -> tuple[bytes, dict[str, int]]:
    b = BTFBuilder()
    ids: dict[str, int] = {}
    ids["uint"] = b.int_("unsigned int", 4)
    ids["char"] = b.int_("char", 1, signed=True, char=True)
    ids["long"] = b.int_("long int", 8, signed=True)
    ids["bool"] = b.int_("_Bool", 1, boolean=True)
    ids["u32"] = b.add("u32", 8, 0, ids["uint"])                 # TYPEDEF
    ids["myu32"] = b.add("myu32", 8, 0, ids["u32"])              # typedef chain
    ids["cu32"] = b.add("", 10, 0, ids["myu32"])                 # CONST
    ids["vu32"] = b.add("", 9, 0, ids["cu32"])                   # VOLATILE
    ids["arr"] = b.add("", 3, 0, 0, struct.pack("<III", ids["char"], ids["uint"], 16))
    ids["enum"] = b.add("color", 6, 2, 4, struct.pack("<Ii", b.s("RED"), 0) + struct.pack("<Ii", b.s("NEG"), -1))
    ids["enum64"] = b.add("big", 19, 1, 8, struct.pack("<III", b.s("HUGE"), 0, 1))
    ids["proto"] = b.add("", 13, 2, ids["long"], struct.pack("<II", b.s("a"), ids["uint"]) + struct.pack("<II", 0, ids["char"]))
    ids["func"] = b.add("do_thing", 12, 1, ids["proto"])
    ids["fptr"] = b.add("", 2, 0, ids["proto"])
    ids["fwd"] = b.add("opaque", 7, 0, 0)
    ids["fwdptr"] = b.add("", 2, 0, ids["fwd"])
    ids["restrict"] = b.add("", 11, 0, ids["fwdptr"])
    ids["float"] = b.add("double", 16, 0, 8)
    ids["anon_u"] = b.struct_("", 8, [("lo", ids["uint"], 0, 0), ("whole", ids["long"], 0, 0)], union=True)
    ids["task"] = b.add("task", 4, 0, 0)  # placeholder replaced below
    # struct thing { u32 a:3; u32 b:5; enum color c:4; char name[16]; union {..}; fn *cb; opaque *restrict p; }
    b.types = b.types[:-12]
    b.count -= 1
    ids["thing"] = b.struct_("thing", 48, [
        ("a", ids["vu32"], 0, 3), ("b", ids["myu32"], 3, 5), ("c", ids["enum"], 8, 4),
        ("name", ids["arr"], 32, 0), ("", ids["anon_u"], 192, 0), ("cb", ids["fptr"], 256, 0),
        ("p", ids["restrict"], 320, 0)])
    ids["tptr"] = b.add("", 2, 0, ids["thing"])
    ids["self"] = b.struct_("node", 8, [("next", b.add("", 2, 0, b.count + 2), 0, 0)])
    ids["var"] = b.add("cpu_thing", 14, 0, ids["thing"], struct.pack("<I", 1))
    ids["datasec"] = b.add(".data..percpu", 15, 1, 64, struct.pack("<III", ids["var"], 0, 48))
    ids["decl_tag"] = b.add("user", 17, 0, ids["thing"], struct.pack("<i", -1))
    ids["type_tag"] = b.add("rcu", 18, 0, ids["uint"])
    ids["anon_s"] = b.struct_("", 4, [("counter", ids["uint"], 0, 0)])
    ids["atomic_t"] = b.add("atomic_t", 8, 0, ids["anon_s"])
    return b.blob(), ids


def test_parse_all_kinds(sample: tuple[bytes, dict[str, int]]) -> None:
    blob, ids = sample
    g = parse_btf(blob)
    assert len(g) == max(ids.values()) + 1
    thing = g[ids["thing"]]
    assert thing.kind == Kind.STRUCT and thing.flag and thing.size == 48
    assert [(m.name, m.bit_offset, m.bit_size) for m in thing.members][:3] == [("a", 0, 3), ("b", 3, 5), ("c", 8, 4)]
    assert g[ids["enum"]].enumerators == [("RED", 0), ("NEG", -1)]
    assert g[ids["enum64"]].enumerators == [("HUGE", 1 << 32)]
    assert g[ids["arr"]].nelems == 16 and g[ids["arr"]].type_id == ids["char"]
    assert [m.name for m in g[ids["proto"]].members] == ["a", ""]
    assert g[ids["datasec"]].members[0].type_id == ids["var"]
    assert g[ids["decl_tag"]].vlen == -1
    assert g[ids["type_tag"]].kind == Kind.TYPE_TAG
    assert g.strip(ids["vu32"]) == ids["uint"]
    assert g.sizeof(ids["thing"]) == 48 and g.sizeof(ids["fwd"]) is None
    assert g.find_complete(Kind.STRUCT, "thing") == ids["thing"]


def test_find_btf_in_memory(sample: tuple[bytes, dict[str, int]]) -> None:
    blob, _ = sample
    memory = b"\x9f\xeb\x01junk" + b"\0" * 100 + blob + b"\xff" * 64
    pos = find_btf(memory)
    assert pos == 107
    assert len(parse_btf(memory[pos:])) == len(parse_btf(blob))


def test_big_endian_and_errors(sample: tuple[bytes, dict[str, int]]) -> None:
    with pytest.raises(ProfileError):
        parse_btf(b"\0" * 40)
    blob, _ = sample
    with pytest.raises(ProfileError):
        parse_btf(blob[:60])


def test_isf_from_btf(sample: tuple[bytes, dict[str, int]]) -> None:
    blob, ids = sample
    g = parse_btf(blob)
    isf = build_isf(g, {"cpu_thing": SymbolEntry(0x1000, ids["thing"]),
                        "thing_ptr": SymbolEntry(0x2000, ids["tptr"], b"\x01\x02")})
    fields = isf["user_types"]["thing"]["fields"]
    assert fields["a"]["type"] == {"kind": "bitfield", "bit_position": 0, "bit_length": 3,
                                   "type": {"kind": "base", "name": "unsigned int"}}
    assert fields["b"]["offset"] == 0 and fields["b"]["type"]["bit_position"] == 3
    assert fields["c"]["type"]["type"] == {"kind": "enum", "name": "color"}
    assert fields["name"] == {"offset": 4, "type": {"kind": "array", "count": 16,
                                                    "subtype": {"kind": "base", "name": "char"}}}
    assert fields["cb"]["type"] == {"kind": "pointer", "subtype": {"kind": "function"}}
    assert fields["p"]["type"] == {"kind": "pointer", "subtype": {"kind": "struct", "name": "opaque"}}
    anon = fields["unnamed_field_4"]
    assert anon["anonymous"] and anon["offset"] == 24 and anon["type"]["kind"] == "union"
    assert anon["type"]["name"].startswith("unnamed_union_")
    assert isf["user_types"][anon["type"]["name"]]["fields"]["whole"]["type"]["name"] == "long int"
    assert isf["user_types"]["opaque"] == {"kind": "struct", "size": 0, "fields": {}}
    assert isf["user_types"]["atomic_t"]["fields"]["counter"]["offset"] == 0  # typedef-named anon
    assert isf["enums"]["color"] == {"size": 4, "base": "int", "constants": {"RED": 0, "NEG": -1}}
    assert isf["base_types"]["pointer"]["size"] == 8 and isf["base_types"]["_Bool"]["kind"] == "bool"
    assert isf["symbols"]["thing_ptr"]["constant_data"] == "AQI="
    # Stable names: a second conversion names the anonymous union the same.
    again = build_isf(parse_btf(blob), {})
    assert anon["type"]["name"] in again["user_types"]


def test_isf_validates_against_volatility_schema(sample: tuple[bytes, dict[str, int]]) -> None:
    from volatility3 import schemas

    blob, ids = sample
    isf = build_isf(parse_btf(blob), {"x": SymbolEntry(1, ids["thing"])},
                    linux_metadata={"symbols": [{"kind": "symtab", "name": "t"}]})
    assert schemas.validate(isf, use_cache=False)


def test_enum_sign_from_kind_flag() -> None:
    """pahole >= 1.24 sets kind_flag on signed enums; once a blob uses the
    flag, an unflagged enum is unsigned (0xffffffff stays 4294967295)."""
    b = BTFBuilder()
    signed = b.add("hv_subnode_type", 6, 1, 4, struct.pack("<Ii", b.s("HvSubnodeInvalid"), -1), kflag=True)
    unsigned = b.add("blk_default_limits", 6, 1, 4, struct.pack("<II", b.s("BLK_SEG_BOUNDARY_MASK"), 0xFFFFFFFF))
    g = parse_btf(b.blob())
    assert g[signed].enumerators == [("HvSubnodeInvalid", -1)]
    assert g[unsigned].enumerators == [("BLK_SEG_BOUNDARY_MASK", 0xFFFFFFFF)]
    isf = build_isf(g, {})
    assert isf["enums"]["blk_default_limits"]["base"] == "unsigned int"
    assert isf["enums"]["hv_subnode_type"]["base"] == "int"
