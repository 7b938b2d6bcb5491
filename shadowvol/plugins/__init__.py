"""shadowvol's own volatility3 plugins, shipped with the package.

This directory is a volatility3 plugin directory: ``linux/`` here becomes
``volatility3.plugins.linux`` when the directory is put first on
``volatility3.plugins.__path__``, as ``vol -p DIR`` does and as
:func:`shadowvol.volbridge.load_plugin` does when it loads a plugin (never at
import). The directory to pass to stock ``vol -p`` is printed by
``python -c 'import shadowvol.plugins as p; print(p.__path__[0])'``.

The plugins import each other as ``volatility3.plugins.linux.*``. The one
module shadowvol imports from here directly is ``shadowvol.plugins.linux.kernel``
(the kernel reader, standard library only), through ``shadowvol.kernel_reader``.
"""
