"""Issue 9: a dump shorter than the RAM it claims is one line and exit 3
(``--partial`` accepts it), never a silently short answer. Synthetic memory;
tests/live/test_hostile_live.py cuts a real guest's RAM."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shadowvol.errors import BackendError, ShadowvolError, TruncatedError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fuzz"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fuzz_parsers as fz  # noqa: E402
from btfgen import BTFBuilder  # noqa: E402

MiB = 1 << 20


@pytest.fixture()
def private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var, sub in (("SHADOWVOL_RUN", "run"), ("SHADOWVOL_SHM", "shm"), ("SHADOWVOL_CACHE", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("SHADOWVOL_PROFILE_DIR", raising=False)
    return tmp_path


def test_truncated_lime_and_elf_exit_3_in_one_line(tmp_path: Path, private: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from shadowvol.cli import main

    for name, data in (("d.lime", fz.lime_seed()), ("d.elf", fz.elfdump_seed())):
        f = tmp_path / name
        f.write_bytes(data[:-100])
        assert main(["-f", str(f), "linux.pslist"]) == 3
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "truncated dump" in err and "--partial" in err, err
        assert "Traceback" not in err


def test_truncated_error_is_a_backend_error() -> None:
    # Callers that catch BackendError (watch, bench, the fidelity sweep) still see it.
    assert issubclass(TruncatedError, BackendError) and TruncatedError("x").exit_code == 3
    assert getattr(BackendError("x"), "exit_code", 1) == 1


# -- raw dumps: the kernel's own max_pfn says where RAM ends ---------------------------------------

MAX_PFN_VA = 0xffffffff82000000
SHIFT = 0x1a000000


def _target(max_pfn: int | None, dump_end: int, readable: bool = True) -> Any:
    def read(addr: int, length: int) -> bytes:
        assert addr == MAX_PFN_VA + SHIFT and length == 8
        if not readable:
            raise ShadowvolError("kernel: invalid address")
        return (max_pfn or 0).to_bytes(8, "little")

    from shadowvol.kaslr import KernelLocation
    from shadowvol.target import Target

    class SyntheticTarget(Target):  # the real symbol API; kernel reads answered by read()
        def __post_init__(self) -> None:
            self.kernel = SimpleNamespace(read=read)  # type: ignore[assignment]

    syms = {} if max_pfn is None else {"max_pfn": {"address": MAX_PFN_VA,
                                                   "type": {"kind": "base", "name": "long unsigned int"}}}
    loc = KernelLocation(dtb=0, virt_shift=SHIFT, phys_base=0, la57=False, source="test")
    return SyntheticTarget(SimpleNamespace(ranges=lambda: [(0, dump_end)]), loc,  # type: ignore[arg-type]
                           {"symbols": syms}, Path("synthetic.json"), "dump:x.raw")


@pytest.mark.parametrize("cut_mib", [160, 256, 511])
def test_raw_dump_shorter_than_max_pfn(cut_mib: int) -> None:
    from shadowvol.target import _raw_shortfall

    ram_end = 0x1ffe0000  # a 512 MiB guest: max_pfn 0x1ffe0
    msg = _raw_shortfall(_target(ram_end >> 12, cut_mib * MiB))  # type: ignore[arg-type]
    assert msg and "truncated dump" in msg and f"{cut_mib} MiB" in msg and "511 MiB" in msg
    assert "\n" not in msg


def test_raw_dump_holding_all_ram_or_no_max_pfn() -> None:
    from shadowvol.target import _raw_shortfall

    assert _raw_shortfall(_target(0x1ffe0, 512 * MiB)) is None  # type: ignore[arg-type]
    assert _raw_shortfall(_target(0x1ffe0, 0x1ffe0000)) is None  # type: ignore[arg-type]
    assert _raw_shortfall(_target(None, 16 * MiB)) is None  # type: ignore[arg-type]
    # max_pfn itself past the end of the file: said, not guessed
    msg = _raw_shortfall(_target(0x1ffe0, 16 * MiB, readable=False))  # type: ignore[arg-type]
    assert msg and "max_pfn is not readable" in msg


def test_kernel_past_the_end_of_a_raw_dump(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel image lies past the cut (KASLR put it high); a copy of its
    banner text is below it: exit 3 naming the cut, not 'no kallsyms'."""
    from shadowvol import profiles
    from shadowvol import target as tg
    from shadowvol.backends.dump import DumpMemory
    from shadowvol.backends.base import Segment

    banner = b"Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) (gcc) #1 SMP\n"
    monkeypatch.setattr(profiles, "known_banners", lambda: [banner])
    ram = bytearray(4 * MiB)
    ram[0x24590f:0x24590f + 40] = banner[:40]  # a cut copy, not the NUL-terminated linux_banner
    mem = DumpMemory(bytes(ram), [Segment(0, len(ram), 0)], "raw", "x.raw")  # type: ignore[arg-type]
    with pytest.raises(TruncatedError, match=r"6\.1\.0-57-cloud-amd64 kernel named at 0x24590f is not "
                                             r"in the dump, which ends at 0x400000 \(4 MiB\)"):
        tg._kernel_cut_off(tg._Source(mem, "dump:x.raw"))
    # a banner of a kernel we know nothing of, or none: the caller's own error stands
    monkeypatch.setattr(profiles, "known_banners", lambda: [b"Linux version 5.10.0-9-amd64 (x) #1\n"])
    assert tg._kernel_cut_off(tg._Source(mem, "dump:x.raw")) is None
    lime = DumpMemory(bytes(ram), [Segment(0, len(ram), 0)], "lime", "x.lime")  # type: ignore[arg-type]
    monkeypatch.setattr(profiles, "known_banners", lambda: [banner])
    assert tg._kernel_cut_off(tg._Source(lime, "dump:x.lime")) is None


def test_max_pfn_typed_without_headers() -> None:
    """A profile built from guest memory (no headers) still types max_pfn,
    the curated static the raw-dump check reads."""
    from shadowvol.symbols.btf import parse_btf
    from shadowvol.symbols.globals import type_globals
    from shadowvol.symbols.kallsyms import Symbol

    b = BTFBuilder()
    b.int_("long unsigned int", 8)
    b.int_("int", 4, signed=True)
    graph = parse_btf(b.blob())
    syms = [Symbol("max_pfn", 0xffffffff82000000, "B"), Symbol("min_low_pfn", 0xffffffff82000008, "B")]
    got = type_globals(graph, syms)
    assert got.origin.get("max_pfn") == "curated"
    t = graph.types[got.types["max_pfn"]]
    assert t.name == "long unsigned int" and graph.sizeof(got.types["max_pfn"]) == 8
