"""The control channel (shadowvol/vm/console.py) against fake peers on a socketpair:
one overall deadline per request, bounded replies, malformed replies as VMError."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

import pytest

from shadowvol.errors import VMError
from shadowvol.vm import console
from shadowvol.vm.console import Console
from shadowvol.vm.registry import VMEntry


def _entry(d: Path) -> VMEntry:
    return VMEntry(name="fake", pid=0, release="", memory_mb=0, cpus=1, accel="tcg", kaslr=True,
                   stub=False, dir=str(d), ram_file="", qmp="", gdb="", ctl="", console="",
                   console_log="", image="", started=0.0)


def _peer(sock: socket.socket, behave) -> threading.Thread:
    """Run ``behave(sock, request_line)`` for the first request line, in a thread."""
    def main() -> None:
        buf = b""
        try:
            while b"\n" not in buf.lstrip(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            behave(sock, buf.lstrip(b"\n").split(b"\n", 1)[0])
        except OSError:
            pass
    t = threading.Thread(target=main, daemon=True)
    t.start()
    return t


def _token(request: bytes) -> bytes:
    return request.split()[1]


def _pair(tmp_path: Path, behave) -> tuple[Console, socket.socket]:
    ours, theirs = socket.socketpair()
    _peer(theirs, behave)
    return Console(_entry(tmp_path), sock=ours), theirs


def test_run_round_trip(tmp_path: Path) -> None:
    def agent(sock: socket.socket, req: bytes) -> None:
        tok = _token(req)
        out = base64.encodebytes(b"hello\n")
        sock.sendall(b"noise\n" + tok + b" BEGIN\n" + out + tok + b" END 7\n")
    con, _ = _pair(tmp_path, agent)
    with con:
        assert con.run("echo hello", timeout=5) == (7, b"hello\n")


def test_dribbling_peer_hits_the_overall_deadline(tmp_path: Path) -> None:
    """One byte every 0.1 s: each recv succeeds, the request as a whole must not outlive its deadline."""
    stop = threading.Event()

    def dribble(sock: socket.socket, req: bytes) -> None:
        while not stop.is_set():
            sock.sendall(b"x")
            time.sleep(0.1)
    con, _ = _pair(tmp_path, dribble)
    start = time.monotonic()
    with con, pytest.raises(VMError, match="did not finish within"):
        con.run("true", timeout=1.0)
    stop.set()
    assert time.monotonic() - start < 2.5


def test_flood_of_lines_hits_the_deadline(tmp_path: Path) -> None:
    stop = threading.Event()

    def flood(sock: socket.socket, req: bytes) -> None:
        while not stop.is_set():
            sock.sendall(b"event\n" * 1000)
    con, _ = _pair(tmp_path, flood)
    start = time.monotonic()
    with con:
        assert con.ping(timeout=1.0) is False
    stop.set()
    assert time.monotonic() - start < 2.5


def test_endless_line_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "MAX_LINE", 4096)
    stop = threading.Event()

    def no_newline(sock: socket.socket, req: bytes) -> None:
        while not stop.is_set():
            sock.sendall(b"A" * 1024)
            time.sleep(0.01)
    con, _ = _pair(tmp_path, no_newline)
    with con, pytest.raises(VMError, match="longer than"):
        con.run("true", timeout=10.0)
    stop.set()


def test_peer_that_never_reads(tmp_path: Path) -> None:
    """put() of more than the socket buffers hold, to a peer that reads nothing: the send times out."""
    ours, theirs = socket.socketpair()
    start = time.monotonic()
    with Console(_entry(tmp_path), sock=ours) as con, pytest.raises(VMError, match="timed out"):
        con.put(b"\0" * (8 << 20), "/tmp/x", timeout=1.0)
    assert time.monotonic() - start < 2.5
    theirs.close()


@pytest.mark.parametrize("reply", [b"END notanumber", b"END 99999999999999999999", b"END "])
def test_malformed_status(tmp_path: Path, reply: bytes) -> None:
    def agent(sock: socket.socket, req: bytes) -> None:
        tok = _token(req)
        sock.sendall(tok + b" BEGIN\n" + tok + b" " + reply + b"\n")
    con, _ = _pair(tmp_path, agent)
    with con, pytest.raises(VMError, match="bad status|did not finish"):
        con.run("true", timeout=2.0)


def test_output_not_base64(tmp_path: Path) -> None:
    def agent(sock: socket.socket, req: bytes) -> None:
        tok = _token(req)
        sock.sendall(tok + b" BEGIN\n\xff\xfe not base64 !!\n" + tok + b" END 0\n")
    con, _ = _pair(tmp_path, agent)
    with con, pytest.raises(VMError, match="not base64"):
        con.run("true", timeout=2.0)


def test_peer_closes(tmp_path: Path) -> None:
    def hang_up(sock: socket.socket, req: bytes) -> None:
        sock.close()
    con, _ = _pair(tmp_path, hang_up)
    with con, pytest.raises(VMError, match="closed"):
        con.run("true", timeout=2.0)


def test_busy_lock_has_a_deadline(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with Console(_entry(tmp_path), sock=a):
        start = time.monotonic()
        with pytest.raises(VMError, match="busy"):
            Console(_entry(tmp_path), timeout=0.3, sock=b)
        assert time.monotonic() - start < 2.0

