"""Ground truth from inside a guest, over its control serial port (ttyS1).

For tests and demos only (``vm exec``, ``vm cp``): introspection never uses it.
The guest side is ``/sbin/sv-agent`` (see guest/sv-agent); requests carry a
random token so stale output is never mistaken for an answer, and payloads
travel base64-encoded so any bytes survive the tty.

Every request has one overall deadline (lock, send and every reply line
together): a peer that dribbles bytes, floods lines or never reads cannot
hold a caller past it. Lines and replies are bounded in size, and a reply
that does not parse is a :class:`VMError`.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import secrets
import socket
import time
from pathlib import Path

from ..errors import VMError
from .registry import VMEntry

MAX_LINE = 1 << 20        # the agent's lines are base64 at 76 columns, or short status lines
MAX_REPLY = 256 << 20     # base64 of one command's output


class Console:
    """A locked session on a VM's control channel."""

    def __init__(self, entry: VMEntry, timeout: float = 30.0, sock: socket.socket | None = None) -> None:
        """Lock the channel and connect, both within ``timeout`` seconds.

        ``sock``: an already connected peer (tests), used instead of ``entry.ctl``.
        """
        self.entry = entry
        self._sock = None
        self._buf = b""
        self._lockfd = os.open(Path(entry.dir) / "ctl.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.close()
                    raise VMError(f"the control channel of {entry.name} is busy (another command "
                                  f"has held it for {timeout:.0f}s)") from None
                time.sleep(0.05)
        if sock is not None:
            self._sock = sock
            return
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            self._sock.connect(entry.ctl)
        except OSError as exc:
            self.close()
            raise VMError(f"cannot reach the control channel of {entry.name}: "
                          f"{exc.strerror or 'timed out'}") from None

    def close(self) -> None:
        if getattr(self, "_sock", None) is not None:
            self._sock.close()
            self._sock = None
        if getattr(self, "_lockfd", None) is not None:
            os.close(self._lockfd)
            self._lockfd = None

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self, deadline: float) -> bytes:
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise VMError(f"control channel of {self.entry.name}: a reply line longer than "
                              f"{MAX_LINE} bytes (not the agent?)")
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

    def _send(self, deadline: float, *parts: bytes) -> None:
        try:
            for part in parts:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self._sock.settimeout(left)  # sendall: the timeout bounds the whole call
                self._sock.sendall(part)
        except (socket.timeout, TimeoutError):
            raise TimeoutError from None
        except OSError as exc:
            raise VMError(f"control channel of {self.entry.name} failed: {exc.strerror}") from None

    def ping(self, timeout: float = 2.0) -> bool:
        tok = secrets.token_hex(6).encode()
        deadline = time.monotonic() + timeout
        try:
            self._send(deadline, b"\nSVPING " + tok + b"\n")
            self._until(tok + b" PONG", deadline)
            return True
        except TimeoutError:
            return False

    def run(self, command: str, timeout: float = 120.0) -> tuple[int, bytes]:
        """Run a shell command in the guest; returns (exit status, output)."""
        tok = secrets.token_hex(6).encode()
        deadline = time.monotonic() + timeout
        try:
            self._send(deadline, b"SVRUN " + tok + b" " + base64.b64encode(command.encode()) + b"\n")
            self._until(tok + b" BEGIN", deadline)
            body = []
            size = 0
            while True:
                line = self._readline(deadline)
                if line.startswith(tok + b" END "):
                    rc = self._status(line[len(tok) + 5:])
                    break
                size += len(line)
                if size > MAX_REPLY:
                    raise VMError(f"output of the command on {self.entry.name} exceeds {MAX_REPLY >> 20} MiB")
                body.append(line)
        except TimeoutError:
            raise VMError(f"command on {self.entry.name} did not finish within {timeout:.0f}s") from None
        try:
            return rc, base64.b64decode(b"".join(body), validate=True)
        except (binascii.Error, ValueError):
            raise VMError(f"control channel of {self.entry.name}: the command's output is not "
                          "base64 (not the agent?)") from None

    def _status(self, text: bytes) -> int:
        """An exit status the agent sent (decimal), else VMError."""
        if not text.strip().isdigit() or len(text.strip()) > 6:
            raise VMError(f"control channel of {self.entry.name}: bad status {text[:20]!r} (not the agent?)")
        return int(text.strip())

    def put(self, data: bytes, guest_path: str, timeout: float = 300.0) -> None:
        """Write ``data`` to ``guest_path`` in the guest."""
        tok = secrets.token_hex(6).encode()
        payload = base64.b64encode(data)
        deadline = time.monotonic() + timeout
        try:
            self._send(deadline, b"SVPUT " + tok + b" " + base64.b64encode(guest_path.encode()) + b" "
                       + str(len(payload)).encode() + b"\n", payload)
            rc = self._status(self._until(tok + b" PUT ", deadline))
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
