"""linux.check_modules: the module list against sysfs kobjects and a carve of struct module.

Models include/linux/module.h (struct module, struct module_kobject),
kernel/module/ (the ``modules`` list, ``module_kset``) and
include/linux/kobject.h (struct kset, struct kobject).

A module that removed itself from the ``modules`` list (list_del on
THIS_MODULE->list, the classic) keeps its sysfs kobject under module_kset and
its struct module in module memory: it shows as ``module_list=False`` with
``sysfs``/``carve`` True, and ``Hidden`` True.
"""

from __future__ import annotations

import logging
from typing import Iterator

from volatility3.framework import interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints
from volatility3.plugins.linux.kernel import (MODULE_STATES, Kernel, ModuleFields, ModuleLayout, Walk,
                                              carve_modules, for_each_module, list_for_each_entry)

__all__ = ["CheckModules", "module_list_modules", "module_kset_modules"]

vollog = logging.getLogger(__name__)



# -- trusting walkers ---------------------------------------------------------


def module_list_modules(r: Kernel, view: Walk) -> None:
    """Fill ``view`` from for_each_module (struct module *)."""
    view.items.update(for_each_module(r, view))


def module_kset_modules(r: Kernel, view: Walk) -> None:
    """Fill ``view`` from module_kset (struct kset *): kobject -> module_kobject -> mod.

    Built-in modules (parameters only) have a module_kobject with mod NULL; they are skipped.
    """
    kset = r.u64(r.symbol("module_kset"))
    if not kset or not r.is_kernel_pointer(kset):
        view.stop("module_kset is NULL or unreadable")
        return
    mod_off = r.offsetof("module_kobject", "mod")
    for kobj in list_for_each_entry(r, "kobject", kset + r.offsetof("kset", "list"), "entry", view):
        mod = r.u64(kobj - r.offsetof("module_kobject", "kobj") + mod_off)
        if mod and r.is_kernel_pointer(mod):
            view.items.add(mod)


# -- validating carve ---------------------------------------------------------


class CheckModules(interfaces.plugins.PluginInterface):
    """Compares the module list with sysfs (module_kset) and a carve of struct module from module memory."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    VIEWS = ("module_list", "sysfs", "carve")
    only_hidden = False

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
                      ) -> tuple[dict[str, Walk], dict[int, ModuleFields], Kernel, ModuleLayout]:
        """Each view's struct module addresses, the fields carved, reader and layout."""
        r = Kernel.from_context(context, kernel_module_name)
        lay = ModuleLayout(r)
        views = {name: Walk(name) for name in cls.VIEWS}
        fields: dict[int, ModuleFields] = {}
        module_list_modules(r, views["module_list"])
        module_kset_modules(r, views["sysfs"])
        carve_modules(r, lay, views["carve"], fields)
        return views, fields, r, lay

    @classmethod
    def cross_view(cls, context: interfaces.context.ContextInterface, kernel_module_name: str
                   ) -> tuple[list[tuple], dict[str, Walk]]:
        """Rows (name, struct module *, hidden, notes) sorted by name, and the views."""
        views, fields, r, lay = cls.collect_views(context, kernel_module_name)
        for v in views.values():
            if v.partial:
                vollog.warning(f"check_modules: {v.name} walk incomplete: {v.partial}")
        listed = views["module_list"].items
        mods = set().union(*(v.items for v in views.values()))
        suspects = mods - listed
        if suspects:  # the guest runs on: walk the list once more before calling anything hidden
            again = Walk("module_list")
            module_list_modules(r, again)
            listed |= again.items & suspects
            suspects -= again.items
            if again.partial:
                vollog.warning(f"check_modules: module list re-walk incomplete: {again.partial}")
        rows = []
        for mod in mods:
            m = fields.get(mod) or lay.read(r, mod)
            notes, hidden = [], False
            if m is None or not m.name_ok:
                notes.append("unreadable struct module")
            if mod in suspects:
                if m is not None and MODULE_STATES.get(m.state) in ("LIVE", "COMING"):
                    hidden = True
                    notes.append("not in module list")
                    if mod not in views["sysfs"].items and not views["sysfs"].partial:
                        notes.append("not in sysfs")
                else:
                    notes.append(f"state {MODULE_STATES.get(m.state, '?') if m else '?'}: (un)loading")
            for v in views.values():
                if mod not in v.items and v.partial:
                    notes.append(f"{v.name} partial")
            rows.append((m.name if m and m.name_ok else "", mod, hidden, notes))
        rows.sort()
        return rows, views

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        rows, views = self.cross_view(self.context, self.config["kernel"])
        for name, mod, hidden, notes in rows:
            if (self.only_hidden or self.config.get("hidden_only")) and not hidden:
                continue
            yield 0, (format_hints.Hex(mod), name or renderers.UnreadableValue(),
                      *(mod in views[v].items for v in self.VIEWS), hidden, "; ".join(notes))

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [("Offset(V)", format_hints.Hex), ("Name", str), ("module_list", bool), ("sysfs", bool),
             ("carve", bool), ("Hidden", bool), ("Notes", str)],
            self._generator())
