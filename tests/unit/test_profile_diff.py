"""shadowvol profile diff on small synthetic ISF dicts."""

from __future__ import annotations

import copy
import json
import lzma
from pathlib import Path
from typing import Any

import pytest

from shadowvol import cli
from shadowvol.symbols import diff


def base_isf() -> dict[str, Any]:
    """A tiny ISF: task_struct with an anonymous union, a typed init_task."""
    return {
        "metadata": {"format": "6.2.0", "producer": {"name": "dwarf2json", "version": "0.9.0"}},
        "base_types": {
            "int": {"size": 4, "signed": True, "kind": "int", "endian": "little"},
            "char": {"size": 1, "signed": True, "kind": "char", "endian": "little"},
            "pointer": {"size": 8, "signed": False, "kind": "int", "endian": "little"},
        },
        "user_types": {
            "list_head": {"kind": "struct", "size": 16, "fields": {
                "next": {"offset": 0, "type": {"kind": "pointer", "subtype": {"kind": "struct", "name": "list_head"}}},
                "prev": {"offset": 8, "type": {"kind": "pointer", "subtype": {"kind": "struct", "name": "list_head"}}},
            }},
            "task_struct": {"kind": "struct", "size": 64, "fields": {
                "pid": {"offset": 0, "type": {"kind": "base", "name": "int"}},
                "tasks": {"offset": 8, "type": {"kind": "struct", "name": "list_head"}},
                "unnamed_field_2": {"offset": 24, "anonymous": True,
                                    "type": {"kind": "union", "name": "unnamed_1a2b"}},
                "comm": {"offset": 32, "type": {"kind": "array", "count": 16,
                                                "subtype": {"kind": "base", "name": "char"}}},
            }},
            "unnamed_1a2b": {"kind": "union", "size": 8, "fields": {
                "flags": {"offset": 0, "type": {"kind": "base", "name": "int"}},
                "ptr": {"offset": 0, "type": {"kind": "pointer", "subtype": {"kind": "function"}}},
            }},
        },
        "enums": {"pid_type": {"size": 4, "base": "int", "constants": {"PIDTYPE_PID": 0, "PIDTYPE_TGID": 1}}},
        "symbols": {
            "init_task": {"address": 0xFFFFFFFF82A0C940, "type": {"kind": "struct", "name": "task_struct"}},
            "modules": {"address": 0xFFFFFFFF82B1D8A0, "type": {"kind": "struct", "name": "list_head"}},
            "_text": {"address": 0xFFFFFFFF81000000},
        },
    }


def renamed_anonymous(isf: dict[str, Any]) -> dict[str, Any]:
    """The same content as another producer names it: anonymous type and
    anonymous member names differ."""
    out = copy.deepcopy(isf)
    ut = out["user_types"]
    ut["unnamed_union_ffee"] = ut.pop("unnamed_1a2b")
    fields = ut["task_struct"]["fields"]
    anon = fields.pop("unnamed_field_2")
    anon["type"]["name"] = "unnamed_union_ffee"
    fields["unnamed_field_0"] = anon
    return out


def test_identical_modulo_anonymous_names() -> None:
    a = base_isf()
    d = diff.diff_profiles(a, renamed_anonymous(a))
    assert d.failures == 0
    assert d.counts["types"].identical == 2  # anonymous types are not listed by name
    assert d.counts["fields"].identical == 2 + 5  # flattened: flags, ptr in task_struct
    assert d.counts["symbols"].identical == 3


def test_field_offset_and_shape_differences() -> None:
    a, b = base_isf(), base_isf()
    b["user_types"]["task_struct"]["fields"]["pid"]["offset"] = 4
    b["user_types"]["task_struct"]["fields"]["comm"]["type"]["count"] = 32
    b["user_types"]["unnamed_1a2b"]["fields"]["flags"]["type"] = {"kind": "base", "name": "char"}
    d = diff.diff_profiles(a, b)
    bad = dict(d.details["fields_differing"])
    assert bad["task_struct.pid"] == "offset 0 vs 4"
    assert "char[16] vs char[32]" in bad["task_struct.comm"]
    assert "int vs char" in bad["task_struct.flags"]  # reached through the anonymous union
    assert d.counts["types"].differing == 1 and d.failures > 0


def test_symbols_extras_in_b_are_not_failures() -> None:
    a, b = base_isf(), base_isf()
    b["symbols"]["prb"] = {"address": 0xFFFFFFFF83000000}
    b["symbols"]["_text"]["type"] = {"kind": "array", "count": 0, "subtype": {"kind": "base", "name": "char"}}
    b["user_types"]["extra_only_b"] = {"kind": "struct", "size": 0, "fields": {}}
    d = diff.diff_profiles(a, b)
    assert d.failures == 0
    assert d.counts["symbols"].only_b == 1 and d.counts["types"].only_b == 1
    assert [n for n, _ in d.details["symbols_typed_only_in_b"]] == ["_text"]


def test_symbols_missing_untyped_or_moved_in_b_fail() -> None:
    a, b = base_isf(), base_isf()
    del b["symbols"]["modules"]
    del b["symbols"]["init_task"]["type"]
    b["symbols"]["_text"]["address"] += 0x1000
    d = diff.diff_profiles(a, b)
    assert d.counts["symbols"].only_a == 1 and d.counts["symbols"].differing == 2
    details = dict(d.details["symbols_differing"])
    assert details["init_task"].startswith("untyped in B")
    assert details["_text"].startswith("address")
    assert d.failures == 3


def test_enum_differences_and_restriction() -> None:
    a, b = base_isf(), base_isf()
    b["enums"]["pid_type"]["constants"]["PIDTYPE_TGID"] = 2
    b["user_types"]["task_struct"]["size"] = 72
    assert diff.diff_profiles(a, b).counts["enums"].differing == 1
    only = ({"list_head"}, {"modules"})
    d = diff.diff_profiles(a, b, only=only)
    assert d.failures == 0 and d.restricted
    assert d.counts["types"].identical == 1 and d.counts["symbols"].identical == 1


def test_stock_references_scan(tmp_path: Path) -> None:
    plugins = tmp_path / "framework" / "plugins" / "linux"
    plugins.mkdir(parents=True)
    (tmp_path / "framework" / "symbols" / "linux").mkdir(parents=True)
    (plugins / "p.py").write_text(
        "from volatility3.framework import constants\n"
        "def run(vmlinux, table):\n"
        "    vmlinux.object_from_symbol(symbol_name='init_task')\n"
        "    vmlinux.get_type('struct module')\n"
        "    vmlinux.object(object_type='list_head', offset=0)\n"
        "    vmlinux.get_symbol(table + constants.BANG + 'modules')\n"
        "    x = table + constants.BANG + 'tracepoint'\n"
        "    y = f'{table}{constants.BANG}ftrace_ops'\n"
        "    for s in ['raw_seq_ops', 'tcp4_seq_ops']:\n"
        "        vmlinux.object_from_symbol(s)\n")
    syms, types, listed = diff.stock_references(tmp_path)
    assert syms == {"init_task", "modules"}
    assert types == {"module", "list_head", "tracepoint", "ftrace_ops"}
    assert listed == {"raw_seq_ops", "tcp4_seq_ops"}
    a = base_isf()
    a["symbols"]["raw_seq_ops"] = {"address": 1, "type": {"kind": "struct", "name": "seq_operations"}}
    scope_types, scope_syms = diff.stock_scope(a, a, tmp_path)
    assert scope_syms == {"init_task", "modules", "raw_seq_ops"}  # listed names: only symbols
    assert {"task_struct", "seq_operations", "list_head"} <= scope_types


def write(path: Path, isf: dict[str, Any]) -> Path:
    data = json.dumps(isf).encode()
    path.write_bytes(lzma.compress(data) if path.suffix == ".xz" else data)
    return path


def test_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path / "a.json.xz", base_isf())
    b_isf = renamed_anonymous(base_isf())
    b = write(tmp_path / "b.json", b_isf)
    assert cli.main(["profile", "diff", str(a), str(b)]) == 0
    assert "equivalent" in capsys.readouterr().out
    b_isf["user_types"]["list_head"]["size"] = 8
    write(b, b_isf)
    assert cli.main(["profile", "diff", str(a), str(b), "-r", "json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["equivalent"] is False
    assert out["summary"]["types"]["differing"] == 1
    assert out["differences"]["types_differing"][0]["name"] == "list_head"


@pytest.mark.parametrize("content", [None, b"not json at all", b'{"symbols": {}}', b"\xfd7zXZ broken"])
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   content: bytes | None) -> None:
    a = write(tmp_path / "a.json", base_isf())
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_bytes(content)
    rc = cli.main(["profile", "diff", str(a), str(bad)])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("shadowvol: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_bitfields_compare_by_absolute_bits() -> None:
    """Same bits, different storage unit (dwarf2json vs shadowvol): equal;
    a moved bit is not."""
    a, b = base_isf(), base_isf()
    enum = {"kind": "enum", "name": "pid_type"}
    a["user_types"]["list_head"]["fields"]["state"] = {
        "offset": 10, "type": {"kind": "bitfield", "bit_position": 0, "bit_length": 16, "type": enum}}
    b["user_types"]["list_head"]["fields"]["state"] = {
        "offset": 8, "type": {"kind": "bitfield", "bit_position": 16, "bit_length": 16, "type": enum}}
    assert diff.diff_profiles(a, b).failures == 0
    b["user_types"]["list_head"]["fields"]["state"]["type"]["bit_position"] = 17
    d = diff.diff_profiles(a, b)
    assert dict(d.details["fields_differing"])["list_head.state"] == "offset 10 vs 10+1 bits"


def test_array_sized_only_in_b_is_not_a_failure() -> None:
    a, b = base_isf(), base_isf()
    char = {"kind": "base", "name": "char"}
    a["symbols"]["_text"]["type"] = {"kind": "array", "count": 0, "subtype": char}
    b["symbols"]["_text"]["type"] = {"kind": "array", "count": 112, "subtype": char}
    d = diff.diff_profiles(a, b)
    assert d.failures == 0 and [n for n, _ in d.details["symbols_sized_only_in_b"]] == ["_text"]
    d = diff.diff_profiles(b, a)  # the other way round, a length is lost
    assert d.failures == 1
