"""Kernel text integrity (plugins/linux/kernel_text.py) on synthetic ELF images: sections,
vmlinux.relocs applied as the boot loader does, patch sites from the image's own tables,
and the masked comparison (what the kernel patches itself is not a difference; anything
else is, widened to whole instructions)."""

from __future__ import annotations

import gzip
import importlib
import struct

import pytest

TEXT = 0xFFFFFFFF81000000
DATA = 0xFFFFFFFF82000000
INIT = 0xFFFFFFFF83000000
DELTA = 0x1A400000


@pytest.fixture(scope="module")
def kt():
    from shadowvol.volbridge import use_our_plugins

    use_our_plugins()
    return importlib.import_module("volatility3.plugins.linux.kernel_text")


@pytest.fixture(scope="module")
def cs():
    import capstone

    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def elf64(sections: list[tuple[str, int, bytes]], tail: bytes = b"") -> bytes:
    """A minimal ELF64 (x86-64) with PROGBITS sections (name, address, contents) and ``tail`` appended."""
    names = b"\0"
    name_off = []
    for name, _a, _d in sections:
        name_off.append(len(names))
        names += name.encode() + b"\0"
    shstr_name = len(names)
    names += b".shstrtab\0"
    body = bytearray(b"\0" * 64)
    offsets = []
    for _n, _a, data in sections:
        body += b"\0" * (-len(body) % 16)
        offsets.append(len(body))
        body += data
    str_off = len(body)
    body += names
    body += b"\0" * (-len(body) % 8)
    shoff = len(body)
    shdrs = [bytes(64)]
    for (name, addr, data), off, no in zip(sections, offsets, name_off):
        shdrs.append(struct.pack("<IIQQQQIIQQ", no, 1, 6, addr, off, len(data), 0, 0, 16, 0))
    shdrs.append(struct.pack("<IIQQQQIIQQ", shstr_name, 3, 0, 0, str_off, len(names), 0, 0, 1, 0))
    body += b"".join(shdrs)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, TEXT, 0, shoff, 0, 64, 56, 0, 64, len(shdrs), len(shdrs) - 1)
    body[:64] = header
    return bytes(body) + tail


def relocs(r32: list[int], inv32: list[int], r64: list[int]) -> bytes:
    """vmlinux.relocs as arch/x86/tools/relocs writes it (read backwards by the loader)."""
    words = [0] + [a & 0xFFFFFFFF for a in r64] + [0] + [a & 0xFFFFFFFF for a in inv32] + [0] + \
        [a & 0xFFFFFFFF for a in r32]
    return struct.pack(f"<{len(words)}I", *words)


NOP5 = bytes.fromhex("0f1f440000")


def text_bytes() -> bytes:
    code = bytearray()
    code += bytes.fromhex("e8") + struct.pack("<i", 0x100)  # 0: call __fentry__ (ftrace site)
    code += bytes.fromhex("48c7c7") + struct.pack("<I", (DATA + 0x40) & 0xFFFFFFFF)  # 5: mov $DATA+0x40, %rdi (R_32S)
    code += bytes.fromhex("48b8") + struct.pack("<Q", DATA + 0x80)  # 12: movabs $DATA+0x80, %rax (R_64)
    code += bytes.fromhex("0f01cb")  # 22: stac (alternative site, 3 bytes)
    code += NOP5  # 25: jump label (nop5) to 0x40
    code += bytes.fromhex("e8") + struct.pack("<i", 0x200)  # 30: static call
    code += bytes.fromhex("f0ff07")  # 35: lock incl (%rdi) (smp lock)
    code += bytes.fromhex("e9") + struct.pack("<i", 0x300)  # 38: jmp __x86_return_thunk (return site)
    code += bytes.fromhex("4889c7")  # 43: mov %rax, %rdi
    code += bytes.fromhex("48b9") + struct.pack("<Q", 0x1122334455667788)  # 46: movabs (runtime const)
    code += bytes.fromhex("c3")  # 56: ret
    code += bytes(64 - len(code))
    return bytes(code)


def image(kt, tail_relocs: bool = True, mcount_in_own_section: bool = True):
    text = text_bytes()
    sections = [(".text", TEXT, text)]
    # struct alt_instr (6.1): s32 instr_offset, s32 repl_offset, u16 cpuid, u8 instrlen, u8 replacementlen
    sections.append((".altinstructions", DATA + 0x1000, struct.pack("<iiHBB", TEXT + 22 - (DATA + 0x1000), 0, 0, 3, 3)))
    sections.append((".smp_locks", DATA + 0x2000, struct.pack("<i", TEXT + 35 - (DATA + 0x2000))))
    sections.append((".return_sites", DATA + 0x3000, struct.pack("<i", TEXT + 38 - (DATA + 0x3000))))
    sections.append(("runtime_ptr_USER_PTR_MAX", DATA + 0x4000, struct.pack("<i", TEXT + 48 - (DATA + 0x4000))))
    # struct jump_entry: s32 code, s32 target, long key
    sections.append(("__jump_table", DATA + 0x5000, struct.pack("<iiq", TEXT + 25 - (DATA + 0x5000),
                                                                 TEXT + 0x40 - (DATA + 0x5004), 0)))
    sections.append((".static_call_sites", DATA + 0x6000, struct.pack("<ii", TEXT + 30 - (DATA + 0x6000), 0)))
    mcount = struct.pack("<Q", TEXT)
    if mcount_in_own_section:
        sections.append(("__mcount_loc", INIT, mcount))
    else:
        sections.append((".init.data", INIT, bytes(16) + mcount + bytes(8)))
    tail = relocs([TEXT + 8], [], [TEXT + 14]) if tail_relocs else b""
    return kt.ElfImage(elf64(sections, tail))


LAYOUTS = {"alt_instr": (12, {"instr_offset": 0, "instrlen": 10}),
           "jump_entry": (16, {"code": 0, "target": 4}),
           "static_call_site": (8, {"addr": 0})}


def layouts(kt):
    return {k: kt.Layout(size, offs) for k, (size, offs) in LAYOUTS.items()}


def test_sections_and_relocs_are_read(kt):
    elf = image(kt)
    assert elf.sections[".text"].addr == TEXT and elf.sections[".text"].size == 64
    low = 0xFFFFFFFF  # entries are the low 32 bits of addresses in the top 2 GiB
    assert elf.relocs is not None and elf.relocs.r32 == [(TEXT + 8) & low] and elf.relocs.r64 == [(TEXT + 14) & low]
    assert elf.read(TEXT, 64) == text_bytes()


def test_text_is_relocated_as_the_boot_loader_does(kt):
    elf = image(kt)
    live = elf.text(TEXT, 64, DELTA)
    assert struct.unpack_from("<I", live, 8)[0] == (DATA + 0x40 + DELTA) & 0xFFFFFFFF
    assert struct.unpack_from("<Q", live, 14)[0] == DATA + 0x80 + DELTA
    assert live[:8] == text_bytes()[:8] and live[22:] == text_bytes()[22:]
    assert elf.text(TEXT, 64, 0) == text_bytes()
    # a window that starts in the middle of a relocated word still gets the bytes right
    assert elf.text(TEXT + 10, 4, DELTA) == live[10:14]


def test_inverse_relocations_subtract(kt):
    words = relocs([], [TEXT + 4], [])
    elf = kt.ElfImage(elf64([(".text", TEXT, struct.pack("<II", 0, 0x1000) + bytes(8))], words))
    assert struct.unpack_from("<I", elf.text(TEXT, 16, 0x200), 4)[0] == 0x1000 - 0x200


def test_no_relocs_under_kaslr_is_one_clear_error(kt):
    elf = image(kt, tail_relocs=False)
    assert elf.relocs is None
    assert elf.text(TEXT, 64, 0) == text_bytes()  # nokaslr: nothing to relocate
    with pytest.raises(kt.KernelTextError, match="no relocation table"):
        elf.text(TEXT, 64, DELTA)


def test_garbage_after_the_elf_is_not_taken_for_relocs(kt):
    elf = kt.ElfImage(elf64([(".text", TEXT, bytes(16))], b"\x01\x02\x03\x04" * 5))
    assert elf.relocs is None


@pytest.mark.parametrize("data, why", [(b"MZ" + bytes(100), "not an ELF"), (b"\x7fELF\x02\x01" + bytes(58), "section header"),
                                       (b"\x7fELF\x01\x01" + bytes(58), "64-bit")])
def test_not_a_kernel_elf_is_refused(kt, data, why):
    with pytest.raises(kt.KernelTextError, match=why):
        kt.ElfImage(data)


def test_a_truncated_image_is_refused(kt):
    data = elf64([(".text", TEXT, bytes(4096))])
    cut = data[:200] + data[-(64 * 3):]  # section headers kept, contents cut
    with pytest.raises(kt.KernelTextError, match="past the end|section header"):
        kt.ElfImage(cut)


def test_patch_sites_come_from_the_images_tables(kt):
    sites = kt.patch_sites(image(kt), layouts(kt), {})
    got = {(s.addr - TEXT, s.length, s.kind) for s in sites.sites}
    assert got == {(0, 5, "ftrace"), (22, 3, "alternative"), (25, 0, "jump-label"), (30, 5, "static-call"),
                   (35, 1, "smp-lock"), (38, 0, "return-thunk"), (48, 8, "runtime-const")}
    jump = next(s for s in sites.sites if s.kind == "jump-label")
    assert jump.target == TEXT + 0x40
    assert [s.kind for s in sites.within(TEXT + 30, TEXT + 36, reach=0)] == ["static-call", "smp-lock"]


def test_a_table_folded_into_a_bigger_section_is_found_by_its_bounds(kt):
    elf = image(kt, mcount_in_own_section=False)
    assert "ftrace" not in {s.kind for s in kt.patch_sites(elf, layouts(kt), {}).sites}
    sites = kt.patch_sites(elf, layouts(kt), {"__mcount_loc": (INIT + 16, INIT + 24)})
    assert [(s.addr, s.kind) for s in sites.sites if s.kind == "ftrace"] == [(TEXT, "ftrace")]


def compare(kt, cs, live: bytes, check=None):
    elf = image(kt)
    sites = kt.patch_sites(elf, layouts(kt), {})
    mine = elf.text(TEXT, 64, DELTA)
    return kt.compare_text(cs, TEXT, DELTA, live, mine, sites.within(TEXT, TEXT + 64), check)


def booted(kt) -> bytearray:
    """The text as a booted kernel holds it: relocated, and every site patched the way the kernel does."""
    live = bytearray(image(kt).text(TEXT, 64, DELTA))
    live[0:5] = NOP5  # ftrace_init: call __fentry__ -> nop
    live[22:25] = bytes.fromhex("0f1f00")  # alternative: stac -> nop3 (no SMAP)
    live[25:30] = b"\xe9" + struct.pack("<i", 0x40 - 30)  # jump label enabled: jmp to its target
    live[30:35] = b"\xe8" + struct.pack("<i", 0x123)  # static_call_update
    live[35:36] = b"\x3e"  # UP: lock -> ds
    live[38:43] = bytes.fromhex("c3cccccccc")  # return thunk -> ret; int3
    live[48:56] = struct.pack("<Q", 0x00007FFFFFFFF000)  # runtime_const_init
    return live


def test_what_the_kernel_patches_itself_is_no_difference(kt, cs):
    assert compare(kt, cs, bytes(booted(kt))) == []
    assert compare(kt, cs, image(kt).text(TEXT, 64, DELTA)) == []


def test_a_changed_operand_is_reported_as_its_whole_instruction(kt, cs):
    live = booted(kt)
    live[45] ^= 0xFF  # 43: mov %rax, %rdi -> its ModRM byte
    diffs = compare(kt, cs, bytes(live))
    assert [(d.offset, d.live, d.image) for d in diffs] == [(43, bytes(live[43:46]), bytes.fromhex("4889c7"))]
    live[57] = 0x90  # after the ret: another run
    assert [d.offset for d in compare(kt, cs, bytes(live))] == [43, 57]


def test_adjacent_changed_instructions_are_one_difference(kt, cs):
    live = booted(kt)
    live[43:47] = bytes.fromhex("9090cccc")
    diffs = compare(kt, cs, bytes(live))
    assert len(diffs) == 1 and diffs[0].offset == 43 and len(diffs[0].live) == 46 - 43 + 10


def test_site_checks_refuse_what_the_kernel_never_writes(kt, cs):
    def check(site, live_addr, live, mine):
        if site.kind == "jump-label":
            return live[0] == 0xE9 and live_addr + 5 + struct.unpack_from("<i", live, 1)[0] == site.target + DELTA \
                or kt.is_nop(cs, live)
        if site.kind == "ftrace":
            return kt.is_nop(cs, live) or live == mine
        return True

    assert compare(kt, cs, bytes(booted(kt)), check) == []
    live = booted(kt)
    live[0:5] = b"\xe9" + struct.pack("<i", 0x7000)  # an inline hook over the ftrace site
    diffs = compare(kt, cs, bytes(live), check)
    assert [(d.offset, d.live, d.sites) for d in diffs] == [(0, bytes(live[0:5]), ("ftrace",))]
    live = booted(kt)
    live[25:30] = b"\xe9" + struct.pack("<i", 0x10)  # a jump label re-pointed elsewhere
    assert [(d.offset, d.sites) for d in compare(kt, cs, bytes(live), check)] == [(25, ("jump-label",))]


def test_nops_of_every_length(kt, cs):
    assert kt.is_nop(cs, NOP5) and kt.is_nop(cs, bytes.fromhex("6690")) and kt.is_nop(cs, b"\x90")
    assert not kt.is_nop(cs, b"\xe9\0\0\0\0") and not kt.is_nop(cs, bytes.fromhex("0f1f44"))


def test_the_payload_of_a_vmlinuz_is_extracted_once_into_the_cache(kt, tmp_path, monkeypatch):
    from shadowvol.errors import ShadowvolError
    from shadowvol.symbols.vmlinuz import kernel_payload_file

    monkeypatch.setenv("SHADOWVOL_CACHE", str(tmp_path / "cache"))
    payload = elf64([(".text", TEXT, text_bytes())], relocs([TEXT + 8], [], []))
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"\0" * 600 + gzip.compress(payload) + b"\0" * 16)
    out = kernel_payload_file(vmlinuz)
    assert out.read_bytes() == payload and out.is_relative_to(tmp_path / "cache")
    assert kernel_payload_file(vmlinuz) == out
    elf = tmp_path / "vmlinux"
    elf.write_bytes(payload)
    assert kernel_payload_file(elf) == elf  # an ELF is used as it is
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello" * 100)
    with pytest.raises(ShadowvolError, match="not a Linux kernel image"):
        kernel_payload_file(junk)
    with pytest.raises(ShadowvolError, match="does not exist"):
        kernel_payload_file(tmp_path / "missing")


def _target(release: str, vm=None):
    import base64
    from types import SimpleNamespace

    banner = f"Linux version {release} (debian-kernel@lists.debian.org) #1 SMP\n\0".encode()
    return SimpleNamespace(vm=vm, isf={"symbols": {"linux_banner": {"constant_data": base64.b64encode(banner).decode()}}})


def test_the_cli_finds_the_image_of_the_profiles_release_or_says_what_to_pass(kt, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from shadowvol import volbridge
    from shadowvol.errors import ShadowvolError
    from shadowvol.run import _kernel_image_option, find_kernel_image

    monkeypatch.setenv("SHADOWVOL_CACHE", str(tmp_path / "cache"))
    check_text = volbridge.load_plugin("linux.check_text")
    report = volbridge.load_plugin("linux.malware_report")
    with pytest.raises(ShadowvolError, match="needs the kernel image .* --kernel-image PATH"):
        _kernel_image_option(check_text, "linux.check_text", {}, _target("6.1.0-99-cloud-amd64"))
    popts: dict = {}
    _kernel_image_option(report, "linux.malware_report", popts, _target("6.1.0-99-cloud-amd64"))
    assert popts == {}  # the report runs its other checks and says check_text was not run
    payload = elf64([(".text", TEXT, text_bytes())])
    cached = tmp_path / "cache" / "images" / "6.1.0-99-cloud-amd64"
    cached.mkdir(parents=True)
    (cached / "vmlinuz").write_bytes(b"\0" * 600 + gzip.compress(payload))
    assert find_kernel_image(_target("6.1.0-99-cloud-amd64")) == cached / "vmlinuz"
    assert find_kernel_image(_target("../../etc")) is None
    _kernel_image_option(check_text, "linux.check_text", popts, _target("6.1.0-99-cloud-amd64"))
    assert open(popts["kernel_image"], "rb").read() == payload
    own = tmp_path / "vm-image"  # a VM we started: its own image first
    own.mkdir()
    (own / "vmlinuz").write_bytes(payload)
    assert find_kernel_image(_target("6.1.0-99-cloud-amd64", vm=SimpleNamespace(image=str(own)))) == own / "vmlinuz"
    given: dict = {"kernel_image": str(tmp_path / "nope")}
    with pytest.raises(ShadowvolError, match="does not exist"):
        _kernel_image_option(check_text, "linux.check_text", given, _target("6.1.0-99-cloud-amd64"))
