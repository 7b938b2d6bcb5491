"""libvirt domains as targets: lookup, QMP through libvirt, pause that keeps state.

libvirtd owns a domain's QMP socket, so we never connect to it. Everything
the monitor is needed for (RAM layout, ``gpa2hva``, ``xp``, registers,
VMCOREINFO) goes through ``virDomainQemuMonitorCommand`` (the
``libvirt_qemu`` binding), which queues our command on libvirt's own monitor
connection: libvirt keeps its monitor and ``virsh`` keeps working. The
domain's definition is only read (``XMLDesc``), never changed.

libvirt marks a domain whose monitor got a passthrough command as tainted
(``custom-monitor`` in its log); that is a runtime note, not a change of the
domain's XML or state.

Never pass ``dump-guest-memory`` through libvirt: QEMU's DUMP_COMPLETED event,
arriving with no libvirt job running, crashes libvirtd 9.0 (Debian 12) in
``qemuProcessHandleDumpCompleted``. VMCOREINFO is read from guest memory
instead (:func:`shadowvol.target.vmcoreinfo_note`).
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import VMError
from ..qemu.qmp import MonitorCommands

__all__ = ["DEFAULT_URI", "PREFIX", "LibvirtDomain", "LibvirtMonitor", "boot_key", "check_name", "connect",
           "list_domains", "lookup_domain", "state_dir"]

DEFAULT_URI = "qemu:///system"
#: ``-vm libvirt:NAME`` skips our registry.
PREFIX = "libvirt:"
_QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def _binding() -> tuple[Any, Any]:
    """The libvirt and libvirt_qemu modules, with libvirt's stderr error printer silenced."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError:
        raise VMError("libvirt domains need the libvirt Python binding: pip install "
                      "'shadowvol[libvirt]' (libvirt-python; builds against libvirt-dev)") from None
    # By default libvirt prints every error on stderr besides raising it; we
    # turn the exception into our one line instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt, libvirt_qemu


def _reason(exc: Exception) -> str:
    msg = getattr(exc, "get_error_message", lambda: None)() or str(exc)
    return " ".join(str(msg).split())[:300]


def connect(uri: str | None = None) -> Any:
    """A libvirt connection to ``uri`` (default ``qemu:///system``), or one clear VMError."""
    libvirt, _ = _binding()
    uri = uri or DEFAULT_URI
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        reason = _reason(exc)
        code, where = exc.get_error_code(), exc.get_error_domain()
        denied = code in (libvirt.VIR_ERR_AUTH_FAILED, libvirt.VIR_ERR_AUTH_UNAVAILABLE,
                          libvirt.VIR_ERR_AUTH_CANCELLED, libvirt.VIR_ERR_ACCESS_DENIED,
                          libvirt.VIR_ERR_OPERATION_DENIED) \
            or where in (libvirt.VIR_FROM_POLKIT, libvirt.VIR_FROM_DBUS, libvirt.VIR_FROM_AUTH) \
            or "permission denied" in reason.lower()
        if code == libvirt.VIR_ERR_SYSTEM_ERROR and where == libvirt.VIR_FROM_RPC and not denied:
            raise VMError(f"libvirt at {uri} is not reachable: is libvirtd running? ({reason})") from None
        if denied:
            # libvirtd answered but does not let this user manage domains (polkit, socket
            # permissions): a read-only connection is not enough to reach the monitor either.
            raise VMError(f"libvirt at {uri}: permission denied for user {_user()} ({reason}); run as "
                          "root, or as a user libvirt lets manage domains") from None
        raise VMError(f"cannot connect to libvirt at {uri}: {reason}") from None


def _user() -> str:
    import pwd

    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


class LibvirtMonitor(MonitorCommands):
    """The QMP client interface (``execute``, ``query``, ``hmp``) over libvirt's own monitor."""

    def __init__(self, domain: "LibvirtDomain", timeout: float = 10.0) -> None:
        self.domain = domain
        self.path = f"libvirt:{domain.name}"  # what error messages name
        self.timeout = timeout
        self._libvirt, self._libvirt_qemu = _binding()

    def execute(self, command: str, **arguments: Any) -> Any:
        libvirt, libvirt_qemu = self._libvirt, self._libvirt_qemu
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:
            text = libvirt_qemu.qemuMonitorCommand(self.domain.dom, json.dumps(msg), 0)
        except libvirt.libvirtError as exc:
            raise VMError(f"QMP {command} through libvirt ({self.domain.name}): {_reason(exc)}") from None
        return _reply(command, text)

    def peer_pid(self) -> int | None:
        return self.domain.pid

    def close(self) -> None:
        pass  # the connection is libvirt's

    def __enter__(self) -> "LibvirtMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reply(command: str, text: str) -> Any:
    try:
        reply = json.loads(text)
    except (TypeError, ValueError):
        raise VMError(f"QMP {command} through libvirt: reply is not JSON") from None
    if not isinstance(reply, dict):
        raise VMError(f"QMP {command} through libvirt: reply is not an object")
    if "error" in reply:
        err = reply["error"]
        desc = err.get("desc", err) if isinstance(err, dict) else err
        raise VMError(f"QMP {command}: {str(desc)[:200]}")
    if "return" not in reply:
        raise VMError(f"QMP {command}: reply has neither return nor error")
    return reply["return"]


@dataclass
class LibvirtDomain:
    """A running libvirt QEMU domain, as read from libvirt (never changed)."""

    uri: str
    name: str
    uuid: str
    dom: Any
    conn: Any
    pid: int
    memory_kib: int
    vcpus: int
    #: ``<features><vmcoreinfo state='on'/>``: the guest registers its VMCOREINFO note.
    vmcoreinfo: bool
    #: A gdbstub the domain exposes (``<qemu:commandline>`` ``-gdb``/``-s``), else None.
    gdb: str | None

    @property
    def spec(self) -> str:
        return f"{PREFIX}{self.name}"

    def monitor(self) -> LibvirtMonitor:
        return LibvirtMonitor(self)

    def running(self) -> bool:
        libvirt, _ = _binding()
        try:
            state, _reason_code = self.dom.state()
        except libvirt.libvirtError as exc:
            raise VMError(f"libvirt domain {self.name}: {_reason(exc)}") from None
        return state == libvirt.VIR_DOMAIN_RUNNING

    def suspend_if_running(self) -> bool:
        """Suspend a running domain through libvirt (its state stays libvirt's); returns
        whether it was running (a paused domain is left as it is)."""
        libvirt, _ = _binding()
        was_running = self.running()
        if was_running:
            try:
                self.dom.suspend()
            except libvirt.libvirtError as exc:
                raise VMError(f"libvirt domain {self.name}: cannot pause: {_reason(exc)}") from None
        return was_running

    def resume(self) -> None:
        """Let a domain :meth:`suspend_if_running` paused run again."""
        libvirt, _ = _binding()
        try:
            self.dom.resume()
        except libvirt.libvirtError as exc:
            raise VMError(f"libvirt domain {self.name}: cannot resume: {_reason(exc)}") from None

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # libvirtError on an already broken connection
            pass


def state_dir(dom: LibvirtDomain) -> Path:
    """Our private per-domain directory (named by the domain's UUID, never by guest text)
    for the per-boot kernel-location cache that :mod:`shadowvol.target` re-verifies each run."""
    if not re.fullmatch(r"[0-9a-f-]{36}", dom.uuid):
        raise VMError(f"libvirt domain {dom.name!r} has an unexpected UUID {dom.uuid[:40]!r}")
    return paths.private_dir(paths.run_dir() / "libvirt" / dom.uuid)


def boot_key(dom: LibvirtDomain) -> str:
    """One QEMU process's identity: pid and its start time (a restarted domain differs)."""
    try:
        stat = Path(f"/proc/{dom.pid}/stat").read_text()
    except OSError:
        raise VMError(f"libvirt domain {dom.name!r}: its QEMU (pid {dom.pid}) has exited") from None
    return f"{dom.pid}:{stat.rsplit(')', 1)[-1].split()[19]}"


def _gdb_from_xml(root: ET.Element) -> str | None:
    """The gdbstub address passed with ``<qemu:commandline>`` (``-gdb DEV`` or ``-s``)."""
    args = [a.get("value", "") for a in root.iter(f"{{{_QEMU_NS}}}arg")]
    for i, a in enumerate(args):
        if a == "-s":
            return "tcp:localhost:1234"
        if a == "-gdb" and i + 1 < len(args):
            dev = args[i + 1]
            if dev.startswith("tcp::"):
                return "tcp:localhost:" + dev[5:].split(",")[0]
            if dev.startswith(("unix:", "tcp:")):
                return dev.split(",")[0]
    return None


def lookup_domain(name: str, uri: str | None = None) -> LibvirtDomain:
    """The running QEMU domain ``name`` at ``uri``, or one clear VMError."""
    libvirt, _ = _binding()
    uri = uri or DEFAULT_URI
    conn = connect(uri)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise VMError(f"no libvirt domain named {name!r} at {uri}") from None
            raise VMError(f"libvirt at {uri}: {_reason(exc)}") from None
        try:
            state, _ = dom.state()
            if state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_CRASHED):
                what = {libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
                        libvirt.VIR_DOMAIN_CRASHED: "crashed"}[state]
                raise VMError(f"libvirt domain {name!r} is {what}: there is no guest memory to read "
                              f"(start it with 'virsh start {name}')")
            root = ET.fromstring(dom.XMLDesc(0))
        except libvirt.libvirtError as exc:
            raise VMError(f"libvirt domain {name!r}: {_reason(exc)}") from None
        if root.get("type") not in ("qemu", "kvm"):
            raise VMError(f"libvirt domain {name!r} is a {root.get('type')} domain, not QEMU")
        pid = _domain_pid(name, dom, root)
        feat = root.find("features/vmcoreinfo")
        return LibvirtDomain(
            uri=uri, name=name, uuid=dom.UUIDString(), dom=dom, conn=conn, pid=pid,
            memory_kib=int(root.findtext("currentMemory") or root.findtext("memory") or 0),
            vcpus=int(root.findtext("vcpu") or 1),
            vmcoreinfo=feat is not None and feat.get("state", "on") == "on",
            gdb=_gdb_from_xml(root))
    except BaseException:
        conn.close()
        raise


def _domain_pid(name: str, dom: Any, root: ET.Element) -> int:
    """The QEMU pid: libvirt's own record of it (virDomainGetID is not a pid). libvirt keeps
    it in its live status XML; the public API does not return it, so we read its pid file
    (``/run/libvirt/qemu/NAME.pid`` for qemu:///system), cross-checked with the process's
    ``-uuid``."""
    candidates = [f"/run/libvirt/qemu/{name}.pid",
                  os.path.expanduser(f"~/.cache/libvirt/qemu/run/{name}.pid"),
                  f"{os.environ.get('XDG_RUNTIME_DIR', '')}/libvirt/qemu/run/{name}.pid"]
    uuid = dom.UUIDString()
    for path in candidates:
        try:
            pid = int(open(path).read().strip())
        except (OSError, ValueError):
            continue
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if uuid.encode() in argv:
            return pid
    raise VMError(f"libvirt domain {name!r} runs, but its QEMU process is not visible here "
                  "(a remote URI, or another pid namespace)")


def list_domains(uri: str | None = None) -> list[dict[str, Any]]:
    """Every domain at ``uri``: name, state, pid (running ones), memory; [] when libvirt is
    not installed. Raises VMError when libvirtd cannot be reached."""
    try:
        libvirt, _ = _binding()
    except VMError:
        return []
    uri = uri or DEFAULT_URI
    conn = connect(uri)
    states = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
              libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
              libvirt.VIR_DOMAIN_CRASHED: "crashed", libvirt.VIR_DOMAIN_BLOCKED: "running",
              libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}
    out = []
    try:
        for dom in conn.listAllDomains(0):
            try:
                state = states.get(dom.state()[0], "unknown")
                root = ET.fromstring(dom.XMLDesc(0))
                pid = None
                if state in ("running", "paused"):
                    try:
                        pid = _domain_pid(dom.name(), dom, root)
                    except VMError:
                        pid = None
                out.append({"name": dom.name(), "state": state, "pid": pid,
                            "memory_mb": int(root.findtext("currentMemory") or 0) // 1024,
                            "type": root.get("type"), "gdb": _gdb_from_xml(root),
                            "vmcoreinfo": root.find("features/vmcoreinfo") is not None})
            except libvirt.libvirtError:
                continue  # undefined while we listed
    finally:
        conn.close()
    return out


_NAME_OK = re.compile(r"[^\x00-\x1f/]{1,200}")


def check_name(name: str) -> str:
    """A libvirt domain name as given by the user (no control characters, no '/')."""
    if not _NAME_OK.fullmatch(name or ""):
        raise VMError(f"invalid libvirt domain name {name[:40]!r}")
    return name
