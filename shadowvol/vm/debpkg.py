"""Resolve, download and extract Debian packages without installing them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Callable

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


def show(package: str) -> str:
    """``apt-cache show`` of the candidate version of ``package``."""
    out = _run(["apt-cache", "show", "--no-all-versions", package])
    if not out.strip():
        raise VMError(f"{package}: no such package in the apt lists (run apt-get update?)")
    return out


def parse_control(text: str) -> dict[str, str]:
    """Fields of the first stanza of Debian control text (``apt-cache show``);
    continuation lines are joined to their field."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" and key is not None:
            fields[key] += "\n" + line.strip()
            continue
        k, sep, v = line.partition(":")
        if sep:
            key = k.strip()
            fields[key] = v.strip()
    return fields


def parse_relations(value: str) -> list[list[str]]:
    """A relation field ("a (>= 1) | b, c:any") as alternatives of package
    names: ``[["a", "b"], ["c"]]``; versions and qualifiers dropped."""
    groups = []
    for group in value.split(","):
        names = []
        for alt in group.split("|"):
            m = re.match(r"\s*([a-z0-9][a-z0-9+.-]*)", alt)
            if m:
                names.append(m.group(1))
        if names:
            groups.append(names)
    return groups


def declared_kernel(control: str) -> str | None:
    """The kernel image package a metapackage's stanza depends on, or None
    when it depends on none (a real kernel package, which ships the image).

    Debian's metapackages (``linux-image-cloud-amd64``,
    ``linux-image-6.12-amd64``) declare ``Depends: linux-image-<release>``;
    real kernel packages depend on kmod, initramfs-tools and the like only.
    """
    fields = parse_control(control)
    for field in ("Pre-Depends", "Depends"):
        for group in parse_relations(fields.get(field, "")):
            for name in group:
                if name.startswith("linux-image-"):
                    return name
    return None


def resolve_kernel_package(package: str, show: Callable[[str], str] = show) -> str:
    """Follow metapackages to the real kernel package, by their declared
    ``Depends`` (``apt-cache show``), never by the shape of their names.

    ``linux-image-6.12-cloud-amd64`` -> ``linux-image-6.12.117+deb12-cloud-amd64``.
    Whether the result really ships ``/boot/vmlinuz-*`` is checked on its
    contents (:func:`vmlinuz_release`) once downloaded.
    """
    seen: list[str] = []
    name = package
    while True:
        if name in seen:
            raise VMError(f"cannot resolve {package}: dependency cycle ({' -> '.join(seen + [name])})")
        seen.append(name)
        nxt = declared_kernel(show(name))
        if nxt is None:
            return name
        name = nxt


def parse_listing(listing: str) -> str | None:
    """The release of the ``./boot/vmlinuz-<release>`` file in a
    ``dpkg-deb -c`` listing, or None when the package ships none."""
    for line in listing.splitlines():
        m = re.search(r"\s\./boot/vmlinuz-(\S+?)(?: -> .*)?$", line)
        if m and line.startswith("-"):  # a regular file, not a symlink or directory
            return m.group(1)
    return None


def vmlinuz_release(deb: Path, package: str) -> str:
    """The kernel release of a downloaded kernel package, from the
    ``/boot/vmlinuz-<release>`` it ships."""
    release = parse_listing(_run(["dpkg-deb", "-c", str(deb)]))
    if release is None:
        raise VMError(f"{package} ships no /boot/vmlinuz-*: not a kernel image package "
                      "(a -dbg package holds symbols only; use the image package or its metapackage)")
    return release


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
        # Into a scratch directory beside the cache, then renamed in: an
        # interrupted download never leaves a half .deb that cached() would take.
        import os
        import shutil
        import tempfile

        from ..safeio import fsync_dir

        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
        try:
            # apt drops privileges to _apt, which cannot write to a private cache dir.
            _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", *want], cwd=scratch)
            for deb in scratch.glob("*.deb"):
                fd = os.open(deb, os.O_RDONLY)
                try:
                    os.fsync(fd)  # its bytes on disk before its name is
                finally:
                    os.close(fd)
                os.replace(deb, dest / deb.name)
            fsync_dir(dest)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
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
