"""Issue 15, pure logic on synthetic data: libvirt domain XML (gdbstub), QMP replies passed
through libvirt, the VMCOREINFO note found in guest memory, and which ``-vm`` names go to
libvirt. The live behaviour is tests/live/test_libvirt.py."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET

import pytest

from shadowvol.backends.base import BufferMemory, Segment
from shadowvol.errors import VMError
from shadowvol.target import _is_libvirt, vmcoreinfo_note
from shadowvol.vm.libvirt import _gdb_from_xml, _reply, check_name

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def _domain(*args: str) -> ET.Element:
    extra = "".join(f"<qemu:arg value='{a}'/>" for a in args)
    return ET.fromstring(f"<domain type='qemu' xmlns:qemu='{QEMU_NS}'><name>x</name>"
                         + (f"<qemu:commandline>{extra}</qemu:commandline>" if args else "") + "</domain>")


@pytest.mark.parametrize("args,want", [
    ((), None),
    (("-s",), "tcp:localhost:1234"),
    (("-gdb", "tcp::4321"), "tcp:localhost:4321"),
    (("-gdb", "tcp::4321,server=on"), "tcp:localhost:4321"),
    (("-gdb", "unix:/run/x.sock,server=on,wait=off"), "unix:/run/x.sock"),
    (("-d", "int"), None),
    (("-gdb",), None),
])
def test_gdbstub_from_qemu_commandline(args, want):
    assert _gdb_from_xml(_domain(*args)) == want


def test_monitor_replies():
    assert _reply("query-status", '{"return": {"running": true}, "id": "libvirt-12"}') == {"running": True}
    with pytest.raises(VMError, match="QMP xp: bad address"):
        _reply("xp", '{"error": {"class": "GenericError", "desc": "bad address"}}')
    for bad in ("not json", "[1]", '{"id": 1}'):
        with pytest.raises(VMError):
            _reply("x", bad)


def _note(text: bytes) -> bytes:
    return struct.pack("<III", 11, len(text), 0) + b"VMCOREINFO\0\0" + text


def test_vmcoreinfo_note_is_the_page_aligned_one():
    ram = bytearray(1 << 20)
    decoy = _note(b"OSRELEASE=evil\nKERNELOFFSET=1000\n")
    ram[0x3008:0x3008 + len(decoy)] = decoy            # not at a page start: a copy, not the note
    real = _note(b"OSRELEASE=6.1.0-57-cloud-amd64\nKERNELOFFSET=2a000000\n")
    ram[0x81000:0x81000 + len(real)] = real
    info = vmcoreinfo_note(BufferMemory(bytes(ram), [Segment(0, len(ram), 0)]))
    assert info == {"OSRELEASE": "6.1.0-57-cloud-amd64", "KERNELOFFSET": "2a000000"}


def test_vmcoreinfo_note_absent_or_malformed():
    ram = bytearray(1 << 16)
    bad = struct.pack("<III", 12, 50, 0) + b"VMCOREINFO\0\0OSRELEASE=x\n"  # namesz is not 11
    ram[0x2000:0x2000 + len(bad)] = bad
    assert vmcoreinfo_note(BufferMemory(bytes(ram), [Segment(0, len(ram), 0)])) is None


def test_which_names_go_to_libvirt(tmp_path, monkeypatch):
    monkeypatch.setenv("SHADOWVOL_RUN", str(tmp_path))
    from shadowvol.vm import registry

    d = registry.vm_dir("ours1")
    d.mkdir(parents=True)
    (d / "vm.json").write_text("{}")
    assert not _is_libvirt("ours1")
    assert _is_libvirt("libvirt:ours1")          # forced
    assert _is_libvirt("theirs")                 # not in our registry
    assert _is_libvirt("web.example.com")        # a libvirt name our registry cannot hold
    assert not _is_libvirt("qmp:/x.sock") and not _is_libvirt("pid:12")


@pytest.mark.parametrize("name", ["", "a/b", "x\ny", "z" * 201])
def test_bad_domain_names(name):
    with pytest.raises(VMError, match="invalid libvirt domain name"):
        check_name(name)
