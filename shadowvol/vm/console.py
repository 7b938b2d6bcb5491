"""Ground truth from inside a guest, over its control serial port (ttyS1).

For tests and demos only (``vm exec``, ``vm cp``): introspection never uses it.
The guest side is ``/sbin/sv-agent`` (see guest/sv-agent); requests carry a
random token so stale output is never mistaken for an answer, and payloads
travel base64-encoded so any bytes survive the tty.
"""

from __future__ import annotations

import base64
import fcntl
import os
import secrets
import socket
import time
from pathlib import Path

from ..errors import VMError
from .registry import VMEntry


class Console:
    """A locked session on a VM's control channel."""

    def __init__(self, entry: VMEntry) -> None:
        self.entry = entry
        self._lockfd = os.open(Path(entry.dir) / "ctl.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lockfd, fcntl.LOCK_EX)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(entry.ctl)
        except OSError as exc:
            self.close()
            raise VMError(f"cannot reach the control channel of {entry.name}: {exc.strerror}") from None
        self._buf = b""

    def close(self) -> None:
        if getattr(self, "_sock", None) is not None:
            self._sock.close()
            self._sock = None
        if self._lockfd is not None:
            os.close(self._lockfd)
            self._lockfd = None

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            except OSError as exc:
                raise VMError(f"control channel of {self.entry.name} failed: {exc.strerror}") from None
            if not chunk:
                raise VMError(f"control channel of {self.entry.name} closed (has the VM stopped?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.rstrip(b"\r")

    def _until(self, prefix: bytes, deadline: float) -> bytes:
        while True:
            line = self._readline(deadline)
            if line.startswith(prefix):
                return line[len(prefix):]

    def _send(self, *parts: bytes) -> None:
        try:
            for part in parts:
                self._sock.sendall(part)
        except OSError as exc:
            raise VMError(f"control channel of {self.entry.name} failed: {exc.strerror}") from None

    def ping(self, timeout: float = 2.0) -> bool:
        tok = secrets.token_hex(6).encode()
        self._send(b"\nSVPING " + tok + b"\n")
        try:
            self._until(tok + b" PONG", time.monotonic() + timeout)
            return True
        except TimeoutError:
            return False

    def run(self, command: str, timeout: float = 120.0) -> tuple[int, bytes]:
        """Run a shell command in the guest; returns (exit status, output)."""
        tok = secrets.token_hex(6).encode()
        self._send(b"SVRUN " + tok + b" " + base64.b64encode(command.encode()) + b"\n")
        deadline = time.monotonic() + timeout
        try:
            self._until(tok + b" BEGIN", deadline)
            body = []
            while True:
                line = self._readline(deadline)
                if line.startswith(tok + b" END "):
                    rc = int(line.split()[-1])
                    break
                body.append(line)
        except TimeoutError:
            raise VMError(f"command on {self.entry.name} did not finish within {timeout:.0f}s") from None
        return rc, base64.b64decode(b"".join(body))

    def put(self, data: bytes, guest_path: str, timeout: float = 300.0) -> None:
        """Write ``data`` to ``guest_path`` in the guest."""
        tok = secrets.token_hex(6).encode()
        payload = base64.b64encode(data)
        self._send(b"SVPUT " + tok + b" " + base64.b64encode(guest_path.encode()) + b" "
                   + str(len(payload)).encode() + b"\n", payload)
        try:
            rc = int(self._until(tok + b" PUT ", time.monotonic() + timeout))
        except TimeoutError:
            raise VMError(f"copy to {self.entry.name}:{guest_path} timed out") from None
        if rc != 0:
            raise VMError(f"copy to {self.entry.name}:{guest_path} failed in the guest (status {rc})")


def vm_exec(entry: VMEntry, command: str, timeout: float = 120.0) -> tuple[int, bytes]:
    with Console(entry) as con:
        return con.run(command, timeout=timeout)


def vm_cp(entry: VMEntry, host_file: Path, guest_path: str) -> int:
    try:
        data = Path(host_file).read_bytes()
    except OSError as exc:
        raise VMError(f"cannot read {host_file}: {exc.strerror}") from None
    with Console(entry) as con:
        con.put(data, guest_path)
    return len(data)
