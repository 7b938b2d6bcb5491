"""Boot and stop guests under QEMU.

Guest RAM lives in a shared file (``memory-backend-file,share=on`` on
/dev/shm), which the shadow backend maps. QMP, the gdbstub, the control serial
port (ttyS1) and the console (ttyS0, also logged to a file) listen on unix
sockets in the VM's private directory. KVM is used only when a probe shows it
boots this kernel; otherwise TCG.
"""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .. import paths
from ..errors import VMError
from ..qemu.qmp import QMPClient
from ..safeio import atomic_write
from . import registry
from .image import Image

QEMU = "qemu-system-x86_64"

def parse_memory(text: str | int) -> int:
    """'512M', '1G', '768' (MiB) -> MiB."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([MmGg]?)i?[Bb]?\s*", str(text))
    if not m:
        raise VMError(f"invalid memory size {text!r}: use e.g. 512M or 1G")
    n = int(m.group(1)) * (1024 if m.group(2).lower() == "g" else 1)
    if not 128 <= n <= 64 * 1024:
        raise VMError(f"memory size {text!r} out of range (128M..64G)")
    return n


def _qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise VMError(f"{QEMU} not found: install the qemu-system-x86 package") from None
    return out.split("\n")[0]


def probe_kvm(image: Image, timeout: float = 6.0) -> bool:
    """True when KVM can boot this kernel to its first printk.

    The host's /dev/kvm may be a paravirtual KVM (PVM) on which stock kernels
    never leave the decompressor, so opening /dev/kvm is not enough: we boot
    the kernel with no initramfs and wait for "Linux version" on the console.
    The answer is cached per host kernel, QEMU version and guest release.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    key = f"{platform.release()}|{_qemu_version()}|{image.release}"
    cache = paths.cache_dir() / "kvm-probe.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return bool(known[key])
    with tempfile.TemporaryDirectory(prefix="shadowvol-kvm-") as tmp:
        log = Path(tmp) / "console.log"
        proc = subprocess.Popen(
            [QEMU, "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "256M", "-nodefaults",
             "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(image.vmlinuz),
             "-append", "console=ttyS0 panic=-1", "-serial", f"file:{log}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ok = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and b"Linux version" in log.read_bytes():
                ok = True
                break
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        proc.kill()
        proc.wait()
    known[key] = ok
    atomic_write(cache, json.dumps(known, indent=1).encode())
    return ok


def console_tail(log: Path, lines: int = 25) -> str:
    try:
        text = log.read_bytes().decode(errors="replace")
    except OSError:
        return "(no console output)"
    text = text.replace("\r", "")
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(no console output)"


def boot_failure_cause(log: Path) -> str:
    """The console lines that explain a failed boot (initramfs errors, the panic)."""
    try:
        text = log.read_bytes().decode(errors="replace")
    except OSError:
        return "no console output"
    keys = ("Initramfs unpacking failed", "Kernel panic", "No working init found", "Run /init as init")
    hits = [re.sub(r"^\[\s*[\d.]+\]\s*", "", line.strip()) for line in text.splitlines()
            if any(k in line for k in keys[:3])]
    return "; ".join(dict.fromkeys(hits)) or "no panic message on the console"


def build_command(entry: registry.VMEntry, image: Image, accel: str, pidfile: Path,
                  qemu_log: Path) -> list[str]:
    """QEMU's argument vector for ``entry``: the monitored machine of :mod:`kvm_module.machine`."""
    from kvm_module.machine import from_vm_entry, qemu_command

    return qemu_command(from_vm_entry(entry, image, accel, pidfile, qemu_log))


def want_stub(image: Image, stub: bool | None) -> bool:
    """Whether to load the guest stub: asked for, or by default whenever ``image`` has one.

    Never depends on the VM's name. Asking for it on an image without it is a VMError.
    """
    has = bool(image.manifest.get("stub"))
    if stub is None:
        return has
    if stub and not has:
        raise VMError(f"image {image.release} has no guest stub; rebuild it with 'shadowvol vm build'")
    return bool(stub)


def start_vm(name: str, image: Image, memory: str | int = "512M", cpus: int = 1,
             kaslr: bool = True, accel: str = "auto", stub: bool | None = None,
             timeout: float = 120.0, cpu: str | None = None,
             stub_params: dict[str, str] | None = None,
             anonymous_ram: bool = False) -> registry.VMEntry:
    """Boot ``image`` as VM ``name`` and return once its control agent answers.

    ``anonymous_ram``: plain QEMU RAM instead of a shared file, as a VM
    started by someone else would have (the shadow backend then reads it
    through QMP and /proc/PID/mem). ``stub``: load the guest stub (default: whenever the image has
    it, whatever the VM's name; False opts out). ``stub_params`` are its module parameters (``points``,
    ``ring_records``, ``size_kb``, ``events``), passed on the kernel command
    line as ``shadow_stub.NAME=VALUE``.
    """
    from .console import Console

    registry.validate_name(name)
    memory_mb = parse_memory(memory)
    if not 1 <= cpus <= 64:
        raise VMError(f"invalid CPU count {cpus}")
    if accel not in ("auto", "kvm", "tcg"):
        raise VMError(f"invalid accelerator {accel!r}: auto, kvm or tcg")
    stub = want_stub(image, stub)
    for key, value in (stub_params or {}).items():
        if not re.fullmatch(r"[a-z_]+", key) or not re.fullmatch(r"[\w.,+:-]+", str(value)):
            raise VMError(f"invalid stub parameter {key}={value!r}")
    if stub_params and not stub:
        raise VMError("stub parameters given but the stub is not loaded (use stub=True / --stub)")
    if accel == "auto":
        accel = "kvm" if probe_kvm(image) else "tcg"
    d = registry.vm_dir(name)
    with registry.locked():
        registry.cleanup_stale()
        if d.exists():
            raise VMError(f"VM {name!r} is already running (stop it with 'shadowvol vm stop {name}')")
        d.mkdir(mode=0o700)
        atomic_write(d / "starting", str(os.getpid()).encode())
    entry = registry.VMEntry(
        name=name, pid=0, release=image.release, memory_mb=memory_mb, cpus=cpus, accel=accel,
        kaslr=kaslr, stub=stub, dir=str(d),
        ram_file="" if anonymous_ram else str(paths.shm_dir() / f"{name}.ram"),
        qmp=str(d / "qmp.sock"), gdb=str(d / "gdb.sock"), ctl=str(d / "ctl.sock"),
        console=str(d / "console.sock"), console_log=str(d / "console.log"),
        image=str(image.root), started=time.time(),
        extra={k: v for k, v in (("cpu", cpu), ("stub_params", stub_params)) if v})
    pidfile, qemu_log = d / "qemu.pid", d / "qemu.log"
    old_umask = os.umask(0o077)
    try:
        proc = subprocess.run(build_command(entry, image, accel, pidfile, qemu_log),
                              capture_output=True, text=True)
    except FileNotFoundError:
        registry.remove_files(d, entry.ram_file)
        raise VMError(f"{QEMU} not found: install the qemu-system-x86 package") from None
    finally:
        os.umask(old_umask)
    if proc.returncode != 0:
        registry.remove_files(d, entry.ram_file)
        msg = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
        raise VMError(f"QEMU failed to start {name}: {msg}")
    entry.pid = int(pidfile.read_text().strip())
    _restrict_modes(entry)
    entry.save()
    (d / "starting").unlink(missing_ok=True)
    deadline = time.monotonic() + timeout
    while True:
        if not entry.alive():
            tail = console_tail(Path(entry.console_log))
            cause = boot_failure_cause(Path(entry.console_log))
            registry.remove_files(d, entry.ram_file)
            raise VMError(f"VM {name} failed to boot: {cause}. Console tail:\n{tail}")
        if time.monotonic() > deadline:
            tail = console_tail(Path(entry.console_log))
            cause = boot_failure_cause(Path(entry.console_log))
            stop_vm(name)
            raise VMError(f"VM {name} did not become ready within {timeout:.0f}s ({cause}). "
                          f"Console tail:\n{tail}")
        try:
            with Console(entry) as con:
                if con.ping(timeout=2.0):
                    break
        except VMError:
            pass
        time.sleep(0.2)
    return entry


def _restrict_modes(entry: registry.VMEntry) -> None:
    """Guest RAM, sockets and logs 0600: QEMU's -daemonize sets umask 027,
    so what it creates would be 0640 (files) and 0750 (sockets).

    The console log (``logfile=`` of the console chardev) and QEMU's own
    ``-D`` log are the only files of ours not written atomically
    (:mod:`shadowvol.safeio`): QEMU appends to them as a stream for the VM's
    whole life, and a reader (``console_tail``) takes them as they are. They
    are made 0600 here, inside the VM's 0700 directory, like the rest."""
    d = Path(entry.dir)
    for f in (entry.ram_file, entry.qmp, entry.gdb, entry.ctl, entry.console, entry.console_log,
              str(d / "qemu.log"), str(d / "qemu.pid")):
        if f:
            try:
                os.chmod(f, 0o600)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise VMError(f"cannot make {f} private (0600): {exc.strerror or exc}") from None


def stop_vm(name: str, timeout: float = 10.0) -> None:
    """Quit QEMU (QMP ``quit``, then signals) and remove the VM's files."""
    d = registry.vm_dir(name)
    entry = registry._load(d)
    if entry is None:
        raise VMError(f"no VM named {name!r} (see 'shadowvol vm list')")
    if entry.alive():
        try:
            with QMPClient(entry.qmp, timeout=3.0) as q:
                q.execute("quit")
        except (VMError, OSError):
            pass
        deadline = time.monotonic() + timeout
        sig = signal.SIGTERM
        while entry.alive():
            if time.monotonic() > deadline:
                try:
                    os.kill(entry.pid, sig)
                except ProcessLookupError:
                    break
                sig = signal.SIGKILL
                deadline = time.monotonic() + 3
            time.sleep(0.05)
    with registry.locked():
        registry.remove_files(d, entry.ram_file)


def vm_state(entry: registry.VMEntry) -> str:
    """QEMU's run state (running, paused, ...), or 'unresponsive'."""
    try:
        with QMPClient(entry.qmp, timeout=2.0) as q:
            return q.run_state()[1]
    except VMError:
        return "unresponsive"
