"""The CLI never picks a VM on the user's behalf, and nothing depends on a VM's name."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from shadowvol.cli import build_parser, main
from shadowvol.errors import VMError
from shadowvol.run import _top_parser
from shadowvol.vm.image import Image
from shadowvol.vm.qemu import want_stub


def _parsers(p: argparse.ArgumentParser, path: str = "shadowvol"):
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield from _parsers(sp, f"{path} {name}")


def test_no_vm_option_has_a_default() -> None:
    seen = 0
    for path, p in [*_parsers(build_parser()), ("shadowvol (plugin)", _top_parser())]:
        for action in p._actions:
            if "-vm" in action.option_strings:
                seen += 1
                assert action.default is None, f"{path}: -vm defaults to {action.default!r}"
    assert seen >= 5  # run, read, bench, trace, trace-check


@pytest.mark.parametrize("argv", [["trace-check"], ["trace"], ["bench", "reads"]])
def test_vm_required(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    assert "-vm" in capsys.readouterr().err


def _image(tmp_path: Path, stub: bool) -> Image:
    (tmp_path / "manifest.json").write_text('{"stub": %s}' % ("true" if stub else "false"))
    return Image("6.1.0-test", tmp_path)


def test_stub_default_follows_the_image_not_the_name(tmp_path: Path) -> None:
    assert want_stub(_image(tmp_path, True), None) is True
    assert want_stub(_image(tmp_path, True), False) is False
    assert want_stub(_image(tmp_path, False), None) is False
    with pytest.raises(VMError, match="no guest stub"):
        want_stub(_image(tmp_path, False), True)


def test_no_vm_name_rule_in_the_package() -> None:
    import shadowvol.vm.qemu as q

    assert not hasattr(q, "DEFAULT_STUB_VM")
    src = Path(q.__file__).read_text()
    assert "web01" not in src


def test_help_shows_the_main_job_first(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("usage: shadowvol (-vm SPEC | -f DUMP)") and "PLUGIN" in lines[0]
    assert "shadowvol -vm NAME PLUGIN" in out and "shadowvol -f DUMP PLUGIN" in out
    assert "shadowvol plugins" in out and "e.g. shadowvol -vm" in out
    assert out.index("--partial") < out.index("commands:") < out.index("trace-check")


def test_subcommand_help_is_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["vm", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: shadowvol vm ") and "The main job" not in out


def test_no_arguments_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("usage: shadowvol (-vm SPEC | -f DUMP)") and "--help" in err


@pytest.mark.parametrize("argv, says", [
    (["bench", "sweep", "-vm", "x", "--workdir", "/nonexistent-dir"], "--workdir /nonexistent-dir is not a directory"),
    (["bench", "scale", "-vm", "x", "--tasks", "1,two"], "--tasks takes task counts"),
    (["bench", "scale", "-vm", "x", "--tasks", ""], "--tasks takes task counts"),
])
def test_bench_options_are_checked_before_any_work(argv: list[str], says: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A bad option is one line and a non-zero exit, before a VM is looked up."""
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert says in err and "internal error" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["watch", "-vm", "libvirt:dom1", "--connect", "qemu:///session", "linux.pslist"],
                                  ["snapshot", "-vm", "libvirt:dom1", "--connect", "qemu:///session", "-o", "NEW"],
                                  ["diff", "SNAP", "-vm", "libvirt:dom1", "--connect", "qemu:///session"]])
def test_connect_reaches_libvirt(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """snapshot, watch and diff pass --connect on to the one resolver: the domain is looked
    up at that URI (never the default one), and a failed lookup is one line."""
    from shadowvol.vm import libvirt

    asked: list[tuple[str, str | None]] = []

    def lookup(name: str, uri: str | None = None):
        asked.append((name, uri))
        raise VMError(f"no libvirt domain named {name!r} at {uri}")

    monkeypatch.setattr(libvirt, "lookup_domain", lookup)
    (tmp_path / "SNAP").mkdir()
    (tmp_path / "SNAP" / "manifest.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("shadowvol.diff._both_sides",  # one process: the fake lookup is seen
                        lambda a, b, kinds, connect=None: (_side(a, kinds, connect), _side(b, kinds, connect)))
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert ("dom1", "qemu:///session") in asked, asked
    assert all(uri == "qemu:///session" for _, uri in asked)
    assert "qemu:///session" in err and "internal error" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "NEW").exists()


def _side(side, kinds, connect):
    from shadowvol.diff import _side_rows

    if side[1] is not None:  # the snapshot side: not what this test is about
        return {k: [] for k in kinds}, ""
    return _side_rows(*side, kinds, connect)


def test_diff_connect_needs_a_vm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diff", "a", "b", "--connect", "qemu:///session"]) != 0
    assert "--connect is the libvirt URI of -vm NAME" in capsys.readouterr().err


def test_bench_connect_only_where_used(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "reads", "-vm", "x", "--connect", "qemu:///session"]) != 0
    assert "does not take --connect" in capsys.readouterr().err


def test_run_control_of_a_libvirt_domain_goes_through_libvirt(monkeypatch: pytest.MonkeyPatch) -> None:
    """watch --pause-ms and snapshot pause a libvirt domain through libvirt (its state stays
    libvirt's), at the URI given, on one connection held for the watch, closed after."""
    from shadowvol import target
    from shadowvol.vm import libvirt

    calls: list[str] = []

    class Domain:
        def suspend_if_running(self) -> bool:
            calls.append("suspend")
            return True

        def resume(self) -> None:
            calls.append("resume")

        def close(self) -> None:
            calls.append("close")

    def lookup(name: str, uri: str | None = None) -> Domain:
        calls.append(f"lookup {name} {uri}")
        return Domain()

    monkeypatch.setattr(libvirt, "lookup_domain", lookup)
    with target.vm_run_control("libvirt:dom1", "qemu:///session") as run:
        assert run.pause() is True
        run.resume()
        assert run.pause() is True
        run.resume()
    assert calls == ["lookup dom1 qemu:///session", "suspend", "resume", "suspend", "resume", "close"]
    calls.clear()
    with target.vm_paused("libvirt:dom1", "qemu:///session") as was_running:
        assert was_running and calls[-1] == "suspend"
    assert calls[-2:] == ["resume", "close"]


def _entry(tmp_path: Path, argv: list[str], before: str = "") -> "subprocess.CompletedProcess":
    """``shadowvol ARGV`` through the console script's entry(), after ``before`` ran."""
    import subprocess
    import sys

    code = (f"import sys\n{before}\nsys.argv = ['shadowvol'] + {argv!r}\n"
            "from shadowvol.cli import entry\nentry()\n")
    env = {"PATH": "/usr/bin:/bin", "SHADOWVOL_RUN": str(tmp_path / "run"), "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=120, text=True, capture_output=True)


def test_entry_keeps_main_exit_code_output_and_exit_handlers(tmp_path: Path) -> None:
    """entry() skips the interpreter's teardown, not what exit does: main's exit code,
    all its output, every atexit handler, and a thread still running finishes."""
    done = tmp_path / "thread-done"
    ok = _entry(tmp_path, ["vm", "list"], "import atexit; atexit.register(lambda: print('handler ran'))")
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("handler ran") and "NAME" in ok.stdout
    bad = _entry(tmp_path, ["vm", "stop", "-vm", "no-such-vm"])
    assert bad.returncode == 1
    assert bad.stderr.startswith("shadowvol: error:") and bad.stderr.count("\n") == 1
    threaded = _entry(tmp_path, ["vm", "list"], "import threading, time, pathlib\n"
                      f"threading.Thread(target=lambda: (time.sleep(0.5), pathlib.Path({str(done)!r}).touch())).start()")
    assert threaded.returncode == 0 and done.exists()
