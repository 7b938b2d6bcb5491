"""Declared C types of kernel global variables (the typed-globals pitfall).

BTF types only per-CPU variables (its DATASEC); plugins need the types of
``init_task``, ``modules``, ``sys_call_table``, ``prb`` and other ordinary
globals. They are recovered in three steps, each validated:

1. **BTF VARs** (per-CPU variables) are taken as they are.
2. **Header probe.** With the kernel's headers, a translation unit is built
   with kbuild (so with the kernel's own flags) that includes
   :data:`PROBE_HEADERS` and, for every data symbol of kallsyms (types
   D/d/B/b/R/r) whose name is a C identifier, one line::

       #ifndef SYM
       __typeof__(SYM) *__svp_SYM = &SYM;
       #endif

   Lines the compiler rejects (the symbol is not declared by any header) are
   dropped from its ``file:line: error`` messages and the unit is rebuilt
   until it compiles. The DWARF of the object then gives the pointee type of
   each ``__svp_SYM``; :class:`~shadowvol.symbols.dwarf.DwarfImporter` maps it
   onto the BTF graph by name (struct/union/enum/typedef/base names resolve to
   the BTF types; pointers and arrays are added). An array declared without a
   bound (``extern const sys_call_ptr_t sys_call_table[]``) gets its count
   from a header macro (:data:`ARRAY_LENGTH_MACROS`), else count 0, as the
   declaration says and as DWARF has it: the distance to the next kallsyms
   address is only an upper bound (``hex_asc``: 32 bytes to the next
   symbol, 17 declared), and most such symbols are linker or assembler
   labels (``_text``, ``__start___ksymtab``) that DWARF also types ``[0]``.
   A type larger than the symbol's size bound is rejected.
3. **Curated statics.** Variables no header declares (``static struct
   printk_ringbuffer *prb`` in kernel/printk/printk.c, ``idt_table``,
   ``tk_core``...) come from :data:`CURATED_STATICS`; an entry is used only if
   its type exists in BTF and fits the symbol's size bound.

Without headers only steps 1 and 3 run, and :class:`GlobalTypes` says so.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from shadowvol.errors import ProfileError
from shadowvol.safeio import atomic_write
from shadowvol.symbols.kallsyms import Symbol, size_bounds, unique_by_name
from shadowvol.symbols.typegraph import CType, Kind, TypeGraph

__all__ = ["PROBE_HEADERS", "CURATED_STATICS", "ARRAY_LENGTH_MACROS", "extern_names", "GlobalTypes", "type_globals", "parse_ctype",
           "probe_header_types"]

#: Headers the probe includes: all compile together against 6.1 (x86-64);
#: missing ones are skipped (see :func:`_write_probe`).
PROBE_HEADERS: tuple[str, ...] = (
    "linux/module.h", "linux/sched.h", "linux/sched/task.h", "linux/sched/signal.h",
    "linux/sched/mm.h", "linux/init_task.h", "linux/pid_namespace.h", "linux/pid.h",
    "linux/printk.h", "linux/kallsyms.h", "linux/syscalls.h", "linux/fs.h", "linux/mm.h",
    "linux/mmzone.h", "linux/memblock.h", "linux/net.h", "linux/netdevice.h",
    "net/net_namespace.h", "linux/tty.h", "linux/fb.h", "linux/interrupt.h", "linux/irq.h",
    "linux/cpu.h", "linux/cpumask.h", "linux/jiffies.h", "linux/timekeeper_internal.h",
    "linux/ftrace.h", "linux/tracepoint.h", "linux/kprobes.h", "linux/bpf.h", "linux/filter.h",
    "linux/security.h", "linux/lsm_hooks.h", "linux/cred.h", "linux/user_namespace.h",
    "linux/utsname.h", "linux/nsproxy.h", "linux/ipc_namespace.h", "linux/cgroup.h",
    "linux/workqueue.h", "linux/kthread.h", "linux/notifier.h", "linux/keyboard.h",
    "linux/input.h", "linux/console.h", "linux/kobject.h", "linux/device.h", "linux/pci.h",
    "linux/slab.h", "linux/vmalloc.h", "linux/swap.h", "linux/mount.h", "linux/dcache.h",
    "linux/namei.h", "linux/fdtable.h", "linux/file.h", "linux/socket.h", "net/sock.h",
    "net/tcp.h", "net/udp.h", "linux/netfilter.h", "linux/percpu.h", "linux/random.h",
    "linux/panic.h", "linux/kernel.h", "linux/reboot.h", "linux/sysctl.h", "linux/proc_fs.h",
    "linux/seq_file.h", "linux/binfmts.h", "linux/elf.h", "linux/highmem.h", "linux/hugetlb.h",
    "linux/ptrace.h", "linux/perf_event.h", "linux/audit.h", "linux/capability.h", "linux/efi.h",
    "linux/acpi.h", "linux/clocksource.h", "linux/hrtimer.h", "linux/timer.h", "linux/rcupdate.h",
    "linux/smp.h", "linux/stop_machine.h", "linux/suspend.h", "linux/crash_dump.h",
    "linux/kexec.h", "linux/nmi.h", "linux/livepatch.h", "linux/static_call.h", "linux/blkdev.h",
    "linux/backing-dev.h", "linux/pagemap.h", "linux/rmap.h", "linux/oom.h", "linux/memcontrol.h",
    "linux/shmem_fs.h", "linux/vt_kern.h", "linux/tty_driver.h", "linux/sysrq.h", "linux/kmod.h",
    "linux/init.h", "linux/root_dev.h", "linux/ioport.h", "linux/dma-mapping.h", "linux/uaccess.h",
    "linux/module_signature.h", "linux/bootconfig.h", "linux/context_tracking.h", "linux/ksm.h",
    "linux/mman.h", "linux/page_ext.h", "linux/idr.h", "linux/radix-tree.h", "linux/xarray.h",
    "linux/kernfs.h", "linux/sysfs.h", "linux/debugfs.h", "linux/tracefs.h",
    "linux/trace_events.h", "linux/kdb.h", "linux/kgdb.h", "linux/profile.h",
    "linux/taskstats_kern.h", "linux/psi.h", "linux/energy_model.h", "linux/cpufreq.h",
    "linux/cpuidle.h", "linux/sched/clock.h", "linux/sched/loadavg.h", "linux/sched/sysctl.h",
    "linux/sched/stat.h", "linux/sched/isolation.h", "linux/sched/topology.h",
    "linux/vmpressure.h", "linux/writeback.h", "net/netns/generic.h", "net/inet_hashtables.h",
    "net/ip.h", "net/ipv6.h", "net/af_unix.h", "net/netlink.h", "linux/netfilter_ipv4.h",
    "linux/if_ether.h", "linux/tcp.h", "linux/udp.h", "linux/unix_diag.h", "net/rtnetlink.h",
    "linux/crypto.h", "linux/key.h", "linux/integrity.h", "linux/ima.h", "linux/lockdep.h",
    "linux/debug_locks.h", "linux/stacktrace.h", "linux/kmsg_dump.h", "linux/dmi.h",
    "linux/firmware.h", "linux/platform_device.h", "linux/virtio.h", "linux/eventfd.h",
    "linux/signalfd.h", "linux/io_uring.h", "linux/aio.h", "linux/poll.h", "linux/posix-timers.h",
    "linux/tick.h", "linux/time_namespace.h", "linux/uts.h", "linux/compat.h", "linux/elfcore.h",
    "linux/coredump.h", "linux/exportfs.h", "linux/fs_struct.h", "linux/fsnotify_backend.h",
    "linux/inotify.h", "linux/fanotify.h", "linux/quota.h", "linux/rculist.h", "linux/srcu.h",
    "linux/mutex.h", "linux/rwsem.h", "linux/seqlock.h", "linux/kmemleak.h", "linux/kasan.h",
    "linux/memory.h", "linux/memory_hotplug.h", "linux/migrate.h", "linux/page_owner.h",
    "linux/pgtable.h", "linux/userfaultfd_k.h", "linux/nodemask.h", "linux/topology.h",
    "linux/numa.h", "linux/mempolicy.h", "linux/khugepaged.h", "linux/cma.h",
    "linux/dma-map-ops.h", "linux/swiotlb.h", "linux/iommu.h", "linux/msi.h", "linux/irqdomain.h",
    "linux/irq_work.h", "linux/softirq.h", "linux/smpboot.h", "linux/cpuhotplug.h",
    "linux/kernel_stat.h", "linux/sched/cputime.h", "linux/sched/nohz.h", "linux/sched/idle.h",
    "linux/sched/rt.h", "linux/sched/deadline.h", "linux/sched/user.h", "linux/sched/coredump.h",
    "linux/sched/debug.h", "linux/sched/hotplug.h", "linux/sched/init.h", "linux/sched/jobctl.h",
    "linux/sched/prio.h", "linux/sched/smt.h", "linux/sched/task_stack.h", "linux/sched/wake_q.h",
    "linux/sched/xacct.h", "linux/vtime.h", "asm/desc.h", "asm/pgtable.h", "asm/syscall.h",
    "asm/setup.h", "asm/e820/api.h", "asm/processor.h", "asm/traps.h", "asm/apic.h", "asm/mce.h",
    "asm/tlbflush.h", "asm/fixmap.h", "asm/realmode.h", "asm/vsyscall.h", "asm/page.h",
    "asm/kaslr.h", "asm/hypervisor.h", "asm/cpufeature.h", "asm/stacktrace.h", "asm/irq_vectors.h",
    "asm/hw_irq.h", "asm/mtrr.h", "asm/idtentry.h", "asm/fpu/api.h", "asm/msr.h", "asm/tsc.h",
    "asm/hpet.h", "asm/i8259.h", "asm/x86_init.h", "asm/cpu.h", "asm/numa.h", "asm/acpi.h",
    "asm/paravirt.h", "asm/pti.h", "asm/cpu_entry_area.h", "asm/espfix.h", "asm/vdso.h",
    "asm/set_memory.h", "asm/memtype.h", "asm/proto.h", "asm/alternative.h", "asm/nospec-branch.h",
    "asm/spec-ctrl.h", "asm/microcode.h", "asm/kvm_para.h", "asm/crash.h", "asm/reboot.h",
    "asm/timer.h", "asm/time.h", "asm/dma.h", "asm/io.h", "asm/mem_encrypt.h", "asm/coco.h",
    "asm/tdx.h", "asm/pgalloc.h", "asm/mmu_context.h", "asm/pkru.h", "asm/kprobes.h",
    "asm/unwind.h", "asm/orc_lookup.h", "asm/jump_label.h", "asm/bugs.h", "asm/cacheinfo.h",
    "asm/intel-family.h", "asm/perf_event.h", "asm/nmi.h", "asm/ia32.h", "asm/elf.h",
    "asm/xen/hypervisor.h", "linux/irqdesc.h", "linux/timekeeping.h", "linux/vmstat.h",
    "linux/pipe_fs_i.h", "linux/initrd.h", "linux/delayacct.h", "linux/eventpoll.h",
    "linux/compaction.h", "linux/mm_inline.h", "linux/zpool.h", "linux/huge_mm.h",
    "asm/sections.h", "asm/io_apic.h", "asm/smp.h", "asm/pgtable_64.h", "asm/bootparam_utils.h",
    "asm/mpspec.h", "asm/text-patching.h", "asm/kexec.h", "asm/irq.h", "asm/pci.h", "asm/uv/uv.h",
    "asm/sev.h", "asm/ftrace.h", "asm/static_call.h", "asm/vgtod.h", "asm/pvclock.h",
)

#: Variables that no public header declares: (symbol, C type). Each entry is
#: validated against BTF and the kallsyms size bound before use. ``{a,b}``
#: names an anonymous struct by its member names.
CURATED_STATICS: tuple[tuple[str, str], ...] = (
    ("prb", "struct printk_ringbuffer *"),             # kernel/printk/printk.c
    ("printk_rb_static", "struct printk_ringbuffer"),  # kernel/printk/printk.c
    ("printk_rb_dynamic", "struct printk_ringbuffer"),
    ("log_buf", "char *"),
    ("log_buf_len", "u32"),
    ("modules", "struct list_head"),                   # kernel/module/main.c
    ("mod_tree", "struct mod_tree_root"),              # kernel/module/main.c
    ("idt_table", "gate_desc[256]"),                   # arch/x86/kernel/idt.c
    ("init_top_pgt", "pgd_t[512]"),                    # arch/x86/kernel/head_64.S
    ("tk_core", "{seq,timekeeper}"),                   # kernel/time/timekeeping.c
    ("socket_file_ops", "struct file_operations"),     # net/socket.c
    ("sockfs_dentry_operations", "struct dentry_operations"),
    ("prog_idr", "struct idr"),                        # kernel/bpf/syscall.c
    ("map_idr", "struct idr"),
    ("link_idr", "struct idr"),
    ("bpf_kallsyms", "struct list_head"),              # kernel/bpf/core.c
    ("ftrace_ops_list", "struct ftrace_ops *"),        # kernel/trace/ftrace.c
    ("ftrace_list_end", "struct ftrace_ops"),
    ("ftrace_mod_maps", "struct list_head"),
    ("keyboard_notifier_list", "struct atomic_notifier_head"),  # drivers/tty/vt/keyboard.c
    ("file_systems", "struct file_system_type *"),     # fs/filesystems.c
    ("dentry_hashtable", "struct hlist_bl_head *"),    # fs/dcache.c
    ("inode_hashtable", "struct hlist_head *"),        # fs/inode.c
    ("module_kset", "struct kset *"),
    ("init_task", "struct task_struct"),
    ("init_pid_ns", "struct pid_namespace"),
    ("jiffies", "unsigned long"),
    # mm/memblock.c: last page frame + 1. Without headers (a profile from guest
    # memory) it must still be typed: it tells how far a raw dump must reach.
    ("max_pfn", "unsigned long"),
    # What stock volatility3 plugins look up (shadowvol profile diff --stock
    # against DWARF); each declaration's file as DWARF's DW_AT_decl_file has it.
    ("cap_last_cap", "int"),                           # kernel/sysctl.c: static const int
    ("ftrace_ops_trampoline_list", "struct list_head"),  # kernel/trace/ftrace.c: static LIST_HEAD
    ("bpf_tree", "struct latch_tree_root"),            # kernel/bpf/core.c
    ("registered_fb", "struct fb_info *[32]"),         # drivers/video/fbdev/core/fbmem.c: [FB_MAX]
    ("num_registered_fb", "int"),                      # drivers/video/fbdev/core/fbmem.c
    ("__start___tracepoints_ptrs", "tracepoint_ptr_t[0]"),  # kernel/tracepoint.c: extern ...[]
    ("__start___ksymtab", "struct kernel_symbol[0]"),  # kernel/module/internal.h: extern ...[]
    ("__stop___ksymtab", "struct kernel_symbol[0]"),
    ("raw_seq_ops", "struct seq_operations"),          # net/ipv4/raw.c: static const
    ("raw6_seq_ops", "struct seq_operations"),         # net/ipv6/raw.c
    ("tcp4_seq_ops", "struct seq_operations"),         # net/ipv4/tcp_ipv4.c
    ("tcp6_seq_ops", "struct seq_operations"),         # net/ipv6/tcp_ipv6.c
    ("arp_seq_ops", "struct seq_operations"),          # net/ipv4/arp.c
    ("unix_seq_ops", "struct seq_operations"),         # net/unix/af_unix.c
    ("packet_seq_ops", "struct seq_operations"),       # net/packet/af_packet.c
    ("tcp4_seq_afinfo", "struct tcp_seq_afinfo"),      # net/ipv4/tcp_ipv4.c: static
    ("tcp6_seq_afinfo", "struct tcp_seq_afinfo"),      # net/ipv6/tcp_ipv6.c
    ("udp4_seq_afinfo", "struct udp_seq_afinfo"),      # net/ipv4/udp.c: static
    ("udp6_seq_afinfo", "struct udp_seq_afinfo"),      # net/ipv6/udp.c
    ("udplite4_seq_afinfo", "struct udp_seq_afinfo"),  # net/ipv4/udplite.c
    ("udplite6_seq_afinfo", "struct udp_seq_afinfo"),  # net/ipv6/udplite.c
)

#: Arrays declared without a bound, and the header macro giving their length
#: (evaluated by the probe; otherwise the count is 0, as declared).
ARRAY_LENGTH_MACROS: tuple[tuple[str, str], ...] = (
    ("sys_call_table", "NR_syscalls"),
    ("ia32_sys_call_table", "IA32_NR_syscalls"),
    ("x32_sys_call_table", "X32_NR_syscalls"),
    ("idt_table", "IDT_ENTRIES"),
    ("init_top_pgt", "PTRS_PER_PGD"),
    ("node_data", "MAX_NUMNODES"),
)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DATA_TYPES = frozenset("DdBbRr")
_C_WORDS = frozenset("""auto break case char const continue default do double else enum extern float
for goto if inline int long register restrict return short signed sizeof static struct switch
typedef union unsigned void volatile while asm typeof _Bool""".split())
_ERROR = re.compile(r"(?:^|/)probe\.c:(\d+):\d+: error:", re.M)
_PREFIX = "__svp_"
_LEN_PREFIX = "__svlen_"


@dataclass
class GlobalTypes:
    """Result of :func:`type_globals`: symbol name -> type id in the graph,
    where each came from (``btf``, ``headers``, ``curated``), and notes."""

    types: dict[str, int] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parse_ctype(graph: TypeGraph, spec: str) -> int | None:
    """Graph id for a small C type spelling (``struct X *``, ``gate_desc[256]``,
    ``unsigned long``, ``{seq,timekeeper}``); None if a named type is not in
    the graph. Pointers and arrays are added to the graph as needed."""
    spec = spec.strip()
    m = re.fullmatch(r"(.*?)\s*\[(\d+)\]", spec)
    if m:
        inner = parse_ctype(graph, m.group(1))
        return None if inner is None else graph.array_of(inner, int(m.group(2)))
    if spec.endswith("*"):
        inner = parse_ctype(graph, spec[:-1])
        return None if inner is None else graph.pointer_to(inner)
    if spec.startswith("{") and spec.endswith("}"):
        wanted = [w.strip() for w in spec[1:-1].split(",")]
        for tid, t in enumerate(graph.types):
            if t.kind == Kind.STRUCT and not t.name and [x.name for x in t.members] == wanted:
                return tid
        return None
    words = spec.split()
    if words and words[0] in ("struct", "union", "enum"):
        kind = {"struct": Kind.STRUCT, "union": Kind.UNION, "enum": Kind.ENUM}[words[0]]
        return graph.find_complete(kind, " ".join(words[1:]))
    name = " ".join(words)
    name = {"unsigned long": "long unsigned int", "long": "long int",
            "unsigned": "unsigned int"}.get(name, name)
    for kind in (Kind.TYPEDEF, Kind.INT, Kind.FLOAT):
        ids = graph.find(kind, name)
        if ids:
            return ids[0]
    return None


def _fits(graph: TypeGraph, tid: int, bound: int | None) -> bool:
    size = graph.sizeof(tid)
    return size is not None and (bound is None or size <= bound)


_EXTERN = re.compile(r"\bextern\b([^;{}]*);")
_WORD = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\b(\s*\()?")


def extern_names(preprocessed: str) -> set[str]:
    """Identifiers that ``extern`` statements of preprocessed C declare as
    objects (a superset: type names are included; functions are not)."""
    out: set[str] = set()
    for stmt in _EXTERN.finditer(preprocessed):
        for word, call in _WORD.findall(stmt.group(1)):
            if not call:
                out.add(word)
    return out


def _write_probe(path: Path, names: list[str]) -> dict[int, str]:
    """Writes probe.c; returns line number -> symbol name."""
    lines = [f"#include <{h}>" for h in PROBE_HEADERS]
    lines.append('MODULE_LICENSE("GPL");')
    for sym, macro in ARRAY_LENGTH_MACROS:
        lines += [f"#ifdef {macro}", f"const unsigned long {_LEN_PREFIX}{sym} = {macro};", "#endif"]
    where: dict[int, str] = {}
    for name in names:
        lines.append(f"#ifndef {name}")
        lines.append(f"__typeof__({name}) *{_PREFIX}{name} = &{name};")
        where[len(lines)] = name
        lines.append("#endif")
    atomic_write(path, ("\n".join(lines) + "\n").encode(), mode=0o644)
    return where


def probe_header_types(graph: TypeGraph, symbols: list[Symbol], headers: Path,
                       release: str | None = None, workdir: Path | None = None,
                       max_rounds: int = 6) -> tuple[dict[str, int], set[str], list[str]]:
    """Step 2 of the module docstring: declared types of symbols from the
    kernel headers, mapped onto ``graph``. Returns (name -> type id, names
    declared as arrays without a bound and no length macro, notes)."""
    from shadowvol.symbols.dwarf import DwarfImporter, open_elf
    from shadowvol.symbols.kbuild import prepare_headers, run_kbuild

    tree = prepare_headers(headers, release)
    bounds = size_bounds(symbols)
    by_name = unique_by_name(symbols)
    # All letters: linker symbols such as _text are 'T' but declared
    # ``extern char _text[]``; functions are dropped after the DWARF read.
    names = sorted(n for n in by_name if _IDENT.match(n) and n not in _C_WORDS)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="shadowvol-probe-", dir=workdir) as tmp:
        src = Path(tmp)
        atomic_write(src / "Kbuild", b"obj-m := probe.o\n", mode=0o644)
        # gcc spends ~80 ms per undeclared identifier looking for a "did you
        # mean"; keep only names some header declares extern.
        _write_probe(src / "probe.c", [])
        proc = run_kbuild(tree, src, ["probe.i"])
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            raise ProfileError(f"kernel headers do not preprocess:\n{tail}")
        declared = extern_names((src / "probe.i").read_text(errors="replace"))
        candidates = [n for n in names if n in declared]
        rejected: set[str] = set()
        for _ in range(max_rounds):
            where = _write_probe(src / "probe.c", [n for n in candidates if n not in rejected])
            proc = run_kbuild(tree, src, ["probe.o"])
            if proc.returncode == 0:
                break
            output = proc.stdout + proc.stderr
            bad = {where[int(m)] for m in _ERROR.findall(output) if int(m) in where}
            if not bad:
                tail = "\n".join(output.strip().splitlines()[-10:])
                raise ProfileError(f"header probe does not compile outside symbol lines:\n{tail}")
            rejected |= bad
        else:
            raise ProfileError("header probe still fails after several rounds")
        elf = open_elf(src / "probe.o")
        lengths = _probe_constants(elf, _LEN_PREFIX)
        importer = DwarfImporter(graph, reuse_named=True)
        found: dict[str, int] = {}
        inferred: set[str] = set()
        from shadowvol.symbols.dwarf import die_name, iter_variables
        for die in iter_variables(elf):
            vname = die_name(die)
            if not vname.startswith(_PREFIX) or "DW_AT_type" not in die.attributes:
                continue
            sym = vname[len(_PREFIX):]
            ptr = die.get_DIE_from_attribute("DW_AT_type")
            if ptr.tag != "DW_TAG_pointer_type" or "DW_AT_type" not in ptr.attributes:
                continue
            bound = bounds.get(by_name[sym].address)
            count = None
            if sym in lengths:
                count = (lambda elem, n=lengths[sym]: n)
            elif _unbounded_array(ptr):
                inferred.add(sym)
            tid = importer.import_type(ptr.get_DIE_from_attribute("DW_AT_type"), array_count=count)
            stripped = graph[graph.strip(tid)]
            if stripped.kind in (Kind.FUNC_PROTO, Kind.FUNC):
                continue
            if graph.sizeof(tid) is None:
                continue  # void (linker marks like __nosave_begin)
            if not _fits(graph, tid, bound):
                notes.append(f"{sym}: header type {graph.describe(tid)} does not fit {bound} bytes")
                continue
            found[sym] = tid
    notes.append(f"headers typed {len(found)} of {len(names)} symbols "
                 f"({len(candidates)} declared extern, {len(rejected)} of them rejected by gcc)")
    notes.append(f"array lengths from header macros: {lengths}")
    if inferred:
        notes.append(f"{len(inferred)} arrays declared without a bound left at count 0 (as DWARF)")
    return found, inferred, notes


def _unbounded_array(ptr_die: object) -> bool:
    """Whether a probe pointer's pointee is an array with no bound."""
    from shadowvol.symbols.dwarf import strip_qualifiers

    die = strip_qualifiers(ptr_die.get_DIE_from_attribute("DW_AT_type"))  # type: ignore[attr-defined]
    if die.tag != "DW_TAG_array_type":
        return False
    subs = [c for c in die.iter_children() if c.tag == "DW_TAG_subrange_type"]
    return not subs or not any(a in subs[0].attributes for a in ("DW_AT_count", "DW_AT_upper_bound"))


def _probe_constants(elf: object, prefix: str) -> dict[str, int]:
    """Values of the ``const unsigned long <prefix>NAME`` objects of the probe."""
    out: dict[str, int] = {}
    symtab = elf.get_section_by_name(".symtab")  # type: ignore[attr-defined]
    if symtab is None:
        return out
    for sym in symtab.iter_symbols():
        if sym.name.startswith(prefix) and isinstance(sym["st_shndx"], int):
            data = elf.get_section(sym["st_shndx"]).data()  # type: ignore[attr-defined]
            out[sym.name[len(prefix):]] = int.from_bytes(data[sym["st_value"]:sym["st_value"] + 8], "little")
    return out


def type_globals(graph: TypeGraph, symbols: list[Symbol], headers: Path | None = None,
                 release: str | None = None) -> GlobalTypes:
    """Types of kernel globals by name (see the module docstring)."""
    result = GlobalTypes()
    by_name = unique_by_name(symbols)
    for tid, t in enumerate(graph.types):
        if t.kind == Kind.VAR and t.name in by_name:
            result.types[t.name] = t.type_id
            result.origin[t.name] = "btf"
    if headers is not None:
        found, inferred, notes = probe_header_types(graph, symbols, headers, release)
        result.notes += notes
        curated = {name for name, _ in CURATED_STATICS}
        for name, tid in found.items():
            if name in inferred and name in curated:
                continue  # a curated exact length beats an unbounded declaration
            result.types.setdefault(name, tid)
            result.origin.setdefault(name, "headers")
    else:
        result.notes.append("no kernel headers given: only BTF per-CPU variables and the "
                            f"{len(CURATED_STATICS)} curated statics are typed")
    bounds = size_bounds(symbols)
    for name, spec in CURATED_STATICS:
        if name in result.types or name not in by_name:
            continue
        tid = parse_ctype(graph, spec)
        if tid is None:
            result.notes.append(f"curated {name}: type {spec!r} not in BTF, skipped")
            continue
        if not _fits(graph, tid, bounds.get(by_name[name].address)):
            result.notes.append(f"curated {name}: {spec} larger than the symbol, skipped")
            continue
        result.types[name] = tid
        result.origin[name] = "curated"
    return result
