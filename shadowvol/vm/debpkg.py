"""Resolve, download and extract Debian packages without installing them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ..errors import VMError


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise VMError(f"{cmd[0]} not found: this needs a Debian host with apt and dpkg") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise VMError(f"{' '.join(cmd[:3])}: {last}")
    return proc.stdout


def depends(package: str) -> list[str]:
    """Direct ``Depends:`` of a package, as apt-cache reports them."""
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", package])
    deps = []
    for line in out.splitlines():
        m = re.match(r"\s+\|?Depends:\s+(\S+)", line)
        if m and not m.group(1).startswith("<"):
            deps.append(m.group(1))
    return deps


def resolve_kernel_package(package: str) -> str:
    """Follow metapackages (``linux-image-cloud-amd64``) to ``linux-image-<release>``.

    A real kernel package ships ``/boot/vmlinuz-<release>``; a metapackage only
    depends on one. We follow ``linux-image-*`` dependencies until the name
    carries a release (digits after ``linux-image-``).
    """
    seen = set()
    name = package
    while not re.match(r"linux-image-\d", name):
        if name in seen:
            raise VMError(f"cannot resolve {package}: dependency cycle")
        seen.add(name)
        nxt = [d for d in depends(name) if d.startswith("linux-image-")]
        if not nxt:
            raise VMError(f"{name} does not depend on a linux-image package; is it a kernel package?")
        name = nxt[0]
    if name.endswith("-dbg") or name.endswith("-unsigned"):
        raise VMError(f"{name}: pick a signed or plain kernel image package")
    return name


def kernel_release(image_package: str) -> str:
    """``linux-image-6.1.0-56-cloud-amd64`` -> ``6.1.0-56-cloud-amd64``."""
    return image_package[len("linux-image-"):]


def headers_packages(release: str) -> list[str]:
    """The packages that make a module-build tree for ``release``.

    ``linux-headers-<release>`` plus its ``-common`` and ``linux-kbuild-*``
    dependencies (compilers are not fetched: the host's gcc is used).
    """
    top = f"linux-headers-{release}"
    pkgs = [top]
    for dep in depends(top):
        if dep.startswith("linux-headers-") or dep.startswith("linux-kbuild-"):
            pkgs.append(dep)
    return pkgs


def download(packages: list[str], dest: Path) -> list[Path]:
    """``apt-get download`` each package into ``dest``; returns .debs in request order.

    Packages already in ``dest`` are not fetched again.
    """
    dest.mkdir(parents=True, exist_ok=True)

    def cached(pkg: str) -> Path | None:
        have = sorted(dest.glob(f"{pkg}_*.deb"))
        return have[-1] if have else None

    want = [pkg for pkg in packages if cached(pkg) is None]
    if want:
        # apt drops privileges to _apt, which cannot write to a private cache dir.
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", *want], cwd=dest)
    found = []
    for pkg in packages:
        deb = cached(pkg)
        if deb is None:
            raise VMError(f"apt-get download {pkg} produced no .deb")
        found.append(deb)
    return found


def extract(deb: Path, dest: Path) -> None:
    """``dpkg -x`` a package into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg", "-x", str(deb), str(dest)])
