"""Registered kprobes and ftrace callbacks, read from the kernel's own tables.

Models kernel/kprobes.c (``kprobe_table[KPROBE_TABLE_SIZE]``: hlists of
struct kprobe; aggregated probes on one address hang on the aggregate's
``list``; a kretprobe embeds its struct kprobe ``kp``) and
kernel/trace/ftrace.c (``ftrace_ops_list``, ended by ``&ftrace_list_end``;
each struct ftrace_ops has a filter hash of struct ftrace_func_entry, the
functions it hooks, and on x86 its own trampoline the patched call sites
jump to).

Walks follow the bound and cycle policy of :mod:`kernel` (a :class:`Walk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from volatility3.framework import exceptions
from volatility3.plugins.linux.kernel import Kernel, Walk, hlist_for_each, list_for_each_entry

__all__ = ["Kprobe", "FtraceOps", "for_each_kprobe", "for_each_ftrace_ops", "ftrace_flag_names",
           "FTRACE_OPS_FL_ENABLED", "FTRACE_OPS_FL_IPMODIFY", "KPROBE_TABLE_SIZE"]

KPROBE_TABLE_SIZE = 64  # 1 << KPROBE_HASH_BITS
MAX_HASH_BITS = 16
FTRACE_OPS_FL_ENABLED = 1 << 0
FTRACE_OPS_FL_IPMODIFY = 1 << 12
# include/linux/ftrace.h, enum FTRACE_OPS_FL_*
_FTRACE_FLAGS = ("ENABLED", "DYNAMIC", "SAVE_REGS", "SAVE_REGS_IF_SUPPORTED", "RECURSION", "STUB",
                 "INITIALIZED", "DELETED", "ADDING", "REMOVING", "MODIFYING", "ALLOC_TRAMP", "IPMODIFY",
                 "PID", "RCU", "TRACE_ARRAY", "PERMANENT", "DIRECT")
KPROBE_FLAGS = {1: "GONE", 2: "DISABLED", 4: "OPTIMIZED", 8: "FTRACE"}


def ftrace_flag_names(flags: int) -> str:
    """``FTRACE_OPS_FL_*`` names set in ``flags``, comma-separated."""
    return ",".join(n for i, n in enumerate(_FTRACE_FLAGS) if flags >> i & 1)


@dataclass(frozen=True)
class Kprobe:
    """One registered probe: a struct kprobe, or the kprobe of a struct kretprobe."""

    struct: int  # struct kprobe *
    kind: str  # "kprobe" or "kretprobe"
    addr: int  # kp->addr, the probed instruction
    symbol: str  # kp->symbol_name (+offset), "" if registered by address
    handlers: tuple[tuple[str, int], ...]  # (role, function) of each non-NULL handler
    flags: int


@dataclass(frozen=True)
class FtraceOps:
    """One struct ftrace_ops on ``ftrace_ops_list``."""

    struct: int  # struct ftrace_ops *
    func: int  # ops->func, the callback
    flags: int
    trampoline: int
    trampoline_size: int
    ips: tuple[int, ...]  # the filter hash: addresses of the hooked functions' call sites
    all_functions: bool  # an empty filter hash: every traceable function


def _kprobe(k: Kernel, p: int, kretprobe_pre: Optional[int]) -> Kprobe:
    off = lambda m: k.offsetof("kprobe", m)  # noqa: E731
    addr = k.u64(p + off("addr")) or 0
    name_ptr = k.u64(p + off("symbol_name")) or 0
    symbol = (k.cstring(name_ptr, 128) or "") if name_ptr and k.is_kernel_pointer(name_ptr) else ""
    offset = k.u32(p + off("offset")) or 0
    if symbol and offset:
        symbol += f"+{offset:#x}"
    pre, post = k.u64(p + off("pre_handler")) or 0, k.u64(p + off("post_handler")) or 0
    flags = k.u32(p + off("flags")) or 0
    if kretprobe_pre is not None and pre == kretprobe_pre and k.has_member("kretprobe", "handler"):
        rp = p - k.offsetof("kretprobe", "kp")
        handlers = [("handler", k.u64(rp + k.offsetof("kretprobe", "handler")) or 0),
                    ("entry_handler", k.u64(rp + k.offsetof("kretprobe", "entry_handler")) or 0)]
        return Kprobe(p, "kretprobe", addr, symbol, tuple((r, h) for r, h in handlers if h), flags)
    handlers = [("pre_handler", pre), ("post_handler", post)]
    return Kprobe(p, "kprobe", addr, symbol, tuple((r, h) for r, h in handlers if h), flags)


def kprobe_table_size(k: Kernel) -> int:
    """Buckets of ``kprobe_table`` (struct hlist_head[]), from the profile's type when it has one."""
    if k.module is None:
        return KPROBE_TABLE_SIZE
    try:
        count = k.module.get_symbol("kprobe_table").type.vol.count
    except (AttributeError, exceptions.SymbolError):  # a symbol without a type
        return KPROBE_TABLE_SIZE
    return count if 0 < count <= 1 << MAX_HASH_BITS else KPROBE_TABLE_SIZE


def for_each_kprobe(k: Kernel, walk: Walk) -> Iterator[Kprobe]:
    """Every registered kprobe and kretprobe: each hlist of ``kprobe_table``, each aggregate's children."""
    table = k.symbol("kprobe_table")
    if table is None:
        walk.stop("the profile has no kprobe_table")
        return
    aggr = k.symbol("aggr_pre_handler")
    kretprobe_pre = k.symbol("pre_handler_kretprobe")
    hlist = k.offsetof("kprobe", "hlist")
    pre_off = k.offsetof("kprobe", "pre_handler")
    count = kprobe_table_size(k)
    heads = k.read(table, 8 * count)
    if heads is None:
        walk.stop("kprobe_table is unreadable")
        return
    for i in range(count):
        first = int.from_bytes(heads[8 * i: 8 * i + 8], "little")
        for node in hlist_for_each(k, first, walk):
            p = node - hlist
            if aggr is not None and k.u64(p + pre_off) == aggr:
                for child in list_for_each_entry(k, "kprobe", p + k.offsetof("kprobe", "list"), "list", walk):
                    yield _kprobe(k, child, kretprobe_pre)
            else:
                yield _kprobe(k, p, kretprobe_pre)


def _hash_ips(k: Kernel, hash_ptr: int, walk: Walk) -> tuple[int, ...]:
    """The ``ip`` of every struct ftrace_func_entry in a struct ftrace_hash."""
    bits = k.u64(hash_ptr + k.offsetof("ftrace_hash", "size_bits"))
    buckets = k.u64(hash_ptr + k.offsetof("ftrace_hash", "buckets"))
    if bits is None or bits > MAX_HASH_BITS or not buckets:
        return ()
    heads = k.read(buckets, 8 << bits)
    if heads is None:
        walk.stop(f"unreadable ftrace hash buckets at {buckets:#x}")
        return ()
    ip_off = k.offsetof("ftrace_func_entry", "ip") - k.offsetof("ftrace_func_entry", "hlist")
    ips = []
    for i in range(1 << bits):
        first = int.from_bytes(heads[8 * i: 8 * i + 8], "little")
        for node in hlist_for_each(k, first, walk):
            ip = k.u64(node + ip_off)
            if ip:
                ips.append(k.canonical(ip))
    return tuple(sorted(ips))


def for_each_ftrace_ops(k: Kernel, walk: Walk) -> Iterator[FtraceOps]:
    """Every struct ftrace_ops on ``ftrace_ops_list`` (up to ``&ftrace_list_end``), with its filter hash."""
    head, end = k.symbol("ftrace_ops_list"), k.symbol("ftrace_list_end")
    if head is None or end is None:
        walk.stop("the profile has no ftrace_ops_list")
        return
    o = lambda m: k.offsetof("ftrace_ops", m)  # noqa: E731
    ops, seen = k.u64(head), set()
    while ops != end:
        if ops is None or not k.is_kernel_pointer(ops):
            walk.stop(f"bad ftrace_ops pointer {ops if ops is None else hex(ops)}")
            return
        if ops in seen or len(seen) >= walk.limit:
            walk.stop(f"cycle or more than {walk.limit} ftrace_ops at {ops:#x}")
            return
        seen.add(ops)
        func = k.u64(ops + o("func")) or 0
        flags = k.u64(ops + o("flags")) or 0
        tramp = k.u64(ops + o("trampoline")) or 0 if k.has_member("ftrace_ops", "trampoline") else 0
        tsize = k.u64(ops + o("trampoline_size")) or 0 if tramp else 0
        ips: tuple[int, ...] = ()
        every = False
        if k.has_member("ftrace_ops", "func_hash"):
            fh = k.u64(ops + o("func_hash"))
            filt = k.u64(fh + k.offsetof("ftrace_ops_hash", "filter_hash")) if fh else None
            if filt:
                ips = _hash_ips(k, filt, walk)
            every = not ips
        yield FtraceOps(ops, k.canonical(func), flags & 0xFFFF_FFFF, k.canonical(tramp) if tramp else 0,
                        tsize & 0xFFFF_FFFF, ips, every)
        ops = k.u64(ops + o("next"))
