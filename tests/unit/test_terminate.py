"""SIGTERM and SIGHUP become an exception in the CLI, so clean-up code runs."""

from __future__ import annotations

import os
import signal

import pytest

from shadowvol.cli import terminate_as_exception
from shadowvol.errors import Terminated


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_raises_terminated_and_finally_runs(sig: int) -> None:
    before = signal.getsignal(sig)
    cleaned = []
    with pytest.raises(Terminated) as exc:
        with terminate_as_exception():
            try:
                os.kill(os.getpid(), sig)
                for _ in range(10_000_000):  # the handler runs between bytecodes
                    pass
            finally:
                os.kill(os.getpid(), sig)  # a second signal during clean-up is ignored
                cleaned.append(True)
    assert exc.value.signum == sig
    assert cleaned == [True]
    assert signal.getsignal(sig) is before  # restored after the block


def test_main_returns_128_plus_the_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    from shadowvol import cli

    def killed(argv: list[str]) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000_000):
            pass
        return 0

    monkeypatch.setattr(cli, "_main", killed)
    assert cli.main(["anything"]) == 128 + signal.SIGTERM
