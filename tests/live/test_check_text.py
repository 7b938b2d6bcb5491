"""Issue 14: x64_sys_call and every syscall handler compared byte for byte with the kernel image.

One guest (the cloud kernel, KASLR on) with our stub loaded and probing two
syscall handlers: one probe on the ftrace site at the entry, one optimized
kprobe in the middle of a handler (a jmp to its detour buffer). Neither is a
finding. Then the two kits that patch kernel text, each first verified by
its effect in the guest and by what it says in the guest's own log
(``dmesg``: the patched address or offset and where the new jump leads):

- rk_dispatch re-points getppid's case of the x64_sys_call switch;
- rk_inline writes a jmp over the ftrace site of __x64_sys_getppid.

The hidden culprit (rk_ghost, ``hidden:rk_ghost``) is checked in
test_modern_kits.py's throw-away guest; the generic and 6.12 kernels in
test_clean_kernels.py.
"""

from __future__ import annotations

import re

import pytest

from conftest import ROOT, run_cli
from test_modern_kits import MARKER, TARGET, _guest, effect, kallsyms, rows, static_exe

pytestmark = pytest.mark.live

PROBED = ("__x64_sys_getpid", "__x64_sys_getuid")
#: __x64_sys_getuid+5: the instruction after its ftrace site (5 bytes on this kernel, which has no endbr64),
#: where a kprobe is optimized into a jmp.
MID_PROBE = "__x64_sys_getuid+5"


@pytest.fixture(scope="module")
def textguest(image, tmp_path_factory):
    from shadowvol.vm import qemu

    exe = static_exe(ROOT / "tests/kits/bin/getppid.c", tmp_path_factory.mktemp("bin") / "getppid")
    entry, run = _guest(image, "text14", exe, ("rk_dispatch", "rk_inline"), stub=True,
                        stub_params={"points": f"{PROBED[0]},{MID_PROBE}"})
    yield entry.name, run
    qemu.stop_vm(entry.name)


def assert_clean(vm: str, run) -> None:
    """No finding; the stub's optimized probe is the one row, ours, where the guest lists it."""
    found = rows(vm, "linux.check_text")
    assert [r for r in found if r["Finding"]] == []
    assert [(r["Symbol"], r["Offset"], r["Owner"]) for r in found] == [("__x64_sys_getuid", 5, "shadow_stub")]
    assert found[0]["Address"] in {a for a, _ in guest_probe_list(run)}
    assert "sv_kprobe_pre [shadow_stub]" in found[0]["Live code"]


def guest_probe_list(run) -> list[tuple[int, str]]:
    out = []
    for line in run("cat /sys/kernel/debug/kprobes/list").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((int(parts[0], 16), parts[2]))
    return out


def test_clean_guest_with_our_stub_has_no_finding(textguest) -> None:
    vm, run = textguest
    assert len(guest_probe_list(run)) == 2 and "[OPTIMIZED]" in run("cat /sys/kernel/debug/kprobes/list")
    assert_clean(vm, run)
    # the other checks see the optimized probe as ours too
    assert [r for r in rows(vm, "linux.check_syscall") if r["Hooked"]] == []
    report = rows(vm, "linux.malware_report")
    assert {r["Verdict"] for r in report} == {"clean"} and "linux.check_text" in {r["Check"] for r in report}


def test_dispatch_patch_is_caught_with_offset_and_culprit(textguest) -> None:
    vm, run = textguest
    run("insmod /tmp/rk_dispatch.ko")
    try:
        assert effect(run)[0] == MARKER
        said = re.search(r"rk_dispatch: x64_sys_call\+(0x[0-9a-f]+) -> ([0-9a-f]+)", run("dmesg | grep rk_dispatch:"))
        site, dest = int(said.group(1), 16), int(said.group(2), 16)
        syms = kallsyms(run, r" (x64_sys_call|rk_getppid)(\s|$)")
        found = [r for r in rows(vm, "linux.check_text") if r["Finding"]]
        assert [(r["Symbol"], r["Offset"], r["Owner"]) for r in found] == [("x64_sys_call", site, "rk_dispatch")]
        row = found[0]
        assert row["Address"] == syms["x64_sys_call"] + site and row["Target"] == dest == syms["rk_getppid [rk_dispatch]"]
        assert row["Target symbol"] == "rk_getppid [rk_dispatch]" and row["Live code"].startswith(("jmp ", "call "))
        live, mine = bytes.fromhex(row["Live bytes"]), bytes.fromhex(row["Image bytes"])
        assert len(live) == len(mine) == 5 and live[0] == mine[0] and live[1:] != mine[1:]  # the rel32 re-pointed
        report = rows(vm, "linux.malware_report")
        assert ("linux.check_text", "rk_dispatch") in {(r["Check"], r["Culprit"]) for r in report
                                                        if r["Verdict"] == "FINDING"}
    finally:
        run("rmmod rk_dispatch", check=False)
    assert_clean(vm, run)


def test_inline_hook_is_caught_with_offset_and_culprit(textguest) -> None:
    vm, run = textguest
    run("insmod /tmp/rk_inline.ko")
    try:
        assert effect(run)[0] != MARKER  # rk_inline re-implements getppid: the guest keeps working
        said = re.search(rf"rk_inline: {TARGET} at ([0-9a-f]+) -> jmp ([0-9a-f]+)", run("dmesg | grep rk_inline:"))
        entry, dest = int(said.group(1), 16), int(said.group(2), 16)
        syms = kallsyms(run, rf" ({TARGET}|rk_getppid)(\s|$)")
        assert entry == syms[TARGET]
        found = [r for r in rows(vm, "linux.check_text") if r["Finding"]]
        assert [(r["Symbol"], r["Offset"], r["Address"], r["Target"], r["Owner"]) for r in found] == \
            [(TARGET, 0, entry, dest, "rk_inline")]
        assert found[0]["Target symbol"] == "rk_getppid [rk_inline]" and "ftrace" in found[0]["Live code"]
        assert bytes.fromhex(found[0]["Live bytes"])[0] == 0xE9
    finally:
        run("rmmod rk_inline", check=False)
    assert_clean(vm, run)


def test_without_the_right_image_one_line_and_no_verdict(textguest, tmp_path) -> None:
    vm, _run = textguest
    r = run_cli("-vm", vm, "linux.check_text", "--kernel-image", str(tmp_path / "missing"))
    assert r.returncode != 0 and r.stdout == "" and "does not exist" in r.stderr and len(r.stderr.splitlines()) == 1
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel\n" * 100)
    r = run_cli("-vm", vm, "linux.check_text", "--kernel-image", str(junk))
    assert r.returncode != 0 and "not a Linux kernel image" in r.stderr and len(r.stderr.splitlines()) == 1
    from shadowvol.vm.image import list_images

    others = [i for i in list_images() if i.release != "6.1.0-57-cloud-amd64" and i.vmlinuz.is_file()]
    if others:  # another kernel's image (the generic flavour, or 6.12) is refused, not compared
        r = run_cli("-vm", vm, "linux.check_text", "--kernel-image", str(others[0].vmlinuz))
        assert r.returncode != 0 and "is not the running kernel" in r.stderr and len(r.stderr.splitlines()) == 1
    # stock vol's way in (-p our plugins, nobody to find the image): the plugin itself says what to pass
    from volatility3.framework import exceptions

    from shadowvol.run import run_plugin
    from shadowvol.target import open_target

    target = open_target(vm=vm)
    try:
        with pytest.raises(exceptions.VolatilityException, match="--kernel-image PATH"):
            run_plugin(target, "linux.check_text").populate()
    finally:
        target.close()
