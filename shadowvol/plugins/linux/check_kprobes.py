"""linux.check_kprobes: every registered kprobe and kretprobe, its handlers and their owner.

Reads ``kprobe_table`` (kernel/kprobes.c) through :mod:`tracing_hooks`. A
probe whose handler lives in a module, a module hidden from the module list
(``hidden:NAME``) or unknown memory is a finding: a kprobe handler can change
``regs->ip`` and so replace the probed function (the kprobe way of hooking a
syscall since ``kallsyms_lookup_name`` is no longer exported). Handlers in
kernel text (the kernel's own trace_kprobe dispatcher, used by tracefs, perf
and eBPF) are reported but are not findings here; ``linux.check_ebpf`` looks
at what eBPF attaches. shadowvol's own guest stub's probes are reported with
``Ours`` set and are never findings.
"""

from __future__ import annotations

import logging
from typing import Iterator

from volatility3.framework import interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints
from volatility3.plugins.linux import kernel_hooks
from volatility3.plugins.linux.tracing_hooks import KPROBE_FLAGS

vollog = logging.getLogger(__name__)

__all__ = ["CheckKprobes"]


class CheckKprobes(interfaces.plugins.PluginInterface):
    """Lists registered kprobes and kretprobes with their handlers' owners; flags those not in kernel text."""

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
    def probe_rows(cls, image: kernel_hooks.KernelImage) -> Iterator[tuple]:
        """(struct, kind, addr, symbol, handlers, owner, ours, flags, finding) of each probe."""
        for p in image.kprobes():
            owners = sorted({image.owner(h) for _, h in p.handlers}) or [kernel_hooks.KERNEL]
            ours = bool(p.handlers) and all(image.is_ours(h) for _, h in p.handlers)
            finding = not ours and any(o != kernel_hooks.KERNEL for o in owners)
            handlers = ", ".join(f"{role}={image.function_name(h)}" for role, h in p.handlers) or "-"
            flags = ",".join(n for bit, n in KPROBE_FLAGS.items() if p.flags & bit) or "-"
            yield (p.struct, p.kind, p.addr, p.symbol or image.describe(p.addr), handlers, ",".join(owners),
                   ours, flags, finding)

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        image = kernel_hooks.KernelImage(self.context, self.config["kernel"])
        only = bool(self.config.get("findings_only"))
        for struct_addr, kind, addr, symbol, handlers, owner, ours, flags, finding in self.probe_rows(image):
            if only and not finding:
                continue
            yield 0, (format_hints.Hex(struct_addr), kind, format_hints.Hex(addr), symbol, handlers, owner, ours,
                      flags, finding)

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [("Offset(V)", format_hints.Hex), ("Type", str), ("Address", format_hints.Hex), ("Symbol", str),
             ("Handlers", str), ("Owner", str), ("Ours", bool), ("Flags", str), ("Finding", bool)],
            self._generator())
