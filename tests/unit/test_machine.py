"""kvm_module.machine: the QEMU machine every monitored guest boots on."""

from __future__ import annotations

from pathlib import Path

from kvm_module.machine import MonitoredMachine, kernel_cmdline, qemu_command


def machine(**kw) -> MonitoredMachine:
    base = dict(name="g1", vmlinuz=Path("/i/vmlinuz"), initramfs=Path("/i/initrd"), ram_file=Path("/s/g1.ram"),
                qmp=Path("/r/qmp"), gdb=Path("/r/gdb"), ctl=Path("/r/ctl"), console=Path("/r/con"),
                console_log=Path("/r/con.log"), pidfile=Path("/r/pid"), qemu_log=Path("/r/log"))
    base.update(kw)
    return MonitoredMachine(**base)


def arg_after(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == flag]


def test_shared_ram_file_backs_guest_memory():
    cmd = qemu_command(machine(memory_mb=768))
    assert "q35,memory-backend=mem" in arg_after(cmd, "-machine")
    assert "memory-backend-file,id=mem,size=768M,mem-path=/s/g1.ram,share=on" in arg_after(cmd, "-object")


def test_anonymous_ram_has_no_backend_file():
    cmd = qemu_command(machine(ram_file=None))
    assert arg_after(cmd, "-machine") == ["q35"] and "-object" not in cmd


def test_monitor_interfaces_and_vmcoreinfo():
    cmd = qemu_command(machine())
    assert "chardev:gdb0" in arg_after(cmd, "-gdb")
    assert any("path=/r/gdb" in c for c in arg_after(cmd, "-chardev"))
    assert arg_after(cmd, "-qmp") == ["unix:/r/qmp,server=on,wait=off"]
    assert "vmcoreinfo" in arg_after(cmd, "-device")
    assert arg_after(cmd, "-cpu") == ["max,la57=off"]          # 4-level paging under TCG
    assert arg_after(qemu_command(machine(accel="kvm")), "-cpu") == ["host"]


def test_kernel_command_line():
    plain = kernel_cmdline(machine())
    assert "shadowvol.name=g1" in plain and "nokaslr" not in plain and "shadowvol.stub" not in plain
    stub = kernel_cmdline(machine(stub=True, kaslr=False, stub_params={"points": "do_exit", "events": "3"}))
    assert stub.split()[-4:] == ["nokaslr", "shadowvol.stub=1", "shadow_stub.events=3", "shadow_stub.points=do_exit"]
