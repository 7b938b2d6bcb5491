"""Resolve what the user points at into memory + kernel location + profile.

``-vm NAME`` (a VM in our registry), ``-vm qmp:/path/qmp.sock`` or
``-vm pid:NNN`` (a QEMU started by someone else), or ``-f DUMP``. This is the
one place that turns those into a :class:`Target`.

Per-boot facts (which profile, where the kernel is) are cached in the VM's
private directory and re-verified on every run by reading the banner through
the page tables, so a reboot or a wrong cache can never go unnoticed.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import kaslr, profiles
from .backends.base import PhysicalMemory
from .errors import BackendError, ProfileError, ShadowvolError, VMError
from .kaslr import KernelLocation
from .paging import PagedMemory, TranslationCache

Progress = Callable[[str], None]


@dataclass
class Target:
    """A kernel to introspect: physical memory, where the kernel is, its profile."""

    memory: PhysicalMemory
    location: KernelLocation
    isf: dict[str, Any]
    profile_path: Path
    description: str
    cache: TranslationCache = field(init=False)
    kernel: PagedMemory = field(init=False)

    def __post_init__(self) -> None:
        self.cache = TranslationCache(self.memory)
        self.kernel = PagedMemory(self.memory, self.location.dtb, self.location.paging_format, self.cache)

    def new_epoch(self) -> None:
        """Forget every cached translation (call between snapshots of a live guest)."""
        self.cache.invalidate()

    def close(self) -> None:
        self.memory.close()


@dataclass
class _Source:
    memory: PhysicalMemory
    description: str
    state_dir: Path | None = None
    boot_key: str | None = None
    qmp: str | None = None
    vmcoreinfo: Callable[[], dict[str, str] | None] = lambda: None
    registers: Callable[[], tuple[int, int] | None] = lambda: None


def _qmp_vmcoreinfo(qmp_path: str) -> dict[str, str] | None:
    """VMCOREINFO via a filtered ``dump-guest-memory`` (ELF notes + one page, ~1 ms)."""
    from .backends.dump import open_dump
    from .qmp import QMPClient

    with tempfile.TemporaryDirectory(prefix="shadowvol-vmci-") as tmp:
        out = Path(tmp) / "notes.elf"
        try:
            with QMPClient(qmp_path, timeout=5.0) as q:
                q.execute("dump-guest-memory", paging=False, protocol=f"file:{out}", begin=0, length=4096)
            with open_dump(out) as d:
                return d.vmcoreinfo()
        except (VMError, BackendError):
            return None


def _qmp_registers(qmp_path: str) -> tuple[int, int] | None:
    from .qmp import QMPClient

    try:
        with QMPClient(qmp_path, timeout=5.0) as q:
            text = q.hmp("info registers")
    except VMError:
        return None
    cr3 = re.search(r"CR3=([0-9a-fA-F]+)", text)
    cr4 = re.search(r"CR4=([0-9a-fA-F]+)", text)
    if not (cr3 and cr4):
        return None
    return int(cr3.group(1), 16), int(cr4.group(1), 16)


def _open_vm(spec: str, backend: str) -> _Source:
    from .backends import libvmi, shadow
    from .vm import registry

    if spec.startswith("qmp:"):
        qmp = spec[4:]
        if not os.path.exists(qmp):
            raise VMError(f"QMP socket {qmp} does not exist")
        mem = shadow.open_shadow(qmp_path=qmp) if backend == "shadow" else libvmi.open_libvmi(None, qmp)
        return _Source(mem, f"qmp:{qmp}", qmp=qmp, vmcoreinfo=lambda: _qmp_vmcoreinfo(qmp),
                       registers=lambda: _qmp_registers(qmp))
    if spec.startswith("pid:"):
        try:
            pid = int(spec[4:])
        except ValueError:
            raise VMError(f"invalid pid in {spec!r}") from None
        if backend != "shadow":
            raise VMError("pid: targets have no hypervisor interface for --backend libvmi; use qmp:")
        return _Source(shadow.ShadowProcess.open_pid(pid), f"pid:{pid}")
    entry = registry.get_vm(spec)
    if backend == "shadow" and entry.ram_file:
        mem: PhysicalMemory = shadow.ShadowFile(entry.ram_file)
    elif backend == "shadow":
        mem = shadow.ShadowProcess.open_qmp(entry.qmp)
    else:
        mem = libvmi.open_libvmi(entry.gdb, entry.qmp)
    return _Source(mem, f"vm:{entry.name}", state_dir=Path(entry.dir), qmp=entry.qmp,
                   boot_key=f"{entry.pid}:{entry.started}",
                   vmcoreinfo=lambda: _qmp_vmcoreinfo(entry.qmp),
                   registers=lambda: _qmp_registers(entry.qmp))


def _open_dump(path: str) -> _Source:
    from .backends.dump import open_dump

    if not os.path.exists(path):
        raise BackendError(f"dump {path} does not exist")
    d = open_dump(path)

    def regs() -> tuple[int, int] | None:
        for cpu in d.cpu_states():
            if cpu.get("cr3"):
                return cpu["cr3"], cpu.get("cr4", 0)
        return None

    return _Source(d, f"dump:{path}", vmcoreinfo=d.vmcoreinfo, registers=regs)


def scan_banners(memory: PhysicalMemory, wanted: list[bytes]) -> bytes | None:
    """The first of ``wanted`` found NUL-terminated in physical memory."""
    longest = max((len(b) for b in wanted), default=0)
    for pa in memory.find(b"Linux version "):
        text = memory.read_partial(pa, longest + 1).data
        for b in wanted:
            if text.startswith(b) and text[len(b):len(b) + 1] in (b"\0", b""):
                return b
    return None


def _locate(src: _Source, symbols: dict[str, int], banner: bytes, progress: Progress,
            info: dict[str, str] | None) -> KernelLocation:
    if info:
        loc = kaslr.locate_from_vmcoreinfo(info, src.memory, symbols, banner)
        if loc:
            return loc
    regs = src.registers()
    if regs:
        loc = kaslr.locate_from_registers(regs[0], regs[1], src.memory, symbols, banner)
        if loc:
            return loc
    progress("searching physical memory for the kernel")
    loc = kaslr.locate_by_scan(src.memory, symbols, banner)
    if loc is None:
        raise ProfileError(f"the kernel of the profile ({banner[:60].decode(errors='replace')}...) "
                           f"is not in {src.description}: wrong profile?")
    return loc


def open_target(vm: str | None = None, dump: str | None = None, backend: str = "shadow",
                profile: str | None = None, progress: Progress | None = None) -> Target:
    """Open ``-vm`` or ``-f`` and find the kernel and its profile."""
    say = progress or (lambda msg: None)
    if backend not in ("shadow", "libvmi"):
        raise ShadowvolError(f"unknown backend {backend!r}: shadow or libvmi")
    if (vm is None) == (dump is None):
        raise ShadowvolError("give exactly one of -vm NAME or -f DUMP")
    src = _open_vm(vm, backend) if vm is not None else _open_dump(dump)
    try:
        return _resolve(src, profile, say)
    except BaseException:
        src.memory.close()
        raise


def _profile_from_guest(src: _Source, info: dict[str, str] | None, say: Progress) -> Path:
    """Build and store a profile from the BTF and kallsyms in guest memory."""
    from .symbols import ProfileReport
    from .symbols.live import profile_from_memory

    release = (info or {}).get("OSRELEASE", "unknown release")
    say(f"no stored profile for {release}: building one from guest memory")
    report = ProfileReport()
    try:
        isf = profile_from_memory(src.memory, info, report)
    except ProfileError as exc:
        raise ProfileError(
            f"no profile for the kernel in {src.description} ({release}), and none can be built from "
            f"its memory ({exc}); build one with 'shadowvol profile build --vmlinuz "
            "/boot/vmlinuz-<release>' (from the Debian linux-image package)") from None
    return profiles.write_profile(isf, f"linux-{report.release or 'unknown'}-from-guest")


def _resolve(src: _Source, profile: str | None, say: Progress) -> Target:
    state = src.state_dir / "kernel.json" if src.state_dir else None
    cached = None
    if state is not None and profile is None:
        try:
            cached = json.loads(state.read_text())
            if cached.get("boot") != src.boot_key:
                cached = None
        except (OSError, ValueError):
            cached = None
    if cached:
        path = Path(cached["profile"])
        if path.exists():
            isf = profiles.load_profile(path)
            banner = profiles.profile_banner(isf)
            loc = KernelLocation.from_json(cached["location"])
            if kaslr.verify_location(src.memory, loc, profiles.profile_addresses(isf), banner):
                return Target(src.memory, loc, isf, path, src.description)
    info = src.vmcoreinfo()  # once: it may cost a QMP dump-guest-memory
    if profile is not None:
        path = Path(profile)
        isf = profiles.load_profile(path)
        banner = profiles.profile_banner(isf)
    else:
        path = None
        say("identifying the kernel")
        banner = scan_banners(src.memory, profiles.known_banners())
        if banner is not None:
            path = profiles.find_profile(banner)
        if path is None:
            path = _profile_from_guest(src, info, say)
        isf = profiles.load_profile(path)
        banner = profiles.profile_banner(isf)
    symbols = profiles.profile_addresses(isf)
    loc = _locate(src, symbols, banner, say, info)
    if state is not None:
        state.write_text(json.dumps({"boot": src.boot_key, "profile": str(path),
                                     "location": loc.to_json()}))
        os.chmod(state, 0o600)
    return Target(src.memory, loc, isf, path, src.description)
