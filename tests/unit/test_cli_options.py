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
