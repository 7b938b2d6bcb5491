"""Pure parts of shadowvol.fidelity: row flattening and comparison, failure keys,
plugin listings (no guest needed)."""

from __future__ import annotations

import io
import tarfile

from shadowvol import fidelity


def test_flatten_rows_keeps_depth_and_is_order_insensitive_in_compare():
    rows = [{"PID": 1, "__children": [{"PID": 2, "__children": []}]}, {"PID": 3, "__children": []}]
    flat = fidelity.flatten_rows(rows)
    assert len(flat) == 3 and '"__depth": 1' in flat[1]
    same, a, b = fidelity.compare_rows(flat, list(reversed(flat)))
    assert same and not a and not b
    moved = fidelity.flatten_rows([{"PID": 1, "__children": []}, {"PID": 2, "__children": []},
                                   {"PID": 3, "__children": []}])
    same, only_live, only_dump = fidelity.compare_rows(flat, moved)
    assert not same and len(only_live) == 1 and len(only_dump) == 1  # PID 2 at another depth


def test_compare_rows_counts_duplicates():
    same, a, b = fidelity.compare_rows(["x", "x"], ["x"])
    assert not same and a == ["x"] and b == []


def test_error_key_matches_ours_and_stocks():
    stock_tb = ("Volatility 3 Framework 2.28.2\nTraceback (most recent call last):\n  File ...\n"
                "TypeError: Symbol sock_def_destruct has no associated type and no object_type specified\n")
    ours = ("shadowvol: error: internal error: TypeError: Symbol sock_def_destruct has no associated type "
            "and no object_type specified (SHADOWVOL_DEBUG=1 shows the traceback)\n")
    assert fidelity.error_key(stock_tb) == fidelity.error_key(ours)
    inside = ("shadowvol: error: error inside volatility3 (framework/plugins/linux/sockscan.py:91): TypeError: "
              "Symbol sock_def_destruct has no associated type and no object_type specified (SHADOWVOL_DEBUG=1 ...)")
    assert fidelity.error_key(inside) == fidelity.error_key(stock_tb)
    stock_sym = ("Volatility 3 Framework 2.28.2\n\n\nVolatility experienced a symbol-related issue:\n"
                 "symbol_table_name1!Elf64_Ehdr: Unknown symbol: Elf64_Ehdr\n\n\t* An invalid symbol table\n"
                 "\nNo further results will be produced\n")
    ours_sym = "shadowvol: error: volatility3 SymbolError: Unknown symbol: Elf64_Ehdr (SHADOWVOL_DEBUG=1 ...)\n"
    assert fidelity.error_key(stock_sym) == fidelity.error_key(ours_sym) == "Unknown symbol: Elf64_Ehdr"
    assert fidelity.error_key("") == ""


def _tar(path, members, mtime):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))


def test_written_files_compared_by_content(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _tar(a / "fs.tar.gz", [("x", b"1"), ("y", b"22")], mtime=1)
    _tar(b / "fs.tar.gz", [("x", b"1"), ("y", b"22")], mtime=2)  # other run time: same content
    assert fidelity._same_files(a, b)
    _tar(b / "fs.tar.gz", [("x", b"1"), ("y", b"23")], mtime=2)
    assert not fidelity._same_files(a, b)


def test_plugin_listings():
    stock = {p.name for p in fidelity.stock_plugins() if not p.error}
    assert "linux.pslist.PsList" in stock and "linux.malware.check_syscall.Check_syscall" in stock
    assert not any(n.startswith("linux.check_syscall") for n in stock)  # deprecated alias / ours
    ours = {p.name for p in fidelity.our_plugins()}
    assert ours == {"linux.check_ebpf.CheckEbpf", "linux.check_ftrace.CheckFtrace", "linux.check_idt.CheckIdt",
                    "linux.check_kprobes.CheckKprobes", "linux.check_modules.CheckModules",
                    "linux.check_syscall.CheckSyscall", "linux.check_text.CheckText", "linux.hidden_modules.HiddenModules",
                    "linux.malware_report.MalwareReport", "linux.psxview.PsXView"}


def test_bench_scale_drgn_workloads_are_python_drgn_can_run():
    """The drgn scripts ``bench scale`` times (drgn itself is not a dependency):
    valid Python, reading ``prog`` as drgn's CLI provides it, and the pslist one
    and psaux ones print the fields those stock plugins render (checked by hand
    against a live guest: 2,049 of 2,049 rows identical for each)."""
    import ast

    from shadowvol.bench import DRGN_PSAUX, DRGN_PSLIST, DRGN_TASKS

    for source in (DRGN_TASKS, DRGN_PSLIST, DRGN_PSAUX):
        names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
        assert "prog" in names and "for_each_task" in names
    for field in ("pid", "tgid", "real_parent.tgid", "comm", "uid", "gid", "euid", "egid", "start_boottime"):
        assert field in DRGN_PSLIST
    assert "cmdline(t)" in DRGN_PSAUX and "[{comm}]" in DRGN_PSAUX
