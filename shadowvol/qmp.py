"""A minimal QMP (QEMU Machine Protocol) client over a unix socket.

Used for VM control (``quit``, ``query-status``), for register reads
(``human-monitor-command info registers``) and by the libvmi backend for
physical reads (``xp``) when no gdbstub is available.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from .errors import VMError


class QMPClient:
    """One QMP session. ``execute`` sends a command and returns its ``return``."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise VMError(f"cannot connect to QMP socket {self.path}: {exc.strerror or exc}") from None
        self._buf = b""
        self.greeting = self._recv()
        if "QMP" not in self.greeting:
            raise VMError(f"{self.path} is not a QMP socket")
        self.execute("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise VMError(f"QMP socket {self.path} timed out") from None
            if not chunk:
                raise VMError(f"QMP socket {self.path} closed (has QEMU exited?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._recv()
            if "event" in reply:
                continue
            if "error" in reply:
                raise VMError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def hmp(self, command_line: str) -> str:
        """Run a human-monitor command (e.g. ``info registers``) and return its text."""
        return self.execute("human-monitor-command", **{"command-line": command_line})

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
