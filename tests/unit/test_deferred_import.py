"""capstone is imported on first use, not at start-up: stock text_renderer behaves as
with it imported eagerly, and a plain run never loads it."""

from __future__ import annotations

import json
import subprocess
import sys

_RENDER = r"""
import json, sys
eager = sys.argv[1] == "eager"
if eager:
    import capstone
from shadowvol.volbridge import text_renderer
tr = text_renderer()
from volatility3.framework import renderers
before = type(sys.modules["capstone"]).__name__
code = bytes.fromhex("554889e54883ec10c745fc00000000e8000000004889c7c3")
out = [tr.display_disassembly(renderers.Disassembly(code, 0xffffffff81000000, arch))
       for arch in ("intel64", "intel")]
from capstone import x86
print(json.dumps({"present": tr.CAPSTONE_PRESENT, "before": before, "out": out,
                  "after": type(sys.modules["capstone"]).__name__, "x86": x86.__name__}))
"""


def _run(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _RENDER, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_disassembly_renders_as_with_capstone_imported_eagerly() -> None:
    lazy, eager = _run("lazy"), _run("eager")
    assert lazy["before"] == "DeferredModule" and eager["before"] == "module"
    assert lazy["present"] is True and lazy["out"] == eager["out"]
    assert "push\trbp" in lazy["out"][0] and "call" in lazy["out"][0]
    assert lazy["after"] == "module" and lazy["x86"] == "capstone.x86"


def test_a_plain_plugin_run_never_loads_capstone() -> None:
    code = ("import sys\nfrom shadowvol.volbridge import text_renderer\ntr = text_renderer()\n"
            "from volatility3.framework import renderers\n"
            "g = renderers.TreeGrid([('PID', int)], iter([(0, (1,))]))\n"
            "tr.QuickTextRenderer().render(g)\n"
            "print(type(sys.modules['capstone']).__name__, 'capstone.x86' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["DeferredModule", "False"]
