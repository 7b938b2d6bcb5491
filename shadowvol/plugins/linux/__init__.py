"""shadowvol's Linux plugins, merged into ``volatility3.plugins.linux``.

Stock vol (``vol -p plugins``) and shadowvol put this directory before
volatility3's own plugin directory on ``volatility3.plugins.__path__``, so
``volatility3.plugins.linux`` is this package. Appending the stock
``framework/plugins/linux`` directory to ``__path__`` keeps every stock Linux
plugin (``linux.pslist``, ``linux.malware...``) importable from it; a module of
ours with the same name as a stock one (``check_syscall``, ``check_idt``)
takes its place.

Imported as ``shadowvol.plugins.linux`` (shadowvol's trace and integrity code
use ``kernel.py``, the one kernel reader, which needs nothing but the standard
library) the package is left alone: no volatility3 import, no path change.
"""

import os as _os

if __name__ != "shadowvol.plugins.linux":
    from volatility3.framework import constants as _constants

    for _base in _constants.PLUGINS_PATH:
        _stock = _os.path.join(_os.path.abspath(_base), "linux")
        if _os.path.isdir(_stock) and _stock not in __path__:
            __path__.append(_stock)
