"""The hypervisor-side configuration that does run on this host: a monitored VM's QEMU machine.

ShadowMonitor's hypervisor part needs EPT views (README.md, not implemented
here). What a stock QEMU 7.2 can give a monitor, and what this module sets up:

- guest RAM in a shared file (``memory-backend-file,share=on``) that the host
  maps read-only: the compartment and every kernel structure at memory speed;
- a gdbstub and QMP on private unix sockets: the LibVMI/DRAKVUF comparison
  path (breakpoints, register reads) and VM control;
- the ``vmcoreinfo`` device, so the host learns KASLR offsets without a scan;
- the kernel command line that loads the stub (``shadowvol.stub=1``, read by
  the initramfs) and, optionally, kprobe monitor points for it
  (``shadow_stub.points=SYM,...`` and the other ``shadow_stub.K=V``);
- TCG unless a boot probe shows KVM works (this host's /dev/kvm is PVM).

This is the one place the machine is described: ``shadowvol vm start``
(``shadowvol.vm.qemu.build_command``) boots every guest with
:func:`qemu_command`. ``python -m kvm_module.machine`` prints an example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MonitoredMachine", "qemu_command", "kernel_cmdline"]

QEMU = "qemu-system-x86_64"
# TCG's "max" CPU has LA57, and Linux then runs 5-level paging. Most deployed
# x86 servers (and stock volatility3's LinuxIntel32e) use 4-level paging, so
# that is the default; ``--cpu max`` gives a 5-level guest.
DEFAULT_TCG_CPU = "max,la57=off"


@dataclass
class MonitoredMachine:
    """Everything QEMU needs to run one guest under the monitor."""

    name: str
    vmlinuz: Path
    initramfs: Path
    ram_file: Path | None    # /dev/shm/... shared RAM file mapped by the host (None: anonymous RAM)
    qmp: Path
    gdb: Path
    ctl: Path                # control serial port (ttyS1), tests and demos only
    console: Path            # ttyS0 socket
    console_log: Path
    pidfile: Path
    qemu_log: Path
    memory_mb: int = 512
    cpus: int = 1
    accel: str = "tcg"       # "kvm" only after a successful boot probe
    cpu: str | None = None
    kaslr: bool = True
    stub: bool = False
    stub_params: dict[str, str] = field(default_factory=dict)  # shadow_stub.K=V (points, ring size...)
    daemonize: bool = True


def kernel_cmdline(m: MonitoredMachine) -> str:
    """The guest kernel's command line: console, our name, and the stub switches."""
    args = ["console=ttyS0", "panic=-1", f"shadowvol.name={m.name}", "loglevel=6"]
    if not m.kaslr:
        args.append("nokaslr")
    if m.stub:
        args.append("shadowvol.stub=1")
        for key, value in sorted(m.stub_params.items()):
            args.append(f"shadow_stub.{key}={value}")
    return " ".join(args)


def qemu_command(m: MonitoredMachine) -> list[str]:
    """The QEMU argument vector for a monitored guest."""
    mem = f"{m.memory_mb}M"
    if m.ram_file is not None:
        # Guest RAM is the shared file: the host's view of it is live, with no copies.
        ram = ["-machine", "q35,memory-backend=mem",
               "-object", f"memory-backend-file,id=mem,size={mem},mem-path={m.ram_file},share=on"]
    else:
        ram = ["-machine", "q35"]
    cmd = [
        QEMU, "-name", f"{m.name},process=shadowvol-{m.name}", *ram, "-accel", m.accel,
        "-cpu", m.cpu or ("host" if m.accel == "kvm" else DEFAULT_TCG_CPU),
        "-smp", str(m.cpus), "-m", mem,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(m.vmlinuz), "-initrd", str(m.initramfs),
        "-append", kernel_cmdline(m),
        # VMCOREINFO: KASLR offset and phys_base without scanning memory.
        "-device", "vmcoreinfo",
        "-chardev", f"socket,id=con0,path={m.console},server=on,wait=off,"
                    f"logfile={m.console_log},logappend=on",
        "-serial", "chardev:con0",
        "-chardev", f"socket,id=ctl0,path={m.ctl},server=on,wait=off",
        "-serial", "chardev:ctl0",
        # The gdbstub: the breakpoint (LibVMI-style) monitor's only way in.
        "-chardev", f"socket,id=gdb0,path={m.gdb},server=on,wait=off",
        "-gdb", "chardev:gdb0",
        "-qmp", f"unix:{m.qmp},server=on,wait=off",
    ]
    if m.daemonize:
        cmd += ["-daemonize", "-pidfile", str(m.pidfile), "-D", str(m.qemu_log)]
    return cmd


def from_vm_entry(entry, image, accel: str, pidfile: Path, qemu_log: Path) -> MonitoredMachine:
    """A :class:`MonitoredMachine` from shadowvol's registry entry and image (same inputs as build_command)."""
    return MonitoredMachine(
        name=entry.name, vmlinuz=Path(image.vmlinuz), initramfs=Path(image.initramfs),
        ram_file=Path(entry.ram_file) if entry.ram_file else None, qmp=Path(entry.qmp), gdb=Path(entry.gdb), ctl=Path(entry.ctl),
        console=Path(entry.console), console_log=Path(entry.console_log), pidfile=pidfile,
        qemu_log=qemu_log, memory_mb=entry.memory_mb, cpus=entry.cpus, accel=accel,
        cpu=entry.extra.get("cpu"), kaslr=entry.kaslr, stub=entry.stub,
        stub_params=dict(entry.extra.get("stub_params") or {}))


if __name__ == "__main__":
    print(" ".join(qemu_command(MonitoredMachine(
        name="web01", vmlinuz=Path("vmlinuz"), initramfs=Path("initramfs.cpio.gz"),
        ram_file=Path("/dev/shm/web01.ram"), qmp=Path("qmp.sock"), gdb=Path("gdb.sock"),
        ctl=Path("ctl.sock"), console=Path("console.sock"), console_log=Path("console.log"),
        pidfile=Path("qemu.pid"), qemu_log=Path("qemu.log"), stub=True,
        stub_params={"points": "do_exit"}))))
