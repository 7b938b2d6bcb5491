"""A plain (non-editable) ``pip install .`` ships our plugins and runs them.

The package is built from a copy of the checkout and installed, without
dependencies and offline, into a fresh venv that sees this venv's
site-packages (volatility3, capstone, ...) through a ``.pth`` line only: this
venv's editable install of shadowvol is not active there, and the check runs
outside the checkout, so only the installed copy can be imported.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import sys, volatility3.plugins as vp
before = list(vp.__path__)
import shadowvol, shadowvol.volbridge as vb, shadowvol.run, shadowvol.cli, shadowvol.fidelity
assert list(vp.__path__) == before, "volatility3's plugin path changed at import"
pkg = shadowvol.__path__[0]
assert "/site-packages/" in pkg and not pkg.startswith(sys.argv[1]), pkg
cls = vb.load_plugin("linux.check_syscall")
f = sys.modules[cls.__module__].__file__
assert f.startswith(pkg + "/plugins/linux/"), f
assert cls.__name__ == "CheckSyscall"
assert vb.load_plugin("linux.pslist").__name__ == "PsList"  # stock plugins still load beside ours
names = [p.name for p in shadowvol.fidelity.our_plugins()]
assert "linux.psxview.PsXView" in names and "linux.check_modules.CheckModules" in names, names
print("OK", f)
"""


def test_plain_pip_install_runs_our_plugins(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    for name in ("shadowvol", "kvm_module"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]  # this venv's: deps and pip, never processed for .pth files
    (Path(purelib) / "deps.pth").write_text(ours + "\n")
    r = subprocess.run([str(py), "-I", "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
                        "--no-cache-dir", "--disable-pip-version-check", "-q", str(src)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([str(py), "-I", "-c", CHECK, str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("OK ")
