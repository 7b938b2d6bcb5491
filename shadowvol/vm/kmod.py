"""Build out-of-tree kernel modules for a guest image, against its Debian headers.

The headers (``linux-headers-<release>``, ``-common``, ``linux-kbuild-*``) are
extracted, not installed, by :func:`shadowvol.vm.image.prepare_headers`; here
we run kbuild on a copy of the module's source directory and return the .ko.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VMError
from ..safeio import atomic_copy

if TYPE_CHECKING:  # image.py builds the stub with build_module: no import back at run time
    from .image import Image


def headers_build_dir(image: Image) -> Path:
    """The directory to pass as ``make -C`` when building modules for ``image``."""
    from ..symbols.kbuild import prepare_headers

    if not image.headers.is_dir():
        raise VMError(f"image {image.release} has no kernel headers; rebuild it with 'shadowvol vm build'")
    return prepare_headers(image.headers, image.release)


def build_module(image: Image, src_dir: Path, out_dir: Path | None = None,
                 extra_cflags: str = "") -> list[Path]:
    """``make -C <headers> M=<copy of src_dir> modules``; returns the built .ko paths.

    ``src_dir`` holds a Kbuild (or Makefile with ``obj-m``) and the sources.
    The .ko files are copied to ``out_dir`` (default: ``src_dir``'s build
    cache in the image directory).
    """
    from ..symbols.kbuild import run_kbuild

    tree = headers_build_dir(image)
    src_dir = Path(src_dir).resolve()
    if not src_dir.is_dir():
        raise VMError(f"module source {src_dir} is not a directory")
    out = Path(out_dir) if out_dir else image.root / "modules" / src_dir.name
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shadowvol-kmod-") as tmp:
        # Build a copy, so the source tree stays clean.
        build = Path(tmp) / src_dir.name
        shutil.copytree(src_dir, build, copy_function=atomic_copy, ignore=shutil.ignore_patterns(
            "*.o", "*.ko", "*.mod*", ".*.cmd", "Module.symvers", "modules.order"))
        extra = [f"ccflags-y={extra_cflags}"] if extra_cflags else []
        if shutil.which("pahole") is None:
            # Headers that ship a BTF vmlinux (Debian's 6.12) make kbuild run
            # pahole on each .ko; module BTF is optional, so skip it.
            extra.append("CONFIG_DEBUG_INFO_BTF_MODULES=")
        proc = run_kbuild(tree, build, ["modules"], extra=extra)
        if proc.returncode != 0:
            lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
            # The compiler's first error, else a tool that is missing, else make's own.
            err = next((l for l in lines if "error:" in l or ": not found" in l),
                       next((l for l in lines if "error" in l.lower()), lines[-1] if lines else "?"))
            raise VMError(f"building module in {src_dir.name} failed: {err.strip()}")
        kos = sorted(build.glob("*.ko"))
        if not kos:
            raise VMError(f"building module in {src_dir.name} produced no .ko")
        result = []
        for ko in kos:
            atomic_copy(ko, out / ko.name, mode=0o644)  # a VM booting now loads old or new, never half
            result.append(out / ko.name)
    return result
