"""Profiles from a real kernel image.

Set SHADOWVOL_TEST_VMLINUZ to a vmlinuz (e.g. a Debian 12 cloud kernel) and,
for the header probe, SHADOWVOL_TEST_HEADERS to the extracted linux-headers
root (package root or flavour directory).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from shadowvol.symbols import ProfileReport, build_profile, load_fast, read_profile, save_fast, write_profile

VMLINUZ = os.environ.get("SHADOWVOL_TEST_VMLINUZ")
HEADERS = os.environ.get("SHADOWVOL_TEST_HEADERS")

needs_kernel = pytest.mark.skipif(not VMLINUZ, reason="set SHADOWVOL_TEST_VMLINUZ to a vmlinuz to run")
needs_headers = pytest.mark.skipif(not (VMLINUZ and HEADERS),
                                   reason="set SHADOWVOL_TEST_VMLINUZ and SHADOWVOL_TEST_HEADERS to run")


@pytest.fixture(scope="module")
def built() -> tuple[dict[str, Any], ProfileReport]:
    report = ProfileReport()
    isf = build_profile(vmlinuz=Path(VMLINUZ), headers=Path(HEADERS) if HEADERS else None,  # type: ignore[arg-type]
                        report=report)
    return isf, report


@needs_kernel
def test_validates_against_volatility_schema(built: tuple[dict[str, Any], ProfileReport]) -> None:
    from volatility3 import schemas

    isf, _ = built
    assert isf["metadata"]["format"] == "6.2.0"
    assert schemas.validate(isf, use_cache=False)


@needs_kernel
def test_known_symbols(built: tuple[dict[str, Any], ProfileReport]) -> None:
    isf, report = built
    syms = isf["symbols"]
    assert report.symbols > 10_000
    assert syms["_text"]["address"] == 0xFFFFFFFF81000000
    for name in ("init_task", "sys_call_table", "x64_sys_call", "init_pid_ns", "linux_banner", "prb",
                 "modules", "idt_table", "init_top_pgt", "jiffies", "mod_tree", "module_kset"):
        assert 0xFFFFFFFF81000000 <= syms[name]["address"] < 0xFFFFFFFFC0000000, name
    assert syms["init_task"]["type"] == {"kind": "struct", "name": "task_struct"}
    assert syms["prb"]["type"] == {"kind": "pointer", "subtype": {"kind": "struct", "name": "printk_ringbuffer"}}
    assert syms["modules"]["type"] == {"kind": "struct", "name": "list_head"}
    assert syms["idt_table"]["type"]["count"] == 256


@needs_kernel
def test_banner(built: tuple[dict[str, Any], ProfileReport]) -> None:
    import base64

    isf, report = built
    banner = base64.b64decode(isf["symbols"]["linux_banner"]["constant_data"])
    assert banner.startswith(b"Linux version " + report.release.encode()) and banner.endswith(b"\n\0")
    assert isf["symbols"]["linux_banner"]["type"]["count"] == len(banner)


@needs_headers
def test_header_typed_globals(built: tuple[dict[str, Any], ProfileReport]) -> None:
    isf, _ = built
    syms = isf["symbols"]
    table = syms["sys_call_table"]["type"]
    assert table["kind"] == "array" and 300 < table["count"] < 1000
    assert table["subtype"] == {"kind": "pointer", "subtype": {"kind": "function"}}
    assert syms["init_task"]["type"]["name"] == "task_struct"
    assert syms["jiffies"]["type"]["kind"] == "base"


@needs_headers
def test_comm_offset_matches_compiled_module(built: tuple[dict[str, Any], ProfileReport], tmp_path: Path) -> None:
    from shadowvol.symbols.dwarf import DwarfImporter, iter_variables, open_elf
    from shadowvol.symbols.kbuild import prepare_headers, run_kbuild
    from shadowvol.symbols.typegraph import Kind, TypeGraph

    isf, report = built
    (tmp_path / "Kbuild").write_text("obj-m := t.o\n")
    (tmp_path / "t.c").write_text('#include <linux/sched.h>\nstruct task_struct *svt_task;\n')
    proc = run_kbuild(prepare_headers(Path(HEADERS), report.release), tmp_path, ["t.o"])  # type: ignore[arg-type]
    assert proc.returncode == 0, proc.stderr
    graph = TypeGraph()
    importer = DwarfImporter(graph, reuse_named=True)
    for die in iter_variables(open_elf(tmp_path / "t.o")):
        importer.import_type(die.get_DIE_from_attribute("DW_AT_type"))
    task = graph[graph.find_complete(Kind.STRUCT, "task_struct")]  # type: ignore[index]
    comm = next(m for m in task.members if m.name == "comm")
    assert isf["user_types"]["task_struct"]["fields"]["comm"]["offset"] == comm.bit_offset // 8
    assert isf["user_types"]["task_struct"]["size"] == task.size


@needs_kernel
def test_volatility_loads_profile(built: tuple[dict[str, Any], ProfileReport], tmp_path: Path) -> None:
    import volatility3.plugins
    from volatility3 import framework
    from volatility3.framework import contexts
    from volatility3.framework.symbols.linux import LinuxKernelIntermedSymbols

    isf, _ = built
    path = write_profile(isf, tmp_path / "k.json.xz")
    framework.import_files(volatility3.plugins, True)
    ctx = contexts.Context()
    name = "vmlinux"
    ctx.symbol_space.append(LinuxKernelIntermedSymbols(ctx, "shadowvol", name=name, isf_url=path.as_uri()))
    task = ctx.symbol_space.get_type(f"{name}!task_struct")
    assert "comm" in task.vol.members
    init_task = ctx.symbol_space.get_symbol(f"{name}!init_task")
    assert init_task.type.vol.type_name.endswith("task_struct")


@needs_kernel
def test_fast_store_roundtrip(built: tuple[dict[str, Any], ProfileReport], tmp_path: Path) -> None:
    isf, _ = built
    fast = save_fast(isf, tmp_path / "k.svisf")
    start = time.perf_counter()
    loaded = load_fast(fast)
    elapsed = time.perf_counter() - start
    assert loaded["user_types"]["task_struct"] == isf["user_types"]["task_struct"]
    assert set(loaded["symbols"]) == set(isf["symbols"])
    assert read_profile(fast)["symbols"]["init_task"] == isf["symbols"]["init_task"]
    assert elapsed < 0.5
