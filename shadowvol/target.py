"""Resolve what the user points at into memory + kernel location + profile.

``-vm NAME`` (a VM in our registry, else a libvirt domain of that name),
``-vm libvirt:NAME`` (a libvirt domain only), ``-vm qmp:/path/qmp.sock`` or
``-vm pid:NNN`` (a QEMU started by someone else), or ``-f DUMP``. This is the
one place that turns those into a :class:`Target`.

Per-boot facts (which profile, where the kernel is) are cached in the VM's
private directory and re-verified on every run by reading the banner through
the page tables, so a reboot or a wrong cache can never go unnoticed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import kaslr, profiles
from .backends.base import EpochPageCache, PhysicalMemory
from .errors import BackendError, ProfileError, ShadowvolError, TruncatedError, VMError
from .kaslr import KernelLocation
from .paging import PagedMemory, TranslationCache

if TYPE_CHECKING:
    from .qemu.qmp import QMPClient
    from .vm.registry import VMEntry

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Endpoints:
    """The hypervisor interfaces behind a target; None where its source has none.

    ``qmp``: QEMU's QMP socket (``-vm NAME``, ``qmp:PATH``, and ``pid:N`` when
    its command line names one); ``gdb``: its gdbstub (``-vm NAME``);
    ``control``: the guest agent's control socket (``-vm NAME``, tests and
    demos only). A dump has none.
    """

    qmp: str | None = None
    gdb: str | None = None
    control: str | None = None


@dataclass
class Target:
    """A kernel to introspect: physical memory, where the kernel is, its profile, its endpoints.

    The symbol API (:meth:`symbol_address`, :meth:`type_size`,
    :meth:`member_offset`...) answers from the profile with KASLR applied;
    nothing outside this module and the profile code indexes the ISF by hand.
    """

    memory: PhysicalMemory
    location: KernelLocation
    isf: dict[str, Any]
    profile_path: Path
    description: str
    endpoints: Endpoints = field(default_factory=Endpoints)
    #: The registry entry of a VM we started (``-vm NAME``); None for qmp:, pid: and dumps.
    vm: VMEntry | None = None
    #: One-line warnings for the user (a dump opened with --partial...).
    warnings: list[str] = field(default_factory=list)
    #: The source's (CR3, CR4) of its first vCPU now (QMP, libvirt's monitor, a dump's notes);
    #: None when it has none (``pid:`` without a QMP socket) or the monitor did not answer.
    registers: Callable[[], tuple[int, int] | None] = lambda: None
    #: The source's VMCOREINFO (QEMU's copy, or the guest's note for libvirt), None if unknown.
    vmcoreinfo: Callable[[], dict[str, str] | None] = lambda: None
    #: False once the VM behind a live source has gone (its QEMU exited); True for a dump.
    alive: Callable[[], bool] = lambda: True
    cache: TranslationCache = field(init=False)
    kernel: PagedMemory = field(init=False)

    def __post_init__(self) -> None:
        self.cache = TranslationCache(self.memory)
        self.kernel = PagedMemory(self.memory, self.location.dtb, self.location.paging_format, self.cache)

    def new_epoch(self) -> None:
        """Forget every cached translation, and cached pages of a slow source (call between
        snapshots of a live guest)."""
        self.cache.invalidate()
        if isinstance(self.memory, EpochPageCache):
            self.memory.invalidate()

    def close(self) -> None:
        self.memory.close()

    # -- symbols and types (the profile, KASLR applied) ------------------------

    def _symbol(self, name: str) -> dict[str, Any] | None:
        syms = self.isf.get("symbols") if isinstance(self.isf, Mapping) else None
        sym = syms.get(name) if isinstance(syms, Mapping) else None
        return sym if isinstance(sym, Mapping) and isinstance(sym.get("address"), int) else None

    def has_symbol(self, name: str) -> bool:
        """True when the profile gives ``name`` an address."""
        return self._symbol(name) is not None

    def symbol_address(self, name: str) -> int:
        """Runtime virtual address of kernel symbol ``name`` (link address + KASLR shift)."""
        sym = self._symbol(name)
        if sym is None:
            raise ProfileError(f"the profile {self.profile_path.name} has no symbol {name!r}")
        return sym["address"] + self.location.virt_shift

    def symbol_addresses(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(name, runtime address) of every symbol whose name starts with ``prefix``.

        Names are selected before anything is decoded: a lazily loaded profile
        decodes only the symbols asked for."""
        syms = self.isf.get("symbols", {})
        for name in [n for n in syms if n.startswith(prefix)]:
            sym = self._symbol(name)
            if sym is not None:
                yield name, sym["address"] + self.location.virt_shift

    def array_length(self, name: str) -> int | None:
        """Element count of symbol ``name`` when the profile types it as an array, else None."""
        sym = self._symbol(name)
        typ = sym.get("type") if sym is not None else None
        count = typ.get("count") if isinstance(typ, Mapping) and typ.get("kind") == "array" else None
        return count if isinstance(count, int) else None

    def _type(self, name: str) -> dict[str, Any]:
        types = self.isf.get("user_types", {})
        typ = types.get(name) if isinstance(types, Mapping) else None
        if not isinstance(typ, Mapping):
            raise ProfileError(f"the profile {self.profile_path.name} has no struct {name!r}")
        return typ

    def has_type(self, name: str) -> bool:
        types = self.isf.get("user_types", {})
        return isinstance(types, Mapping) and isinstance(types.get(name), Mapping)

    def type_size(self, name: str) -> int:
        """``sizeof(struct name)``."""
        size = self._type(name).get("size")
        if not isinstance(size, int):
            raise ProfileError(f"the profile {self.profile_path.name} gives struct {name!r} no size")
        return size

    def has_member(self, type_name: str, member: str) -> bool:
        """True when the profile's ``struct type_name`` has ``member`` (feature detection)."""
        return self.has_type(type_name) and member in self._type(type_name).get("fields", {})

    def member_offset(self, type_name: str, member: str) -> int:
        """``offsetof(struct type_name, member)``."""
        field_ = self._type(type_name).get("fields", {}).get(member)
        if not isinstance(field_, Mapping) or not isinstance(field_.get("offset"), int):
            raise ProfileError(f"the profile {self.profile_path.name} has no member {member!r} "
                               f"in struct {type_name!r}")
        return field_["offset"]

    def _member_type(self, type_name: str, member: str) -> Mapping[str, Any]:
        fields = self._type(type_name).get("fields")
        field_ = fields.get(member) if isinstance(fields, Mapping) else None
        typ = field_.get("type") if isinstance(field_, Mapping) else None
        if not isinstance(typ, Mapping):
            raise ProfileError(f"the profile {self.profile_path.name} has no member {member!r} "
                               f"in struct {type_name!r}")
        return typ

    def offsetof(self, type_name: str, *path: str) -> int:
        """``offsetof(struct type_name, a.b.c)``: members of nested structs and unions, by name."""
        off = 0
        for i, member in enumerate(path):
            off += self.member_offset(type_name, member)
            if i + 1 < len(path):
                typ = self._member_type(type_name, member)
                if typ.get("kind") not in ("struct", "union") or not isinstance(typ.get("name"), str):
                    raise ProfileError(f"the profile {self.profile_path.name}: {type_name}.{member} "
                                       f"is not a struct")
                type_name = typ["name"]
        return off

    def member_count(self, type_name: str, member: str) -> int:
        """The element count of array member ``member`` of ``struct type_name`` (``ARRAY_SIZE``)."""
        typ = self._member_type(type_name, member)
        count = typ.get("count") if typ.get("kind") == "array" else None
        if not isinstance(count, int):
            raise ProfileError(f"the profile {self.profile_path.name}: {type_name}.{member} is not an array")
        return count

    def enum_value(self, enum: str, name: str) -> int | None:
        """The value of enumerator ``name`` of ``enum enum``, or None when the profile lacks either."""
        enums = self.isf.get("enums", {})
        typ = enums.get(enum) if isinstance(enums, Mapping) else None
        consts = typ.get("constants") if isinstance(typ, Mapping) else None
        value = consts.get(name) if isinstance(consts, Mapping) else None
        return value if isinstance(value, int) else None


@dataclass
class _Source:
    memory: PhysicalMemory
    description: str
    state_dir: Path | None = None
    boot_key: str | None = None
    endpoints: Endpoints = field(default_factory=Endpoints)
    vm: VMEntry | None = None
    vmcoreinfo: Callable[[], dict[str, str] | None] = lambda: None
    registers: Callable[[], tuple[int, int] | None] = lambda: None
    alive: Callable[[], bool] = lambda: True
    #: Reads are too slow to scan RAM (``xp`` through libvirt, ~6 ms each): the kernel is
    #: identified from CR3 against the stored profiles instead of a banner scan.
    slow: bool = False


#: What ``-vm`` accepts, said once for every command that takes it.
VM_HELP = ("NAME (shadowvol vm list: ours, else a libvirt domain), libvirt:NAME, qmp:/path/qmp.sock "
           "or pid:NNN")
BACKENDS = ("shadow", "libvmi")
BACKEND_HELP = ("shadow (the RAM file or /proc/PID/mem, read-only; default) or libvmi (the "
                "hypervisor's debug interfaces: gdbstub, QMP xp)")


def add_source_options(parser: Any, *, dump: bool = True, backend: bool = True, profile: bool = True,
                       required: bool = True, backend_help: str | None = None, connect: bool = True) -> None:
    """Add the source options to an argparse parser: ``-vm SPEC`` (never a default), and as
    asked ``-f DUMP`` (exclusive with ``-vm``), ``--backend`` and ``--profile``.

    Every command that opens a target defines them here, so they mean the same
    everywhere; :func:`open_target` takes what they parse (``vm``, ``dump``,
    ``backend``, ``profile``, and ``connect``, the libvirt URI)."""
    group = parser.add_mutually_exclusive_group(required=required) if dump else parser
    group.add_argument("-vm", dest="vm", metavar="SPEC", default=None, required=required and not dump,
                       help=VM_HELP)
    if connect:  # only where the command passes it on (a URI never silently ignored)
        parser.add_argument("--connect", metavar="URI", default=None,
                            help="libvirt URI for a -vm that names a libvirt domain (default qemu:///system)")
    else:
        parser.set_defaults(connect=None)
    if dump:
        group.add_argument("-f", dest="dump", metavar="DUMP", default=None,
                           help="raw, LiME or QEMU ELF dump, or a snapshot folder")
    else:
        parser.set_defaults(dump=None)
    if backend:
        parser.add_argument("--backend", default="shadow", choices=BACKENDS, help=backend_help or BACKEND_HELP)
    else:
        parser.set_defaults(backend="shadow")
    if profile:
        parser.add_argument("--profile", metavar="ISF", default=None,
                            help="ISF profile to use instead of the store's")
    else:
        parser.set_defaults(profile=None)


@contextmanager
def _monitor(qmp: str | QMPClient) -> Iterator[QMPClient]:
    """A QMP client for ``qmp``: the one given (QEMU serves one QMP client at a time, and a
    backend reading through ``xp`` holds it), or a new connection to the socket path."""
    from .qemu.qmp import QMPClient

    if isinstance(qmp, QMPClient):
        yield qmp
        return
    with QMPClient(qmp, timeout=5.0) as client:
        yield client


def _qmp_vmcoreinfo(qmp: str | QMPClient) -> dict[str, str] | None:
    """VMCOREINFO from the ELF notes of a one-page ``dump-guest-memory`` (~1 ms)."""
    from .backends.dump import open_dump
    from .qemu.monitor import dump_first_page

    with tempfile.TemporaryDirectory(prefix="shadowvol-vmci-") as tmp:
        out = Path(tmp) / "notes.elf"
        try:
            with _monitor(qmp) as q:
                dump_first_page(q, out)
            with open_dump(out) as d:
                return d.vmcoreinfo()
        except (VMError, BackendError):
            return None


def _qmp_registers(qmp: str | QMPClient) -> tuple[int, int] | None:
    """(CR3, CR4) from ``info registers``; None when the monitor does not answer."""
    from .qemu.monitor import control_registers

    try:
        with _monitor(qmp) as q:
            return control_registers(q)
    except VMError:
        return None


def process_alive(pid: int) -> bool:
    """QEMU process ``pid`` still runs (exists and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _qmp_alive(qmp: str | QMPClient) -> bool:
    """The QEMU behind ``qmp`` answers ``query-status``."""
    try:
        with _monitor(qmp) as q:
            q.execute("query-status")
        return True
    except (VMError, OSError):
        return False


@dataclass
class RunControl:
    """Pause and resume ``-vm SPEC`` one step at a time (``watch --pause-ms``): ``pause()``
    pauses a running VM and says whether it ran, ``resume()`` lets it run again."""

    pause: Callable[[], bool]
    resume: Callable[[], None]


@contextmanager
def vm_run_control(spec: str, connect: str | None = None) -> Iterator[RunControl]:
    """A :class:`RunControl` of ``-vm SPEC`` held for the block: a libvirt domain through
    libvirt (its state stays libvirt's; one connection for the block), any other VM through
    its QMP socket (one connection per step: QEMU serves one QMP client at a time)."""
    if _is_libvirt(spec):
        with _libvirt_domain(spec, connect) as dom:
            yield RunControl(dom.suspend_if_running, dom.resume)
        return
    qmp = qmp_endpoint(spec)
    if not qmp:
        raise VMError(f"{spec} has no QMP socket: cannot pause it (a pid: QEMU started without -qmp)")

    def pause() -> bool:
        with _monitor(qmp) as q:
            running = q.run_state()[0]
            if running:
                q.set_running(False)
        return running

    def resume() -> None:
        with _monitor(qmp) as q:
            q.set_running(True)

    yield RunControl(pause, resume)


@contextmanager
def _libvirt_domain(spec: str, connect: str | None) -> Iterator[Any]:
    """The libvirt domain ``-vm SPEC`` names (``libvirt:NAME`` or a bare name libvirt has), closed after the block."""
    from .vm import libvirt

    name = spec[len("libvirt:"):] if spec.startswith("libvirt:") else spec
    dom = libvirt.lookup_domain(libvirt.check_name(name), connect)
    try:
        yield dom
    finally:
        dom.close()


@contextmanager
def vm_monitor(spec: str, connect: str | None = None) -> Iterator[Any]:
    """A monitor (``execute``/``hmp``) of ``-vm SPEC`` for the block: QMP on our VMs'
    and ``qmp:``/``pid:`` sockets, QMP passed through libvirt for a libvirt domain."""
    if _is_libvirt(spec):
        with _libvirt_domain(spec, connect) as dom:
            yield dom.monitor()
        return
    qmp = qmp_endpoint(spec)
    if not qmp:
        raise VMError(f"{spec} has no QMP socket (a registry name, qmp:PATH, or a pid: QEMU started with -qmp)")
    with _monitor(qmp) as q:
        yield q


def qmp_endpoint(spec: str) -> str | None:
    """The QMP socket of ``-vm SPEC`` without opening its memory: a registry name's,
    ``qmp:PATH``'s, or the one named on a ``pid:N`` QEMU's command line (None if none)."""
    if spec.startswith("qmp:"):
        return spec[4:]
    if spec.startswith("pid:"):
        from .qemu.process import qmp_socket_of

        try:
            return qmp_socket_of(int(spec[4:]))
        except (ValueError, BackendError):
            return None
    from .vm import registry

    return registry.get_vm(spec).qmp


def _is_libvirt(spec: str) -> bool:
    """``-vm SPEC`` names a libvirt domain: ``libvirt:NAME``, or a NAME our registry lacks."""
    from .vm import registry

    return spec.startswith("libvirt:") or not (spec.startswith(("qmp:", "pid:")) or registry.known(spec))


@contextmanager
def vm_paused(spec: str, connect: str | None = None) -> Iterator[bool]:
    """Pause ``-vm SPEC`` for the block (yields whether it ran): our VMs through their QMP
    socket, libvirt domains through libvirt (so libvirt's state stays right). A paused VM
    stays paused; a running one is resumed, also when the block fails."""
    with vm_run_control(spec, connect) as run:
        was_running = run.pause()
        try:
            yield was_running
        finally:
            if was_running:
                run.resume()


def _open_vm(spec: str, backend: str, connect: str | None = None) -> _Source:
    from .backends import shadow
    from .vm import registry

    if spec.startswith("libvirt:"):
        return _open_libvirt(spec[len("libvirt:"):], backend, connect)
    if _is_libvirt(spec):
        # Not one of ours: a libvirt domain of that name, else one line saying neither has it.
        from .vm import libvirt as vm_libvirt

        try:
            vm_libvirt.check_name(spec)
        except VMError:
            registry.validate_name(spec)  # a name neither could hold: say what a name is
            raise
        try:
            return _open_libvirt(spec, backend, connect)
        except VMError as exc:
            raise VMError(f"no VM named {spec!r} in shadowvol's registry (see 'shadowvol vm list'), "
                          f"nor in libvirt: {exc}") from None
    if spec.startswith("qmp:"):
        qmp = spec[4:]
        if not os.path.exists(qmp):
            raise VMError(f"QMP socket {qmp} does not exist")
        monitor: str | QMPClient = qmp
        if backend == "shadow":
            mem = shadow.open_shadow(qmp_path=qmp)
        else:
            from .backends import libvmi

            mem = libvmi.open_libvmi(None, qmp)
            if isinstance(mem, libvmi.QmpPhysicalMemory):
                monitor = mem.qmp  # reading through xp, the backend holds QEMU's one QMP connection
        return _Source(mem, f"qmp:{qmp}", endpoints=Endpoints(qmp=qmp),
                       vmcoreinfo=lambda: _qmp_vmcoreinfo(monitor), registers=lambda: _qmp_registers(monitor),
                       alive=lambda: _qmp_alive(monitor))
    if spec.startswith("pid:"):
        try:
            pid = int(spec[4:])
        except ValueError:
            raise VMError(f"invalid pid in {spec!r}") from None
        if backend != "shadow":
            raise VMError("pid: targets have no hypervisor interface for --backend libvmi; use qmp:")
        from .qemu.process import qmp_socket_of

        qmp = qmp_socket_of(pid)  # kept: it finds the kernel without a scan of all memory
        mem = shadow.ShadowProcess.open_pid(pid, qmp_path=qmp)
        if qmp is None:
            return _Source(mem, f"pid:{pid}", alive=lambda: process_alive(pid))
        return _Source(mem, f"pid:{pid}", endpoints=Endpoints(qmp=qmp), vmcoreinfo=lambda: _qmp_vmcoreinfo(qmp),
                       registers=lambda: _qmp_registers(qmp), alive=lambda: process_alive(pid))
    entry = registry.get_vm(spec)
    if backend == "shadow" and entry.ram_file:
        mem: PhysicalMemory = shadow.ShadowFile(entry.ram_file)
    elif backend == "shadow":
        mem = shadow.ShadowProcess.open_qmp(entry.qmp)
    else:
        from .backends import libvmi

        mem = libvmi.open_libvmi(entry.gdb, entry.qmp)
    return _Source(mem, f"vm:{entry.name}", state_dir=Path(entry.dir), vm=entry,
                   endpoints=Endpoints(qmp=entry.qmp, gdb=entry.gdb, control=entry.ctl),
                   boot_key=f"{entry.pid}:{entry.started}",
                   vmcoreinfo=lambda: _qmp_vmcoreinfo(entry.qmp),
                   registers=lambda: _qmp_registers(entry.qmp), alive=lambda: process_alive(entry.pid))


def _open_libvirt(name: str, backend: str, connect: str | None) -> _Source:
    """A running libvirt domain: RAM through /proc/PID/mem (or its shared RAM file) for
    shadow, ``xp`` for libvmi; the monitor is libvirt's, reached through libvirt."""
    from .backends import libvmi, shadow
    from .vm import libvirt

    dom = libvirt.lookup_domain(libvirt.check_name(name), connect)
    try:
        mon = dom.monitor()
        if backend == "shadow":
            mem: PhysicalMemory = shadow.open_shadow_monitor(mon)
        else:
            mem = EpochPageCache(libvmi.QmpPhysicalMemory(mon))
    except BaseException:
        dom.close()
        raise
    slow = backend != "shadow"
    return _Source(mem, f"libvirt:{dom.name}", state_dir=libvirt.state_dir(dom), boot_key=libvirt.boot_key(dom),
                   endpoints=Endpoints(gdb=dom.gdb),
                   vmcoreinfo=lambda: None if slow or not dom.vmcoreinfo else vmcoreinfo_note(mem),
                   registers=lambda: _monitor_registers(mon), alive=lambda: process_alive(dom.pid), slow=slow)


#: The ELF note the kernel hands QEMU's vmcoreinfo device (kernel/crash_core.c): a page of
#: its own, ``Elf64_Nhdr`` (namesz 11, descsz, type 0), "VMCOREINFO\0" padded to 12, then text.
_VMCOREINFO_NOTE = b"VMCOREINFO\0\0OSRELEASE="


def vmcoreinfo_note(memory: PhysicalMemory) -> dict[str, str] | None:
    """VMCOREINFO read where the guest kernel keeps it: the page-aligned note whose address
    it gives QEMU's vmcoreinfo device. Used for libvirt domains, where QEMU's own copy is
    out of reach (a ``dump-guest-memory`` sent through libvirt 9.0 crashes libvirtd on its
    DUMP_COMPLETED event). Like any VMCOREINFO it is only a hint: the location found from it
    is verified through the page tables."""
    from .backends.dump import parse_vmcoreinfo

    for pa in memory.find(_VMCOREINFO_NOTE):
        if pa % 4096 != 12:
            continue
        try:
            head = memory.read(pa - 12, 12)
            namesz, descsz = int.from_bytes(head[:4], "little"), int.from_bytes(head[4:8], "little")
            if namesz != 11 or not 0 < descsz <= 4096 - 24:
                continue
            return parse_vmcoreinfo(memory.read(pa + 12, descsz))
        except ShadowvolError:
            continue
    return None


def _monitor_registers(mon: Any) -> tuple[int, int] | None:
    """(CR3, CR4) through an open monitor; None when it does not answer."""
    from .qemu.monitor import control_registers

    try:
        return control_registers(mon)
    except VMError:
        return None


def _open_dump(path: str, partial: bool = False) -> _Source:
    from .backends.dump import open_dump
    from .safeio import check_input

    check_input(path, "-f")  # a FIFO, device or directory is refused before open()
    d = open_dump(path, partial=partial)

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
                profile: str | None = None, progress: Progress | None = None,
                partial: bool = False, connect: str | None = None) -> Target:
    """Open ``-vm`` or ``-f`` and find the kernel and its profile.

    A dump shorter than its layout (LiME/ELF headers, or for a raw dump the
    kernel's own ``max_pfn``) raises BackendError; with ``partial`` it opens
    and the shortfall is in ``Target.warnings``. ``connect``: the libvirt URI for a
    ``-vm`` that names a libvirt domain (default ``qemu:///system``)."""
    say = progress or (lambda msg: None)
    if backend not in BACKENDS:
        raise ShadowvolError(f"unknown backend {backend!r}: shadow or libvmi")
    if (vm is None) == (dump is None):
        raise ShadowvolError("give exactly one of -vm NAME or -f DUMP")
    if profile is not None:
        from .safeio import check_input

        check_input(profile, "--profile")
    bundle = None
    if dump is not None:
        from .bundle import is_bundle, open_bundle

        if is_bundle(dump):  # a snapshot folder: its memory image, profile, vmcoreinfo and registers
            bundle = open_bundle(dump)
            dump, profile = str(bundle.memory), profile or str(bundle.profile)
    src = _open_vm(vm, backend, connect) if vm is not None else _open_dump(dump, partial)
    if bundle is not None:
        src.vmcoreinfo, src.registers = bundle.vmcoreinfo, bundle.registers
    try:
        try:
            target = _resolve(src, profile, say)
        except ProfileError:
            if dump is not None and profile is None:
                _kernel_cut_off(src)
            raise
        if dump is not None:
            target.warnings += list(getattr(src.memory, "truncated", []))
            short = _raw_shortfall(target)
            if short and not partial:
                raise TruncatedError(short + " (--partial reads what is there)")
            if short:
                target.warnings.append(short)
        return target
    except BaseException:
        src.memory.close()
        raise


def _raw_shortfall(target: Target) -> str | None:
    """Why a dump holds less RAM than the kernel in it has, from the kernel's
    ``max_pfn`` (last page frame + 1); None when it holds all of it."""
    if not target.has_symbol("max_pfn"):
        return None
    try:
        raw = target.kernel.read(target.symbol_address("max_pfn"), 8)
    except ShadowvolError:
        return f"{target.description}: the kernel's max_pfn is not readable: truncated dump?"
    ram_end = int.from_bytes(raw, "little") << 12
    have = max((hi for _, hi in target.memory.ranges()), default=0)
    if ram_end > have and ram_end < 1 << 52:
        return (f"{target.description}: truncated dump: the kernel has RAM up to {ram_end:#x} "
                f"({ram_end >> 20} MiB), the dump ends at {have:#x} ({have >> 20} MiB)")
    return None


def _kernel_cut_off(src: _Source) -> None:
    """A raw dump in which no kernel was found, though it holds a banner of a
    kernel we have a profile for (the text of ``linux_banner`` is also in
    copies outside the kernel image): the image lies past the end of a dump
    cut short. Raises TruncatedError saying so; returns otherwise."""
    memory = src.memory
    if getattr(memory, "format", None) != "raw":
        return
    known = profiles.known_banners()
    for n, pa in enumerate(memory.find(b"Linux version ")):
        if n >= 64:
            break
        release = memory.read_partial(pa + 14, 65).data.split(b" ", 1)[0]
        if release and any(b.startswith(b"Linux version " + release + b" ") for b in known):
            from .safeio import short

            end = max((hi for _, hi in memory.ranges()), default=0)
            raise TruncatedError(
                f"{src.description}: the {short(release.decode(errors='replace'), 60)} kernel "
                f"named at {pa:#x} is not in the dump, which ends at {end:#x} ({end >> 20} MiB): "
                "a raw dump cut short? (it must hold all of RAM from address 0)")
    return


def _profile_from_guest(src: _Source, info: dict[str, str] | None, say: Progress) -> Path:
    """Build and store a profile from the BTF and kallsyms in guest memory."""
    from .symbols import ProfileReport
    from .symbols.live import profile_from_memory

    from .safeio import short

    release = short((info or {}).get("OSRELEASE", "unknown release"), 60)
    say(f"no stored profile for {release}: building one from guest memory")
    report = ProfileReport()
    try:
        isf = profile_from_memory(src.memory, info, report)
    except ProfileError as exc:
        raise ProfileError(
            f"no profile for the kernel in {src.description} ({release}), and none can be built from "
            f"its memory ({exc}); build one with 'shadowvol profile build --vmlinuz "
            "/boot/vmlinuz-<release>' (from the Debian linux-image package)") from None
    # Stored under a hash, never under text read from the guest (a release of
    # "6.1/../../x" must not become a path).
    import hashlib

    btf_hash = guest_btf_hash(isf) or ""
    key = hashlib.sha256(profiles.profile_banner(isf)).hexdigest()[:16]
    return profiles.write_profile(isf, f"guest-{key}-{btf_hash[:8] or 'nobtf'}")


def guest_btf_hash(isf: dict[str, Any]) -> str | None:
    """The BTF hash of a profile built from guest memory, None for other profiles."""
    from .symbols.live import GUEST_BTF_NAME

    try:
        types = isf["metadata"]["linux"]["types"]
        item = next(t for t in types if isinstance(t, dict) and t.get("name") == GUEST_BTF_NAME)
    except (KeyError, TypeError, StopIteration):
        return None
    value = item.get("hash_value")
    return value if isinstance(value, str) else ""


def verify_guest_profile(target: Target) -> bool:
    """For a profile built from guest memory: the BTF at ``__start_BTF``, read
    through the guest's page tables, hashes to what the profile recorded, and
    ``_text`` and ``linux_banner`` are mapped. True for any other profile."""
    import hashlib

    from .symbols.btf import btf_size

    want = guest_btf_hash(target.isf)
    if want is None:
        return True
    try:
        for name in ("_text", "linux_banner"):
            target.kernel.read(target.symbol_address(name), 8)
        start = target.symbol_address("__start_BTF")
        size = btf_size(target.kernel.read(start, 24))
        if not 24 < size <= 64 << 20:
            return False
        return hashlib.sha256(target.kernel.read(start, size)).hexdigest() == want
    except (KeyError, TypeError, ShadowvolError):
        return False


def _stored_profile(src: _Source, banner: bytes, info: dict[str, str] | None,
                    say: Progress) -> tuple[Path, dict[str, Any]] | None:
    """A stored profile for ``banner``: one built from kernel files first; one
    built from some guest's memory only if this guest's own BTF hashes the
    same (a banner alone is guest-controlled text)."""
    want = banner.rstrip(b"\0")
    candidates = [p for p, b in profiles.indexed_profiles().items() if b == want]
    guest = []
    for p in candidates:
        try:
            isf = profiles.load_profile(p)
        except ShadowvolError:
            continue
        if guest_btf_hash(isf) is None:
            return p, isf
        guest.append((p, isf))
    for p, isf in guest:
        try:
            loc = _locate(src, profiles.profile_addresses(isf), banner, say, info)
        except ShadowvolError:
            continue
        if verify_guest_profile(_target(src, loc, isf, p)):
            return p, isf
    if guest:
        say("no stored profile from guest memory matches this guest's BTF")
    return None


def _runs_there(src: _Source, loc: KernelLocation, symbols: Any, banner: bytes) -> bool:
    """The vCPU's registers (when the source has them) lead to the kernel at ``loc``.

    A guest that rebooted inside the same QEMU keeps its boot key, and the dead
    kernel's banner and page tables stay in RAM until reused: the banner check
    alone accepts a cached location of a kernel that no longer runs. CR3 says
    which kernel the CPU runs (``info registers``, ~2 ms)."""
    regs = src.registers()
    if regs is None:
        return True
    now = kaslr.locate_from_registers(regs[0], regs[1], src.memory, symbols, banner)
    return now is not None and (now.dtb, now.virt_shift) == (loc.dtb, loc.virt_shift)


def _banner_from_vmcoreinfo(src: _Source, info: dict[str, str] | None) -> bytes | None:
    """The stored banner of the kernel's release (VMCOREINFO's OSRELEASE) that reads back at
    ``linux_banner`` through the page tables VMCOREINFO locates; None when none does.

    No scan of all memory: through the libvmi backend a scan is one QMP or
    gdbstub round trip per page. The check is the scan's own (the banner's
    bytes in guest memory), at the one address the kernel says it is."""
    release = (info or {}).get("OSRELEASE", "").strip()
    if not release:
        return None
    prefix = f"Linux version {release} ".encode()
    for banner in profiles.known_banners():
        path = profiles.find_profile(banner) if banner.startswith(prefix) else None
        if path is None:
            continue
        try:
            isf = profiles.load_profile(path)
            if kaslr.locate_from_vmcoreinfo(info or {}, src.memory, profiles.profile_addresses(isf), banner):
                return banner
        except ShadowvolError:
            continue
    return None


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
    if isinstance(cached, dict):
        try:
            path = Path(cached["profile"])
            if path.is_file():
                isf = profiles.load_profile(path)
                banner = profiles.profile_banner(isf)
                loc = KernelLocation.from_json(cached["location"])
                if kaslr.verify_location(src.memory, loc, profiles.profile_addresses(isf), banner) and \
                        _runs_there(src, loc, profiles.profile_addresses(isf), banner):
                    t = _target(src, loc, isf, path)
                    if verify_guest_profile(t):
                        return t
        except (KeyError, TypeError, ValueError, ShadowvolError):
            pass  # a damaged cache is only a missed shortcut
    info = src.vmcoreinfo()  # once: it may cost a QMP dump-guest-memory
    if profile is None and src.slow:
        found = _identify_by_registers(src, say)
        if found is not None:
            return _remember(state, src, *found)
    if profile is not None:
        path = Path(profile)
        isf = profiles.load_profile(path)
        banner = profiles.profile_banner(isf)
    else:
        path = None
        say("identifying the kernel")
        banner = _banner_from_vmcoreinfo(src, info) or scan_banners(src.memory, profiles.known_banners())
        found = _stored_profile(src, banner, info, say) if banner is not None else None
        if found is not None:
            path, isf = found
        else:
            path = _profile_from_guest(src, info, say)
            isf = profiles.load_profile(path)
        banner = profiles.profile_banner(isf)
    symbols = profiles.profile_addresses(isf)
    loc = _locate(src, symbols, banner, say, info)
    if profile is not None:
        # Only what was found without user flags is remembered for later runs:
        # a --profile applies to the run that passed it.
        return _target(src, loc, isf, path)
    return _remember(state, src, path, isf, loc)


def _remember(state: Path | None, src: _Source, path: Path, isf: dict[str, Any], loc: KernelLocation) -> Target:
    """The target, its profile and location saved in the per-boot cache when there is one."""
    if state is not None:
        from .safeio import atomic_write

        atomic_write(state, json.dumps({"boot": src.boot_key, "profile": str(path),
                                        "location": loc.to_json()}).encode(), mode=0o600)
    return _target(src, loc, isf, path)


def _target(src: _Source, loc: KernelLocation, isf: dict[str, Any], path: Path) -> Target:
    return Target(src.memory, loc, isf, path, src.description, endpoints=src.endpoints, vm=src.vm,
                  registers=src.registers, vmcoreinfo=src.vmcoreinfo, alive=src.alive)


def _identify_by_registers(src: _Source, say: Progress) -> tuple[Path, dict[str, Any], KernelLocation] | None:
    """For memory too slow to scan: the stored profile whose kernel the vCPU's CR3 maps
    (``_text`` and ``linux_banner`` read through its page tables), or None."""
    regs = src.registers()
    if regs is None:
        return None
    say("identifying the kernel from the vCPU's page tables")
    for path in profiles.indexed_profiles():
        try:
            isf = profiles.load_profile(path)
            banner = profiles.profile_banner(isf)
            loc = kaslr.locate_from_registers(regs[0], regs[1], src.memory, profiles.profile_addresses(isf), banner)
            if loc is not None and verify_guest_profile(Target(src.memory, loc, isf, path, src.description)):
                return path, isf, loc
        except ShadowvolError:
            continue
    return None
