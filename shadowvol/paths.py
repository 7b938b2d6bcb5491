"""Where shadowvol keeps its files: an image cache and a private run directory."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Cache for images, packages and profiles (``$SHADOWVOL_CACHE`` or XDG)."""
    env = os.environ.get("SHADOWVOL_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shadowvol"
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return base


def run_dir() -> Path:
    """Private (0700) directory for the VM registry, sockets and consoles."""
    env = os.environ.get("SHADOWVOL_RUN")
    if env:
        base = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "shadowvol"
    else:
        base = Path(f"/tmp/shadowvol-{os.getuid()}")
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(base, 0o700)
    return base


def shm_dir() -> Path:
    """Private (0700) directory on /dev/shm for guest RAM files."""
    env = os.environ.get("SHADOWVOL_SHM")
    base = Path(env) if env else Path(f"/dev/shm/shadowvol-{os.getuid()}")
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(base, 0o700)
    return base
