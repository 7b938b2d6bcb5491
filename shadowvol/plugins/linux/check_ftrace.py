"""linux.check_ftrace: ftrace callbacks that can redirect kernel functions, with their owner.

Reads ``ftrace_ops_list`` (kernel/trace/ftrace.c) through :mod:`tracing_hooks`:
each struct ftrace_ops, its callback, its flags and the functions it hooks
(the ``ip`` of each entry of its filter hash, the patched call sites). An ops
is a finding when its callback lies outside kernel text (a module, a module
hidden from the module list: ``hidden:NAME``, or unknown memory), or when it
has ``FTRACE_OPS_FL_IPMODIFY`` (it may rewrite the return address and so
replace the function: the ftrace way of hooking a syscall).

The kprobes' own ops (callback ``kprobe_ftrace_handler``) stands for the
kprobes placed on ftrace sites: it is owned by their handlers, is a finding
only when one of them is (see ``linux.check_kprobes``), and is never one for
shadowvol's own guest stub's probes.
"""

from __future__ import annotations

import logging
from typing import Iterator

from volatility3.framework import interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints
from volatility3.plugins.linux import kernel_hooks
from volatility3.plugins.linux.tracing_hooks import FTRACE_OPS_FL_IPMODIFY, ftrace_flag_names

vollog = logging.getLogger(__name__)

__all__ = ["CheckFtrace"]

MAX_LISTED = 16
"""Hooked functions named per row; more are counted."""


class CheckFtrace(interfaces.plugins.PluginInterface):
    """Lists registered ftrace_ops with their callback, owner and hooked functions; flags IPMODIFY or foreign callbacks."""

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
    def ops_rows(cls, image: kernel_hooks.KernelImage) -> Iterator[tuple]:
        """(struct, callback, callback name, owner, flags, hooked, finding, note) of each ftrace_ops."""
        for ops in image.ftrace_ops():
            hooked = ", ".join(image.describe(ip) for ip in ops.ips[:MAX_LISTED])
            if len(ops.ips) > MAX_LISTED:
                hooked += f", ... ({len(ops.ips)} functions)"
            if ops.all_functions:
                hooked = "all functions"
            note = ""
            if image.is_kprobe_ops(ops):
                found = [f for f in (image.kprobe_hooks(ip, ip + 1) for ip in ops.ips) if f]
                theirs = [f for f in found if not f[2]]
                owners = sorted({o for f in (theirs or found) for o in f[0].split(",")}) or [kernel_hooks.KERNEL]
                owner = ",".join(owners)
                finding = any(o != kernel_hooks.KERNEL for f in theirs for o in f[0].split(","))
                note = "kprobes on ftrace sites" + ("" if theirs or not found else " (ours)")
            else:
                owner = image.owner(ops.func)
                finding = owner != kernel_hooks.KERNEL or bool(ops.flags & FTRACE_OPS_FL_IPMODIFY)
                if ops.flags & FTRACE_OPS_FL_IPMODIFY:
                    note = "IPMODIFY: may redirect the hooked functions"
            yield (ops.struct, ops.func, image.function_name(ops.func), owner, ftrace_flag_names(ops.flags),
                   hooked or "-", finding, note)

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        image = kernel_hooks.KernelImage(self.context, self.config["kernel"])
        only = bool(self.config.get("findings_only"))
        for struct_addr, func, name, owner, flags, hooked, finding, note in self.ops_rows(image):
            if only and not finding:
                continue
            yield 0, (format_hints.Hex(struct_addr), format_hints.Hex(func), name, owner, flags, hooked, finding,
                      note)

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [("Offset(V)", format_hints.Hex), ("Callback", format_hints.Hex), ("Symbol", str), ("Owner", str),
             ("Flags", str), ("Hooked", str), ("Finding", bool), ("Notes", str)],
            self._generator())
