"""Issue 13: snapshots of a live VM (stock vol opens them, hashes verify, the
VM's run state is kept) and ``watch`` printing what changes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shadowvol import fidelity
from shadowvol.bundle import verify_bundle
from shadowvol.qemu.qmp import QMPClient

from conftest import run_cli

pytestmark = pytest.mark.live


def _running(entry) -> bool:
    with QMPClient(entry.qmp) as q:
        return bool(q.execute("query-status").get("running"))


def _pids(rows: list[dict]) -> dict[int, str]:
    return {r["PID"]: r["COMM"] for r in rows}


def test_snapshot_opens_with_stock_vol_and_its_hashes_verify(web01, guest, tmp_path: Path) -> None:
    pid = int(guest("sleep 4321 >/dev/null 2>&1 & echo $!").split()[-1])
    out = tmp_path / "snap"
    r = run_cli("snapshot", "-vm", "web01", "-o", str(out), "-r", "json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["was_running"] and 0 < summary["pause_ms"] < 5000
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for f in out.rglob("*"):
        assert stat.S_IMODE(f.stat().st_mode) == (0o700 if f.is_dir() else 0o600), f
    m = json.loads((out / "manifest.json").read_text())
    assert m["memory"] == "memory.lime" and (out / m["symbols"] / "linux").is_dir()
    assert m["kernel"]["release"] == web01.release and m["kernel"]["banner"].startswith("Linux version ")
    assert len(m["vcpus"]) == web01.cpus and m["vcpus"][0]["cr3"]
    assert m["vmcoreinfo"]["OSRELEASE"] == web01.release
    assert m["taken_at"].endswith("+00:00")
    assert set(m["sha256"]) == {m["memory"], m["profile"]}
    assert verify_bundle(out) == []
    assert run_cli("snapshot", "--verify", str(out)).returncode == 0

    stock = subprocess.run([fidelity.vol_command(), "-q", "-r", "json", "-f", str(out / m["memory"]),
                            "-s", str(out / m["symbols"]), "linux.pslist"],
                           capture_output=True, text=True, timeout=600)
    assert stock.returncode == 0, stock.stderr[-2000:]
    ours = run_cli("-f", str(out), "-r", "json", "linux.pslist")
    assert ours.returncode == 0, ours.stderr
    stock_pids, our_pids = _pids(json.loads(stock.stdout)), _pids(json.loads(ours.stdout))
    assert stock_pids == our_pids
    assert stock_pids[1] and stock_pids[pid] == "sleep"

    with open(out / m["memory"], "r+b") as f:  # one flipped byte is seen
        f.seek(4096)
        b = f.read(1)
        f.seek(4096)
        f.write(bytes([b[0] ^ 1]))
    assert verify_bundle(out) == [m["memory"]]
    assert run_cli("snapshot", "--verify", str(out)).returncode == 1


def test_run_state_is_kept_and_nothing_is_overwritten(web01, tmp_path: Path) -> None:
    assert _running(web01)
    r = run_cli("snapshot", "-vm", "web01", "-o", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert _running(web01)
    with QMPClient(web01.qmp) as q:
        q.execute("stop")
    try:
        r = run_cli("snapshot", "-vm", "web01", "-o", str(tmp_path / "b"), "-r", "json")
        assert r.returncode == 0, r.stderr
        assert not _running(web01)
        assert json.loads(r.stdout)["was_running"] is False
    finally:
        with QMPClient(web01.qmp) as q:
            q.execute("cont")
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    r = run_cli("snapshot", "-vm", "web01", "-o", str(tmp_path / "a"))
    assert r.returncode == 1 and "exists" in r.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before


def test_a_failed_snapshot_leaves_nothing_and_the_vm_running(web01, tmp_path: Path, monkeypatch) -> None:
    from shadowvol import snapshot

    def broken(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot.RamCopy, "copy", broken)
    with pytest.raises(OSError):
        snapshot.take_snapshot("web01", tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert _running(web01)


def test_watch_sees_a_started_process(web01, guest) -> None:
    cmd = [sys.executable, "-m", "shadowvol", "watch", "-vm", "web01", "--interval", "5", "--count", "3",
           "-r", "jsonl", "--stats", "linux.pslist"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "tick 0:" not in line:  # the baseline is taken: what starts now is a change
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, "watch gave no first tick"
        pid = int(guest("sleep 5678 >/dev/null 2>&1 & echo $!").split()[-1])
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    changes = [json.loads(x) for x in out.splitlines()]
    plus = [c for c in changes if c["change"] == "+" and c["PID"] == pid]
    assert plus and plus[0]["COMM"] == "sleep" and plus[0]["tick"] in (1, 2), changes
    assert all(set(c) >= {"PID", "COMM", "change", "tick"} for c in changes)
    assert not [c for c in changes if c["change"] == "-" and c["PID"] == pid]


def test_diff_sees_a_started_process_and_an_insmod_module(web01, guest, image, tmp_path: Path) -> None:
    from conftest import ROOT
    from shadowvol.vm.console import vm_cp
    from shadowvol.vm.kmod import build_module

    vm_cp(web01, build_module(image, ROOT / "tests/kits/hello")[0], "/tmp/sv_hello.ko")
    guest("if lsmod | grep -q sv_hello; then rmmod sv_hello; fi")
    assert run_cli("snapshot", "-vm", "web01", "-o", str(tmp_path / "a")).returncode == 0
    guest("insmod /tmp/sv_hello.ko")
    pid = int(guest("sleep 8765 >/dev/null 2>&1 & echo $!").split()[-1])
    assert run_cli("snapshot", "-vm", "web01", "-o", str(tmp_path / "b")).returncode == 0
    r = run_cli("diff", str(tmp_path / "a"), str(tmp_path / "b"), "-r", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {"kind": "process", "change": "added", "pid": pid, "comm": "sleep"}.items() <= \
        next(x for x in rows if x.get("pid") == pid).items()
    assert any(x["kind"] == "module" and x["change"] == "added" and x["name"] == "sv_hello" for x in rows)
    assert not any(x["change"] == "removed" and x.get("pid") == 1 for x in rows)
    live = run_cli("diff", str(tmp_path / "b"), "-vm", "web01")  # a snapshot against the VM now
    assert live.returncode == 0, live.stderr
    assert f"pid={pid} " not in live.stdout  # still there: no change for it


@pytest.fixture(scope="module")
def rk14(image):
    """A guest of this module's own for the rootkit kits (never web01)."""
    from shadowvol.vm import qemu

    entry = qemu.start_vm("rk14", image, memory="512M", stub=False)
    yield entry
    qemu.stop_vm("rk14")


def test_diff_shows_the_hooks_a_rootkit_installs(rk14, image, tmp_path: Path) -> None:
    from conftest import ROOT
    from shadowvol.vm.console import vm_cp, vm_exec
    from shadowvol.vm.kmod import build_module

    def run(cmd: str) -> str:
        rc, out = vm_exec(rk14, cmd, timeout=120.0)
        assert rc == 0, f"{cmd!r} failed ({rc}): {out!r}"
        return out.decode(errors="replace")

    for kit in ("rk_sctable", "rk_inline"):
        vm_cp(rk14, build_module(image, ROOT / "tests/kits" / kit)[0], f"/tmp/{kit}.ko")
    assert run_cli("snapshot", "-vm", "rk14", "-o", str(tmp_path / "clean")).returncode == 0
    run("insmod /tmp/rk_sctable.ko && insmod /tmp/rk_inline.ko")
    try:
        r = run_cli("snapshot", "-vm", "rk14", "-o", str(tmp_path / "owned"))
        assert r.returncode == 0, r.stderr
    finally:
        run("rmmod rk_inline; rmmod rk_sctable")
    r = run_cli("diff", str(tmp_path / "clean"), str(tmp_path / "owned"), "-r", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    added = {x["name"] for x in rows if x["kind"] == "module" and x["change"] == "added"}
    assert {"rk_sctable", "rk_inline"} <= added
    hooked = [x for x in rows if x["kind"] == "syscall" and x["change"] == "changed"]
    assert hooked and all(x["after"].get("hooked") for x in hooked if "hooked" in x["after"]), hooked
    assert any(x["check"] == "sys_call_table" for x in hooked), hooked
    assert any(x["kind"] == "text" and x["change"] == "changed" for x in rows)  # the inline jmp


def test_watch_pause_ms_leaves_the_vm_running(web01) -> None:
    for limit in ("5", "60000"):  # resumed by the timer mid-tick, or at the end of the tick
        r = run_cli("watch", "-vm", "web01", "--count", "1", "--pause-ms", limit, "linux.pslist")
        assert r.returncode == 0, r.stderr
        assert _running(web01)


def test_watch_ends_cleanly_when_the_vm_stops(image) -> None:
    from shadowvol.errors import VMError
    from shadowvol.vm import qemu

    entry = qemu.start_vm("gone14", image, memory="512M", stub=False)
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "shadowvol", "watch", "-vm", "gone14", "--interval", "1",
                                 "--count", "60", "--stats", "linux.lsmod"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        line = ""
        while "tick 0:" not in line:
            line = proc.stderr.readline()
            assert line, "watch gave no first tick"
        qemu.stop_vm(entry.name)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "gone14 has stopped" in err
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        try:
            qemu.stop_vm(entry.name)
        except VMError:
            pass  # stopped by the test


def _kaslr_shift(entry) -> int:
    """The guest's own KASLR shift: its _text in /proc/kallsyms against the link address."""
    from shadowvol.vm.console import vm_exec

    rc, out = vm_exec(entry, "grep -w _text /proc/kallsyms", timeout=60.0)
    assert rc == 0, out
    return int(out.split()[0], 16) - 0xFFFFFFFF81000000


@pytest.mark.parametrize("how", ["name", "qmp", "pid"])
def test_watch_follows_a_guest_reboot(image, how: str) -> None:
    """A guest of its own rebooted from inside under watch: one line names the new
    KASLR shift (the guest's own, from /proc/kallsyms), and the watch goes on
    reading the new kernel (a process started after the reboot appears as +). The
    same whether -vm names it, its QMP socket (qmp:) or its QEMU process (pid:): the
    vCPU's CR3 is asked through the target's own monitor."""
    from shadowvol.errors import VMError
    from shadowvol.vm import qemu
    from shadowvol.vm.console import vm_exec

    entry = qemu.start_vm("boot14", image, memory="512M", stub=False)
    proc = None
    try:
        with QMPClient(entry.qmp) as q:  # our guests run with -no-reboot: let this one reset instead
            q.execute("set-action", reboot="reset")
        old_shift = _kaslr_shift(entry)
        spec = {"name": entry.name, "qmp": f"qmp:{entry.qmp}", "pid": f"pid:{entry.pid}"}[how]
        proc = subprocess.Popen([sys.executable, "-m", "shadowvol", "watch", "-vm", spec, "--interval", "1",
                                 "--count", "400", "-r", "jsonl", "--stats", "linux.pslist"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        line = ""
        while "tick 0:" not in line:
            line = proc.stderr.readline()
            assert line, "watch gave no first tick"
        try:
            vm_exec(entry, "reboot -f", timeout=5.0)
        except VMError:
            pass  # the console went down with the guest
        deadline = time.monotonic() + 300
        seen = []
        while not any("kernel located again" in x for x in seen):
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, f"watch never re-located the kernel: {seen[-5:]}"
            seen.append(line)
        while True:  # a request sent while the guest boots is lost: ask again until its agent answers
            try:
                if vm_exec(entry, "true", timeout=5.0)[0] == 0:
                    break
            except VMError:
                assert time.monotonic() < deadline, "the guest's agent never came back after the reboot"
        new_shift = _kaslr_shift(entry)
        if new_shift != old_shift:  # KASLR chose another slide (it may, rarely, choose the same)
            said = next(x for x in seen if "kernel located again" in x)
            assert f"KASLR shift {old_shift:#x} -> {new_shift:#x}" in said, said
            assert sum("no longer at KASLR shift" in x for x in seen) == 1, seen
        rc, out = vm_exec(entry, "sleep 4321 >/dev/null 2>&1 & echo $!", timeout=60.0)
        pid = int(out.split()[-1])
        plus = None
        while plus is None:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "watch did not show the new process"
            row = json.loads(line)
            if row["change"] == "+" and row["PID"] == pid:
                plus = row
        assert plus["COMM"] == "sleep" and "partial" not in plus
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        try:
            qemu.stop_vm(entry.name)
        except VMError:
            pass
