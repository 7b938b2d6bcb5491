"""Issue 5: linux.check_syscall on live guests, against the guest's own /proc/kallsyms.

A clean guest (the session's web01) shows no hooks. The rootkit kits run in a
guest of this module's own (rk1), never in web01: rk_sctable replaces a
sys_call_table entry, rk_inline patches a handler's entry with a jmp; each
must be found with its module named, and gone after rmmod. Stock
``vol -p plugins`` loads the same plugin and finds both hooks in a raw dump.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from shadowvol.volbridge import our_plugin_dir

pytestmark = pytest.mark.live

VOL = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "vol"


def kallsyms(run, pattern: str = r" (__x64_sys_\w+|x64_sys_call|sys_call_table|rk_\w+)(\s|$)") -> dict[str, int]:
    """name -> address from the guest's /proc/kallsyms (module symbols as ``name [mod]``).

    Only lines matching ``pattern`` (grep -E in the guest): the serial console is slow.
    """
    syms = {}
    for line in run(f"grep -E '{pattern}' /proc/kallsyms").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            name = parts[2] if len(parts) == 3 else f"{parts[2]} {parts[3]}"
            syms.setdefault(name, int(parts[0], 16))
    return syms


def check_syscall(vm: str, *extra: str) -> list[dict]:
    r = run_cli("-vm", vm, "-r", "json", "linux.check_syscall", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_clean_guest_has_no_hooks(web01, guest) -> None:
    rows = check_syscall("web01")
    assert [r for r in rows if r["Hooked"]] == []
    syms = kallsyms(guest)
    table = [r for r in rows if r["Check"] == "sys_call_table"]
    dispatch = {r["Index"]: r for r in rows if r["Check"] == "x64_sys_call"}
    inline = [r for r in rows if r["Check"] == "inline"]
    assert len(table) > 400 and len(dispatch) == len(table)
    assert [r["Index"] for r in table] == list(range(len(table)))
    for r in table:
        # Each entry is the handler the guest itself names __x64_sys_<Syscall>,
        # and the one x64_sys_call dispatches that number to.
        assert r["Target"] == syms[f"__x64_sys_{r['Syscall']}"], r
        assert r["Expected"] == r["Target"] == dispatch[r["Index"]]["Target"], r
        assert r["Owner"] == "kernel"
    assert syms["x64_sys_call"] <= min(r["Address"] for r in dispatch.values())
    assert len(inline) == len({r["Target"] for r in table})  # every distinct handler checked once
    by_name = {r["Syscall"]: r for r in table}
    assert by_name["getppid"]["Index"] == 110 and by_name["getdents64"]["Index"] == 217


@pytest.fixture(scope="module")
def rk1(image):
    """A guest of this module's own, for the rootkit kits."""
    from shadowvol.vm import qemu

    entry = qemu.start_vm("rk1", image, memory="512M", stub=False)
    yield entry
    qemu.stop_vm("rk1")


@pytest.fixture(scope="module")
def rk_run(rk1):
    from shadowvol.vm.console import vm_exec

    def run(cmd: str, check: bool = True) -> str:
        rc, out = vm_exec(rk1, cmd, timeout=120.0)
        if check:
            assert rc == 0, f"guest command {cmd!r} failed ({rc}): {out.decode(errors='replace')}"
        return out.decode(errors="replace")

    return run


@pytest.fixture(scope="module")
def kits(image, rk1) -> dict[str, str]:
    """Build both kits against the guest headers and copy them in; name -> guest path."""
    from shadowvol.vm.console import vm_cp
    from shadowvol.vm.kmod import build_module

    paths = {}
    for kit in ("rk_sctable", "rk_inline"):
        ko = build_module(image, ROOT / "tests/kits" / kit)[0]
        paths[kit] = f"/tmp/{kit}.ko"
        vm_cp(rk1, ko, paths[kit])
    return paths


@pytest.fixture
def loaded(kits, rk_run):
    """Load the named kits for one test; rmmod restores the kernel afterwards."""
    names: list[str] = []

    def load(*kit_names: str) -> None:
        for k in kit_names:
            rk_run(f"insmod {kits[k]}")
            names.append(k)

    yield load
    for k in reversed(names):
        rk_run(f"rmmod {k}", check=False)


def test_sys_call_table_hook_is_found_and_named(rk1, rk_run, loaded) -> None:
    assert [r for r in check_syscall("rk1") if r["Hooked"]] == []
    loaded("rk_sctable")
    hooks = check_syscall("rk1", "--hooked-only")
    syms = kallsyms(rk_run)
    assert len(hooks) == 1, hooks
    h = hooks[0]
    assert (h["Check"], h["Index"], h["Syscall"], h["Owner"]) == \
        ("sys_call_table", 217, "getdents64", "rk_sctable")
    assert h["Target"] == syms["rk_getdents64 [rk_sctable]"]
    assert h["Expected"] == syms["__x64_sys_getdents64"]
    assert h["Address"] == syms["sys_call_table"] + 8 * 217
    assert "bin" in rk_run("ls /").split()  # getdents64 still works


def test_inline_hook_is_found_and_named(rk1, rk_run, loaded) -> None:
    loaded("rk_inline")
    hooks = check_syscall("rk1", "--hooked-only")
    syms = kallsyms(rk_run)
    assert len(hooks) == 1, hooks
    h = hooks[0]
    assert (h["Check"], h["Syscall"], h["Owner"]) == ("inline", "getppid", "rk_inline")
    assert h["Address"] == h["Expected"] == syms["__x64_sys_getppid"]
    assert h["Target"] == syms["rk_getppid [rk_inline]"]
    assert h["Symbol"].startswith("jmp rk_inline")
    shell_pid, child_ppid = rk_run('echo $$; sh -c "echo \\$PPID"').split()
    assert shell_pid == child_ppid  # the hook implements getppid


def test_rmmod_restores_a_clean_kernel(rk1, rk_run, kits) -> None:
    for k in ("rk_sctable", "rk_inline"):
        rk_run(f"insmod {kits[k]} && rmmod {k}")
    assert [r for r in check_syscall("rk1") if r["Hooked"]] == []


def raw_dump(entry, out: Path) -> None:
    """Copy the guest's RAM file while QEMU is stopped (a consistent raw image)."""
    from shadowvol.qemu.qmp import QMPClient

    with QMPClient(entry.qmp, timeout=10.0) as q:
        q.execute("stop")
        try:
            shutil.copyfile(entry.ram_file, out)
        finally:
            q.execute("cont")


def vol(dump: Path, symbols: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VOL), "-q", "-p", str(our_plugin_dir()), "-s", str(symbols), "-f", str(dump),
                           "-r", "json", *args], capture_output=True, text=True, timeout=600)


def test_stock_vol_loads_our_plugin_and_finds_both_hooks(rk1, rk_run, loaded, tmp_path) -> None:
    from shadowvol.target import open_target

    target = open_target(vm="rk1")
    try:
        profile = target.profile_path
    finally:
        target.close()
    symbols = tmp_path / "symbols"
    (symbols / "linux").mkdir(parents=True)
    shutil.copy(profile, symbols / "linux" / profile.name)
    loaded("rk_sctable", "rk_inline")
    syms = kallsyms(rk_run)
    dump = tmp_path / "rk1.raw"
    raw_dump(rk1, dump)
    try:
        r = vol(dump, symbols, "linux.check_syscall", "--hooked-only")
        assert r.returncode == 0, r.stderr
        found = {(h["Check"], h["Syscall"], h["Owner"], h["Target"]) for h in json.loads(r.stdout)}
        assert found == {("sys_call_table", "getdents64", "rk_sctable", syms["rk_getdents64 [rk_sctable]"]),
                         ("inline", "getppid", "rk_inline", syms["rk_getppid [rk_inline]"])}
        # Stock plugins still load next to ours.
        r = vol(dump, symbols, "linux.pslist")
        assert r.returncode == 0, r.stderr
        assert {1, 2} <= {row["PID"] for row in json.loads(r.stdout)}
    finally:
        dump.unlink(missing_ok=True)


def test_stock_plugins_still_load_in_our_cli(web01) -> None:
    r = run_cli("-vm", "web01", "-r", "json", "linux.pslist")
    assert r.returncode == 0, r.stderr
    assert 1 in {row["PID"] for row in json.loads(r.stdout)}
    r = run_cli("-vm", "web01", "-r", "json", "linux.malware.check_syscall")
    assert r.returncode == 0, r.stderr


def test_unknown_option_is_one_line_error(web01) -> None:
    r = run_cli("-vm", "web01", "linux.check_syscall", "--no-such-option")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1


class _FakeImage:
    """Kernel text at [0xffffffff81000000, 0xffffffff82000000); no guest needed."""

    def __init__(self) -> None:
        from shadowvol.volbridge import load_plugin

        load_plugin("linux.check_syscall")  # puts our plugin dir on volatility3.plugins.__path__
        from volatility3.plugins.linux import kernel_hooks

        self.cs = kernel_hooks.disassembler()
        self.pointers = {0xffffffff81000100: 0xffffffffc0001000}

    def canonical(self, addr: int) -> int:
        return addr & ((1 << 64) - 1)

    def in_text(self, addr: int) -> bool:
        return 0xffffffff81000000 <= addr < 0xffffffff82000000

    def read_pointers(self, addr: int, count: int) -> tuple[int, ...]:
        return (self.pointers[addr],)


@pytest.mark.parametrize("code,kind,target", [
    (b"\x0f\x1f\x44\x00\x00\x55\x48\x89\xe5", None, None),                  # nop5 ftrace site; push rbp
    (b"\xe8\xfb\x0f\x00\x00\x55", None, None),                              # call into text (ftrace_caller)
    (b"\xe9\xfb\x0f\x00\x3f", "jmp", 0xffffffffc0001000),                   # jmp rel32 to a module
    (b"\x0f\x1f\x44\x00\x00\x68\x00\x10\x00\xc0\xc3", "push-ret", 0xffffffffc0001000),
    (b"\x48\xb8" + (0xffffffffc0001000).to_bytes(8, "little") + b"\xff\xe0", "mov-jmp", 0xffffffffc0001000),
    (b"\xff\x25\xfa\x00\x00\x00", "jmp-indirect", 0xffffffffc0001000),      # jmp [rip+0xfa]
    (b"\x48\xc7\xc0\xda\xff\xff\xff\xc3", None, None),                      # mov rax, -ENOSYS; ret
])
def test_find_trampoline_patterns(code: bytes, kind, target) -> None:
    image = _FakeImage()
    from volatility3.plugins.linux.kernel_hooks import find_trampoline

    hook = find_trampoline(image, code, 0xffffffff81000000)
    assert (hook.kind, hook.target) == (kind, target) if kind else hook is None
