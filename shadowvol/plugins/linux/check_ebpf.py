"""linux.check_ebpf: loaded eBPF programs, where they are attached, what they call, who holds them.

Models kernel/bpf/syscall.c (``prog_idr`` of struct bpf_prog, ``link_idr`` of
struct bpf_link; programs and links are held by file descriptors whose
``f_op`` is ``bpf_prog_fops`` / ``bpf_link_fops``), include/linux/filter.h
(struct bpf_prog: type, len, aux, the translated instructions ``insnsi``),
kernel/trace/bpf_trace.c (struct bpf_raw_tp_link: the raw tracepoint) and
kernel/trace/trace_kprobe.c (struct trace_kprobe: a kprobe whose event's
``prog_array`` runs programs).

A program is a finding when it is attached to system calls (the raw
tracepoints ``sys_enter``/``sys_exit``, or a kprobe/fentry on a syscall entry
point), to a kprobe, or to an LSM hook, or when it calls a helper that
overwrites user memory or return values (``bpf_probe_write_user``,
``bpf_override_return``). The culprit is named by the processes holding the
program or its link (``PID:COMM``).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Iterator

from volatility3.framework import exceptions, interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints
from volatility3.plugins.linux import kernel_hooks
from volatility3.plugins.linux.kernel import Kernel, Walk, for_each_process, for_each_thread, idr_for_each

vollog = logging.getLogger(__name__)

__all__ = ["CheckEbpf", "BpfProg", "bpf_programs"]

BPF_OBJ_NAME_LEN = 16
MAX_INSNS = 1 << 20
DANGEROUS_HELPERS = ("bpf_probe_write_user", "bpf_override_return")
SYSCALL_TRACEPOINTS = ("sys_enter", "sys_exit")
SYSCALL_PREFIXES = ("__x64_sys_", "__ia32_sys_", "__do_sys_", "__se_sys_", "x64_sys_call", "do_syscall_64")
BPF_JMP_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_PSEUDO_CALL = 1  # src_reg of a call to a bpf-to-bpf function, not a helper
MAX_FDS = 1 << 20
_INSN = struct.Struct("<BBhi")  # struct bpf_insn: code, dst_reg:4 src_reg:4, off, imm


@dataclass
class BpfProg:
    """One loaded program and what the walks learnt about it."""

    addr: int  # struct bpf_prog *
    id: int
    name: str
    type: str
    attach: list[str] = field(default_factory=list)
    helpers: set[str] = field(default_factory=set)
    holders: set[str] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)


def _enum_names(k: Kernel, enum: str) -> dict[int, str]:
    try:
        return {v: n for n, v in k.module.get_enumeration(enum).choices.items()}
    except (exceptions.SymbolError, AttributeError):
        return {}


def _insns_offset(k: Kernel) -> int:
    """offsetof(struct bpf_prog, insnsi): the flexible array ends the struct (an anonymous union in 6.x)."""
    try:
        return k.offsetof("bpf_prog", "insnsi")
    except (exceptions.SymbolError, KeyError, AttributeError):
        return k.sizeof("bpf_prog")


def helper_calls(image: kernel_hooks.KernelImage, prog: int, helper_ids: dict[int, str]) -> set[str]:
    """Names of the helpers the translated instructions of ``prog`` (struct bpf_prog *) call.

    The verifier rewrites a helper call's ``imm`` to ``helper - __bpf_call_base``;
    a not yet rewritten one still holds the ``BPF_FUNC_*`` number.
    """
    length = image.u32(prog + image.offsetof("bpf_prog", "len")) or 0
    if not 0 < length <= MAX_INSNS:
        return set()
    raw = image.read(prog + _insns_offset(image), length * _INSN.size)
    base = image.symbol("__bpf_call_base")
    if raw is None:
        return set()
    out = set()
    for code, regs, _off, imm in _INSN.iter_unpack(raw):
        if code != BPF_JMP_CALL or regs >> 4 == BPF_PSEUDO_CALL:
            continue
        names = image.symbols_at(image.canonical(base + imm)) if base is not None else []
        if names:
            out.add(kernel_hooks.preferred_name(names))
        elif imm in helper_ids:
            out.add("bpf_" + helper_ids[imm][len("BPF_FUNC_"):])
    return out


def bpf_programs(image: kernel_hooks.KernelImage) -> dict[int, BpfProg]:
    """Every program of ``prog_idr`` (struct bpf_prog *) -> what is known of it."""
    idr = image.symbol("prog_idr")
    if idr is None:
        raise exceptions.SymbolError("prog_idr", image.kernel.symbol_table_name, "the profile has no prog_idr")
    types = _enum_names(image, "bpf_prog_type")
    helper_ids = _enum_names(image, "bpf_func_id")
    aux_off = image.offsetof("bpf_prog", "aux")
    type_off = image.offsetof("bpf_prog", "type")
    id_off, name_off = image.offsetof("bpf_prog_aux", "id"), image.offsetof("bpf_prog_aux", "name")
    func_name_off = image.offsetof("bpf_prog_aux", "attach_func_name") \
        if image.has_member("bpf_prog_aux", "attach_func_name") else None
    walk = Walk("prog_idr")
    progs: dict[int, BpfProg] = {}
    for prog in idr_for_each(image, idr, walk):
        aux = image.u64(prog + aux_off)
        if not aux or not image.is_kernel_pointer(aux):
            continue
        raw_name = image.read(aux + name_off, BPF_OBJ_NAME_LEN, pad=True) or b""
        ptype = image.u32(prog + type_off)
        p = BpfProg(prog, image.u32(aux + id_off) or 0, raw_name.split(b"\0", 1)[0].decode("latin-1"),
                    types.get(ptype, str(ptype)).replace("BPF_PROG_TYPE_", ""))
        if func_name_off is not None:
            fn = image.u64(aux + func_name_off)
            if fn and image.is_kernel_pointer(fn):
                p.attach.append(f"{'lsm' if p.type == 'LSM' else 'fentry/fexit'}:{image.cstring(fn, 128)}")
        p.helpers = helper_calls(image, prog, helper_ids)
        progs[prog] = p
    if walk.partial:
        vollog.warning("check_ebpf: prog_idr walk incomplete: %s", walk.partial)
    return progs


def link_attachments(image: kernel_hooks.KernelImage, progs: dict[int, BpfProg]) -> dict[int, int]:
    """Add raw tracepoint attach points from ``link_idr`` (struct bpf_link *); returns link -> prog."""
    idr = image.symbol("link_idr")
    links: dict[int, int] = {}
    if idr is None:
        return links
    link_types = _enum_names(image, "bpf_link_type")
    prog_off, type_off = image.offsetof("bpf_link", "prog"), image.offsetof("bpf_link", "type")
    walk = Walk("link_idr")
    for link in idr_for_each(image, idr, walk):
        prog = image.u64(link + prog_off)
        if prog not in progs:
            continue
        links[link] = prog
        ltype = link_types.get(image.u32(link + type_off), "?").replace("BPF_LINK_TYPE_", "")
        if ltype == "RAW_TRACEPOINT" and image.has_member("bpf_raw_tp_link", "btp"):
            btp = image.u64(link + image.offsetof("bpf_raw_tp_link", "btp"))
            tp = image.u64(btp + image.offsetof("bpf_raw_event_map", "tp")) if btp else None
            name_ptr = image.u64(tp + image.offsetof("tracepoint", "name")) if tp else None
            name = image.cstring(name_ptr, 128) if name_ptr else None
            progs[prog].attach.append(f"raw_tracepoint:{name or '?'}")
        elif ltype not in ("TRACING",):  # tracing links: the prog's attach_func_name says where
            progs[prog].attach.append(ltype.lower())
    if walk.partial:
        vollog.warning("check_ebpf: link_idr walk incomplete: %s", walk.partial)
    return links


def kprobe_attachments(image: kernel_hooks.KernelImage, progs: dict[int, BpfProg]) -> None:
    """Add kprobe attach points: kprobes of trace_kprobe events (pre_handler ``kprobe_dispatcher``)
    whose ``tp.event->call.prog_array`` (struct bpf_prog_array: items[].prog, NULL-ended) holds a program."""
    dispatcher = image.symbol("kprobe_dispatcher")
    if dispatcher is None or not image.has_member("trace_kprobe", "tp"):
        return
    kp_off = image.offsetof("trace_kprobe", "rp") + image.offsetof("kretprobe", "kp")
    event_off = image.offsetof("trace_kprobe", "tp") + image.offsetof("trace_probe", "event")
    array_off = image.offsetof("trace_probe_event", "call") + image.offsetof("trace_event_call", "prog_array")
    items_off = image.offsetof("bpf_prog_array", "items")
    item_size = image.sizeof("bpf_prog_array_item")
    for p in image.kprobes():
        if all(h != dispatcher for _, h in p.handlers):
            continue
        event = image.u64(p.struct - kp_off + event_off)
        array = image.u64(event + array_off) if event else None
        if not array:
            continue
        for i in range(64):
            prog = image.u64(array + items_off + i * item_size)
            if not prog:
                break
            if prog in progs:
                progs[prog].attach.append(f"{p.kind}:{p.symbol or image.describe(p.addr)}")


def fd_holders(image: kernel_hooks.KernelImage, objects: dict[int, int]) -> dict[int, set[str]]:
    """struct bpf_prog * -> {"PID:COMM"} of the processes with a file descriptor on it or on one of its
    links (``objects``: file private_data -> prog), from each task's ``files->fdt`` (struct fdtable)."""
    fops = {a for a in (image.symbol("bpf_prog_fops"), image.symbol("bpf_link_fops")) if a is not None}
    holders: dict[int, set[str]] = {}
    if not fops:
        return holders
    o = image.offsetof
    files_off, fdt_off = o("task_struct", "files"), o("files_struct", "fdt")
    max_off, fd_off = o("fdtable", "max_fds"), o("fdtable", "fd")
    fop_off, priv_off = o("file", "f_op"), o("file", "private_data")
    pid_off, comm_off = o("task_struct", "tgid"), o("task_struct", "comm")
    signal_off = o("task_struct", "signal")
    seen_files: set[int] = set()
    walk = Walk("tasks")
    for leader in for_each_process(image, walk):
        signal = image.u64(leader + signal_off)
        tasks = [leader] + (list(for_each_thread(image, signal, Walk("threads"))) if signal else [])
        for task in tasks:
            files = image.u64(task + files_off)
            if not files or files in seen_files or not image.is_kernel_pointer(files):
                continue
            seen_files.add(files)
            fdt = image.u64(files + fdt_off)
            count = image.u32(fdt + max_off) if fdt else None
            array = image.u64(fdt + fd_off) if fdt else None
            if not count or not array or count > MAX_FDS:
                continue
            raw = image.read(array, 8 * count, pad=True) or b""
            for (f,) in struct.iter_unpack("<Q", raw):
                if not f or image.u64(f + fop_off) not in fops:
                    continue
                prog = objects.get(image.u64(f + priv_off) or 0)
                if prog is not None:
                    comm = (image.read(task + comm_off, 16) or b"?").split(b"\0", 1)[0].decode("latin-1")
                    holders.setdefault(prog, set()).add(f"{image.u32(task + pid_off)}:{comm}")
    if walk.partial:
        vollog.warning("check_ebpf: task walk incomplete: %s", walk.partial)
    return holders


def judge(p: BpfProg) -> None:
    """Fill ``p.reasons``: syscall, kprobe and LSM attach points, dangerous helpers."""
    for a in p.attach:
        kind, _, where = a.partition(":")
        if where in SYSCALL_TRACEPOINTS or where.startswith(SYSCALL_PREFIXES):
            p.reasons.append(f"attached to system calls ({a})")
        elif kind in ("kprobe", "kretprobe"):
            p.reasons.append(f"attached to a kprobe ({a})")
        elif kind == "lsm" or where.startswith("bpf_lsm_"):
            p.reasons.append(f"attached to an LSM hook ({a})")
    if p.type == "LSM" and not any("LSM" in r for r in p.reasons):
        p.reasons.append("LSM program")
    for h in sorted(p.helpers & set(DANGEROUS_HELPERS)):
        p.reasons.append(f"calls {h}")


class CheckEbpf(interfaces.plugins.PluginInterface):
    """Lists loaded eBPF programs with attach points, helpers and holders; flags syscall/kprobe/LSM hooks and
    user-memory or return-value overwrites."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            requirements.ModuleRequirement(name="kernel", description="Linux kernel", architectures=["Intel64"]),
            requirements.BooleanRequirement(name="findings_only", description="Only rows that are findings",
                                            default=False, optional=True),
        ]

    @classmethod
    def programs(cls, image: kernel_hooks.KernelImage) -> list[BpfProg]:
        """Every loaded program, judged."""
        progs = bpf_programs(image)
        if not progs:
            return []
        links = link_attachments(image, progs)
        kprobe_attachments(image, progs)
        objects = {p: p for p in progs}
        objects.update(links)
        for prog, who in fd_holders(image, objects).items():
            progs[prog].holders |= who
        for p in progs.values():
            judge(p)
        return sorted(progs.values(), key=lambda p: p.id)

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        image = kernel_hooks.KernelImage(self.context, self.config["kernel"])
        only = bool(self.config.get("findings_only"))
        for p in self.programs(image):
            if only and not p.reasons:
                continue
            yield 0, (format_hints.Hex(p.addr), p.id, p.name or renderers.NotAvailableValue(), p.type,
                      ", ".join(p.attach) or "-", ", ".join(sorted(p.helpers)) or "-",
                      ", ".join(sorted(p.holders)) or "-", bool(p.reasons), "; ".join(p.reasons))

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [("Offset(V)", format_hints.Hex), ("ID", int), ("Name", str), ("Type", str), ("Attach", str),
             ("Helpers", str), ("Holders", str), ("Finding", bool), ("Reasons", str)],
            self._generator())
