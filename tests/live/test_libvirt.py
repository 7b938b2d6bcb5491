"""Issue 15: ``-vm NAME`` on a libvirt domain, with a real libvirtd.

The module's fixture starts virtlogd and libvirtd when they are not running,
defines and starts a q35 TCG domain booting our web01 kernel and initramfs
(copied where ``libvirt-qemu`` can read them), and destroys and undefines it
at the end. The guest's control agent sits on the domain's second serial port
(a unix socket), so the guest's own ``ps`` and ``/proc/kallsyms`` are the
ground truth. libvirtd keeps the domain's monitor the whole time: we reach
QEMU only through libvirt (``virsh qemu-monitor-command`` must keep working),
and the domain's XML and run state must be what they were.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, assert_pslist_is_guest_ps, guest_ps, pslist, run_cli
from libvirt_domain import domain_xml, ensure_libvirtd, prepare_dir, wait_agent, wait_console

libvirt = pytest.importorskip("libvirt", reason="the libvirt binding (pip install '.[libvirt]', scripts/setup)")

pytestmark = pytest.mark.live

EXTRA = 40  # long-lived guest processes with distinct comms, as in test_pslist
SYS_UNAME = 63


@pytest.fixture(scope="module")
def lvdom(image):
    started = ensure_libvirtd()
    name = f"svlv{secrets.token_hex(3)}"
    base = Path(tempfile.mkdtemp(prefix="shadowvol-test-", dir="/var/lib/libvirt"))
    d, k, i = prepare_dir(base, Path(image.vmlinuz), Path(image.initramfs))
    xml = domain_xml(name, d, k, i, stub=False)
    conn = libvirt.open("qemu:///system")
    dom = conn.defineXML(xml)
    try:
        dom.create()
        wait_console(d / "console.log", f"shadowvol: guest {name} up".encode())
        entry = SimpleNamespace(name=name, dir=str(d), ctl=str(d / "ctl.sock"))
        wait_agent(entry)
        yield SimpleNamespace(name=name, dir=d, dom=dom, conn=conn, image=image, entry=entry)
    finally:
        try:
            if dom.isActive():
                dom.destroy()
        finally:
            dom.undefine()
            conn.close()
            shutil.rmtree(base, ignore_errors=True)
            for pid in started:  # daemons this fixture started, by pid
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="module")
def lvguest(lvdom):
    """Run a shell command in the domain's guest through its control agent (ttyS1)."""
    from shadowvol.vm.console import vm_exec

    def run(cmd: str, check: bool = True, timeout: float = 120.0) -> str:
        rc, out = vm_exec(lvdom.entry, cmd, timeout=timeout)
        if check:
            assert rc == 0, f"guest command {cmd!r} failed ({rc}): {out.decode(errors='replace')}"
        return out.decode(errors="replace")

    run(f"for i in $(seq {EXTRA}); do ln -sf /usr/bin/sv-idle /tmp/sv-l$i; /tmp/sv-l$i & done; sleep 0.5")
    return run


def _xml(dom) -> tuple[str, str]:
    return dom.XMLDesc(0), dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)


def _virsh_monitor(name: str) -> dict:
    """``virsh qemu-monitor-command``: libvirt's monitor answers (we never took it away)."""
    p = subprocess.run(["virsh", "-c", "qemu:///system", "qemu-monitor-command", name,
                        '{"execute":"query-status"}'], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["return"]


@pytest.fixture
def unchanged(lvdom):
    """The domain's XML (live and persistent) and run state are the same after the test,
    and virsh can still use the monitor."""
    before = _xml(lvdom.dom)
    state = lvdom.dom.state()[0]
    yield
    assert _xml(lvdom.dom) == before
    assert lvdom.dom.state()[0] == state
    assert _virsh_monitor(lvdom.name)["running"] == (state == libvirt.VIR_DOMAIN_RUNNING)


@pytest.mark.parametrize("backend", ["shadow", "libvmi"])
def test_pslist_equals_guest_ps(lvdom, lvguest, unchanged, backend):
    ours = assert_pslist_is_guest_ps(lvguest, backend, "sv-l", EXTRA, vm=lvdom.name)
    assert len(ours) >= EXTRA + 20


def test_libvirt_prefix_resolves_the_same_domain(lvdom, lvguest, unchanged):
    before = guest_ps(lvguest)
    forced = pslist("-vm", f"libvirt:{lvdom.name}", "--connect", "qemu:///system")
    plain = pslist("-vm", lvdom.name)
    stable = {p for p, v in before.items() if forced.get(p) == v and plain.get(p) == v}
    assert len(stable) >= EXTRA + 20


def test_vm_list_marks_libvirt_domains(lvdom):
    r = run_cli("vm", "list")
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith(f"libvirt:{lvdom.name} "))
    assert "running" in line and "(read-only)" in line and "vmcoreinfo=yes" in line and "gdb=none" in line
    pid = int(Path(f"/run/libvirt/qemu/{lvdom.name}.pid").read_text())
    assert f" {pid} " in line


def test_kernel_found_from_vmcoreinfo_and_from_registers(lvdom, lvguest):
    """shadow reads the VMCOREINFO note the guest registered with the vmcoreinfo device;
    libvmi (too slow to scan) identifies the kernel from CR3. Both land on the kernel the
    guest's /proc/kallsyms shows."""
    from shadowvol.target import _open_libvirt, _resolve, vmcoreinfo_note

    text = int(lvguest("grep ' _text$' /proc/kallsyms").split()[0], 16)
    for backend in ("shadow", "libvmi"):
        src = _open_libvirt(lvdom.name, backend, None)
        src.state_dir = None  # no per-boot cache: find it afresh
        try:
            if backend == "shadow":
                info = vmcoreinfo_note(src.memory)
                assert info and info["OSRELEASE"] == lvguest("uname -r").strip()
            t = _resolve(src, None, lambda msg: None)
            assert t.isf["symbols"]["_text"]["address"] + t.location.virt_shift == text
            assert t.location.source == ("vmcoreinfo" if backend == "shadow" else "registers")
        finally:
            src.memory.close()


@pytest.mark.parametrize("backend", ["shadow", "libvmi"])
def test_check_syscall_matches_guest_kallsyms(lvdom, lvguest, unchanged, backend):
    from test_check_syscall import kallsyms

    r = run_cli("-vm", lvdom.name, "--backend", backend, "-r", "json", "linux.check_syscall")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [x for x in rows if x["Hooked"]] == []
    syms = kallsyms(lvguest)
    table = [x for x in rows if x["Check"] == "sys_call_table"]
    assert len(table) > 400
    for x in table:
        assert x["Target"] == syms[f"__x64_sys_{x['Syscall']}"], x


def test_paused_domain_stays_paused(lvdom, lvguest):
    lvdom.dom.suspend()
    try:
        xml = _xml(lvdom.dom)
        for backend in ("shadow", "libvmi"):
            r = run_cli("-vm", lvdom.name, "--backend", backend, "linux.pslist")
            assert r.returncode == 0, r.stderr
            assert lvdom.dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
            assert _virsh_monitor(lvdom.name)["running"] is False
        assert _xml(lvdom.dom) == xml
    finally:
        lvdom.dom.resume()
    assert lvdom.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING


def test_virsh_uses_the_monitor_during_a_run(lvdom, lvguest, unchanged):
    """While a libvmi run sends its reads through libvirt, virsh's own monitor commands work."""
    done = threading.Event()
    answers = []

    def poll() -> None:
        while not done.is_set():
            answers.append(_virsh_monitor(lvdom.name)["running"])

    th = threading.Thread(target=poll)
    th.start()
    try:
        r = run_cli("-vm", lvdom.name, "--backend", "libvmi", "linux.pslist")
    finally:
        done.set()
        th.join(60)
    assert r.returncode == 0, r.stderr
    assert answers and all(answers)


#: Stock plugins that read most of guest RAM or of the kernel's address space: through
#: libvirt every libvmi page read is an ``xp`` round trip (~15-25 ms a page on this host), so
#: each takes from several minutes to hours there (measured: kallsyms and vmcoreinfo > 240 s;
#: psscan and sockscan scan all 512 MiB, 131,072 pages). They run on the shadow backend.
LIBVMI_TOO_SLOW = {"linux.psscan.PsScan", "linux.sockscan.Sockscan", "linux.kallsyms.Kallsyms",
                   "linux.vmcoreinfo.VMCoreInfo"}


#: The sweep CI runs on a domain: one stock plugin per kind of kernel structure a plugin walks
#: (task list and pid tree, process memory and environment, open files and mounts, modules,
#: sockets, the kernel log, a physical scan). The whole sweep on our own VMs is
#: tests/live/test_fidelity.py; on a domain it takes 30 minutes for both backends, so it runs
#: with SHADOWVOL_LIBVIRT_FULL_SWEEP=1 (or: shadowvol bench sweep -vm libvirt:NAME).
DOMAIN_SWEEP = ["linux.pslist.PsList", "linux.pstree.PsTree", "linux.psaux.PsAux", "linux.envars.Envars",
                "linux.proc.Maps", "linux.lsof.Lsof", "linux.mountinfo.MountInfo", "linux.lsmod.Lsmod",
                "linux.sockstat.Sockstat", "linux.kmsg.Kmsg", "linux.psscan.PsScan"]


@pytest.mark.parametrize("backend", ["shadow", "libvmi"])
def test_stock_plugin_sweep(lvdom, lvguest, tmp_path_factory, backend):
    """Stock Linux plugins live on the domain give what stock vol gives on a copy of its RAM
    (the domain is paused through libvirt for the copy and resumed): DOMAIN_SWEEP, or every
    plugin with SHADOWVOL_LIBVIRT_FULL_SWEEP=1; on libvmi, all but those that read most of
    RAM (LIBVMI_TOO_SLOW)."""
    from shadowvol import fidelity
    from test_fidelity import UPSTREAM_FAILURES, _vol_cache

    xml = _xml(lvdom.dom)
    lvguest("(SV_FIDELITY=1 sleep 3600 &) ; echo fidelity > /tmp/sv-fidelity.txt; true")
    names = sorted(p.name for p in fidelity.stock_plugins() if not p.error)
    assert set(DOMAIN_SWEEP) | LIBVMI_TOO_SLOW <= set(names)
    if os.environ.get("SHADOWVOL_LIBVIRT_FULL_SWEEP") != "1":
        names = sorted(DOMAIN_SWEEP)
    if backend == "libvmi":
        names = [n for n in names if n not in LIBVMI_TOO_SLOW]
    rows = fidelity.sweep(lvdom.name, tmp_path_factory.mktemp(f"sweep-{backend}"), plugins=names,
                          backend=backend, timeout=900, vol_cache=_vol_cache(tmp_path_factory))
    assert lvdom.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, "the sweep must resume a running domain"
    assert _xml(lvdom.dom) == xml
    assert {r.plugin for r in rows} == set(names)
    bad = [f"{r.plugin}: {r.verdict} {r.live_error or r.dump_error} {r.only_live[:1]} {r.only_dump[:1]}"
           for r in rows if r.verdict != "identical"
           and not (r.plugin in UPSTREAM_FAILURES and r.verdict == "fails-as-stock")]
    assert not bad, "\n".join(bad)


def test_trace_with_the_stub_the_user_loads(lvdom, lvguest, tmp_path):
    """The domain booted without our stub; the user builds it for the guest's kernel package,
    copies it in and loads it; then trace reads the guest's syscalls from its rings."""
    from shadowvol.vm.console import vm_cp

    ko = tmp_path / "shadow_stub.ko"
    r = run_cli("stub", "build", "--kernel-package", lvdom.image.manifest["image_package"], "-o", str(ko),
                timeout=900)
    assert r.returncode == 0, r.stderr
    assert "shadow_stub" not in lvguest("cat /proc/modules")
    vm_cp(lvdom.entry, ko, "/tmp/shadow_stub.ko")
    lvguest("insmod /tmp/shadow_stub.ko")
    proc = subprocess.Popen([sys.executable, "-m", "shadowvol", "trace", "-vm", lvdom.name, "--syscalls",
                             "--duration", "40", "-r", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    try:
        # The tracer starts at the rings' heads once it has opened the target (seconds on a
        # loaded host): the guest keeps calling uname for 30 s, well inside the 40 s traced.
        time.sleep(3)
        pid = int(lvguest("for i in $(seq 150); do uname -a >/dev/null; sleep 0.2; done; echo $$",
                          timeout=180).split()[-1])
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    evs = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    unames = [e for e in evs if e["kind"] == "syscall" and e.get("nr") == SYS_UNAME]
    assert len(unames) >= 8, (len(evs), err[-300:])
    assert any(e["tgid"] == pid for e in evs), pid


def test_breakpoints_say_the_domain_has_no_gdbstub(lvdom, unchanged):
    r = run_cli("trace", "-vm", lvdom.name, "--backend", "libvmi", "--duration", "1")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "has no gdbstub" in r.stderr and "shadowvol never adds one" in r.stderr


# -- bad input: one clear line, non-zero exit ----------------------------------------


def _one_line(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_domain(lvdom):
    _one_line(run_cli("-vm", f"libvirt:{lvdom.name}x", "linux.pslist"),
              f"no libvirt domain named '{lvdom.name}x' at qemu:///system")
    _one_line(run_cli("-vm", f"{lvdom.name}x", "linux.pslist"), f"no VM named '{lvdom.name}x'")


def test_shut_off_domain(lvdom):
    name = f"{lvdom.name}off"
    dom = lvdom.conn.defineXML(domain_xml(name, lvdom.dir, lvdom.dir / "vmlinuz", lvdom.dir / "initramfs.cpio.gz"))
    try:
        for backend in ("shadow", "libvmi"):
            _one_line(run_cli("-vm", name, "--backend", backend, "linux.pslist"), f"'{name}' is shut off")
        assert not dom.isActive()
    finally:
        dom.undefine()


def test_libvirtd_not_reachable(lvdom, tmp_path):
    """What a client sees when libvirtd is not running: nothing listens on its socket."""
    uri = f"qemu:///system?socket={tmp_path}/libvirt-sock"
    _one_line(run_cli("-vm", f"libvirt:{lvdom.name}", "--connect", uri, "linux.pslist"),
              "is not reachable: is libvirtd running?")
    _one_line(run_cli("vm", "list", "--connect", uri), "is not reachable: is libvirtd running?")


def _unprivileged_python() -> str | None:
    """A Python of the venv's version that user nobody can run (the venv's own may sit
    under /root), else None."""
    for exe in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(exe):
            p = subprocess.run(["runuser", "-u", "nobody", "--", exe, "-c",
                                "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
            if p.returncode == 0 and p.stdout.strip() == str(sys.version_info[:2]):
                return exe
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_user_without_permission(lvdom):
    exe = _unprivileged_python()
    # The venv is Python 3.11, as is Debian 12's /usr/bin/python3, which nobody can run.
    assert exe is not None, f"no Python {sys.version_info[:2]} that user nobody can run"
    import site

    home = Path(tempfile.mkdtemp(prefix="svtest-nobody-"))
    os.chown(home, 65534, grp.getgrnam("nogroup").gr_gid)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "SHADOWVOL_RUN": str(home / "run"),
           "SHADOWVOL_CACHE": str(home / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])}
    r = subprocess.run(["runuser", "-u", "nobody", "--", "env", *[f"{k}={v}" for k, v in env.items()],
                        exe, "-m", "shadowvol", "-vm", f"libvirt:{lvdom.name}", "linux.pslist"],
                       capture_output=True, text=True, timeout=120)
    shutil.rmtree(home, ignore_errors=True)
    _one_line(r, "permission denied for user nobody")


def test_snapshot_diff_and_watch_through_connect(lvdom, lvguest, unchanged, tmp_path):
    """``snapshot``, ``diff`` and ``watch`` on ``-vm libvirt:NAME --connect URI``: the snapshot
    (and ``watch --pause-ms``) pause the domain through libvirt (it runs again after,
    libvirt's state intact: the ``unchanged`` fixture) and the snapshot verifies; a process started after it is ``added`` in a diff
    against the domain now, and ``+`` under watch, with the pid the guest gave it."""
    from shadowvol.bundle import verify_bundle

    spec, uri = f"libvirt:{lvdom.name}", ["--connect", "qemu:///system"]
    r = run_cli("snapshot", "-vm", spec, *uri, "-o", str(tmp_path / "a"), "-r", "json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["was_running"] and made["pause_ms"] > 0 and verify_bundle(tmp_path / "a") == []
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["vcpus"] and manifest["vcpus"][0]["cr3"] and manifest["vmcoreinfo"]["OSRELEASE"]
    assert manifest["kernel"]["release"] == lvguest("uname -r").strip()

    proc = subprocess.Popen([sys.executable, "-m", "shadowvol", "watch", "-vm", spec, *uri, "--interval", "5",
                             "--count", "3", "-r", "jsonl", "--stats", "linux.pslist"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        line = ""
        while "tick 0:" not in line:
            line = proc.stderr.readline()
            assert line, f"watch gave no first tick: {proc.communicate(timeout=60)[1][-500:]}"
        pid = int(lvguest("sleep 5679 >/dev/null 2>&1 & echo $!").split()[-1])
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    plus = [c for c in map(json.loads, out.splitlines()) if c["change"] == "+" and c["PID"] == pid]
    assert plus and plus[0]["COMM"] == "sleep", out
    r = run_cli("watch", "-vm", spec, *uri, "--count", "2", "--interval", "1", "--pause-ms", "5", "linux.pslist")
    assert r.returncode == 0, r.stderr  # paused and resumed through libvirt: unchanged checks its state
    assert lvdom.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    r = run_cli("diff", str(tmp_path / "a"), "-vm", spec, *uri, "--kinds", "process,module", "-r", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert any(x["kind"] == "process" and x["change"] == "added" and x["pid"] == pid and x["comm"] == "sleep"
               for x in rows), rows
    assert not any(x["change"] == "removed" and x.get("pid") == 1 for x in rows)
