"""The Target's symbol API and the source options, on a synthetic profile (no guest)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from shadowvol.backends.base import BufferMemory, Segment
from shadowvol.errors import ProfileError
from shadowvol.kaslr import KernelLocation
from shadowvol.target import Endpoints, Target, add_source_options

SHIFT = 0x2A00000

ISF = {
    "symbols": {
        "init_task": {"address": 0xFFFFFFFF82A0C940, "type": {"kind": "struct", "name": "task_struct"}},
        "sys_call_table": {"address": 0xFFFFFFFF82200300,
                           "type": {"kind": "array", "count": 451, "subtype": {"kind": "pointer"}}},
        "__x64_sys_read": {"address": 0xFFFFFFFF81400000},
        "__x64_sys_write": {"address": 0xFFFFFFFF81400100},
        "untyped_only": {"constant_data": "AA=="},  # no address: not a symbol we can read
    },
    "user_types": {
        "task_struct": {"kind": "struct", "size": 9792,
                        "fields": {"pid": {"offset": 2456, "type": {"kind": "base", "name": "int"}},
                                   "comm": {"offset": 3008, "type": {"kind": "array", "count": 16}}}},
        "broken": {"kind": "struct", "fields": {}},
    },
}


def _target() -> Target:
    mem = BufferMemory(bytes(0x3000), [Segment(0, 0x3000, 0)], name="synthetic")
    loc = KernelLocation(dtb=0x1000, virt_shift=SHIFT, phys_base=0, la57=False, source="test")
    return Target(mem, loc, ISF, Path("synthetic.json"), "synthetic")


def test_symbols_with_kaslr_applied() -> None:
    t = _target()
    assert t.symbol_address("init_task") == 0xFFFFFFFF82A0C940 + SHIFT
    assert t.has_symbol("init_task") and not t.has_symbol("nope") and not t.has_symbol("untyped_only")
    with pytest.raises(ProfileError, match="no symbol 'nope'"):
        t.symbol_address("nope")
    assert dict(t.symbol_addresses("__x64_sys_")) == {"__x64_sys_read": 0xFFFFFFFF81400000 + SHIFT,
                                                      "__x64_sys_write": 0xFFFFFFFF81400100 + SHIFT}
    assert t.array_length("sys_call_table") == 451
    assert t.array_length("init_task") is None and t.array_length("nope") is None


def test_types_and_members() -> None:
    t = _target()
    assert t.type_size("task_struct") == 9792
    assert t.member_offset("task_struct", "pid") == 2456
    assert t.has_member("task_struct", "comm") and not t.has_member("task_struct", "__state")
    assert not t.has_member("no_such_struct", "x")
    with pytest.raises(ProfileError, match="no member 'state'"):
        t.member_offset("task_struct", "state")
    with pytest.raises(ProfileError, match="no struct 'mm_struct'"):
        t.type_size("mm_struct")
    with pytest.raises(ProfileError, match="no size"):
        t.type_size("broken")


def test_a_dump_has_no_endpoints_and_no_registry_vm() -> None:
    t = _target()
    assert t.endpoints == Endpoints() and t.endpoints.qmp is None and t.endpoints.gdb is None
    assert t.vm is None


def test_source_options_mean_the_same_everywhere() -> None:
    p = argparse.ArgumentParser()
    add_source_options(p)
    a = p.parse_args(["-vm", "db01"])
    assert (a.vm, a.dump, a.backend, a.profile) == ("db01", None, "shadow", None)
    with pytest.raises(SystemExit):
        p.parse_args([])  # -vm or -f is required, never defaulted
    with pytest.raises(SystemExit):
        p.parse_args(["-vm", "a", "-f", "b"])
    only_vm = argparse.ArgumentParser()
    add_source_options(only_vm, dump=False, backend=False, profile=False)
    b = only_vm.parse_args(["-vm", "pid:42"])
    assert (b.vm, b.dump, b.backend, b.profile) == ("pid:42", None, "shadow", None)
    with pytest.raises(SystemExit):
        only_vm.parse_args([])
    optional = argparse.ArgumentParser()
    add_source_options(optional, required=False)
    assert optional.parse_args([]).vm is None
