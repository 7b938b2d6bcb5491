"""The detach guard (shadowvol/qemu/detach_guard.py) as a real process, against
a scripted gdbstub peer listening on a unix socket.

Released after a clean detach, it never connects; if its holder goes away
without saying so, it attaches and detaches (``D``) for it. Live tests
(tests/live/test_killed_holder.py) kill real holders on a real VM.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from test_gdbstub import FakePeer, qemu_like

from shadowvol.qemu.detach_guard import DetachGuard


class Listener(threading.Thread):
    """Accepts connections on ``path`` and serves each with a QEMU-like FakePeer."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
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
