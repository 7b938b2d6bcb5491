"""Exceptions shared by every layer.

:class:`ShadowvolError` is the one a user sees: its message is one line, and
the CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations


class ShadowvolError(Exception):
    """An error meant for the user: a clear one-line message."""


class VMError(ShadowvolError):
    """A VM is unknown, stopped, failed to boot, or cannot be driven."""


class ProfileError(ShadowvolError):
    """A symbol profile is missing, corrupt, or does not match the guest."""


class BackendError(ShadowvolError):
    """A memory backend cannot be opened or read (bad dump, dead VM...)."""


class TruncatedError(BackendError):
    """A dump holds less memory than its own layout says (headers, or the
    kernel's ``max_pfn`` for a raw file): whatever it answered would be
    silently partial. The CLI exits 3, as for any incomplete answer
    (``--partial`` accepts what is there)."""

    exit_code = 3


class InvalidAddressError(ShadowvolError):
    """An address cannot be read or translated.

    ``layer`` names the layer, ``address`` the faulting address, and ``entry``
    the page-table entry that stopped the walk (None for physical reads).
    """

    def __init__(self, layer: str, address: int, message: str = "", entry: int | None = None,
                 level: str | None = None) -> None:
        self.layer = layer
        self.address = address
        self.entry = entry
        self.level = level
        text = f"{layer}: invalid address {address:#x}"
        if level is not None:
            text += f" (not present at {level}"
            text += f", entry {entry:#x})" if entry is not None else ")"
        if message:
            text += f": {message}"
        super().__init__(text)


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread (as KeyboardInterrupt is for
    SIGINT) so that every ``finally`` runs: breakpoints removed, the gdbstub
    detached, a VM we paused resumed. A BaseException, so that no ``except
    Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
