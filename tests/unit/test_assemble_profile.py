"""assemble_profile: the kallsyms tables get their declared types however the kernel lists them."""

from __future__ import annotations

from shadowvol.symbols import assemble_profile
from shadowvol.symbols.btf import parse_btf
from shadowvol.symbols.kallsyms import Symbol
from tests.btfgen import BTFBuilder

BASE = 0xFFFFFFFF82000000
BANNER = b"Linux version 6.12.0-test (x@y) #1 SMP\n\0"


def _graph():
    b = BTFBuilder()
    b.int_("unsigned int", 4)
    b.int_("char", 1, signed=True, char=True)
    b.int_("unsigned char", 1)
    return parse_btf(b.blob())


def _profile(listed: list[Symbol], extra: dict) -> dict:
    symbols = [Symbol("linux_banner", BASE, "R"), Symbol("start_kernel", BASE + 0x1000, "T")] + listed
    return assemble_profile(_graph(), symbols, BANNER, extra=extra)


def test_tables_left_out_of_kallsyms_are_added_typed():
    """6.1: scripts/kallsyms leaves its own tables out; the builder adds them."""
    isf = _profile([], {"kallsyms_num_syms": (BASE + 0x2000, "unsigned int")})
    assert isf["symbols"]["kallsyms_num_syms"] == {
        "address": BASE + 0x2000, "type": {"kind": "base", "name": "unsigned int"}}


def test_tables_listed_untyped_in_kallsyms_get_their_type():
    """6.12 lists kallsyms_num_syms in kallsyms itself: it must still be typed
    (volatility3's kallsyms API reads its size: linux.kallsyms, linux.pscallstack)."""
    isf = _profile([Symbol("kallsyms_num_syms", BASE + 0x2000, "R")],
                   {"kallsyms_num_syms": (BASE + 0x2000, "unsigned int")})
    assert isf["symbols"]["kallsyms_num_syms"]["type"] == {"kind": "base", "name": "unsigned int"}


def test_a_listed_symbol_elsewhere_keeps_its_address_untyped():
    """The table finder and kallsyms disagree: kallsyms' address stands, no type is guessed."""
    isf = _profile([Symbol("kallsyms_num_syms", BASE + 0x3000, "R")],
                   {"kallsyms_num_syms": (BASE + 0x2000, "unsigned int")})
    assert isf["symbols"]["kallsyms_num_syms"] == {"address": BASE + 0x3000}
