"""Verify the guest stub's compartment from outside, reading only.

Without EPT control (see kvm_module/README.md) the guest kernel can reach the
stub, so the host checks, from guest RAM, that nobody has:

1. **code**: changed the stub's executable sections. Two comparisons:

   - *against the .ko on the host*: the module's executable sections are laid
     out as the kernel's ``layout_sections()`` does (kernel/module/main.c),
     and every byte is compared except those the loader legitimately
     rewrites: relocation targets (``.rela<section>``) and the patch sites
     the kernel lists in ``__mcount_loc``, ``.altinstructions``,
     ``.retpoline_sites``, ``.return_sites``, ``.static_call_sites``,
     ``__jump_table``, ``.parainstructions``, ``.smp_locks`` and
     ``.ibt_endbr_seal``. This catches tampering that happened before the
     host ever looked, but not in the masked bytes.
   - *trust on first use*: the first check of a loaded stub (keyed by the
     compartment's nonce and the module base) stores a SHA-256 of the whole
     text in the VM's private directory; later checks compare every byte
     against it. Masked bytes are covered from then on.

2. **hooks**: every tracepoint the stub registered on (addresses from the
   compartment header, cross-checked with the profile) has the stub's probe
   in its ``funcs`` array, no probe outside the stub runs before it, and the
   tracepoint's static key is enabled; each armed kprobe still has the stub's
   handler and its int3/jmp at the probed address. The header's hook
   functions must lie in the stub's text, as found in the ``modules`` list.

3. **rings**: the header validates (magic, CRC-32, layout inside the
   compartment), and per-CPU ``head`` sequence numbers never go backwards
   (between two reads, and since the last check) and match the records
   in the ring.

Findings are ``ok``, ``warn`` or ``TAMPERED``; any TAMPERED fails the check.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ShadowvolError
from .kernel_reader import Kernel, Walk, kernel_of, linux
from .textsafe import printable
from .trace.points import TextSymbols

__all__ = ["Finding", "IntegrityReport", "StubModule", "find_module", "ko_text_layout",
           "check_integrity", "render_report"]

STUB_MODULE = "shadow_stub"
MAX_MODULES = 4096
MAX_TP_FUNCS = 256

#: Patch-site sections -> bytes the loader may rewrite at each site (0: read from the entry).
_PATCH_SITES: dict[str, int] = {
    "__mcount_loc": 5,          # call __fentry__ -> nop5 (ftrace)
    ".retpoline_sites": 6,      # call/jmp __x86_indirect_thunk_* -> call *%reg / lfence
    ".return_sites": 5,         # jmp __x86_return_thunk -> ret; int3...
    ".static_call_sites": 5,    # call/jmp patched to the static call's target
    "__jump_table": 5,          # jump label: jmp <-> nop (code and target relocs; both masked)
    ".smp_locks": 1,            # lock prefix -> ds on a uniprocessor
    ".ibt_endbr_seal": 4,       # endbr64 -> nop4 when IBT seals
    ".altinstructions": 0,      # length in the entry (struct alt_instr.instrlen)
    ".parainstructions": 0,     # length in the entry (struct paravirt_patch_site.len)
}
_RELOC_SIZE = {1: 8, 2: 4, 4: 4, 10: 4, 11: 4, 24: 8, 9: 4, 41: 4, 42: 4}  # R_X86_64_*


@dataclass
class Finding:
    check: str
    status: str  # ok | warn | TAMPERED
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "detail": self.detail}


@dataclass
class IntegrityReport:
    vm: str
    findings: list[Finding] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f.status == "TAMPERED" for f in self.findings)

    def add(self, check: str, status: str, detail: str) -> None:
        self.findings.append(Finding(check, status, detail))

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "ok": self.ok, "findings": [f.to_json() for f in self.findings],
                "facts": self.facts}


# -- struct module (include/linux/module.h) --------------------------------------


@dataclass(frozen=True)
class StubModule:
    """A loaded module: ``struct module *``, its name, and its core text range."""

    address: int
    name: str
    core_base: int
    core_size: int
    text_size: int


def _u64(k: Kernel, vaddr: int) -> int:
    return k.read_pointers(vaddr, 1)[0]


def _u32(k: Kernel, vaddr: int) -> int:
    return int.from_bytes(k.read_exact(vaddr, 4), "little")


def find_module(target: Any, name: str) -> StubModule | None:
    """The module called ``name`` on the ``modules`` list (bounded walk, cycle-checked)."""
    for m in list_modules(target):
        if m.name == name:
            return m
    return None


def list_modules(target: Any, k: Kernel | None = None) -> list[StubModule]:
    """Every module on the ``modules`` list (``for_each_module``, the one reader's walk and bound).

    The list is what the check trusts to find the stub, so a walk that stops
    early (a cycle, a bad link, more than MAX_MODULES entries) or a module it
    cannot read raises instead of answering from part of the list."""
    k = k or kernel_of(target)
    walk = Walk("modules", limit=MAX_MODULES)
    out: list[StubModule] = []
    for mod in linux.for_each_module(k, walk):
        name = linux.module_name(k, mod)
        text = linux.module_core_text(k, mod)
        if name is None:
            raise ShadowvolError(f"the modules list: struct module at {mod:#x} is unreadable")
        if text is None:
            raise ShadowvolError("struct module has neither core_layout nor mem[] in the profile")
        out.append(StubModule(mod, name, *text))
    if walk.partial:
        raise ShadowvolError(f"the modules list cannot be walked to its end: {walk.partial}")
    return out


# -- the .ko on the host ------------------------------------------------------------


@dataclass
class KoText:
    """Executable sections of a .ko as the loader lays them out in core memory."""

    sections: dict[str, tuple[int, bytes]]   # name -> (offset in core, bytes)
    masks: dict[str, bytearray]              # name -> 1 where the loader may rewrite
    symbols: dict[int, str]                  # core offset -> function name
    text_size: int


def ko_text_layout(path: Path) -> KoText:
    """Lay out ``path``'s executable sections like kernel/module/main.c:layout_sections()."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection
    from elftools.elf.sections import SymbolTableSection

    SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        secs = list(elf.iter_sections())
        size = 0
        offsets: dict[int, int] = {}
        for i, s in enumerate(secs):
            flags = s["sh_flags"]
            if (flags & (SHF_EXECINSTR | SHF_ALLOC)) != (SHF_EXECINSTR | SHF_ALLOC) or s.name.startswith(".init"):
                continue
            align = s["sh_addralign"] or 1
            size = (size + align - 1) // align * align
            offsets[i] = size
            size += s["sh_size"]
        text_size = (size + 4095) // 4096 * 4096  # strict_align()
        sections = {secs[i].name: (off, secs[i].data()) for i, off in offsets.items()}
        masks = {secs[i].name: bytearray(secs[i]["sh_size"]) for i in offsets}
        symtab = next(s for s in secs if isinstance(s, SymbolTableSection))
        symbols: dict[int, str] = {}
        for sym in symtab.iter_symbols():
            if sym["st_info"]["type"] == "STT_FUNC" and sym["st_shndx"] in offsets:
                symbols[offsets[sym["st_shndx"]] + sym["st_value"]] = sym.name

        def mark(sec: int, start: int, n: int) -> None:
            m = masks[secs[sec].name]
            for k in range(max(0, start), min(len(m), start + n)):
                m[k] = 1

        for rs in secs:
            if not isinstance(rs, RelocationSection):
                continue
            applies = rs["sh_info"]
            if applies in offsets:  # relocations inside code
                for r in rs.iter_relocations():
                    mark(applies, r["r_offset"], _RELOC_SIZE.get(r["r_info_type"], 8))
                continue
            name = secs[applies].name if applies < len(secs) else ""
            if name not in _PATCH_SITES:
                continue
            data = secs[applies].data()
            for r in rs.iter_relocations():
                s = symtab.get_symbol(r["r_info_sym"])
                if s["st_shndx"] not in offsets:
                    continue
                site = s["st_value"] + r["r_addend"]
                # Absolute (R_X86_64_64) and relative (PC32: S + A - P) entries both name S + A.
                n = _PATCH_SITES[name]
                if name == ".altinstructions":  # struct alt_instr: s32, s32, u16 cpuid, u8 instrlen
                    if r["r_offset"] % 12:
                        continue  # the repl_offset reloc
                    n = data[r["r_offset"] + 10] if r["r_offset"] + 10 < len(data) else 16
                elif name == ".parainstructions":  # struct paravirt_patch_site: u8 *instr, u8 type, u8 len
                    n = data[r["r_offset"] + 9] if r["r_offset"] + 9 < len(data) else 16
                mark(s["st_shndx"], site, n or 16)
        return KoText(sections, masks, symbols, text_size)


def stub_ko_path(release: str) -> Path:
    """Where ``vm build`` puts the stub's .ko for ``release``."""
    from . import paths

    return paths.cache_dir() / "images" / release / "modules" / "guest_stub" / f"{STUB_MODULE}.ko"


# -- the checks -----------------------------------------------------------------------


def _check_code(target: Any, rep: IntegrityReport, mod: StubModule, ko: KoText | None,
                state: dict[str, Any], key: str) -> None:
    text = target.kernel.read_padded(mod.core_base, mod.text_size)
    if ko is not None:
        if ko.text_size != mod.text_size:
            rep.add("code.layout", "TAMPERED", f"the module's text is {mod.text_size:#x} bytes, the .ko "
                    f"lays out {ko.text_size:#x}: not the module that was built")
        differ: list[str] = []
        compared = masked = 0
        for name, (off, data) in ko.sections.items():
            mask = ko.masks[name]
            live = text[off:off + len(data)]
            for i, (a, b) in enumerate(zip(data, live)):
                if mask[i]:
                    masked += 1
                    continue
                compared += 1
                if a != b:
                    differ.append(f"{_where(ko, off + i)} ({a:02x} -> {b:02x})")
        rep.facts["code_bytes_compared"] = compared
        rep.facts["code_bytes_masked"] = masked
        if differ:
            rep.add("code.ko", "TAMPERED", f"{len(differ)} code byte(s) differ from {STUB_MODULE}.ko: "
                    + ", ".join(differ[:8]) + (" ..." if len(differ) > 8 else ""))
        else:
            rep.add("code.ko", "ok", f"{compared} code bytes match the .ko ({masked} relocated or "
                    "patched by the loader, not compared)")
    digest = hashlib.sha256(text).hexdigest()
    first = state.get("code")
    if first is None or first.get("key") != key:
        state["code"] = {"key": key, "sha256": digest, "text": text.hex(), "time": time.time()}
        rep.add("code.tofu", "ok", f"first sight of this stub: text sha256 {digest[:16]}... recorded")
    elif first["sha256"] != digest:
        old = bytes.fromhex(first["text"])
        diffs = [i for i in range(min(len(old), len(text))) if old[i] != text[i]]
        rep.add("code.tofu", "TAMPERED", f"stub text changed since first sight: {len(diffs)} byte(s), at "
                + ", ".join(f"{_where(ko, i)} ({old[i]:02x} -> {text[i]:02x})" for i in diffs[:8]))
    else:
        rep.add("code.tofu", "ok", f"text sha256 {digest[:16]}... unchanged since first sight")


def _where(ko: KoText | None, off: int) -> str:
    if ko is None or not ko.symbols:
        return f"+{off:#x}"
    best = max((o for o in ko.symbols if o <= off), default=None)
    return f"{ko.symbols[best]}+{off - best:#x}" if best is not None else f"+{off:#x}"


def _symbolize(target: Any, addr: int, mods: list[StubModule], text: TextSymbols) -> str:
    for m in mods:
        if m.core_base <= addr < m.core_base + m.core_size:
            return f"{m.name}+{addr - m.core_base:#x}"
    if target.symbol_address("_stext") <= addr < target.symbol_address("_etext"):
        found = text.enclosing(addr - target.location.virt_shift)
        if found is not None:
            return f"{found[1]}+{addr - target.location.virt_shift - found[0]:#x}"
    return f"{addr:#x} (outside kernel text and modules)"


def _check_hooks(target: Any, k: Kernel, rep: IntegrityReport, mod: StubModule, header: Any,
                 mods: list[StubModule], ko: KoText | None) -> None:
    from .trace.compartment import HOOK_NAMES

    text = TextSymbols(target.isf)  # names hook targets; built on the first lookup
    in_stub = lambda a: mod.core_base <= a < mod.core_base + mod.text_size  # noqa: E731
    funcs_off = target.member_offset("tracepoint", "funcs")
    key_off = target.member_offset("tracepoint", "key") + target.member_offset("static_key", "enabled")
    fn_size = target.type_size("tracepoint_func")
    fn_off = target.member_offset("tracepoint_func", "func")
    for i, hook in enumerate(HOOK_NAMES):
        fn = header.hook_fn[i]
        active = bool(header.hooks_active & (1 << i))
        if hook == "kprobe":
            active = any(p.status == 0 for p in header.points)
        if not active:
            continue  # the stub did not register this hook (events= at load)
        if not in_stub(fn):
            rep.add(f"hook.{hook}", "TAMPERED", f"the header's {hook} handler {fn:#x} "
                    f"({_symbolize(target, fn, mods, text)}) is not in the stub's code")
            continue
        if ko is not None and ko.symbols and (fn - mod.core_base) not in ko.symbols:
            rep.add(f"hook.{hook}", "warn", f"handler {fn:#x} is not the start of a function of the .ko")
        if hook == "kprobe":
            _check_kprobes(target, k, rep, mod, header, mods, text)
            continue
        tp = header.tracepoint[i]
        want = target.symbol_address(f"__tracepoint_{hook}") if target.has_symbol(f"__tracepoint_{hook}") else None
        if want is not None and tp != want:
            rep.add(f"hook.{hook}", "TAMPERED", f"the header names tracepoint {tp:#x}, the profile's "
                    f"__tracepoint_{hook} is at {want:#x}")
            continue
        funcs = _u64(k, tp + funcs_off)
        probes: list[int] = []
        if funcs:
            for j in range(MAX_TP_FUNCS):
                f = _u64(k, funcs + j * fn_size + fn_off)
                if not f:
                    break
                probes.append(f)
        names = [_symbolize(target, p, mods, text) for p in probes]
        if fn not in probes:
            rep.add(f"hook.{hook}", "TAMPERED", f"the stub's probe {_where(ko, fn - mod.core_base)} is not "
                    f"registered on tracepoint {hook}; probes there: {', '.join(names) or 'none'}")
            continue
        before = [names[j] for j in range(probes.index(fn)) if not in_stub(probes[j])]
        if before:
            rep.add(f"hook.{hook}", "TAMPERED", f"foreign probe(s) run before the stub's on {hook}: "
                    + ", ".join(before))
            continue
        if _u32(k, tp + key_off) == 0:
            rep.add(f"hook.{hook}", "TAMPERED", f"tracepoint {hook} is disabled (static key 0): the "
                    "stub's probe never runs")
            continue
        after = [names[j] for j in range(probes.index(fn) + 1, len(probes)) if not in_stub(probes[j])]
        rep.add(f"hook.{hook}", "ok", f"stub probe {_where(ko, fn - mod.core_base)} first of "
                f"{len(probes)}" + (f" (after it: {', '.join(after)})" if after else ""))


def _check_kprobes(target: Any, k: Kernel, rep: IntegrityReport, mod: StubModule, header: Any,
                   mods: list[StubModule], text: TextSymbols) -> None:
    kf = {m: target.member_offset("kprobe", m) for m in ("addr", "pre_handler")}
    for p in header.points:
        if p.status != 0 or not p.kprobe:
            continue
        try:
            addr = _u64(k, p.kprobe + kf["addr"])
            pre = _u64(k, p.kprobe + kf["pre_handler"])
            first = k.read_exact(p.addr, 1)[0]
        except ShadowvolError as exc:
            rep.add(f"hook.kprobe.{p.spec}", "TAMPERED", f"struct kprobe at {p.kprobe:#x} unreadable: {exc}")
            continue
        problems = []
        if addr != p.addr:
            problems.append(f"probes {addr:#x}, not {p.addr:#x}")
        if not mod.core_base <= pre < mod.core_base + mod.text_size:
            problems.append(f"pre_handler is {_symbolize(target, pre, mods, text)}")
        if first not in (0xCC, 0xE9):  # int3, or the jmp of an optimized kprobe
            problems.append(f"no int3/jmp at {p.addr:#x} (byte {first:02x}): disarmed")
        if problems:
            rep.add(f"hook.kprobe.{p.spec}", "TAMPERED", "; ".join(problems))
        else:
            rep.add(f"hook.kprobe.{p.spec}", "ok", f"armed at {p.addr:#x}, handler in the stub")


def _check_rings(target: Any, rep: IntegrityReport, header: Any, state: dict[str, Any], key: str) -> None:
    from .trace.compartment import RECORD_SIZE, RingReader

    mem = target.memory
    readers = [RingReader(mem, header, cpu) for cpu in range(header.nr_rings)]
    h1 = [r.head() for r in readers]
    time.sleep(0.05)
    h2 = [r.head() for r in readers]
    last = state.get("heads") if state.get("heads_key") == key else None
    problems = []
    for cpu, (a, b) in enumerate(zip(h1, h2)):
        if b < a:
            problems.append(f"cpu{cpu} head went back {a} -> {b}")
        if last is not None and cpu < len(last) and a < last[cpu]:
            problems.append(f"cpu{cpu} head {a} is behind the last check's {last[cpu]}")
        # Records in the ring carry seq == slot (mod ring size) and never exceed head.
        n = header.ring_records
        raw = mem.read(header.ring_paddr(cpu), n * RECORD_SIZE)
        bad = 0
        for slot in range(n):
            seq = struct.unpack_from("<Q", raw, slot * RECORD_SIZE)[0]
            if seq and (seq % n != slot or seq > b + 64):  # +64: records published since the read
                bad += 1
        if bad:
            problems.append(f"cpu{cpu}: {bad} record(s) with a sequence number not of their slot")
    state["heads"], state["heads_key"] = h2, key
    rep.facts["heads"] = h2
    if problems:
        rep.add("rings", "TAMPERED", "; ".join(problems))
    else:
        rep.add("rings", "ok", f"{header.nr_rings} ring(s) of {header.ring_records} records, header CRC "
                f"valid, heads {h2} monotonic")


def check_integrity(target: Any, ko: Path | None = None, state_file: Path | None = None) -> IntegrityReport:
    """Run every check on the stub of ``target`` (a :class:`shadowvol.target.Target`,
    opened and closed by the caller); reads guest memory only.

    ``ko`` (default: the stub built for the VM's image) and ``state_file``
    (default: ``integrity.json`` in the VM's private directory, where the
    first-sight hashes are kept) must be given for a target that is not a VM
    started by ``shadowvol vm start``."""
    from .trace.compartment import CompartmentError, find_compartment

    entry = target.vm
    if entry is None and (ko is None or state_file is None):
        raise ShadowvolError(f"trace-check on {target.description}: only a VM started by 'shadowvol vm "
                             "start' has a stub .ko and a private directory for the first-sight hashes")
    rep = IntegrityReport(entry.name if entry is not None else target.description)
    try:
        header = find_compartment(target.memory)
    except CompartmentError as exc:
        rep.add("compartment", "TAMPERED" if entry is not None and entry.stub else "warn", str(exc))
        return rep
    rep.add("compartment", "ok", f"header at physical {header.paddr:#x}, CRC {header.crc:#010x}, "
            f"{header.total_size:#x} bytes")
    rep.facts["compartment"] = header.paddr
    k = kernel_of(target)
    mods = list_modules(target, k)
    mod = next((m for m in mods if m.name == STUB_MODULE), None)
    if mod is None:
        owner = next((m for m in mods if m.core_base <= header.module_core < m.core_base + m.core_size),
                     None)
        rep.add("module", "TAMPERED", f"{STUB_MODULE} is not on the modules list (hidden or unloaded "
                f"while its compartment remains; header says core {header.module_core:#x}"
                + (f", which is {owner.name}'s" if owner else "") + ")")
        return rep
    if (mod.core_base, mod.text_size) != (header.module_core, header.module_text_size):
        rep.add("module", "TAMPERED", f"the modules list puts {STUB_MODULE} at {mod.core_base:#x} "
                f"(text {mod.text_size:#x}), the compartment header at {header.module_core:#x} "
                f"(text {header.module_text_size:#x})")
    else:
        rep.add("module", "ok", f"{STUB_MODULE} core at {mod.core_base:#x}, text {mod.text_size:#x} bytes")
    rep.facts["module_core"] = mod.core_base
    ko_path = ko or stub_ko_path(entry.release)
    kot = None
    if ko_path.exists():
        kot = ko_text_layout(ko_path)
    else:
        rep.add("code.ko", "warn", f"{ko_path} not found: only the trust-on-first-use comparison runs")
    path = state_file or Path(entry.dir) / "integrity.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {}
    key = f"{header.nonce:x}:{header.load_time_ns}:{mod.core_base:x}"
    _check_code(target, rep, mod, kot, state, key)
    _check_hooks(target, k, rep, mod, header, mods, kot)
    _check_rings(target, rep, header, state, key)
    from .safeio import atomic_write

    atomic_write(path, json.dumps(state).encode(), mode=0o600)
    return rep


def render_report(rep: IntegrityReport) -> str:
    lines = [f"{rep.vm}: {'stub intact' if rep.ok else 'TAMPERING DETECTED'}"]
    for f in rep.findings:
        lines.append(printable(f"  {f.status:<8} {f.check:<24} {f.detail}"))  # symbol and module names: the guest's
    return "\n".join(lines)
