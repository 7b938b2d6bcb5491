"""Building out-of-tree kernel modules against extracted Debian headers.

Debian splits the headers into ``linux-headers-<release>`` (the flavour:
.config, Module.symvers, generated headers) and ``linux-headers-<ver>-common``
(the sources), and the flavour ``Makefile`` is a single line including the
common one by absolute path under /usr/src. :func:`prepare_headers` builds,
once, a sibling tree of symlinks whose Makefile includes the extracted common
tree instead; :func:`run_kbuild` then runs ``make -C <tree> M=<src>``
(:func:`shadowvol.vm.kmod.build_module` builds a guest image's modules with it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from shadowvol.errors import ProfileError
from shadowvol.safeio import atomic_write

__all__ = ["find_flavour_dir", "prepare_headers", "run_kbuild"]

_INCLUDE = re.compile(r"^\s*include\s+(\S+/Makefile)\s*$", re.M)
_PREPARED = ".shadowvol-kbuild"


def find_flavour_dir(headers_root: Path, release: str | None = None) -> Path:
    """The kbuild output directory (the one with .config and Module.symvers)
    under ``headers_root``: the directory itself, or
    ``usr/src/linux-headers-<release>`` inside an extracted package root.

    :raises ProfileError: if none, or several and ``release`` does not pick one.
    """
    headers_root = Path(headers_root)
    if (headers_root / ".config").is_file() and (headers_root / "Makefile").is_file():
        return headers_root
    candidates = sorted(p.parent for p in headers_root.glob("usr/src/linux-headers-*/.config"))
    candidates += sorted(p.parent for p in headers_root.glob("linux-headers-*/.config"))
    candidates = [c for c in candidates if not c.name.endswith(_PREPARED)]
    if release is not None:
        candidates = [c for c in candidates if c.name == f"linux-headers-{release}"] or candidates
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise ProfileError(f"{headers_root}: need exactly one kernel headers flavour (found {found})")
    return candidates[0]


def prepare_headers(headers_root: Path, release: str | None = None) -> Path:
    """A kbuild tree usable from where the headers were extracted.

    The result is ``<flavour dir>.shadowvol-kbuild`` (or a directory under the
    shadowvol cache if that is not writable): absolute symlinks to every entry
    of the flavour directory, and a Makefile whose ``include`` points at the
    extracted common tree. It is made once and reused.
    """
    flavour = find_flavour_dir(headers_root, release).resolve()
    makefile = (flavour / "Makefile").read_text()
    match = _INCLUDE.search(makefile)
    if match is None or Path(match.group(1)).is_file():
        return flavour  # self-contained, or its include already resolves
    wanted = Path(match.group(1))
    local = flavour.parent / wanted.parent.name / "Makefile"
    if not local.is_file():
        raise ProfileError(f"{flavour}/Makefile includes {wanted}, and {local} is missing too")
    makefile = makefile.replace(match.group(1), str(local))

    tree = flavour.with_name(flavour.name + _PREPARED)
    if not os.access(flavour.parent, os.W_OK):
        from shadowvol.paths import cache_dir

        tree = cache_dir() / "kbuild" / (flavour.name + _PREPARED)
    if (tree / "Makefile").is_file() and (tree / "Makefile").read_text() == makefile:
        return tree
    tmp = tree.with_name(tree.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for entry in flavour.iterdir():
        if entry.name != "Makefile":
            (tmp / entry.name).symlink_to(entry.resolve())
    atomic_write(tmp / "Makefile", makefile.encode(), mode=0o644)
    shutil.rmtree(tree, ignore_errors=True)
    tmp.rename(tree)
    return tree


def run_kbuild(tree: Path, src_dir: Path, targets: list[str], *, keep_going: bool = False,
               extra: list[str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Runs ``make -C <tree> M=<src_dir> <targets>``; returns the process
    (output captured, no exception on failure)."""
    argv = ["make", "-C", str(tree), f"M={Path(src_dir).resolve()}", f"-j{os.cpu_count() or 1}"]
    if keep_going:
        argv.append("-k")
    argv += (extra or []) + targets
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
