"""A real libvirtd and a TCG domain booted from our web01 image files (tests of issue 15).

Used by tests/live/test_libvirt.py. libvirtd and virtlogd are started when
they are not running (machines without systemd); the domain's kernel and
initramfs are copied into a directory the ``libvirt-qemu`` user can read (the
shared image cache is never relabelled by libvirt). The guest's control agent
is reached on its second serial port, a unix socket in that directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

LIBVIRT_SOCK = "/run/libvirt/libvirt-sock"
QEMU_USER = "libvirt-qemu"


def ensure_libvirtd(timeout: float = 30.0) -> list[int]:
    """Start virtlogd and libvirtd when they are not running; returns the pids we started."""
    started = []
    for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
        if _running(pidfile, daemon):
            continue
        exe = shutil.which(daemon) or f"/usr/sbin/{daemon}"
        subprocess.run([exe, "-d"], check=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while not _running(pidfile, daemon):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{daemon} did not start")
            time.sleep(0.2)
        started.append(int(Path(pidfile).read_text().split()[0]))
    deadline = time.monotonic() + timeout
    while not os.path.exists(LIBVIRT_SOCK):
        if time.monotonic() > deadline:
            raise RuntimeError("libvirtd's socket did not appear")
        time.sleep(0.2)
    return started


def _running(pidfile: str, comm: str) -> bool:
    try:
        pid = int(Path(pidfile).read_text().split()[0])
        return Path(f"/proc/{pid}/comm").read_text().strip() == comm
    except (OSError, ValueError, IndexError):
        return False


@dataclass
class Domain:
    name: str
    dir: Path
    ctl: str
    console_log: Path
    xml: str


def domain_xml(name: str, d: Path, vmlinuz: Path, initramfs: Path, *, memory_mb: int = 512,
               vmcoreinfo: bool = True, stub: bool = True, gdb: str | None = None) -> str:
    """A q35 TCG domain booting our kernel and initramfs, with the control agent on ttyS1."""
    cmdline = f"console=ttyS0 panic=-1 shadowvol.name={name} loglevel=6" + (" shadowvol.stub=1" if stub else "")
    features = "<acpi/>" + ("<vmcoreinfo state='on'/>" if vmcoreinfo else "")
    qemu_cmd = ""
    if gdb:
        qemu_cmd = (f"<qemu:commandline><qemu:arg value='-gdb'/><qemu:arg value='{escape(gdb)}'/>"
                    "</qemu:commandline>")
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mb}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(vmlinuz))}</kernel>
    <initrd>{escape(str(initramfs))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features>{features}</features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{escape(str(d / "console.log"))}'/>
      <target port='0'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path='{escape(str(d / "ctl.sock"))}'/>
      <target port='1'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  {qemu_cmd}
</domain>
"""


def prepare_dir(base: Path, vmlinuz: Path, initramfs: Path) -> tuple[Path, Path, Path]:
    """``base`` (under a directory libvirt-qemu can traverse, e.g. /var/lib/libvirt) made
    libvirt-qemu's, with copies of the kernel and initramfs."""
    import grp
    import pwd

    base.mkdir(parents=True, exist_ok=True)
    uid = pwd.getpwnam(QEMU_USER).pw_uid
    gid = grp.getgrnam("kvm").gr_gid if _has_group("kvm") else pwd.getpwnam(QEMU_USER).pw_gid
    k, i = base / "vmlinuz", base / "initramfs.cpio.gz"
    shutil.copyfile(vmlinuz, k)
    shutil.copyfile(initramfs, i)
    for p in (base, k, i):
        os.chown(p, uid, gid)
    os.chmod(base, 0o750)
    return base, k, i


def _has_group(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def wait_console(log: Path, text: bytes, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in log.read_bytes():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"guest did not print {text!r} within {timeout:.0f}s (see {log})")


def wait_agent(entry, timeout: float = 180.0) -> None:
    """Until the guest's control agent answers on ttyS1 (init starts it after rcS has
    printed "up"; a request sent before it runs is lost)."""
    from shadowvol.errors import VMError
    from shadowvol.vm.console import Console

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with Console(entry, timeout=10.0) as con:
                if con.ping(timeout=3.0):
                    return
        except VMError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the control agent of {entry.name} did not answer within {timeout:.0f}s")
