"""Issue 2: build, boot and drive real guests; compare with the guest's own view."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from shadowvol.errors import VMError
from shadowvol.vm import qemu, registry
from shadowvol.vm.image import Image, build_image
from shadowvol.vm.kmod import build_module

pytestmark = pytest.mark.live


def test_second_build_is_noop(image):
    img, built = build_image()
    assert not built and img.root == image.root
    assert image.vmlinuz.stat().st_size > 1 << 20 and image.initramfs.exists()


def test_exec_uname_matches_built_kernel(web01, image):
    r = run_cli("vm", "exec", "web01", "--", "uname", "-r")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == image.release


def test_exec_propagates_exit_status_and_output(web01):
    r = run_cli("vm", "exec", "web01", "--", "echo out; echo err >&2; exit 7")
    assert r.returncode == 7
    assert r.stdout.split() == ["out", "err"]


def test_guest_runs_the_web01_story(guest):
    assert "<h1>web01</h1>" in guest("wget -q -O - http://127.0.0.1/")
    comms = guest("ps -o comm").split()
    assert "httpd" in comms


def test_list_shows_running_vm(web01):
    r = run_cli("vm", "list")
    assert r.returncode == 0
    row = next(l for l in r.stdout.splitlines() if l.startswith("web01 "))
    assert str(web01.pid) in row and "running" in row and web01.release in row


def test_cp_and_insmod_module_built_for_guest(web01, image, guest):
    ko = build_module(image, ROOT / "tests/kits/hello")[0]
    r = run_cli("vm", "cp", "web01", str(ko), "/tmp/sv_hello.ko")
    assert r.returncode == 0, r.stderr
    assert guest("md5sum /tmp/sv_hello.ko").split()[0] == __import__("hashlib").md5(ko.read_bytes()).hexdigest()
    guest("rmmod sv_hello 2>/dev/null; insmod /tmp/sv_hello.ko")
    mods = [l.split()[0] for l in guest("cat /proc/modules").splitlines()]
    assert "sv_hello" in mods
    guest("rmmod sv_hello")


def test_registry_files_are_private(web01):
    d = Path(web01.dir)
    assert d.stat().st_mode & 0o777 == 0o700
    assert (d / "vm.json").stat().st_mode & 0o777 == 0o600
    assert Path(web01.ram_file).parent.stat().st_mode & 0o777 == 0o700


def test_two_vms_at_once_then_stop(web01, image, guest):
    e2 = qemu.start_vm("web02", image, memory="256M", stub=False)
    try:
        names = {e.name for e in registry.list_vms()}
        assert {"web01", "web02"} <= names
        from shadowvol.vm.console import vm_exec

        assert vm_exec(e2, "hostname")[1].decode().strip() == "web02"
        assert guest("hostname").strip() == "web01"
    finally:
        qemu.stop_vm("web02")
    assert not Path(e2.dir).exists() and not Path(e2.ram_file).exists()
    assert "web02" not in {e.name for e in registry.list_vms()}


def test_stale_entry_is_cleaned_up(image):
    e = qemu.start_vm("stale1", image, memory="256M", stub=False)
    os.kill(e.pid, signal.SIGKILL)
    for _ in range(100):
        if not e.alive():
            break
        time.sleep(0.05)
    r = run_cli("vm", "exec", "stale1", "--", "true")
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "not running" in r.stderr
    assert "stale1" not in {x.name for x in registry.list_vms()}
    assert not Path(e.dir).exists() and not Path(e.ram_file).exists()


def test_list_cleans_dead_qemu(image):
    e = qemu.start_vm("stale2", image, memory="256M", stub=False)
    os.kill(e.pid, signal.SIGKILL)
    while e.alive():
        time.sleep(0.05)
    assert "stale2" not in {x.name for x in registry.list_vms()}
    assert not Path(e.ram_file).exists()


@pytest.mark.parametrize("args,needle", [
    (("vm", "exec", "../etc", "--", "true"), "invalid VM name"),
    (("vm", "start", "a/b"), "invalid VM name"),
    (("vm", "exec", "x" * 40, "--", "true"), "invalid VM name"),
    (("vm", "exec", "nosuchvm", "--", "true"), "no VM named 'nosuchvm'"),
    (("vm", "stop", "nosuchvm"), "no VM named 'nosuchvm'"),
    (("vm", "cp", "web01", "/nonexistent/file", "/tmp/x"), "cannot read"),
    (("vm", "start", "web01x", "--memory", "lots"), "invalid memory size"),
])
def test_bad_input_gives_one_line_error(web01, args, needle):
    r = run_cli(*args)
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("shadowvol: error:") and needle in err


def test_starting_a_running_name_is_refused(web01, image):
    with pytest.raises(VMError, match="already running"):
        qemu.start_vm("web01", image)


def test_corrupt_initramfs_reports_boot_failure_with_console_tail(image, tmp_path):
    bad = tmp_path / image.release
    bad.mkdir()
    for f in ("vmlinuz", "config", "manifest.json"):
        shutil.copy2(image.root / f, bad / f)
    (bad / "initramfs.cpio.gz").write_bytes(os.urandom(200_000))
    with pytest.raises(VMError) as exc:
        qemu.start_vm("corrupt1", Image(image.release, bad), memory="256M", timeout=90, stub=False)
    msg = str(exc.value)
    assert "failed to boot" in msg and "Initramfs unpacking failed" in msg
    assert "Console tail:" in msg and "Kernel panic" in msg.split("Console tail:")[1]
    assert "corrupt1" not in {x.name for x in registry.list_vms()}


def test_other_debian_kernel_package_builds_and_boots():
    """Not only the cloud flavour: the generic linux-image-amd64 works the same way."""
    img, _ = build_image("linux-image-amd64")
    assert img.release.endswith("-amd64") and "cloud" not in img.release
    e = qemu.start_vm("generic1", img, memory="512M", stub=False)
    try:
        from shadowvol.vm.console import vm_exec

        rc, out = vm_exec(e, "uname -r")
        assert rc == 0 and out.decode().strip() == img.release
    finally:
        qemu.stop_vm("generic1")
