"""Issue 3: linux.pslist and friends on live memory, compared with the guest's own view."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_pslist_is_guest_ps, guest_ps, pslist, run_cli, same_comm
from shadowvol.qemu.qmp import QMPClient

pytestmark = pytest.mark.live

EXTRA = 120


@pytest.fixture(scope="module")
def busy_guest(web01, guest):
    """web01 with EXTRA more long-lived processes (distinct comms via symlinks)."""
    guest(f"for i in $(seq {EXTRA}); do ln -sf /usr/bin/sv-idle /tmp/sv-x$i; /tmp/sv-x$i & done; sleep 0.5")
    yield web01
    guest("killall sv-idle 2>/dev/null; for i in $(seq %d); do pkill -f /tmp/sv-x$i; done; true" % EXTRA,
          check=False)


@pytest.mark.parametrize("backend", ["shadow", "libvmi"])
def test_pslist_equals_guest_ps(busy_guest, guest, backend):
    ours = assert_pslist_is_guest_ps(guest, backend, "sv-x", EXTRA)
    assert len(ours) >= EXTRA + 20


def test_pslist_on_a_dump_equals_pslist_live(busy_guest, tmp_path):
    dump = tmp_path / "web01.elf"
    with QMPClient(busy_guest.qmp) as q:
        q.execute("stop")
        try:
            live = pslist("-vm", "web01")
            q.execute("dump-guest-memory", paging=False, protocol=f"file:{dump}")
        finally:
            q.execute("cont")
    assert pslist("-f", str(dump)) == live
    assert len(live) > EXTRA


@pytest.mark.parametrize("plugin,column", [
    ("linux.pstree", "PID"), ("linux.psaux", "ARGS"), ("linux.lsmod", "Module Name"), ("linux.kmsg", "line"),
])
def test_stock_plugins_run_live(web01, guest, image, plugin, column):
    if plugin == "linux.lsmod":
        from shadowvol.vm.console import vm_cp
        from shadowvol.vm.kmod import build_module
        from conftest import ROOT

        vm_cp(web01, build_module(image, ROOT / "tests/kits/hello")[0], "/tmp/sv_hello.ko")
        guest("lsmod | grep -q sv_hello || insmod /tmp/sv_hello.ko")
    r = run_cli("-vm", "web01", "-r", "json", plugin)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows and column in rows[0]
    if plugin == "linux.lsmod":
        theirs = {l.split()[0] for l in guest("cat /proc/modules").splitlines()}
        assert {row["Module Name"] for row in rows} == theirs and "sv_hello" in theirs
    if plugin == "linux.kmsg":
        assert any("Linux version" in row["line"] for row in rows)
    if plugin == "linux.psaux":
        assert any(row["ARGS"].startswith("httpd") for row in rows)


def test_kernel_location_matches_guest_kallsyms(web01, guest):
    from shadowvol.target import open_target

    t = open_target(vm="web01")
    try:
        kall = {}
        for line in guest("grep -w -E '_text|init_task|linux_banner|init_top_pgt|sys_call_table' "
                          "/proc/kallsyms").splitlines():
            addr, _, name = line.split()[:3]
            kall[name] = int(addr, 16)
        assert kall["_text"] - t.isf["symbols"]["_text"]["address"] == t.location.virt_shift != 0
        for name, addr in kall.items():
            assert t.isf["symbols"][name]["address"] + t.location.virt_shift == addr, name
    finally:
        t.close()


@pytest.mark.parametrize("args,needle", [
    (("-vm", "nosuchvm", "linux.pslist"), "no VM named"),
    (("-vm", "../x", "linux.pslist"), "invalid VM name"),
    (("-vm", "web01", "linux.nosuchplugin"), "unknown plugin"),
    (("-vm", "web01", "--backend", "fast", "linux.pslist"), "invalid choice"),
    (("-f", "/nonexistent.raw", "linux.pslist"), "does not exist"),
])
def test_bad_targets_give_one_line_errors(web01, args, needle):
    r = run_cli(*args)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err


def test_truncated_and_corrupt_dumps(web01, tmp_path):
    elf = tmp_path / "small.elf"
    with QMPClient(web01.qmp) as q:
        q.execute("dump-guest-memory", paging=False, protocol=f"file:{elf}", begin=0, length=1 << 20)
    data = elf.read_bytes()
    trunc = tmp_path / "trunc.elf"
    trunc.write_bytes(data[:3000])
    junk = tmp_path / "junk.raw"
    junk.write_bytes(os.urandom(1 << 20))
    for path in (trunc, junk):
        r = run_cli("-f", str(path), "linux.pslist")
        assert r.returncode != 0
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_stopped_vm_gives_clear_error(image):
    from shadowvol.vm import qemu

    e = qemu.start_vm("gone1", image, memory="256M", stub=False)
    qemu.stop_vm("gone1")
    r = run_cli("-vm", "gone1", "linux.pslist")
    assert r.returncode != 0 and "no VM named 'gone1'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_read_hexdump_matches_guest(web01, guest):
    addr = int(guest("grep -w linux_banner /proc/kallsyms").split()[0], 16)
    r = run_cli("read", "-vm", "web01", hex(addr), "64")
    assert r.returncode == 0, r.stderr
    text = "".join(line.split("  ", 2)[2] for line in r.stdout.splitlines())
    assert guest("cat /proc/version").startswith(text.replace(".", " ")[:14])
    first = r.stdout.splitlines()[0]
    assert first.startswith(f"{addr:016x}") and "4c 69 6e 75 78" in first  # "Linux"


def test_vm_banner_is_the_running_kernels(web01, guest):
    r = run_cli("vm", "banner", "web01")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(guest("cat /proc/version").strip())


@pytest.mark.parametrize("args,needle", [
    (("read", "-vm", "web01", "0xffff800000000000", "16"), "invalid address 0xffff800000000000 (not present at PML4"),
    (("read", "-vm", "web01", "--physical", hex(1 << 40), "16"), "not in guest RAM"),
    (("read", "-vm", "web01", "0x12zz"), "not a number"),
])
def test_invalid_addresses_give_one_line_errors(web01, args, needle):
    r = run_cli(*args)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_profile_built_from_guest_memory_when_none_is_stored(busy_guest, tmp_path):
    """No stored profile: shadowvol builds one from the BTF and kallsyms in guest RAM."""
    env_before = os.environ.get("SHADOWVOL_PROFILE_DIR")
    state = Path(busy_guest.dir) / "kernel.json"
    with QMPClient(busy_guest.qmp) as q:
        q.execute("stop")
        try:
            reference = pslist("-vm", "web01")
            state.unlink(missing_ok=True)
            os.environ["SHADOWVOL_PROFILE_DIR"] = str(tmp_path)
            from_guest = pslist("-vm", "web01")
        finally:
            q.execute("cont")
            if env_before is None:
                os.environ.pop("SHADOWVOL_PROFILE_DIR", None)
            else:
                os.environ["SHADOWVOL_PROFILE_DIR"] = env_before
            state.unlink(missing_ok=True)
    assert [p.name for p in tmp_path.glob("guest-*.json.xz")]
    assert from_guest == reference and len(reference) > EXTRA


def test_wrong_profile_is_refused(web01):
    from shadowvol import profiles
    from shadowvol.vm.image import build_image

    other, _ = build_image("linux-image-amd64")  # a different kernel (generic flavour)
    path = profiles.store_dir() / f"linux-{other.release}.json.xz"
    r = run_cli("-vm", "web01", "--profile", str(path), "linux.pslist")
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "wrong profile" in err, err


def test_one_process_sees_the_guest_change_across_epochs(web01, guest):
    """A long-lived monitor: each epoch (new_epoch + a new context) sees the guest as it is now."""
    from volatility3.plugins.linux.pslist import PsList

    from shadowvol import volbridge
    from shadowvol.target import open_target

    t = open_target(vm="web01")
    try:
        def pids() -> set[int]:
            t.new_epoch()
            ctx = volbridge.build_context(t.memory, t.kernel, t.location, t.isf)
            return {int(task.pid) for task in PsList.list_tasks(ctx, volbridge.KERNEL_MODULE)}

        before = pids()
        pid = int(guest("ln -sf /usr/bin/sv-idle /tmp/sv-epoch; /tmp/sv-epoch >/dev/null 2>&1 & echo $!").strip())
        assert pid not in before and pid in pids()
        guest(f"kill {pid}; while [ -e /proc/{pid} ]; do sleep 0.1; done")
        assert pid not in pids()
    finally:
        t.close()


#: A process name a hostile guest can give itself (the exec'd file's name, 14 of
#: TASK_COMM_LEN's 15 bytes): erase the line, return to its start, a C1 CSI, a
#: right-to-left override. Printed raw, it rewrites the analyst's screen.
HOSTILE_COMM = "ev\x1b[2Ki\r\x9bl\u202e"
HOSTILE_SHOWN = "ev\\x1b[2Ki\\x0d\\x9bl\\u202e"


def test_a_hostile_process_name_is_shown_escaped_and_given_exactly_in_json(web01, guest):
    """Text output shows every control character of a guest string as an escape
    (nothing in it reaches the terminal raw); -r json carries the exact name."""
    octal = "".join(f"\\{b:03o}" for b in HOSTILE_COMM.encode())
    guest(f"n=$(printf '{octal}'); ln -sf /usr/bin/sv-idle \"/tmp/$n\"; "
          f"setsid \"/tmp/$n\" </dev/null >/dev/null 2>&1 & sleep 0.5")
    try:
        rows = json.loads(run_cli("-vm", "web01", "-r", "json", "linux.pslist").stdout)
        assert [r["COMM"] for r in rows if r["COMM"].startswith("ev")] == [HOSTILE_COMM]
        for renderer in ("quick", "pretty"):
            r = run_cli("-vm", "web01", "-r", renderer, "linux.psaux")
            assert r.returncode == 0, r.stderr
            assert HOSTILE_SHOWN in r.stdout
            assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", r.stdout)
    finally:
        guest("pkill -f /tmp/ev; rm -f /tmp/ev*; true", check=False)
