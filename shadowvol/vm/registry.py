"""The per-user VM registry: one private directory per running VM.

``<run_dir>/vms/<name>/vm.json`` records the QEMU pid and the endpoints (QMP,
gdbstub, control and console sockets, RAM file). The directory is 0700 and
the files 0600. An entry whose QEMU has died is stale and is cleaned up on
sight. This module is the one place that resolves ``-vm NAME``.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .. import paths
from ..errors import VMError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


def validate_name(name: str) -> str:
    """VM names are 1-32 of [A-Za-z0-9_-], starting alphanumeric: no path tricks."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 40 else repr(name)[:36] + "...'"
        raise VMError(f"invalid VM name {shown}: use 1-32 letters, digits, '-' or '_', "
                      "starting with a letter or digit")
    return name


@dataclass
class VMEntry:
    """What we know about one VM we started."""

    name: str
    pid: int
    release: str
    memory_mb: int
    cpus: int
    accel: str
    kaslr: bool
    stub: bool
    dir: str
    ram_file: str
    qmp: str
    gdb: str
    ctl: str
    console: str
    console_log: str
    image: str
    started: float
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.dir)

    def alive(self) -> bool:
        """True when our QEMU still runs (pid alive and it is the same QEMU)."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return f"process=shadowvol-{self.name}\0".encode() in cmdline or \
            f"process=shadowvol-{self.name},".encode() in cmdline

    def save(self) -> None:
        """Write vm.json atomically (temp file in the same dir, fsync, rename), 0600."""
        from ..safeio import atomic_write

        atomic_write(self.path / "vm.json", json.dumps(asdict(self), indent=2).encode(), mode=0o600)


def vms_dir() -> Path:
    d = paths.run_dir() / "vms"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def vm_dir(name: str) -> Path:
    return vms_dir() / validate_name(name)


@contextmanager
def locked() -> Iterator[None]:
    """Serialise registry changes (start/stop/cleanup) across processes."""
    lock = paths.run_dir() / "registry.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load(d: Path) -> VMEntry | None:
    try:
        data = json.loads((d / "vm.json").read_text())
        return VMEntry(**data)
    except (OSError, ValueError, TypeError):
        return None


def remove_files(entry_dir: Path, ram_file: str | None) -> None:
    """Delete a VM's private directory and its RAM file, but only what lies
    inside our own directories (paths resolved): a stale or forged vm.json
    naming a file elsewhere never makes us unlink it."""
    if ram_file:
        if paths.is_inside(ram_file, paths.shm_dir()) and not Path(ram_file).is_symlink():
            try:
                os.unlink(ram_file)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
    if paths.is_inside(entry_dir, vms_dir()) and not Path(entry_dir).is_symlink():
        shutil.rmtree(entry_dir, ignore_errors=True)


def cleanup_stale() -> list[str]:
    """Remove entries whose QEMU has died; returns their names."""
    removed = []
    for d in sorted(vms_dir().iterdir()):
        if not d.is_dir():
            continue
        entry = _load(d)
        if entry is None:
            # A directory without a readable vm.json: a start that never finished,
            # unless a start is in progress right now (it holds a 'starting' marker).
            if not (d / "starting").exists() or not _pid_alive_file(d / "starting"):
                remove_files(d, None)
                removed.append(d.name)
            continue
        if not entry.alive():
            remove_files(d, entry.ram_file)
            removed.append(entry.name)
    return removed


def _pid_alive_file(f: Path) -> bool:
    try:
        pid = int(f.read_text().strip())
        os.kill(pid, 0)
        return True
    except (OSError, ValueError):
        return False


def list_vms() -> list[VMEntry]:
    """Live VMs, stale ones cleaned up first."""
    with locked():
        cleanup_stale()
    out = []
    for d in sorted(vms_dir().iterdir()):
        e = _load(d) if d.is_dir() else None
        if e is not None:
            out.append(e)
    return out


def known(name: str) -> bool:
    """Whether ``name`` is a valid VM name with an entry in our registry (alive or stale)."""
    return bool(NAME_RE.fullmatch(name or "")) and (vms_dir() / name / "vm.json").exists()


def get_vm(name: str) -> VMEntry:
    """The running VM called ``name``, or a clear error."""
    d = vm_dir(name)
    entry = _load(d)
    if entry is None:
        raise VMError(f"no VM named {name!r} (see 'shadowvol vm list')")
    if not entry.alive():
        with locked():
            remove_files(d, entry.ram_file)
        raise VMError(f"VM {name!r} is not running (its QEMU, pid {entry.pid}, has exited; "
                      "stale entry removed)")
    return entry
