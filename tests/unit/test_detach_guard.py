"""The detach guard (shadowvol/qemu/detach_guard.py) as a real process, against
a scripted gdbstub peer listening on a unix socket.

Released after a clean detach, it never connects; if its holder goes away
without saying so, it attaches and detaches (``D``) for it. Live tests
(tests/live/test_killed_holder.py) kill real holders on a real VM.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from test_gdbstub import FakePeer, qemu_like

from shadowvol.errors import BackendError
from shadowvol.qemu import detach_guard
from shadowvol.qemu.detach_guard import DetachGuard, guarded_attach


class Listener(threading.Thread):
    """Accepts connections on ``path`` and serves each with a QEMU-like FakePeer."""

    def __init__(self, path: Path, broken_first: bool = False) -> None:
        super().__init__(daemon=True)
        self.broken_first = broken_first  # the first connection is closed at once
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.server.settimeout(0.2)
        self.peers: list[FakePeer] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.server.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            if self.broken_first:
                self.broken_first = False
                conn.close()
                continue
            peer = FakePeer(conn, qemu_like)
            peer.start()
            self.peers.append(peer)

    def close(self) -> None:
        self.stopped.set()
        self.join(5)
        self.server.close()


def _guard(tmp_path: Path) -> tuple[DetachGuard, Listener, str]:
    path = tmp_path / "gdb.sock"
    listener = Listener(path)
    listener.start()
    return DetachGuard(str(path)), listener, str(path)


def test_released_after_a_clean_detach_it_never_connects(tmp_path):
    guard, listener, _ = _guard(tmp_path)
    proc = guard._proc
    try:
        guard.release(detached=True)
        assert proc.returncode == 0
        assert listener.peers == []
    finally:
        listener.close()


@pytest.mark.parametrize("said", [b"", b"do"])
def test_a_holder_gone_without_its_word_is_detached_for(tmp_path, said):
    """The pipe closed with nothing, or with part of the word (a holder killed
    while writing it): the guard leaves physical mode and detaches, once."""
    guard, listener, _ = _guard(tmp_path)
    proc = guard._proc
    try:
        proc.stdin.write(said)
        guard.release(detached=False)
        assert proc.wait(30) == 0
        assert [p.received[-2:] for p in listener.peers] == [[b"Qqemu.PhyMemMode:0", b"D"]]
    finally:
        listener.close()


def test_an_attach_that_breaks_once_connected_is_detached_by_the_guard(tmp_path, monkeypatch):
    """Connected (QEMU halted the VM), then the peer went away: our own detach
    cannot reach it, so the guard attaches again and detaches."""
    path = tmp_path / "gdb.sock"
    listener = Listener(path, broken_first=True)
    listener.start()
    guards: list[DetachGuard] = []
    monkeypatch.setattr(detach_guard, "DetachGuard", lambda t: guards.append(DetachGuard(t)) or guards[-1])
    try:
        with pytest.raises(BackendError):
            guarded_attach(str(path))
        assert guards[0]._proc is None  # released, not told "done"
        deadline = time.monotonic() + 30
        while not (listener.peers and listener.peers[0].received[-1:] == [b"D"]):
            assert time.monotonic() < deadline, "the guard never detached"
            time.sleep(0.05)
    finally:
        listener.close()


def test_a_refused_attach_leaves_nothing_to_undo(tmp_path):
    with pytest.raises(BackendError, match="cannot connect"):
        guarded_attach(str(tmp_path / "nobody.sock"))


def test_a_guard_that_cannot_detach_says_so_on_the_holders_stderr(tmp_path, capfd):
    """Nobody to detach from (QEMU gone, or another debugger holds the stub):
    the guard gives up after its retries, exits 1, and says why in one line on
    the standard error it inherited (here pytest's capture file)."""
    target = str(tmp_path / "nobody.sock")
    guard = DetachGuard(target, retry_s=0.3)
    proc = guard._proc
    guard.release(detached=False)
    assert proc.wait(30) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shadowvol: detach guard: ")
    assert target in err and "no detach was acknowledged within 0.3 s" in err


def test_a_guard_released_cleanly_says_nothing(tmp_path, capfd):
    guard, listener, _ = _guard(tmp_path)
    try:
        guard.release(detached=True)
        assert capfd.readouterr().err == ""
    finally:
        listener.close()


def test_the_guard_keeps_only_a_stderr_nobody_waits_on(tmp_path):
    """A pipe's or a socket's reader would wait for the guard's end: the guard
    gets /dev/null there; a file or a terminal it keeps."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    try:
        with open(tmp_path / "log", "w") as f, os.fdopen(w, "w", closefd=False) as pipe, \
                open(os.devnull, "w") as null:
            assert detach_guard.stderr_outlives_us(f) and detach_guard.stderr_outlives_us(null)
            assert not detach_guard.stderr_outlives_us(pipe)
            assert not detach_guard.stderr_outlives_us(a.makefile("w"))
        closed = open(tmp_path / "log")
        closed.close()
        assert not detach_guard.stderr_outlives_us(closed)
        assert not detach_guard.stderr_outlives_us(io.StringIO())
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


@pytest.mark.parametrize("argv", [[], ["t", "nan"], ["t", "-1"], ["t", "inf"], ["t", "1", "x"], ["t", "soon"]])
def test_the_guard_refuses_a_wrong_command_line(argv, capsys):
    assert detach_guard.main(argv) == 2
    assert capsys.readouterr().err.startswith("usage: ")
