"""Profiles built from the real kernel image of the test guest (vmlinuz alone,
plus its Debian headers for typed globals), checked against the running
guest's own view: /proc/kallsyms and offsets printed by a module."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from shadowvol.symbols import ProfileReport, build_profile, load_fast, read_profile, save_fast, write_profile

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def built(image) -> tuple[dict[str, Any], ProfileReport]:
    report = ProfileReport()
    isf = build_profile(vmlinuz=image.vmlinuz, headers=image.headers, report=report)
    return isf, report


@pytest.fixture(scope="module")
def VMLINUZ(image) -> str:
    return str(image.vmlinuz)


@pytest.fixture(scope="module")
def HEADERS(image) -> str:
    return str(image.headers)


def test_symbols_match_guest_kallsyms_after_kaslr_shift(built, guest) -> None:
    """Every symbol the guest exports in /proc/kallsyms sits at profile address + one shift."""
    from collections import Counter

    isf, _ = built
    syms = isf["symbols"]
    # Module symbols ("name [mod]") are not in the image.
    entries = [(p[2], int(p[0], 16)) for p in map(str.split, guest("cat /proc/kallsyms").splitlines())
               if len(p) == 3]
    # Static symbols repeated in several files share a name: check unique names,
    # except per-CPU and absolute symbols (below the kernel map), not relocated by KASLR.
    counts = Counter(name for name, _ in entries)
    unique = [(name, addr) for name, addr in entries if counts[name] == 1 and addr >= 0xFFFFFFFF80000000]
    missing = [name for name, _ in unique if name not in syms]
    assert not missing, missing[:10]
    shift = unique[0][1] - syms[unique[0][0]]["address"]
    assert shift != 0 and shift % 0x200000 == 0  # KASLR is on; the kernel moves by 2 MiB steps
    wrong = [(name, hex(addr)) for name, addr in unique if addr - syms[name]["address"] != shift]
    assert not wrong, wrong[:10]
    assert len(unique) > 50_000


def test_struct_offsets_match_a_module_built_against_the_headers(built, web01, image, guest) -> None:
    from conftest import ROOT
    from shadowvol.vm.console import vm_cp
    from shadowvol.vm.kmod import build_module

    isf, _ = built
    vm_cp(web01, build_module(image, ROOT / "tests/kits/hello")[0], "/tmp/sv_hello.ko")
    guest("rmmod sv_hello 2>/dev/null; insmod /tmp/sv_hello.ko")
    line = guest("dmesg | grep 'sv_hello: task_struct' | tail -1")
    reported = {k: int(v) for k, v in re.findall(r"task_struct\.(\w+)=(\d+)", line)}
    task = isf["user_types"]["task_struct"]
    for field in ("comm", "pid", "tasks"):
        assert task["fields"][field]["offset"] == reported[field], field
    assert task["size"] == int(re.search(r"sizeof=(\d+)", line).group(1))


def test_validates_against_volatility_schema(built: tuple[dict[str, Any], ProfileReport]) -> None:
    from volatility3 import schemas

    isf, _ = built
    assert isf["metadata"]["format"] == "6.2.0"
    assert schemas.validate(isf, use_cache=False)


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


def test_banner(built: tuple[dict[str, Any], ProfileReport]) -> None:
    import base64

    isf, report = built
    banner = base64.b64decode(isf["symbols"]["linux_banner"]["constant_data"])
    assert banner.startswith(b"Linux version " + report.release.encode()) and banner.endswith(b"\n\0")
    assert isf["symbols"]["linux_banner"]["type"]["count"] == len(banner)


def test_header_typed_globals(built: tuple[dict[str, Any], ProfileReport]) -> None:
    isf, _ = built
    syms = isf["symbols"]
    table = syms["sys_call_table"]["type"]
    assert table["kind"] == "array" and 300 < table["count"] < 1000
    assert table["subtype"] == {"kind": "pointer", "subtype": {"kind": "function"}}
    assert syms["init_task"]["type"]["name"] == "task_struct"
    assert syms["jiffies"]["type"]["kind"] == "base"


def test_comm_offset_matches_compiled_module(built: tuple[dict[str, Any], ProfileReport], tmp_path: Path,
                                             HEADERS: str) -> None:
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


def test_fast_store_roundtrip(built: tuple[dict[str, Any], ProfileReport], tmp_path: Path) -> None:
    isf, _ = built
    fast = save_fast(isf, tmp_path / "k.svisf")
    loaded = load_fast(fast)
    assert loaded["user_types"]["task_struct"] == isf["user_types"]["task_struct"]
    assert set(loaded["symbols"]) == set(isf["symbols"])
    assert read_profile(fast)["symbols"]["init_task"] == isf["symbols"]["init_task"]
