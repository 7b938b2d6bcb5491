"""linux.hidden_modules: the modules that linux.check_modules flags Hidden (same views, fewer rows)."""

from __future__ import annotations

from volatility3.plugins.linux.check_modules import CheckModules

__all__ = ["HiddenModules"]


class HiddenModules(CheckModules):
    """Modules missing from the module list but present in sysfs or carved from module memory."""

    _version = (1, 0, 0)
    only_hidden = True
