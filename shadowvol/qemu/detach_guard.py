"""A dead man's switch for a gdbstub session on a running VM.

QEMU 7.2 does nothing when its debugger's connection closes: breakpoints
stay inserted and a VM halted by the debugger stays halted. A process killed
while attached (SIGKILL, the OOM killer) therefore left a running guest
frozen for good: at the next breakpoint hit (run state ``debug``), or at
once when the kill came mid-read (``paused``). Only a debugger's attach and
detach (``D``: QEMU removes every breakpoint and resumes) repairs that.

:class:`DetachGuard` starts, before we attach, a small process in a session
of its own (signals sent to our process group do not reach it) that waits
on a pipe from us. :meth:`DetachGuard.release` writes ``done`` once our own
detach succeeded. If the pipe closes without it (we died, or our detach
failed), the guard attaches and detaches in our place. Only for a VM that
was running: a paused one stays paused if we die (closing the connection
leaves it so).

When the guard cannot detach either, it says so in one line on the
holder's standard error (a terminal or a file: it inherits it, unless it is
a pipe or a socket, whose reader would wait for the guard's end), so a VM
left stopped is never a silent outcome.

Run as ``python -m shadowvol.qemu.detach_guard GDB_TARGET [RETRY_S]``.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

from ..errors import BackendError
from .gdbstub import GdbStub

#: What the holder writes when it detached cleanly.
DONE = b"done\n"
#: How long the guard keeps trying to reach the gdbstub once it must act.
RETRY_S = 20.0


class DetachGuard:
    """The guard process for one gdbstub session (see the module docstring)."""

    def __init__(self, target: str | tuple[str, int], retry_s: float = RETRY_S) -> None:
        spec = target if isinstance(target, str) else f"{target[0]}:{target[1]}"
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-m", "shadowvol.qemu.detach_guard", spec, str(retry_s)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=None if stderr_outlives_us(sys.stderr) else subprocess.DEVNULL,
                start_new_session=True)
        except OSError as exc:
            raise BackendError(f"cannot start the detach guard for gdbstub {spec}: "
                               f"{exc.strerror or exc}") from None

    def release(self, detached: bool = True) -> None:
        """Let the guard go: ``detached`` says our own detach succeeded (else the
        guard detaches for us, as if we had died)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        try:
            if detached:
                proc.stdin.write(DONE)
            proc.stdin.close()
        except OSError:
            pass
        if not detached:
            return  # it works on in its own session, beyond our exit
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stderr_outlives_us(stream: object) -> bool:
    """Whether the guard may keep ``stream`` (our standard error) open after we
    are gone: a terminal, a file, a device; not a pipe or a socket, whose
    reader (a shell's ``$(...)``, a harness) waits until every writer closes it."""
    try:
        mode = os.fstat(stream.fileno()).st_mode  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):  # no descriptor (closed, replaced by an object)
        return False
    return not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode))


def guarded_attach(target: str | tuple[str, int], running: bool = True) -> tuple[GdbStub, DetachGuard | None]:
    """A :class:`~shadowvol.qemu.gdbstub.GdbStub` attached to ``target``, with its
    guard when the VM ``running`` (the caller releases it after its own detach).

    If the attach fails once connected (QEMU halted the VM, then the protocol
    broke), we detach at once, and the guard does it if we cannot."""
    guard = DetachGuard(target) if running else None
    stub = GdbStub(target, connect=False)
    try:
        stub.connect()
    except BaseException:
        detached = stub.close() if running and stub.connected else True
        if guard is not None:
            guard.release(detached)
        raise
    return stub, guard


def guarded_detach(stub: GdbStub, guard: DetachGuard | None) -> None:
    """Detach ``stub`` (QEMU resumes the VM), then release its guard: told
    ``done`` if QEMU acknowledged, else left to detach in our place."""
    detached = False
    try:
        detached = stub.close()
    finally:
        if guard is not None:
            guard.release(detached)


def detach_for_a_dead_holder(target: str, retry_s: float = RETRY_S) -> bool:
    """Attach to ``target`` and detach at once: QEMU removes every breakpoint and
    resumes the VM. Retries while QEMU still holds the dead holder's connection.
    Returns whether a detach was acknowledged."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            stub = GdbStub(target, timeout=5.0)
        except BackendError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
            continue
        try:
            stub.set_physical_mode(False)  # QEMU keeps the mode for the next debugger
        except BackendError:
            pass
        return stub.close()


def main(argv: list[str]) -> int:
    try:
        target, retry_s = argv[0], float(argv[1]) if len(argv) == 2 else RETRY_S
        if len(argv) > 2 or not 0 <= retry_s < float("inf"):
            raise ValueError
    except (IndexError, ValueError):
        print("usage: python -m shadowvol.qemu.detach_guard GDB_TARGET [RETRY_S]", file=sys.stderr)
        return 2
    said = sys.stdin.buffer.read()  # until the holder closes its end, or dies
    if said == DONE:
        return 0
    if detach_for_a_dead_holder(target, retry_s):
        return 0
    print(f"shadowvol: detach guard: the debugger on gdbstub {target} ended without detaching, and no "
          f"detach was acknowledged within {retry_s:g} s: the VM may stay stopped (run state 'debug' or "
          "'paused'); attach a debugger there and detach it to resume the VM", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
