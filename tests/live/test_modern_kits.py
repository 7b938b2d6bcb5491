"""Issue 14: the rootkit techniques of today, each caught with its culprit named.

Kits (tests/kits, built against the guest headers), each first verified in the
guest by its effect: a process whose comm starts with "rkmark" (a static
getppid printer copied in as /tmp/rkmark) gets 31337 from getppid():

- rk_kprobe: a kprobe on __x64_sys_getppid whose pre-handler redirects it;
- rk_ftrace: an IPMODIFY ftrace_ops on __x64_sys_getppid;
- rk_ebpf: a static loader (raw bpf() syscalls, no libbpf) attaches a
  program to the raw tracepoint sys_enter; for getppid() of marked
  processes it writes 31337 with bpf_probe_write_user() into the buffer the
  caller passed in its first argument (``/tmp/rkmark -u`` prints it);
- rk_dispatch: re-points getppid's case of the x64_sys_call switch;
- rk_ghost: hooks sys_call_table[getppid] and the handler's entry, then
  hides from the module list and sysfs (named ``hidden:rk_ghost``).

The kprobe and ftrace kits run in a guest whose stub has its own kprobe on
the same function (``points=__x64_sys_getppid``): the stub's probe is
reported, recognised as ours, and never a finding, before, with and after
each kit. rk_ghost cannot be unloaded; it gets a throw-away guest of its own.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.live

MARKER = 31337
TARGET = "__x64_sys_getppid"


def rows(vm: str, plugin: str, *extra: str) -> list[dict]:
    r = run_cli("-vm", vm, "-r", "json", plugin, *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def kallsyms(run, pattern: str) -> dict[str, int]:
    """name -> address of the guest's /proc/kallsyms lines matching ``pattern`` (``name [mod]`` for modules)."""
    out = {}
    for line in run(f"grep -E '{pattern}' /proc/kallsyms; true").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.setdefault(" ".join(parts[2:4]), int(parts[0], 16))
    return out


def guest_kprobes(run) -> list[tuple[int, str]]:
    """(address, "symbol+off") of each probe in the guest's own /sys/kernel/debug/kprobes/list."""
    out = []
    for line in run("cat /sys/kernel/debug/kprobes/list").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((int(parts[0], 16), parts[2]))
    return out


def static_exe(src: Path, out: Path) -> Path:
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def getppid_exe(tmp_path_factory) -> Path:
    return static_exe(ROOT / "tests/kits/bin/getppid.c", tmp_path_factory.mktemp("bin") / "getppid")


def _guest(image, name: str, getppid_exe: Path, kits: tuple[str, ...], **start):
    from shadowvol.vm import qemu
    from shadowvol.vm.console import vm_cp, vm_exec
    from shadowvol.vm.kmod import build_module

    entry = qemu.start_vm(name, image, memory="512M", **start)

    def run(cmd: str, check: bool = True) -> str:
        rc, out = vm_exec(entry, cmd, timeout=120.0)
        if check:
            assert rc == 0, f"guest command {cmd!r} failed ({rc}): {out.decode(errors='replace')}"
        return out.decode(errors="replace")

    vm_cp(entry, getppid_exe, "/tmp/rkmark")
    vm_cp(entry, getppid_exe, "/tmp/plain")
    run("chmod +x /tmp/rkmark /tmp/plain")
    for kit in kits:
        vm_cp(entry, build_module(image, ROOT / "tests/kits" / kit)[0], f"/tmp/{kit}.ko")
    return entry, run


@pytest.fixture(scope="module")
def stubbed(image, getppid_exe):
    """A guest whose stub has a kprobe on the function the kits hook."""
    from shadowvol.vm import qemu

    from shadowvol.vm.console import vm_cp

    entry, run = _guest(image, "mk14s", getppid_exe, ("rk_kprobe", "rk_ftrace", "rk_dispatch"), stub=True,
                        stub_params={"points": TARGET})
    loader = static_exe(ROOT / "tests/kits/rk_ebpf/rk_ebpf_loader.c", getppid_exe.parent / "rk_ebpf_loader")
    vm_cp(entry, loader, "/tmp/rk_ebpf_loader")
    run("chmod +x /tmp/rk_ebpf_loader")
    yield entry.name, run
    qemu.stop_vm(entry.name)


def effect(run) -> tuple[int, int]:
    """getppid() as a marked and as a plain process see it."""
    marked, plain = run("/tmp/rkmark; /tmp/plain").split()
    return int(marked), int(plain)


def assert_clean(vm: str, run) -> None:
    """No finding from any check; the stub's probe reported as ours."""
    assert effect(run)[0] != MARKER
    assert [r for r in rows(vm, "linux.check_syscall") if r["Hooked"]] == []
    assert [r for r in rows(vm, "linux.check_ftrace") if r["Finding"]] == []
    assert [r for r in rows(vm, "linux.check_ebpf") if r["Finding"]] == []
    assert run("/tmp/rkmark -u").strip() == "0"
    probes = rows(vm, "linux.check_kprobes")
    assert [r for r in probes if r["Finding"]] == []
    target = kallsyms(run, f" {TARGET}$")[TARGET]
    ours = [r for r in probes if r["Ours"]]
    assert [(r["Address"], r["Owner"]) for r in ours] == [(target, "shadow_stub")]
    assert "sv_kprobe_pre [shadow_stub]" in ours[0]["Handlers"]
    assert sorted(r["Address"] for r in probes) == sorted(a for a, _ in guest_kprobes(run))
    inline = [r for r in rows(vm, "linux.check_syscall") if r["Check"] == "inline" and r["Syscall"] == "getppid"]
    assert len(inline) == 1 and "(ours)" in inline[0]["Symbol"] and inline[0]["Owner"] == "shadow_stub"


def test_clean_guest_with_our_stub_probing(stubbed) -> None:
    vm, run = stubbed
    assert_clean(vm, run)
    report = rows(vm, "linux.malware_report")
    assert {r["Verdict"] for r in report} == {"clean"} and len(report) == 8, report
    assert report[-1]["Check"] == "linux.check_text"  # shadowvol found the image the guest booted


def test_malware_report_names_every_culprit(stubbed) -> None:
    """Three kits at once: one screen, one finding row per hook, each with its culprit."""
    vm, run = stubbed
    run("insmod /tmp/rk_kprobe.ko && insmod /tmp/rk_dispatch.ko")
    try:
        report = rows(vm, "linux.malware_report")
        found = {(r["Check"], r["Culprit"]) for r in report if r["Verdict"] == "FINDING"}
        assert found == {("linux.check_syscall", "rk_kprobe"), ("linux.check_syscall", "rk_dispatch"),
                         ("linux.check_kprobes", "rk_kprobe"), ("linux.check_ftrace", "rk_kprobe"),
                         ("linux.check_text", "rk_dispatch")}, report
        assert {r["Check"] for r in report if r["Verdict"] == "clean"} == \
            {"linux.check_idt", "linux.check_modules", "linux.psxview", "linux.check_ebpf"}
        text = run_cli("-vm", vm, "linux.malware_report")
        assert text.returncode == 0 and len(text.stdout.strip().splitlines()) <= 24
    finally:
        run("rmmod rk_kprobe; rmmod rk_dispatch", check=False)


def test_kprobe_hook_is_caught_and_named(stubbed) -> None:
    vm, run = stubbed
    run("insmod /tmp/rk_kprobe.ko")
    try:
        marked, plain = effect(run)
        assert marked == MARKER and plain != MARKER  # the kit works
        syms = kallsyms(run, rf" ({TARGET}|rk_pre)(\s|$)")
        found = [r for r in rows(vm, "linux.check_kprobes") if r["Finding"]]
        assert [(r["Address"], r["Owner"], r["Type"]) for r in found] == [(syms[TARGET], "rk_kprobe", "kprobe")]
        assert "pre_handler=rk_pre [rk_kprobe]" in found[0]["Handlers"]
        assert found[0]["Address"] in {a for a, _ in guest_kprobes(run)}
        hooks = rows(vm, "linux.check_syscall", "--hooked-only")
        assert [(h["Check"], h["Syscall"], h["Owner"]) for h in hooks] == [("inline", "getppid", "rk_kprobe")]
        assert "rk_pre [rk_kprobe]" in hooks[0]["Symbol"]
        ftrace = [r for r in rows(vm, "linux.check_ftrace") if r["Finding"]]
        assert [(r["Symbol"], r["Owner"]) for r in ftrace] == [("kprobe_ftrace_handler", "rk_kprobe")]
    finally:
        run("rmmod rk_kprobe", check=False)
    assert_clean(vm, run)


def test_ftrace_hook_is_caught_and_named(stubbed) -> None:
    vm, run = stubbed
    run("insmod /tmp/rk_ftrace.ko")
    try:
        marked, plain = effect(run)
        assert marked == MARKER and plain != MARKER
        syms = kallsyms(run, rf" ({TARGET}|rk_callback)(\s|$)")
        found = [r for r in rows(vm, "linux.check_ftrace") if r["Finding"]]
        assert [(r["Callback"], r["Owner"], r["Symbol"]) for r in found] == \
            [(syms["rk_callback [rk_ftrace]"], "rk_ftrace", "rk_callback [rk_ftrace]")]
        assert "IPMODIFY" in found[0]["Flags"] and found[0]["Hooked"] == TARGET
        hooks = rows(vm, "linux.check_syscall", "--hooked-only")
        assert [(h["Check"], h["Syscall"], h["Owner"]) for h in hooks] == [("inline", "getppid", "rk_ftrace")]
        assert [r for r in rows(vm, "linux.check_kprobes") if r["Finding"]] == []  # an ftrace hook, no kprobe
    finally:
        run("rmmod rk_ftrace", check=False)
    assert_clean(vm, run)


def test_dispatch_patch_is_caught_and_named(stubbed) -> None:
    vm, run = stubbed
    run("insmod /tmp/rk_dispatch.ko")
    try:
        marked, plain = effect(run)
        assert marked == MARKER and plain != MARKER
        syms = kallsyms(run, r" (x64_sys_call|rk_getppid)(\s|$)")
        hooks = rows(vm, "linux.check_syscall", "--hooked-only")
        assert [(h["Check"], h["Index"], h["Syscall"], h["Owner"]) for h in hooks] == \
            [("x64_sys_call", 110, "getppid", "rk_dispatch")]
        assert hooks[0]["Target"] == syms["rk_getppid [rk_dispatch]"]
        assert syms["x64_sys_call"] < hooks[0]["Address"] < syms["x64_sys_call"] + 8192
    finally:
        run("rmmod rk_dispatch", check=False)
    assert_clean(vm, run)


def test_ebpf_syscall_hook_is_caught_and_named(stubbed) -> None:
    vm, run = stubbed
    assert run("/tmp/rk_ebpf_loader > /tmp/ebpf.out 2>&1 & echo $! > /tmp/ebpf.pid; "
               "for i in $(seq 100); do grep -q attached /tmp/ebpf.out && break; sleep 0.2; done; "
               "cat /tmp/ebpf.out").strip() == "attached"
    pid = int(run("cat /tmp/ebpf.pid"))
    try:
        assert run("/tmp/rkmark -u").strip() == str(MARKER) and run("/tmp/plain -u").strip() == "0"
        found = [r for r in rows(vm, "linux.check_ebpf") if r["Finding"]]
        assert [(r["Name"], r["Type"], r["Attach"], r["Holders"]) for r in found] == \
            [("rk_ebpf", "RAW_TRACEPOINT", "raw_tracepoint:sys_enter", f"{pid}:rk_ebpf_loader")]
        assert "bpf_probe_write_user" in found[0]["Helpers"] and "calls bpf_probe_write_user" in found[0]["Reasons"]
        assert "attached to system calls" in found[0]["Reasons"]
        assert found[0]["ID"] in {int(i) for i in run("ls /proc/" + str(pid) + "/fdinfo | while read f; do "
                                                      "sed -n 's/^prog_id:\\s*//p' /proc/" + str(pid) +
                                                      "/fdinfo/$f; done").split()}
    finally:
        run(f"kill {pid}; while [ -d /proc/{pid} ]; do sleep 0.1; done", check=False)
    # The program is freed after the loader exits (an RCU grace period and a work item later).
    run("for i in $(seq 100); do /tmp/rkmark -u | grep -q 31337 || break; sleep 0.2; done")
    for _ in range(20):
        if not [r for r in rows(vm, "linux.check_ebpf") if r["Finding"]]:
            break
        run("sleep 1")
    assert_clean(vm, run)


@pytest.fixture(scope="module")
def ghost(image, getppid_exe):
    """A throw-away guest without the stub (rk_ghost patches the handler's ftrace site)."""
    from shadowvol.vm import qemu

    entry, run = _guest(image, "mk14g", getppid_exe, ("rk_ghost",), stub=False)
    yield entry.name, run
    qemu.stop_vm(entry.name)


def test_hidden_culprit_is_named_from_the_carve(ghost) -> None:
    vm, run = ghost
    assert [r for r in rows(vm, "linux.check_syscall") if r["Hooked"]] == []
    run("insmod /tmp/rk_ghost.ko")
    assert effect(run)[0] == MARKER
    assert "rk_ghost" not in run("cat /proc/modules") and "rk_ghost" not in run("ls /sys/module")  # hidden
    syms = kallsyms(run, rf" ({TARGET}|sys_call_table)$")
    hooks = rows(vm, "linux.check_syscall", "--hooked-only")
    assert sorted((h["Check"], h["Syscall"], h["Owner"]) for h in hooks) == \
        [("inline", "getppid", "hidden:rk_ghost"), ("sys_call_table", "getppid", "hidden:rk_ghost")]
    table = next(h for h in hooks if h["Check"] == "sys_call_table")
    inline = next(h for h in hooks if h["Check"] == "inline")
    assert table["Address"] == syms["sys_call_table"] + 8 * 110 and inline["Address"] == syms[TARGET]
    assert table["Target"] == inline["Target"]  # both lead to the same function of the hidden module
    text = [r for r in rows(vm, "linux.check_text") if r["Finding"]]  # the handler's bytes against the image
    assert [(r["Symbol"], r["Offset"], r["Address"], r["Owner"]) for r in text] == \
        [(TARGET, 0, syms[TARGET], "hidden:rk_ghost")]
    assert text[0]["Target"] == inline["Target"] and text[0]["Target symbol"].endswith("[hidden:rk_ghost]")
    mods = rows(vm, "linux.check_modules")
    hidden = [r for r in mods if r["Hidden"]]
    assert [(r["Name"], r["module_list"], r["sysfs"], r["carve"]) for r in hidden] == \
        [("rk_ghost", False, False, True)]
    assert {r["Name"] for r in mods if not r["Hidden"]} == {line.split()[0] for line in
                                                          run("cat /proc/modules").splitlines()}
