"""A minimal QMP (QEMU Machine Protocol) client over a unix socket.

Used for VM control (``quit``, ``query-status``, ``stop``/``cont``), for register reads
(``human-monitor-command info registers``) and by the libvmi backend for
physical reads (``xp``) when no gdbstub is available.
"""

from __future__ import annotations

import abc
import json
import socket
import struct
import time
from typing import Any, Protocol

from ..errors import VMError

#: Largest reply line accepted (``info registers`` of 64 vCPUs is ~100 KiB;
#: query-* replies are smaller).
MAX_REPLY = 8 << 20
#: Events skipped while waiting for one reply, at most.
MAX_EVENTS = 10_000


class Monitor(Protocol):
    """What the backends and the RAM-layout code need of a QEMU monitor: a
    :class:`QMPClient`, or QMP passed through libvirt (``shadowvol.vm.libvirt``)."""

    path: str

    def execute(self, command: str, **arguments: Any) -> Any: ...

    def query(self, command: str, **arguments: Any) -> dict[str, Any]: ...

    def run_state(self) -> tuple[bool, str]: ...

    def set_running(self, running: bool) -> None: ...

    def hmp(self, command_line: str) -> str: ...

    def peer_pid(self) -> int | None: ...

    def close(self) -> None: ...


class MonitorCommands(abc.ABC):
    """``query`` and ``hmp`` on top of a monitor's ``execute`` (shared by
    :class:`QMPClient` and QMP passed through libvirt)."""

    @abc.abstractmethod
    def execute(self, command: str, **arguments: Any) -> Any:
        """Send ``command`` and return its ``return``; VMError on an error reply."""

    def query(self, command: str, **arguments: Any) -> dict[str, Any]:
        """``execute`` for commands that return an object (``query-status``...)."""
        out = self.execute(command, **arguments)
        if not isinstance(out, dict):
            raise VMError(f"QMP {command}: reply is not an object")
        return out

    def run_state(self) -> tuple[bool, str]:
        """``query-status``: whether the guest runs, and QEMU's run state
        ('running', 'paused', 'debug': stopped at a debugger's breakpoint...)."""
        status = self.query("query-status")
        running = status.get("running")
        if not isinstance(running, bool):
            raise VMError(f"QMP query-status: the reply has no 'running' flag: {str(status)[:120]}")
        return running, str(status.get("status", "?"))

    def set_running(self, running: bool) -> None:
        """Resume the guest (``cont``) or pause it (``stop``)."""
        self.execute("cont" if running else "stop")

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (e.g. ``info registers``) and return its text."""
        out = self.execute("human-monitor-command", **{"command-line": command_line})
        if not isinstance(out, str):
            raise VMError(f"QMP human-monitor-command {command_line!r}: reply is not text")
        return out


class QMPClient(MonitorCommands):
    """One QMP session. ``execute`` sends a command and returns its ``return``.

    ``timeout`` bounds each exchange as a whole (greeting, capabilities, each
    command), not each ``recv``: a peer dribbling a byte at a time or flooding
    events cannot hold us past it. Replies longer than :data:`MAX_REPLY` and
    anything that is not a JSON object raise VMError.
    """

    def __init__(self, path: str, timeout: float = 10.0, sock: socket.socket | None = None) -> None:
        self.path = str(path)
        self.timeout = timeout
        self._deadline = time.monotonic() + timeout
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                raise VMError(f"cannot connect to QMP socket {self.path}: {exc.strerror or exc}") from None
        self._sock = sock
        self._buf = b""
        try:
            self.greeting = self._recv()
            if not isinstance(self.greeting.get("QMP"), dict):
                raise VMError(f"{self.path} is not a QMP socket (no QMP greeting)")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _recv(self) -> dict[str, Any]:
        """The next line as a JSON object, before the exchange's deadline."""
        while b"\n" not in self._buf:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise VMError(f"QMP socket {self.path}: no complete reply within {self.timeout:g} s")
            if len(self._buf) > MAX_REPLY:
                raise VMError(f"QMP socket {self.path}: reply longer than {MAX_REPLY} bytes")
            try:
                self._sock.settimeout(left)
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise VMError(f"QMP socket {self.path}: no complete reply within {self.timeout:g} s") from None
            except OSError as exc:
                raise VMError(f"QMP socket {self.path}: {exc.strerror or exc}") from None
            if not chunk:
                raise VMError(f"QMP socket {self.path} closed (has QEMU exited?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        if len(line) > MAX_REPLY:
            raise VMError(f"QMP socket {self.path}: reply longer than {MAX_REPLY} bytes")
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            raise VMError(f"QMP socket {self.path} sent a line that is not JSON: "
                          f"{line[:40].decode('utf-8', 'replace')!r}") from None
        if not isinstance(msg, dict):
            raise VMError(f"QMP socket {self.path} sent JSON that is not an object")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._deadline = time.monotonic() + self.timeout
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise VMError(f"QMP socket {self.path}: {exc.strerror or exc}") from None
        for _ in range(MAX_EVENTS):
            reply = self._recv()
            if "event" in reply:
                continue
            if "error" in reply:
                err = reply["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise VMError(f"QMP {command}: {str(desc)[:200]}")
            if "return" not in reply:
                raise VMError(f"QMP {command}: reply has neither return nor error")
            return reply["return"]
        raise VMError(f"QMP {command}: more than {MAX_EVENTS} events before the reply")

    def peer_pid(self) -> int | None:
        """The pid of the QEMU at the other end of the socket (SO_PEERCRED), if known."""
        try:
            creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except (OSError, AttributeError):
            return None
        pid = struct.unpack("3i", creds)[0]
        return pid or None

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> "QMPClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

