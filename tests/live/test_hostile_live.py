"""Issue 9 on a real guest: copies of web01's RAM that are cut short or have
a hole give one line and exit 3 (``--partial``: 0), never a silently short
answer; the VM's files are private. Nothing in the guest is corrupted: the
copies are made from outside, of a paused guest, and compared with what the
guest says of itself."""

from __future__ import annotations

import json
import mmap
import os
import stat
from pathlib import Path

import pytest

from conftest import guest_ps, run_cli
from shadowvol.qemu.qmp import QMPClient

pytestmark = pytest.mark.live

MiB = 1 << 20


def _maple_root(target, pid: int) -> tuple[int, int]:
    """(virtual, physical) address of the root node of task ``pid``'s VMA maple tree."""
    from volatility3.plugins.linux.pslist import PsList

    from shadowvol import volbridge

    ctx = volbridge.build_context(target.memory, target.kernel, target.location, target.isf)
    for task in PsList.list_tasks(ctx, volbridge.KERNEL_MODULE):
        if int(task.pid) == pid:
            mte = int(task.mm.mm_mt.ma_root)  # volatility3 masks pointers to the layer's width
            va = target.location.paging_format.canonical(mte & ~0xFF)
            return va, target.kernel.vtop(va)
    raise AssertionError(f"pid {pid} not in the task list")


@pytest.fixture(scope="module")
def paused_copy(web01, guest, tmp_path_factory):
    """A raw copy of web01's RAM taken while it was paused, and facts read at that moment:
    RAM ranges, the kernel's physical extent, one process's VMA count and maple root."""
    from shadowvol import fidelity
    from shadowvol.target import open_target

    d = tmp_path_factory.mktemp("hostile")
    pid = int(guest("pidof syslogd").split()[0])
    vmas = len(guest(f"cat /proc/{pid}/maps").splitlines())
    tasks = guest_ps(guest)
    with QMPClient(web01.qmp) as q:
        q.execute("stop")
        try:
            t = open_target(vm="web01")
            try:
                raw = d / "full.raw"
                fidelity.raw_copy(t.memory, raw)
                ranges = t.memory.ranges()
                syms = t.isf["symbols"]
                shift = t.location.virt_shift
                kernel = (t.kernel.vtop(syms["_text"]["address"] + shift),
                          t.kernel.vtop(syms["_end"]["address"] + shift - 1) + 1)
                _, node_pa = _maple_root(t, pid)
            finally:
                t.close()
        finally:
            q.execute("cont")
    after = guest_ps(guest)
    stable = {p for p, v in tasks.items() if after.get(p) == v}  # alive before and after the pause
    return {"dir": d, "raw": raw, "ranges": ranges, "kernel": kernel, "pid": pid, "vmas": vmas,
            "node_pa": node_pa, "stable": stable}


def _cut(src: Path, dst: Path, size: int) -> Path:
    with open(src, "rb") as f, open(dst, "wb") as g:
        left = size
        while left:
            chunk = f.read(min(left, 64 * MiB))
            g.write(chunk)
            left -= len(chunk)
    return dst


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("mib", [160, 256])
def test_raw_copy_cut_short_is_exit_3(paused_copy, mib: int) -> None:
    """The issue's probes: cut to 160 MiB (empty pslist, exit 0) and 256 MiB (14 of 50 tasks,
    exit 0). Now one line and exit 3 whether or not the kernel image lies below the cut
    (KASLR places it anywhere in RAM)."""
    cut = _cut(paused_copy["raw"], paused_copy["dir"] / f"cut{mib}.raw", mib * MiB)
    r = run_cli("-f", str(cut), "linux.pslist")
    line = _one_line(r.stderr)
    assert r.returncode == 3, line
    assert "truncated dump" in line or "cut short" in line, line
    assert r.stdout.strip() == ""  # no rows: nothing partial printed as if whole


def test_partial_reads_a_cut_copy_that_holds_the_kernel(paused_copy) -> None:
    """A cut past the kernel image: exit 3 naming the RAM the kernel has; --partial lists
    what is there (exit 0, the warning kept), and every task it lists is the guest's."""
    ram_end = max(hi for _, hi in paused_copy["ranges"])
    size = min(-(-paused_copy["kernel"][1] // (16 * MiB)) * 16 * MiB + 16 * MiB, ram_end - MiB)
    assert size > paused_copy["kernel"][1], f"the kernel image ends in the last MiB of RAM: {paused_copy['kernel']}"
    cut = _cut(paused_copy["raw"], paused_copy["dir"] / "cut-kernel.raw", size)
    r = run_cli("-f", str(cut), "linux.pslist")
    line = _one_line(r.stderr)
    assert r.returncode == 3 and "truncated dump" in line and f"({size >> 20} MiB)" in line, line
    assert "--partial" in line
    r = run_cli("-f", str(cut), "--partial", "-r", "json", "linux.pslist")
    assert r.returncode == 0, r.stderr
    assert "truncated dump" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert all(l.startswith("shadowvol: warning: ") for l in r.stderr.strip().splitlines()), r.stderr
    pids = {row["PID"] for row in json.loads(r.stdout)}
    # the whole copy of the same instant: every task the guest had, and the cut one lists no other
    full = run_cli("-f", str(paused_copy["raw"]), "-r", "json", "linux.pslist")
    assert full.returncode == 0 and full.stderr.strip() == "", full.stderr
    every = {row["PID"] for row in json.loads(full.stdout)}
    assert paused_copy["stable"] <= every, sorted(paused_copy["stable"] - every)
    assert pids and pids <= every, (sorted(pids - every), r.stderr)


def _holed_lime(paused_copy, hole: tuple[int, int], name: str) -> Path:
    """The raw copy as LiME, without the physical range ``hole``: memory the guest has
    but the dump lacks, where nothing says so (the max_pfn check passes)."""
    from shadowvol.snapshot import write_lime

    out = paused_copy["dir"] / name
    with open(paused_copy["raw"], "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        try:
            segments = []
            for lo, hi in paused_copy["ranges"]:
                for a, b in ((lo, min(hi, hole[0])), (max(lo, hole[1]), hi)):
                    if a < b:
                        segments.append((a, b, view[a:b]))
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_lime(segments, fd)
            finally:
                os.close(fd)
            segments.clear()
        finally:
            view.release()
            mm.close()
    return out


def test_hole_under_a_maple_tree_is_exit_3(paused_copy) -> None:
    """proc.Maps walks a process's VMAs in the maple tree; its root node's page is missing
    from the copy. The stock walk stops there: one line naming the maple tree, exit 3;
    --partial accepts it. (Without the report: fewer VMAs than /proc/PID/maps, exit 0.)"""
    page = paused_copy["node_pa"] & ~0xFFF
    holed = _holed_lime(paused_copy, (page, page + 0x1000), "maple-hole.lime")
    pid = str(paused_copy["pid"])
    r = run_cli("-f", str(holed), "-r", "json", "linux.proc.Maps", "--pid", pid)
    line = _one_line(r.stderr)
    assert r.returncode == 3 and "maple tree" in line and "--partial accepts it" in line, line
    rows = json.loads(r.stdout) if r.stdout.strip() else []  # (the json renderer prints at the end)
    assert len(rows) < paused_copy["vmas"]
    r = run_cli("-f", str(holed), "--partial", "linux.proc.Maps", "--pid", pid)
    assert r.returncode == 0 and "maple tree" in _one_line(r.stderr)
    # the same copy with nothing missing: every VMA, no warning
    whole = _holed_lime(paused_copy, (0, 0), "whole.lime")
    r = run_cli("-f", str(whole), "-r", "json", "linux.proc.Maps", "--pid", pid)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    assert len(json.loads(r.stdout)) == paused_copy["vmas"]


def test_vm_files_are_private(web01) -> None:
    """Guest RAM, sockets, the registry entry and QEMU's logs (the console log is QEMU's
    stream, the one file not written atomically): 0600, in 0700 directories."""
    d = Path(web01.dir)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(d.parent.stat().st_mode) == 0o700
    files = sorted(d.iterdir())
    assert {p.name for p in files} >= {"vm.json", "console.log", "qemu.log", "qemu.pid", "qmp.sock"}
    for p in [*files, Path(web01.ram_file)]:
        assert stat.S_IMODE(p.lstat().st_mode) == 0o600, p
    assert stat.S_IMODE(Path(web01.ram_file).parent.stat().st_mode) == 0o700


def test_error_cell_is_exit_3_and_output_files_are_whole(web01, guest, tmp_path) -> None:
    """The issue's probe: ``linux.pslist --pid 1 --dump`` exited 0 with "Error outputting
    file" in a column. And what -o writes (our atomic handler, as vol -o names it): each
    file a plugin reports is there whole, 0600, and nothing half-written is left."""
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli("-vm", "web01", "-o", str(out), "linux.pslist", "--pid", "1", "--dump")
    if "Error outputting file" in r.stdout:
        line = _one_line(r.stderr)
        assert r.returncode == 3 and "Error outputting file" in line and "--partial" in line, line
        r = run_cli("-vm", "web01", "--partial", "-o", str(out), "linux.pslist", "--pid", "1", "--dump")
        assert r.returncode == 0 and "Error outputting file" in _one_line(r.stderr)
    else:  # the ELF header page of init was resident: a file, no warning
        assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    pid = guest("pidof syslogd").split()[0]
    r = run_cli("-vm", "web01", "-r", "json", "-o", str(out), "linux.proc.Maps", "--pid", pid, "--dump")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    names = {row["File output"] for row in rows}
    assert names and not any(n.startswith("Error") for n in names), names
    on_disk = {p.name: p for p in out.iterdir() if p.name.startswith(f"pid.{pid}.")}
    assert set(on_disk) == names
    for row in rows:
        p = on_disk[row["File output"]]
        assert p.stat().st_size == row["End"] - row["Start"], row
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".vol3"))]


def test_a_snapshot_failing_at_its_last_file_leaves_nothing(web01, tmp_path, monkeypatch) -> None:
    """The RAM image and the profile are written, then the manifest fails (a full disk):
    no folder that looks like a snapshot, no scratch folder, the VM still running."""
    from shadowvol import snapshot
    from shadowvol.errors import ShadowvolError

    def full_disk(path, data, *a, **k):  # noqa: ANN001
        raise ShadowvolError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(snapshot, "atomic_write", full_disk)
    with pytest.raises(ShadowvolError, match="No space"):
        snapshot.take_snapshot("web01", tmp_path / "snap")
    assert list(tmp_path.iterdir()) == []
    with QMPClient(web01.qmp) as q:
        assert q.execute("query-status")["running"]
