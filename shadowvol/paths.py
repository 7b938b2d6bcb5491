"""Where shadowvol keeps its files: an image cache and a private run directory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Cache for images, packages and profiles (``$SHADOWVOL_CACHE`` or XDG)."""
    env = os.environ.get("SHADOWVOL_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shadowvol"
    return private_dir(base)


def private_dir(path: Path) -> Path:
    """``path`` created if missing and made 0700 on every call (not only at
    creation: an older tree or a lax umask may have left it 0755)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_mode & 0o777 != 0o700:
        os.chmod(path, 0o700)
    return path


def is_inside(path: str | os.PathLike[str], *roots: Path) -> bool:
    """True if ``path``, symlinks resolved, lies strictly inside one of
    ``roots`` (also resolved): the check before deleting anything."""
    try:
        real = Path(path).resolve(strict=False)
    except (OSError, RuntimeError):
        return False
    for root in roots:
        try:
            r = Path(root).resolve(strict=False)
        except (OSError, RuntimeError):
            continue
        if real != r and real.is_relative_to(r):
            return True
    return False


def run_dir() -> Path:
    """Private (0700) directory for the VM registry, sockets and consoles."""
    env = os.environ.get("SHADOWVOL_RUN")
    if env:
        base = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "shadowvol"
    else:
        base = Path(f"/tmp/shadowvol-{os.getuid()}")
    return private_dir(base)


def shm_dir() -> Path:
    """Private (0700) directory on /dev/shm for guest RAM files."""
    env = os.environ.get("SHADOWVOL_SHM")
    base = Path(env) if env else Path(f"/dev/shm/shadowvol-{os.getuid()}")
    return private_dir(base)
