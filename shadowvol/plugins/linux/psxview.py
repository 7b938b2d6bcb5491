"""linux.psxview: every task, cross-checked across independent kernel views.

Models include/linux/sched.h (struct task_struct, for_each_process,
for_each_thread), include/linux/pid.h + lib/xarray.c (the pid IDR of a pid
namespace), kernel/sched/sched.h (struct rq, its CFS rb-tree and RT queues)
and mm/slab.h (struct slab, struct kmem_cache: the task_struct cache).

A task hidden by unlinking it from the task list (the classic DKOM) still has
a struct pid in the IDR and still lives in a task_struct slab: it shows as
``task_list=False`` with ``pid_hash``/``task_scan`` True, and ``Hidden`` True.

Reads are raw (bytes + offsets from the profile) for speed. Walkers come in
two kinds, as in drgn: trusting walkers (``for_each_process``,
``idr_for_each``, ...) follow pointers, bounded and cycle-detecting, and
record why they stopped early; ``validate_task`` checks one candidate's
fields and back-links before the memory scan believes it.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

from volatility3.framework import exceptions, interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints
from volatility3.plugins.linux.kernel import (LIST_POISON2, MAX_ENTRIES, Kernel, Walk, for_each_process,
                                              for_each_thread, idr_for_each, list_for_each, per_cpu_ptr,
                                              rb_for_each)

__all__ = ["TaskFields", "TaskLayout", "PsXView", "process_tasks", "pid_hash_tasks", "runqueue_tasks",
           "scan_task_slabs", "validate_task"]

vollog = logging.getLogger(__name__)

PID_MAX_LIMIT = 4 * 1024 * 1024
TASK_COMM_LEN = 16
TASK_STATE_LIMIT = 0x10000  # TASK_STATE_MAX (6.1) and above is garbage
EXIT_STATES = (0, 0x10, 0x20)  # 0, EXIT_DEAD, EXIT_ZOMBIE
MAX_TASKS = MAX_ENTRIES  # bound of the task views
PAGE_SIZE = 4096
_Q = struct.Struct("<Q")


@dataclass
class TaskFields:
    """The fields of one struct task_struct that psxview needs."""

    addr: int
    state: int
    exit_state: int
    pid: int
    tgid: int
    comm: str
    comm_ok: bool
    mm: int
    tasks_next: int
    tasks_prev: int
    thread_pid: int
    sched_class: int
    signal: int


class TaskLayout:
    """Offsets of struct task_struct fields, and a parser for its bytes."""

    def __init__(self, r: Kernel) -> None:
        o = r.offsetof
        # __state replaced state in 5.14 (2f064a59a11f "sched: Change task_struct::state").
        state = "__state" if r.has_member("task_struct", "__state") else "state"
        self.state = o("task_struct", state)
        self.state_size = 4 if state == "__state" else 8
        self.exit_state = o("task_struct", "exit_state")
        self.pid = o("task_struct", "pid")
        self.tgid = o("task_struct", "tgid")
        self.comm = o("task_struct", "comm")
        self.mm = o("task_struct", "mm")
        self.tasks = o("task_struct", "tasks")
        self.thread_pid = o("task_struct", "thread_pid")
        self.pid_links = o("task_struct", "pid_links")
        self.sched_class = o("task_struct", "sched_class")
        self.signal = o("task_struct", "signal")
        self.thread_node = o("task_struct", "thread_node")
        self.se = o("task_struct", "se")
        self.rt = o("task_struct", "rt")
        self.size = r.sizeof("task_struct")
        self.span = max(self.state, self.exit_state, self.pid, self.tgid, self.comm + 8, self.mm,
                        self.tasks + 8, self.thread_pid, self.sched_class, self.signal) + 8

    def parse(self, addr: int, buf: bytes, base: int = 0) -> TaskFields:
        """TaskFields of the task at ``addr`` whose bytes start at ``buf[base]``."""
        q = _Q.unpack_from
        raw = buf[base + self.comm: base + self.comm + TASK_COMM_LEN]
        nul = raw.find(b"\0")
        name = raw[:nul] if nul >= 0 else raw
        comm_ok = 0 <= nul and nul > 0 and all(0x20 <= c < 0x7F for c in name)
        state = int.from_bytes(buf[base + self.state: base + self.state + self.state_size], "little")
        return TaskFields(
            addr, state, int.from_bytes(buf[base + self.exit_state: base + self.exit_state + 4], "little", signed=True),
            int.from_bytes(buf[base + self.pid: base + self.pid + 4], "little", signed=True),
            int.from_bytes(buf[base + self.tgid: base + self.tgid + 4], "little", signed=True),
            name.decode("latin-1"), comm_ok, q(buf, base + self.mm)[0], q(buf, base + self.tasks)[0],
            q(buf, base + self.tasks + 8)[0], q(buf, base + self.thread_pid)[0], q(buf, base + self.sched_class)[0],
            q(buf, base + self.signal)[0])

    def read(self, r: Kernel, addr: int) -> Optional[TaskFields]:
        buf = r.read(addr, self.span)
        return None if buf is None else self.parse(addr, buf)


# -- trusting walkers ---------------------------------------------------------


def process_tasks(r: Kernel, view: Walk, threads: bool = True) -> None:
    """Fill ``view`` from for_each_process (struct task_struct) and, with ``threads``, each one's threads."""
    leaders = list(for_each_process(r, view))
    view.items.update(leaders)
    if not threads:
        return
    signal_off = r.offsetof("task_struct", "signal")
    for task in leaders[1:]:
        signal = r.u64(task + signal_off)
        if signal is None or not r.is_kernel_pointer(signal):
            continue  # kernel threads have a signal_struct too; a bad one is a smeared task
        for thread in for_each_thread(r, signal, Walk("threads")):
            view.items.add(thread)
            if len(view.items) > MAX_TASKS:
                view.stop(f"more than {MAX_TASKS} tasks")
                return


def pid_task(r: Kernel, lay: TaskLayout, pid: int) -> Optional[int]:
    """pid_task(pid, PIDTYPE_PID): struct task_struct * of a struct pid *, or None."""
    first = r.u64(pid + r.offsetof("pid", "tasks"))
    if not first or not r.is_kernel_pointer(first):
        return None
    return first - lay.pid_links


def pid_hash_tasks(r: Kernel, lay: TaskLayout, view: Walk) -> None:
    """Fill ``view`` from init_pid_ns.idr (struct pid_namespace)."""
    ns = r.symbol("init_pid_ns")
    for pid in idr_for_each(r, ns + r.offsetof("pid_namespace", "idr"), view):
        task = pid_task(r, lay, pid)
        if task is not None:
            view.items.add(task)
        if len(view.items) > MAX_TASKS:
            view.stop(f"more than {MAX_TASKS} pids")
            return


def online_cpus(r: Kernel) -> list[int]:
    """CPUs in __cpu_online_mask (struct cpumask), below nr_cpu_ids."""
    nr = r.u32(r.symbol("nr_cpu_ids")) or 1
    words = r.read(r.symbol("__cpu_online_mask"), 8 * ((nr + 63) // 64))
    if words is None:
        return [0]
    bits = int.from_bytes(words, "little")
    return [cpu for cpu in range(nr) if bits >> cpu & 1] or [0]


def cfs_rq_tasks(r: Kernel, lay: TaskLayout, cfs_rq: int, view: Walk, depth: int = 0) -> None:
    """Tasks queued on a struct cfs_rq (descending into group entities' my_q)."""
    root = r.u64(cfs_rq + r.offsetof("cfs_rq", "tasks_timeline"))
    if root is None:
        view.stop(f"unreadable cfs_rq {cfs_rq:#x}")
        return
    run_node = r.offsetof("sched_entity", "run_node")
    has_my_q = r.has_member("sched_entity", "my_q")  # CONFIG_FAIR_GROUP_SCHED
    for node in rb_for_each(r, root, view):
        se = node - run_node
        my_q = r.u64(se + r.offsetof("sched_entity", "my_q")) if has_my_q else 0
        if my_q and depth < 16:
            cfs_rq_tasks(r, lay, my_q, view, depth + 1)
        elif not my_q:
            view.items.add(se - lay.se)


def rt_rq_tasks(r: Kernel, lay: TaskLayout, rt_rq: int, view: Walk) -> None:
    """Tasks queued on a struct rt_rq's priority array (task entities only)."""
    queue = rt_rq + r.offsetof("rt_rq", "active") + r.offsetof("rt_prio_array", "queue")
    count = r.array_count("rt_prio_array", "queue")
    heads = r.read(queue, 16 * count)
    if heads is None:
        view.stop(f"unreadable rt_rq {rt_rq:#x}")
        return
    run_list = r.offsetof("sched_rt_entity", "run_list")
    my_q = r.offsetof("sched_rt_entity", "my_q") if r.has_member("sched_rt_entity", "my_q") else None
    for i in range(count):
        head = queue + 16 * i
        first = _Q.unpack_from(heads, 16 * i)[0]
        if first == head:
            continue
        for node in list_for_each(r, head, view, first=first):
            rt_se = node - run_list
            if my_q is None or not r.u64(rt_se + my_q):
                view.items.add(rt_se - lay.rt)


def runqueue_tasks(r: Kernel, lay: TaskLayout, view: Walk) -> set[int]:
    """Fill ``view`` from each online CPU's struct rq (curr, CFS tree, RT queues); returns the idle tasks."""
    idle = set()
    for cpu in online_cpus(r):
        rq = per_cpu_ptr(r, "runqueues", cpu)
        if rq is None:
            view.stop(f"no runqueue for cpu {cpu}")
            continue
        curr, idle_task = r.u64(rq + r.offsetof("rq", "curr")), r.u64(rq + r.offsetof("rq", "idle"))
        if idle_task:
            idle.add(idle_task)
        if curr and curr != idle_task:
            view.items.add(curr)
        cfs_rq_tasks(r, lay, rq + r.offsetof("rq", "cfs"), view)
        rt_rq_tasks(r, lay, rq + r.offsetof("rq", "rt"), view)
    return idle


# -- validating scan ----------------------------------------------------------


@dataclass
class TaskCheck:
    """What validate_task found: plausible fields, and which back-links hold."""

    plausible: bool
    linked: bool = False  # task->tasks.next->prev == &task->tasks
    registered: bool = False  # task->thread_pid->tasks[PIDTYPE_PID].first == &task->pid_links[0]

    @property
    def ok(self) -> bool:
        return self.plausible and (self.linked or self.registered)


def validate_task(r: Kernel, lay: TaskLayout, t: TaskFields, sched_classes: frozenset[int]) -> TaskCheck:
    """Check a struct task_struct candidate: field ranges, then its list and pid back-links."""
    plausible = (
        t.comm_ok and 0 <= t.pid <= PID_MAX_LIMIT and 0 <= t.tgid <= PID_MAX_LIMIT
        and t.state < TASK_STATE_LIMIT and t.exit_state in EXIT_STATES
        and (t.mm == 0 or r.is_kernel_pointer(t.mm))
        and r.is_kernel_pointer(t.tasks_next) and (r.is_kernel_pointer(t.tasks_prev) or t.tasks_prev == LIST_POISON2)
        and (t.thread_pid == 0 or r.is_kernel_pointer(t.thread_pid))
        and (not sched_classes or t.sched_class in sched_classes))
    if not plausible:
        return TaskCheck(False)
    linked = r.u64(t.tasks_next + 8) == t.addr + lay.tasks
    registered = bool(t.thread_pid) and pid_task(r, lay, t.thread_pid) == t.addr
    return TaskCheck(True, linked, registered)


def sched_class_addresses(r: Kernel) -> frozenset[int]:
    """&stop_sched_class, &dl_sched_class, ...: the values task->sched_class may hold."""
    names = ("stop_sched_class", "dl_sched_class", "rt_sched_class", "fair_sched_class", "idle_sched_class",
             "ext_sched_class")
    return frozenset(a for a in (r.symbol(n) for n in names) if a is not None)


@dataclass
class SlabCache:
    """Where a struct kmem_cache's objects are: slab addresses, objects per slab, stride, left pad, order."""

    slabs: list[int]
    objects: int
    size: int
    red_left_pad: int
    order: int


def task_struct_slabs(r: Kernel) -> Optional[SlabCache]:
    """The slabs of task_struct_cachep (struct kmem_cache *).

    Finds the head struct page/slab of each slab page in the vmemmap whose
    slab_cache is the cache and whose PG_slab flag is set. None when the
    kernel lacks what this needs (SLUB struct slab, vmemmap_base).
    """
    cachep, vmemmap_sym, pob_sym = r.symbol("task_struct_cachep"), r.symbol("vmemmap_base"), r.symbol("page_offset_base")
    if None in (cachep, vmemmap_sym, pob_sym):
        return None
    cache, vmemmap, pob = r.u64(cachep), r.u64(vmemmap_sym), r.u64(pob_sym)
    if not (cache and vmemmap and pob):
        return None
    # struct slab split out of struct page in 5.17 (d122019bf061 "mm: Split slab into its own type").
    page_type = "slab" if r.has_member("slab", "slab_cache") else "page"
    cache_off = r.offsetof(page_type, "slab_cache")
    psize = r.sizeof("page")
    oo = r.u32(cache + r.offsetof("kmem_cache", "oo"))
    size = r.u32(cache + r.offsetof("kmem_cache", "size"))
    pad = r.u32(cache + r.offsetof("kmem_cache", "red_left_pad")) if r.has_member("kmem_cache", "red_left_pad") else 0
    if not oo or not size:
        return None
    objects, order = oo & 0xFFFF, oo >> 16
    try:
        pg_slab = r.module.get_enumeration("pageflags").choices.get("PG_slab")
    except exceptions.SymbolError:
        pg_slab = None
    max_pfn = r.u64(r.symbol("max_pfn")) if r.symbol("max_pfn") else None
    if not max_pfn:
        phys = r.context.layers[r.layer.config["memory_layer"]]
        max_pfn = (phys.maximum_address + 1) // PAGE_SIZE
    needle = _Q.pack(cache)
    slabs = []
    chunk_pages = 32768  # 2 MiB of struct page at a time
    for first_pfn in range(0, max_pfn, chunk_pages):
        npages = min(chunk_pages, max_pfn - first_pfn)
        data = r.read(vmemmap + first_pfn * psize, npages * psize, pad=True)
        if data is None:
            continue
        i = data.find(needle)
        while i >= 0:
            if i % psize == cache_off:
                pfn = first_pfn + i // psize
                flags = _Q.unpack_from(data, i - cache_off)[0]
                if pg_slab is None or flags >> pg_slab & 1:
                    slabs.append(pob + pfn * PAGE_SIZE)
            i = data.find(needle, i + 1)
    return SlabCache(slabs, objects, size, pad, order)


def scan_task_slabs(r: Kernel, lay: TaskLayout, view: Walk,
                    fields: dict[int, TaskFields]) -> None:
    """Fill ``view`` with validated task_structs carved from the task_struct slabs.

    Every object slot of every slab is checked with :func:`validate_task`;
    the fields parsed on the way are stored in ``fields``.
    """
    found = task_struct_slabs(r)
    if found is None:
        view.stop("no task_struct slab cache in this kernel's profile")
        return
    classes = sched_class_addresses(r)
    slab_bytes = PAGE_SIZE << found.order
    for slab in found.slabs:
        buf = r.read(slab, slab_bytes)
        if buf is None:
            view.stop(f"unreadable slab {slab:#x}")
            continue
        for i in range(found.objects):
            base = found.red_left_pad + i * found.size
            if base + lay.span > len(buf):
                break
            t = lay.parse(slab + base, buf, base)
            if not t.comm_ok:  # free slots: cheap first filter
                continue
            if validate_task(r, lay, t, classes).ok:
                view.items.add(t.addr)
                fields[t.addr] = t


class PsXView(interfaces.plugins.PluginInterface):
    """Cross-view of processes: task list, pid IDR, run queues and a task_struct slab scan."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    VIEWS = ("task_list", "pid_hash", "runqueue", "task_scan")

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            requirements.ModuleRequirement(name="kernel", description="Linux kernel",
                                           architectures=["Intel32", "Intel64"]),
            requirements.BooleanRequirement(name="hidden_only", description="Only rows flagged Hidden",
                                            default=False, optional=True),
        ]

    @classmethod
    def collect_views(cls, context: interfaces.context.ContextInterface, kernel_module_name: str
                      ) -> tuple[dict[str, Walk], set[int], dict[int, TaskFields], Kernel, TaskLayout]:
        """Each view's tasks, the idle tasks, the fields parsed by the scan, reader and layout."""
        r = Kernel.from_context(context, kernel_module_name)
        lay = TaskLayout(r)
        views = {name: Walk(name) for name in cls.VIEWS}
        fields: dict[int, TaskFields] = {}
        process_tasks(r, views["task_list"])
        pid_hash_tasks(r, lay, views["pid_hash"])
        idle = runqueue_tasks(r, lay, views["runqueue"])
        scan_task_slabs(r, lay, views["task_scan"], fields)
        init_task = r.symbol("init_task")
        idle.add(init_task)
        return views, idle, fields, r, lay

    @classmethod
    def cross_view(cls, context: interfaces.context.ContextInterface, kernel_module_name: str
                   ) -> tuple[list[tuple], dict[str, Walk]]:
        """Rows (pid, task, TaskFields or None, hidden, notes) sorted by pid, and the views."""
        views, idle, fields, r, lay = cls.collect_views(context, kernel_module_name)
        for v in views.values():
            if v.partial:
                vollog.warning(f"psxview: {v.name} walk incomplete: {v.partial}")
        tasks = set().union(*(v.items for v in views.values())) - idle
        others = ("pid_hash", "task_scan")
        suspects = {t for t in tasks if t not in views["task_list"].items
                    and any(t in views[o].items for o in others)}
        recheck = ""
        if suspects:
            # The guest runs on: walk the list once more before calling anything hidden.
            again = Walk("task_list")
            process_tasks(r, again)
            views["task_list"].items |= again.items & suspects
            suspects -= again.items
            recheck = again.partial
        classes = sched_class_addresses(r)
        rows = []
        for task in tasks:
            t = fields.get(task) or lay.read(r, task)
            notes = []
            hidden = False
            if t is None:
                notes.append("unreadable task_struct")
            if task in suspects:
                # Still alive and registered under its pid? Otherwise it exited while we looked.
                now = lay.read(r, task)
                check = validate_task(r, lay, now, classes) if now is not None else TaskCheck(False)
                node = task + lay.tasks
                in_list = (check.linked and now.tasks_next != node
                           and r.u64(now.tasks_prev) == node)
                if in_list:
                    # Both neighbours point at it, so a forward walk reaches it: the
                    # walks raced the running guest (a task being linked), nothing hides it.
                    views["task_list"].items.add(task)
                    notes.append("linked while we looked")
                elif check.registered and now.exit_state != 0x10 and recheck:
                    notes.append(f"not in task list (unconfirmed: {recheck})")
                elif check.registered and now.exit_state != 0x10:
                    hidden = True
                    notes.append("not in task list")
                    if task not in views["pid_hash"].items and not views["pid_hash"].partial:
                        notes.append("not in pid hash")
                else:
                    notes.append("exited during scan")
            for v in views.values():
                if task not in v.items and v.partial:
                    notes.append(f"{v.name} partial")
            rows.append((t.pid if t else -1, task, t, hidden, notes))
        rows.sort(key=lambda row: (row[0], row[1]))
        return rows, views

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        rows, views = self.cross_view(self.context, self.config["kernel"])
        for pid, task, t, hidden, notes in rows:
            if self.config.get("hidden_only") and not hidden:
                continue
            yield 0, (format_hints.Hex(task), pid, t.comm if t else renderers.UnreadableValue(),
                      *(task in views[v].items for v in self.VIEWS), hidden, "; ".join(notes))

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [("Offset(V)", format_hints.Hex), ("PID", int), ("COMM", str), ("task_list", bool),
             ("pid_hash", bool), ("runqueue", bool), ("task_scan", bool), ("Hidden", bool), ("Notes", str)],
            self._generator())
