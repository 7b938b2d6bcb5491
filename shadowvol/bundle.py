"""Reading a snapshot folder (``shadowvol snapshot``): its manifest, memory image and profile.

Paths in a manifest are confined to the folder (no absolute paths, no
``..``, no symlinks): a manifest is data, never a way to name other files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ShadowvolError

__all__ = ["MANIFEST", "MEMORY_NAME", "SYMBOLS_NAME", "sha256_file", "is_bundle", "Bundle", "open_bundle",
           "verify_bundle"]

MANIFEST = "manifest.json"
MEMORY_NAME = "memory.lime"
SYMBOLS_NAME = "symbols"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_bundle(path: str | os.PathLike[str]) -> bool:
    """``path`` is a folder holding a snapshot manifest."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


@dataclass
class Bundle:
    """A snapshot folder, read from its manifest."""

    root: Path
    manifest: dict[str, Any]
    memory: Path
    profile: Path

    def registers(self) -> tuple[int, int] | None:
        """CR3 and CR4 of the first vCPU that has them."""
        for cpu in self.manifest.get("vcpus") or []:
            if isinstance(cpu, dict) and isinstance(cpu.get("cr3"), int):
                return cpu["cr3"], int(cpu.get("cr4") or 0)
        return None

    def vmcoreinfo(self) -> dict[str, str] | None:
        info = self.manifest.get("vmcoreinfo")
        return {str(k): str(v) for k, v in info.items()} if isinstance(info, dict) else None


def _inside(root: Path, name: Any, what: str) -> Path:
    """``root/name`` for a manifest entry, refusing anything that leaves ``root``."""
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in Path(name).parts:
        raise ShadowvolError(f"{root}/{MANIFEST}: bad {what} entry {str(name)[:60]!r}")
    path = root / name
    if path.is_symlink() or not path.is_file():
        raise ShadowvolError(f"{root}/{MANIFEST}: {what} {name[:60]!r} is not a regular file in the bundle")
    return path


def open_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read a snapshot folder's manifest; its memory and profile paths stay inside the folder."""
    root = Path(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ShadowvolError(f"{root}/{MANIFEST}: unreadable snapshot manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ShadowvolError(f"{root}/{MANIFEST}: not a snapshot manifest")
    return Bundle(root, manifest, _inside(root, manifest.get("memory"), "memory"),
                  _inside(root, manifest.get("profile"), "profile"))


def verify_bundle(path: str | os.PathLike[str]) -> list[str]:
    """Files whose sha256 differs from the manifest (or are missing); empty when all verify."""
    bundle = open_bundle(path)
    bad = []
    for name, digest in (bundle.manifest.get("sha256") or {}).items():
        try:
            if sha256_file(_inside(bundle.root, name, "hashed file")) != digest:
                bad.append(name)
        except (ShadowvolError, OSError):
            bad.append(name)
    return bad
